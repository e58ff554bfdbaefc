"""No Docker engine runs in CI, so the Docker files are checked as files: they parse, and
every path and command they name exists in the repository or the installed project.
docker/check.sh builds and runs them where an engine is (docs/docker.md). The node script
the containers start is run here for real: its cluster refuses a job without the token."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipeline.ray_setup import _free_port, loopback_head_options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dockerfile() -> list[str]:
    with open(os.path.join(ROOT, "docker", "Dockerfile")) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def test_dockerfile_copies_existing_paths_and_installs_like_ci():
    lines = _dockerfile()
    assert lines[:2] == ["ARG BASE=python:3.11-slim", "FROM ${BASE}"]  # a base of the user's choosing
    for line in lines:
        if line.startswith("COPY"):
            for source in line.split()[1:-1]:
                assert os.path.exists(os.path.join(ROOT, source)), source
    text = "\n".join(lines)
    assert "make install VENV=/opt/venv EXTRAS=s3,timm CONSTRAINTS=/tmp/constraints.txt" in text  # runtime extras only
    assert 'sh docker/constraints.sh "$TORCH"' in text and "ARG TORCH=cpu" in lines
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    assert re.search(r"^install:", makefile, re.M) and "-c $(CONSTRAINTS)" in makefile
    assert re.search(r"^CONSTRAINTS \?= constraints.txt$", makefile, re.M)
    assert "make test" in open(os.path.join(ROOT, ".ci", "run")).read()  # CI installs through the same target


def test_dockerfile_is_lean_and_runs_as_a_user_under_an_init_process():
    lines = _dockerfile()
    text = "\n".join(lines)
    assert "PIP_NO_CACHE_DIR=1" in text and "rm -rf /var/lib/apt/lists/*" in text
    # pip settings only as a build secret: no layer holds a pip.conf
    assert "--mount=type=secret,id=pipconf,target=/etc/pip.conf,required=false" in text
    assert not any(line.startswith(("COPY", "ADD")) and re.search(r"pip\.conf|\.netrc", line) for line in lines)
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert lines[-2:] == ['ENTRYPOINT ["/usr/bin/tini", "--"]', 'CMD ["catkd", "--help"]']
    assert "tini" in next(line for line in lines if "apt-get install" in line)


def test_dockerignore_keeps_the_environment_and_outputs_out_of_the_build_context():
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        entries = {line.strip() for line in f if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "outputs", "*.pt", "*.zarr"} <= entries
    copied = [line.split()[1:-1] for line in _dockerfile() if line.startswith("COPY")]
    assert not any(source in entries for sources in copied for source in sources)


def _constraints(variant: str) -> dict[str, str]:
    out = subprocess.run(
        ["sh", "docker/constraints.sh", variant], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return dict(line.split("==") for line in out.splitlines() if "==" in line and not line.startswith("#"))


def test_cpu_constraints_are_ci_pins_with_cpu_only_torch():
    cuda, cpu = _constraints("cuda"), _constraints("cpu")
    assert cuda["torch"].split("+")[0] and not any(name.startswith("nvidia-") for name in cpu)
    assert cpu["torch"] == cuda["torch"] + "+cpu" and cpu["torchvision"] == cuda["torchvision"] + "+cpu"
    assert not any(name.startswith(("nvidia-", "cuda-")) or name == "triton" for name in cpu)
    assert any(name.startswith("nvidia-") for name in cuda)  # the CUDA variant keeps them
    rest = {
        k: v
        for k, v in cuda.items()
        if not k.startswith(("nvidia-", "cuda-")) and k not in ("triton", "torch", "torchvision")
    }
    assert rest.items() <= cpu.items()  # every other pin is CI's
    bad = subprocess.run(["sh", "docker/constraints.sh", "rocm"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "cpu|cuda" in bad.stderr


def test_compose_cluster_is_consistent():
    with open(os.path.join(ROOT, "docker", "compose.yaml")) as f:
        compose = yaml.safe_load(f)
    head, worker = compose["services"]["head"], compose["services"]["worker"]
    assert head["build"]["dockerfile"] == "docker/Dockerfile" and os.path.exists(
        os.path.join(ROOT, "docker", head["build"]["context"], head["build"]["dockerfile"])
    )
    assert head["ports"] == ["127.0.0.1:8265:8265"]  # dashboard on localhost only
    assert head["command"].startswith("docker/ray-node.sh head ") and "--port=6379" in head["command"]
    assert worker["command"].startswith("docker/ray-node.sh worker --address=head:6379")
    for service in (head, worker):
        assert "shared:/shared" in service["volumes"] and service["shm_size"]
        # token authentication, the token on a volume of its own (made at first start, not in the image)
        assert service["environment"]["RAY_AUTH_MODE"] == "token"
        assert service["environment"]["RAY_AUTH_TOKEN_PATH"] == "/auth/token" and "auth:/auth" in service["volumes"]
        assert service["environment"]["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] == "0"
        assert "init" not in service  # the image's tini is PID 1 already
    assert set(compose["volumes"]) == {"shared", "auth"}
    assert shutil.which("ray", path=os.path.dirname(sys.executable))  # the image runs `ray start` from the project env


def test_ray_node_script_refuses_bad_roles_and_a_missing_token_path():
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN_PATH"}
    missing = subprocess.run(["sh", "docker/ray-node.sh", "head"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert missing.returncode != 0 and "RAY_AUTH_TOKEN_PATH" in missing.stderr
    env["RAY_AUTH_TOKEN_PATH"] = "/nonexistent/token"
    bad = subprocess.run(["sh", "docker/ray-node.sh", "driver"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown role 'driver'" in bad.stderr


def _submit(dashboard: int, env: dict[str, str], *entrypoint: str) -> subprocess.CompletedProcess[str]:
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    command = [ray, "job", "submit", f"--address=http://127.0.0.1:{dashboard}", "--", *entrypoint]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_ray_node_head_makes_a_token_and_refuses_jobs_without_it(tmp_path: Path):
    """The compose head's own start-up, on loopback ports: token made at first start, a
    job without it refused by the Jobs API, with it accepted and run."""
    token = tmp_path / "auth" / "token"
    token.parent.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env |= {
        "PATH": os.path.dirname(sys.executable) + os.pathsep + env["PATH"],  # `python` and `ray`, as in the image
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    }
    port, dashboard = _free_port(), _free_port()
    head = subprocess.Popen(
        ["sh", "docker/ray-node.sh", "head", "--num-cpus=1", *loopback_head_options(port, dashboard)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_for_jobs_api(dashboard, head)
        assert re.fullmatch(r"[0-9a-f]{64}", token.read_text()) and token.stat().st_mode & 0o077 == 0
        client = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN_PATH"}
        refused = _submit(dashboard, client, "echo", "catkd-job-ran")
        assert refused.returncode != 0 and "catkd-job-ran" not in refused.stdout
        assert re.search(r"token|auth", refused.stdout + refused.stderr, re.I)
        accepted = _submit(
            dashboard, client | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token.read_text()}, "echo", "catkd-job-ran"
        )
        assert accepted.returncode == 0 and "catkd-job-ran" in accepted.stdout, accepted.stdout + accepted.stderr
    finally:
        head.send_signal(signal.SIGTERM)  # what the image's init passes on at `compose down`
        try:
            head.wait(timeout=30)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, signal.SIGKILL)


def _wait_for_jobs_api(dashboard: int, head: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert head.poll() is None, f"the head exited with {head.returncode}"
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{dashboard}/api/jobs/", timeout=5)
        except urllib.error.HTTPError:
            return  # answering (401: the token is asked for)
        except OSError:
            time.sleep(0.5)
        else:
            return
    raise AssertionError("the head's Jobs API did not answer in 120 s")


def test_runtime_env_and_entrypoints_exist():
    with open(os.path.join(ROOT, "jobs", "runtime_env.yaml")) as f:
        runtime_env = yaml.safe_load(f)
    assert runtime_env["working_dir"] == "."
    for stage in ("shard", "train_teacher", "build_cache", "distill", "evaluate", "sweep"):
        assert os.path.exists(os.path.join(ROOT, "jobs", f"{stage}.py")), stage
