"""A real job through the Ray Jobs API (JobSubmissionClient): a local Ray head with its
dashboard, started for this test, runs a stage entrypoint from the submitted working
directory, with `python` taken from PATH as on a cluster."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    gcs, dashboard, agent_http, agent_grpc, metrics, runtime_env = (_free_port() for _ in range(6))
    # Ray's socket paths must stay under ~107 characters: pytest's tmp_path is too deep.
    temp_dir = tempfile.mkdtemp(prefix="catkd-ray-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Ray 2.60 clusters require a token; the head, the client and the job share one.
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    head = subprocess.Popen(
        [
            os.path.join(os.path.dirname(sys.executable), "ray"),
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            "--num-cpus=2",
            "--include-dashboard=true",
            # Other Ray instances on this machine (the test session's own) hold the default agent ports.
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--temp-dir={temp_dir}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    yield f"http://127.0.0.1:{dashboard}", env
    head.terminate()
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_shard_stage_runs_as_a_ray_job(ray_head, tmp_path):
    address, env = ray_head
    out = tmp_path / "shards"
    entrypoint = (
        f"python -m jobs.shard synthetic:shapes {out} --train-samples 40 --test-samples 10 --samples-per-shard 20"
    )
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "helpers", "submit_job.py"), address, ROOT, entrypoint],
        capture_output=True,
        text=True,
        timeout=420,
        env=env,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, result.stderr[-3000:]
    outcome = json.loads(lines[-1])
    assert outcome["status"] == "SUCCEEDED", outcome["logs"][-3000:]
    assert "[shard] train: 40 samples in 2 shards" in outcome["logs"]
    assert json.loads((out / "train.index.json").read_text())["num_samples"] == 40
