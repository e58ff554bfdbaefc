"""Faults on real Ray: an elastic run that gains a node and loses one, and a driver stopped
by SIGTERM mid-run then rerun (a sweep whose driver is killed: tests/test_s3.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from catkd.models import build_model, checkpoint_payload
from pipeline.cache import CacheBuildConfig, build_cache
from pipeline.data.shard_writer import ShardConfig, shard_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def env(ray_local, tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    data = str(base / "shapes")
    shard_dataset(
        ShardConfig(
            "synthetic:shapes",
            data,
            samples_per_shard=40,
            synthetic={"train_samples": 160, "test_samples": 16, "seed": 9},
            progress=False,
        )
    )
    weights = str(base / "teacher.pth")
    torch.save(checkpoint_payload(build_model("resnet8", 10, bias=True), "resnet8"), weights)
    cache = build_cache(
        CacheBuildConfig(
            data=data, teacher="resnet8", weights=weights, root=str(base / "caches"), num_views=2, progress=False
        )
    )
    return {"base": base, "data": data, "cache": cache}


def _env():
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": ROOT}


@pytest.mark.slow
def test_elastic_run_grows_when_a_node_joins_and_shrinks_when_one_is_lost(env):
    """bench/elastic_study.py's drill on a local cluster of one-CPU nodes: an elastic run
    (1 to 2 workers, a global batch of 16) starts on one node, grows when a second joins,
    goes on from its last checkpoint on one when a node is removed abruptly, and finishes."""
    storage = str(env["base"] / "runs-elastic")
    drill = os.path.join(ROOT, "bench", "elastic_study.py")
    result = subprocess.run(
        [sys.executable, drill, "--drill", env["data"], env["cache"], storage, "elastic"],
        capture_output=True,
        text=True,
        timeout=540,
        env=_env(),
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, result.stdout[-3000:] + result.stderr[-3000:]
    outcome = json.loads(lines[-1])
    assert outcome["added_at"] and outcome["removed_at"], outcome
    # no completed epoch lost, none counted twice
    assert outcome["epochs"] == list(range(1, 21)), result.stdout[-3000:] + result.stderr[-3000:]
    sizes = outcome["world_sizes"]
    grown = sizes.index(2)
    assert sizes[0] == 1 and sizes[-1] == 1 and 1 in sizes[grown:], sizes
    # every epoch read the 160 training samples once at either size, with the same global batch
    assert outcome["train_samples"] == [160] * 20 and outcome["global_batch"] == [16] * 20
    assert outcome["exported"] == ["student_cam.pt", "student_classifier.pt"]
    history = [json.loads(line) for line in open(os.path.join(storage, "elastic", "metrics.jsonl"))]
    assert [h["world_size"] for h in history] == sizes
    # one catkd line per resize; the console relay lives on the driver's node
    assert f"elastic: resized 1 -> 2 workers at epoch {grown + 1} (capacity returned)" in result.stdout
    assert "elastic: resized 2 -> 1 workers at epoch" in result.stdout and "(workers lost)" in result.stdout


@pytest.mark.slow
def test_driver_stopped_by_sigterm_says_so_in_one_line_and_resumes_on_rerun(env):
    storage = str(env["base"] / "runs-driver")
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "train",
        f"data={env['data']}",
        f"cache={env['cache']}",
        "student=resnet8",
        "epochs=8",
        "batch_size=8",
        "lr_decay_epochs=[2]",
        "num_workers=1",
        "loader_workers=0",
        f"storage_path={storage}",
        "name=stopped",
    ]
    metrics = os.path.join(storage, "stopped", "metrics.jsonl")
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, env=_env(), cwd=ROOT
    )
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    # Stop once Ray Train has registered epoch 1's checkpoint (metrics.jsonl is written
    # before report() uploads it: a stop before then rightly starts over).
    registered = os.path.join(storage, "stopped", CHECKPOINT_MANAGER_SNAPSHOT_FILENAME)
    deadline = time.time() + 240
    while not os.path.exists(registered):
        assert proc.poll() is None and time.time() < deadline, (
            proc.stdout.read().decode()[-3000:] if proc.poll() is not None else "timeout"
        )
        time.sleep(0.05)
    # SIGTERM to the driver, as `timeout`, a batch scheduler or a pod stop send it
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 143, output[-3000:]
    stopped = [line for line in output.splitlines() if line.startswith("catkd train: stopped by SIGTERM")]
    assert len(stopped) == 1 and "rerun the same command to resume" in stopped[0], output[-3000:]
    for ray_line in ("SIGTERM received", "logging.cc", "PC: @", "Traceback"):
        assert ray_line not in output, output[-3000:]
    assert open(metrics).read().count("\n") < 8
    # nothing the stopped run started keeps holding the shared Ray's CPUs
    import ray

    deadline = time.time() + 60
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.time() < deadline, f"CPUs still held: {ray.available_resources()}"
        time.sleep(0.5)
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env(), cwd=ROOT)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "stopped: 1 worker(s) resuming after epoch" in rerun.stdout, rerun.stdout[-3000:]
    assert [json.loads(line)["epoch"] for line in open(metrics)] == list(range(1, 9))
