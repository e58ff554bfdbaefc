"""Connecting to Ray: ``RAY_ADDRESS`` when set, otherwise the machine's shared local Ray
(DESIGN section 3).

Several catkd commands started at once on one machine share one local Ray, so its
scheduler sees every CPU once and queues what does not fit, instead of each command
starting a Ray that believes it owns the whole machine. The first command starts a head
node in its own session (``ray start --head --block``); later ones find it through a
state file in a private temp folder and connect; the last one to leave stops it. A state
file whose head is gone is ignored (and replaced), as is Ray's own
``/tmp/ray/ray_current_cluster``, which is never read.

The head's processes carry ``RAY_ADDRESS`` in their environment: Ray Train's internal
helpers look a cluster up by address discovery, which fails with "Found multiple active
Ray instances" when another Ray runs on the machine (a test cluster, another user's).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray

from catkd.errors import CatkdError
from pipeline import stopping

START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 20.0  # then the head's process group is killed
# Not handed to a shared head's workers: Ray sets them per process, or this module does.
_OWN_ENV = {"RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "CUDA_VISIBLE_DEVICES", "PWD", "OLDPWD", "SHLVL", "_"}


def state_dir() -> Path:
    """Where the shared head is recorded; ``CATKD_RAY_DIR`` gives a group of commands
    (a test session, say) a local Ray of their own."""
    return Path(os.environ.get("CATKD_RAY_DIR") or Path(tempfile.gettempdir()) / f"catkd-ray-{os.getuid()}")


def init_ray(num_cpus: int | None = None, verbose: bool = False) -> None:
    """Idempotent. ``num_cpus`` caps a head this call starts (an existing one keeps its own).

    Quiet unless ``verbose``: what Ray's workers print stays in their log files (the
    head's session folder) instead of reaching this console; catkd's own lines from
    workers come through ``pipeline.console``."""
    if ray.is_initialized():
        return
    options: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": verbose}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **options)
        stopping.reinstall()  # Ray's core worker took SIGTERM to print its own lines
        return
    address = join_local_ray(num_cpus)
    # The head was started by whichever command came first, with that command's
    # environment: this command's own (credentials, Ray Train settings) goes with its job.
    env = {k: v for k, v in os.environ.items() if k not in _OWN_ENV} | {"RAY_ADDRESS": address}
    ray.init(address=address, runtime_env={"env_vars": env}, **options)
    stopping.reinstall()


def join_local_ray(num_cpus: int | None = None) -> str:
    """The address of the shared local Ray, started here if none is alive; this process
    is registered as one of its users until it exits."""
    state_dir().mkdir(mode=0o700, exist_ok=True)
    with _locked():
        state = _read_state()
        if state is None or not _head_alive(state):
            _stop_head(state)
            state = _start_head(num_cpus)
            how = "started"
        else:
            how = f"shared with {len(_live_users())} other command(s)"
        (_users_dir() / str(os.getpid())).touch()
    print(
        f"[ray] local Ray {state['address']} ({how}; dashboard http://127.0.0.1:{state['dashboard_port']})",
        file=sys.stderr,
        flush=True,
    )
    # Token authentication, with a token of our own (never the user's ~/.ray one). Ray
    # reads the mode into its config when imported: refresh it, as ray.init does when it
    # turns token mode on for a cluster it starts itself.
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": state["token"]})
    from ray._raylet import Config

    Config.initialize("")
    atexit.register(leave_local_ray)
    return state["address"]


def leave_local_ray() -> None:
    """Disconnect; stop the shared head when no other live process uses it."""
    if ray.is_initialized():
        ray.shutdown()
    with _locked():
        (_users_dir() / str(os.getpid())).unlink(missing_ok=True)
        if not _live_users():
            _stop_head(_read_state())


def loopback_head_options(port: int, dashboard_port: int) -> list[str]:
    """`ray start --head` options for a head on loopback with a free port for every other
    listener: another Ray on the machine (a test cluster, a job server) may hold Ray's
    default ones. The dashboard stays on: Ray Train V2's controller queries the state API
    it serves."""
    agent_http, agent_grpc, metrics, runtime_env, client = (_free_port() for _ in range(5))
    return [
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env}",
        f"--ray-client-server-port={client}",
        "--disable-usage-stats",
    ]


def _start_head(num_cpus: int | None) -> dict[str, Any]:
    port, dashboard = _free_port(), _free_port()
    address = f"127.0.0.1:{port}"
    token = secrets.token_hex(32)
    env = dict(os.environ, RAY_ADDRESS=address, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    env.setdefault("RAY_raylet_start_wait_time_s", "120")  # a loaded machine starts a raylet slowly (Ray's default: 60)
    # Stopped only once its last user has left, this head has nothing to drain. Ray's
    # SIGTERM handler otherwise waits (up to 30 s) for the node to go idle, which it never
    # does after a training: Ray Train's state actor is detached and holds its lease.
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    command = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",
        "start",
        "--head",
        "--block",
        *loopback_head_options(port, dashboard),
    ]
    if num_cpus:
        command.append(f"--num-cpus={num_cpus}")
    log_path = state_dir() / "head.log"
    log = open(log_path, "ab")
    offset = log.tell()
    # A session of its own: the head outlives the command that started it, and stopping
    # it signals its whole process group (keeper, GCS, raylet, dashboard, workers).
    keeper = [sys.executable, "-m", "pipeline.ray_setup", str(state_dir()), *command]
    head = subprocess.Popen(
        keeper, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    # Ready when `ray start` says so (GCS, raylet and dashboard up), not when a port opens.
    while b"Ray runtime started." not in log_path.read_bytes()[offset:]:
        if head.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, signal.SIGKILL)
            raise RuntimeError(f"the local Ray head did not start (exit {head.poll()}); its log: {log_path}")
        time.sleep(0.2)
    state = {"address": address, "pid": head.pid, "token": token, "dashboard_port": dashboard}
    path = state_dir() / "head.json"
    path.write_text(json.dumps(state))
    path.chmod(0o600)
    return state


def _stop_head(state: dict[str, Any] | None) -> None:
    (state_dir() / "head.json").unlink(missing_ok=True)
    if state is None:
        return
    # The keeper alone: it stops `ray start --block`, which stops Ray's processes in
    # their order (3-5 s here). Signalling the whole group at once instead had every
    # process start its own graceful exit and took 30 s.
    try:
        os.kill(state["pid"], signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while (_pid_alive(state["pid"]) or _group_alive(state["pid"])) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(state["pid"], signal.SIGKILL)  # whatever is left after the deadline


def _group_alive(group: int) -> bool:
    """Whether a process of the group still runs (zombies do not count: the keeper is
    this process's own child when this process started the head, and is never reaped)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat_fields(stat)
        if fields and int(fields[2]) == group and fields[0] != "Z":  # state, ppid, pgrp
            return True
    return False


def _stat_fields(stat: Path) -> list[str] | None:
    """A /proc/PID/stat's fields after the command name (state first); None when the
    process is gone or there is no /proc."""
    with contextlib.suppress(OSError, IndexError):
        return stat.read_text().rsplit(") ", 1)[1].split()
    return None


def _head_alive(state: dict[str, Any]) -> bool:
    return _pid_alive(state["pid"]) and _port_open(int(state["address"].rsplit(":", 1)[1]))


def _live_users() -> list[int]:
    users = []
    for entry in _users_dir().iterdir():
        pid = int(entry.name)
        if _pid_alive(pid):
            users.append(pid)
        else:
            entry.unlink(missing_ok=True)  # a user that died without leaving
    return users


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    return fields is None or fields[0] != "Z"


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_state() -> dict[str, Any] | None:
    path = state_dir() / "head.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _users_dir() -> Path:
    path = state_dir() / "users"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def keep_head(command: list[str]) -> int:
    """The head's keeper, leader of its process group: runs ``ray start --block`` and
    stops it once no process that joined is alive, so that a head whose last user was
    killed (no chance to leave) does not outlive it."""
    head = subprocess.Popen(command)
    signal.signal(signal.SIGTERM, lambda *_: head.terminate())
    while head.poll() is None:
        time.sleep(2.0)
        with _locked(blocking=False) as held:
            if not held:  # a command is starting, joining or leaving: look again later
                continue
            state = _read_state()
            # The starter records the head and registers itself in one locked step, so a
            # record of this head without a live user means every user is gone.
            if state is not None and state["pid"] == os.getpid() and not _live_users():
                (state_dir() / "head.json").unlink(missing_ok=True)
                head.terminate()
    return head.wait()


@contextlib.contextmanager
def _locked(blocking: bool = True) -> Iterator[bool]:
    """One process at a time reads or changes the shared head's state; yields whether
    the lock is held (always, when ``blocking``)."""
    with open(state_dir() / "lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


if __name__ == "__main__":  # python -m pipeline.ray_setup STATE_DIR RAY_START_COMMAND...: the keeper
    os.environ["CATKD_RAY_DIR"] = sys.argv[1]
    sys.exit(keep_head(sys.argv[2:]))


class ImpossibleRequestError(CatkdError, RuntimeError):
    """Resources that no node of the Ray cluster has, where nothing can add nodes."""


def can_add_nodes() -> bool:
    """Whether nodes may join the Ray cluster this process is connected to: never on
    catkd's own local Ray (this machine is all there is); on a cluster at RAY_ADDRESS an
    autoscaler (KubeRay's, a cluster launcher's) may add them, so it is assumed it can."""
    return bool(os.environ.get("RAY_ADDRESS"))


def check_request_fits(per_worker: dict[str, float], count: int, what: str) -> None:
    """Refuse at once ``count`` workers of ``per_worker`` resources that the cluster can
    never place, when nothing can add nodes (elsewhere a run waits, saying what it waits for)."""
    if can_add_nodes():
        return
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    total = {key: sum(node.get(key, 0.0) for node in nodes) for key in per_worker}
    for key, amount in per_worker.items():
        if amount <= 0:
            continue
        placeable = sum(int(node.get(key, 0.0) // amount) for node in nodes)
        if placeable < count:
            most = max((node.get(key, 0.0) for node in nodes), default=0.0)
            raise ImpossibleRequestError(
                f"{what} asks for {count} x {_shown(per_worker)}, but this Ray cluster has {total.get(key, 0.0):g} "
                f"{key} in all ({most:g} on its largest node), and nothing can add nodes to catkd's local Ray: "
                f"ask for at most what it has{', or set use_gpu=false' if key == 'GPU' else ''}, or run on a "
                "cluster with RAY_ADDRESS"
            )


def _shown(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{key}: {value:g}" for key, value in resources.items()) + "}"
