#!/bin/sh
# Starts one node of a catkd Ray cluster in a container, with token authentication:
#   ray-node.sh head [ray start options]     generates the cluster's token on first start
#   ray-node.sh worker [ray start options]   waits for the head's token, then joins
# The token is a file ($RAY_AUTH_TOKEN_PATH) on a volume the nodes share, never in the
# image; `ray start` clusters do not turn token authentication on by themselves.
set -eu
role=${1:?usage: ray-node.sh head|worker [ray start options]}
shift
token=${RAY_AUTH_TOKEN_PATH:?set RAY_AUTH_TOKEN_PATH to the file that holds (or will hold) the cluster token}
export RAY_AUTH_MODE=token
case $role in
head)
    if [ ! -s "$token" ]; then
        # Written under another name and renamed, so a worker never reads half a token.
        (umask 077 && python -c 'import secrets; print(secrets.token_hex(32), end="")' >"$token.new")
        mv "$token.new" "$token"
        echo "ray-node: generated the cluster token in $token" >&2
    fi
    exec ray start --head --block "$@"
    ;;
worker)
    address=
    for arg in "$@"; do case $arg in --address=*) address=${arg#--address=} ;; esac; done
    # The head's token, then its GCS port, before `ray start`: after a restart the head may
    # come up after the workers (with a new IP), and a worker that cannot reach the GCS
    # gives up after 60 s.
    python - "$token" "$address" <<'PY'
import os, socket, sys, time

token, address = sys.argv[1], sys.argv[2]
deadline = time.monotonic() + 120
while not (os.path.exists(token) and os.path.getsize(token) > 0):
    if time.monotonic() > deadline:
        sys.exit(f"ray-node: no cluster token in {token} after 120 s: is the head up?")
    time.sleep(1)
host, _, port = address.rpartition(":")
while host:
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(f"ray-node: the head's GCS at {address} did not answer in 120 s")
        time.sleep(1)
PY
    exec ray start --block "$@"
    ;;
*)
    echo "ray-node: unknown role '$role' (head or worker)" >&2
    exit 2
    ;;
esac
