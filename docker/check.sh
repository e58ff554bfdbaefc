#!/usr/bin/env bash
# Proves the container path end to end on a machine with Docker or podman:
#   bash docker/check.sh
# builds the image, runs `catkd --help` and `catkd demo` in a container, brings up the
# compose cluster (head + 2 workers, token authentication), checks that the Jobs API
# refuses a job without the token, submits the shard job and a 2-worker training job
# with it, checks their outputs on the shared volume, stops a shard job mid-way and
# reruns it (it resumes), and stops the cluster; then prints every step's time.
#
# Settings, from the environment:
#   ENGINE       docker or podman (default: docker when its daemon answers, else podman)
#   COMPOSE      the compose command (default: `docker compose`, or podman-compose)
#   TORCH        cpu or cuda: the image variant (default: cpu); IMAGE its tag (catkd:$variant)
#   BASE         the base image (default: python:3.11-slim)
#   BUILD_FLAGS  extra build options: a pip secret (--secret id=pipconf,src=FILE), mounts, --network
#   RAY          the host's ray CLI, which submits the jobs (default: .venv/bin/ray, from `make install`)
#   DEMO         0 skips `catkd demo` (about 9 minutes on 2 cores)
#   KEEP         1 leaves the cluster's volumes in place at the end
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${ENGINE:-}" ]]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then ENGINE=docker; else ENGINE=podman; fi
fi
if [[ -z "${COMPOSE:-}" ]]; then
    if [[ $ENGINE == docker ]]; then COMPOSE="docker compose"; else COMPOSE=podman-compose; fi
fi
TORCH=${TORCH:-cpu}
case $TORCH in cpu) IMAGE=${IMAGE:-catkd:cpu} ;; cuda) IMAGE=${IMAGE:-catkd:gpu} ;; *)
    echo "check: TORCH must be cpu or cuda, got '$TORCH'" >&2
    exit 2
    ;;
esac
RAY=${RAY:-.venv/bin/ray}
if ! command -v "$RAY" >/dev/null; then
    echo "check: no ray CLI at $RAY (run \`make install\`, or set RAY)" >&2
    exit 2
fi
PROJECT=catkd-check
compose() { CATKD_IMAGE=$IMAGE $COMPOSE -p "$PROJECT" -f docker/compose.yaml "$@"; }
in_head() { compose exec -T head "$@"; }
export RAY_ADDRESS=http://127.0.0.1:8265

declare -a SUMMARY
step() { # step NAME COMMAND...: runs it, records its time, stops the check if it fails
    local name=$1 start=$SECONDS
    shift
    echo "== $name" >&2
    if ! "$@"; then
        echo "check: step '$name' failed after $((SECONDS - start)) s" >&2
        exit 1
    fi
    SUMMARY+=("$(printf '%-34s %6d s' "$name" $((SECONDS - start)))")
    echo "-- $name: $((SECONDS - start)) s" >&2
}

build() {
    # shellcheck disable=SC2086  # BUILD_FLAGS is a list of options
    $ENGINE build ${BUILD_FLAGS:-} --build-arg BASE="${BASE:-python:3.11-slim}" --build-arg TORCH="$TORCH" \
        -f docker/Dockerfile -t "$IMAGE" .
}
demo() { $ENGINE run --rm --shm-size=2g "$IMAGE" catkd demo --out /tmp/demo; }
help() { $ENGINE run --rm "$IMAGE" catkd --help >/dev/null; }

wait_for_cluster() { # the token file, then 3 alive nodes
    local deadline=$((SECONDS + 240))
    while ((SECONDS < deadline)); do
        # A bounded probe: just after a restart ray.init can hang on the previous session's address.
        if TOKEN=$(in_head cat /auth/token 2>/dev/null) && [[ -n $TOKEN ]] && in_head timeout 30 python -c \
            'import ray, sys; ray.init(address="auto", logging_level="ERROR"); sys.exit(sum(n["Alive"] for n in ray.nodes()) < 3)' \
            >/dev/null 2>&1; then
            export TOKEN
            return 0
        fi
        sleep 2
    done
    echo "check: the cluster did not come up with 3 nodes in 240 s" >&2
    compose logs >&2 || true
    return 1
}
up() { compose up -d --scale worker=2 && wait_for_cluster; }

submit() { # submit ARGS...: a job with the token, its logs on stderr
    RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$TOKEN "$RAY" job submit --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- "$@" >&2
}
refused_without_token() {
    local out
    if out=$(env -u RAY_AUTH_TOKEN -u RAY_AUTH_MODE "$RAY" job submit --no-wait -- echo hello 2>&1); then
        echo "check: a job without the token was accepted:" >&2
        echo "$out" >&2
        return 1
    fi
    grep -q -i -E "auth|401|403|token" <<<"$out" || {
        echo "check: a job without the token failed for another reason: $out" >&2
        return 1
    }
    echo "refused without the token: $(grep -i -E 'AuthenticationError:|Unauthorized' <<<"$out" | tail -1)" >&2
}
shard_job() { submit python -m jobs.shard synthetic:shapes /shared/data/shapes --train-samples 2000 --test-samples 500; }
train_job() {
    submit python -m jobs.train_teacher student=resnet8 data=/shared/data/shapes epochs=1 num_workers=2 \
        storage_path=/shared/runs name=check-train
}
outputs_on_volume() {
    in_head sh -c 'ls /shared/data/shapes/train.index.json /shared/data/shapes/test.index.json &&
        catkd shard --verify /shared/data/shapes && ls /shared/runs/check-train' >&2
}

# A shard job stopped with the cluster mid-way, then rerun on the restarted cluster.
BIG="python -m jobs.shard synthetic:shapes /shared/data/big --train-samples 40000 --test-samples 100 --samples-per-shard 500"
start_big_shard_job() {
    # shellcheck disable=SC2086
    RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$TOKEN "$RAY" job submit --no-wait --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- $BIG >&2
    local deadline=$((SECONDS + 300))
    while ((SECONDS < deadline)); do # until some training shards are committed (their completion records)
        if [[ $(in_head sh -c 'ls /shared/data/big/_progress 2>/dev/null | grep -c "^train-"' || true) -ge 3 ]]; then return 0; fi
        sleep 1
    done
    echo "check: the big shard job committed no shards in 300 s" >&2
    return 1
}
# The cluster's containers, through the engine: podman-compose 1.6's stop and start act on
# the first replica of a scaled service only, and a worker left running across a head
# restart dies (the new head is another cluster).
nodes() { $ENGINE ps -a -q --filter "label=com.docker.compose.project=$PROJECT" "$@"; }
STOP_REPORT=""
stop_cluster() { # times the stop and reads each node's exit status (137: killed, not stopped)
    local start=$SECONDS
    # shellcheck disable=SC2046
    $ENGINE stop -t 10 $(nodes) >/dev/null
    # shellcheck disable=SC2046
    STOP_REPORT="stop of $(nodes | wc -l) nodes took $((SECONDS - start)) s; exit codes: $($ENGINE inspect \
        --format '{{.Name}}={{.State.ExitCode}}' $(nodes) | tr -d / | sort | tr '\n' ' ')"
    echo "$STOP_REPORT" >&2
}
start_cluster() { # the head first, then the workers
    # shellcheck disable=SC2046
    $ENGINE start $(nodes --filter label=com.docker.compose.service=head) >/dev/null &&
        $ENGINE start $(nodes --filter label=com.docker.compose.service=worker) >/dev/null
}
rerun_resumes() {
    local log
    # shellcheck disable=SC2086
    log=$(RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$TOKEN "$RAY" job submit --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- $BIG 2>&1) || {
        echo "$log" >&2
        return 1
    }
    grep "already complete" <<<"$log" >&2 || {
        echo "check: the rerun did not resume:" >&2
        echo "$log" >&2
        return 1
    }
    in_head catkd shard --verify /shared/data/big >&2
}
token_kept() { # the restarted cluster answers to the token made at first start
    local before=$TOKEN
    wait_for_cluster || return 1
    [[ $TOKEN == "$before" ]] || {
        echo "check: the cluster token changed across the restart" >&2
        return 1
    }
}
remove_cluster() { # containers, network and volumes (podman-compose's down leaves scaled replicas)
    # shellcheck disable=SC2046
    if [[ -n $(nodes) ]]; then $ENGINE stop -t 10 $(nodes) >/dev/null && $ENGINE rm -f $(nodes) >/dev/null 2>&1; fi
    compose down -v >/dev/null 2>&1 || true
    $ENGINE volume rm -f "${PROJECT}_shared" "${PROJECT}_auth" >/dev/null 2>&1 || true
}
cleanup() { if [[ ${KEEP:-0} != 1 ]]; then remove_cluster; fi; }

step "build $IMAGE ($ENGINE)" build
SIZE=$($ENGINE image inspect --format '{{.Size}}' "$IMAGE")
step "catkd --help" help
if [[ ${DEMO:-1} != 0 ]]; then step "catkd demo" demo; fi
trap cleanup EXIT
remove_cluster # a cluster left by an earlier check
step "cluster up (head + 2 workers)" up
step "job without the token refused" refused_without_token
step "shard job" shard_job
step "2-worker training job" train_job
step "outputs on the shared volume" outputs_on_volume
step "shard job stopped mid-way" start_big_shard_job
step "cluster stop" stop_cluster
step "cluster restart" start_cluster
step "token kept, cluster back" token_kept
step "rerun resumes" rerun_resumes
trap - EXIT
if [[ ${KEEP:-0} != 1 ]]; then step "cluster removed (with volumes)" remove_cluster; fi

echo
echo "catkd container check: $ENGINE, $IMAGE ($TORCH), $(awk -v b="$SIZE" 'BEGIN{printf "%.2f GB", b/1e9}')"
printf '%s\n' "${SUMMARY[@]}"
echo "$STOP_REPORT"
