"""Faults on real Ray: a lost worker node, and a driver stopped by SIGTERM mid-run then rerun."""

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
def test_lost_worker_node_restarts_from_last_checkpoint(env):
    storage = str(env["base"] / "runs-node-loss")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "helpers", "node_loss.py"), env["data"], env["cache"], storage],
        capture_output=True,
        text=True,
        timeout=420,
        env=_env(),
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, result.stdout[-3000:] + result.stderr[-3000:]
    outcome = json.loads(lines[-1])
    assert outcome["removed"], "the worker node was never removed"
    # no completed epoch lost, none counted twice
    assert outcome["epochs"] == [1, 2, 3, 4], result.stdout[-3000:] + result.stderr[-3000:]
    history = [json.loads(line)["epoch"] for line in open(os.path.join(storage, "node-loss", "metrics.jsonl"))]
    assert history == [1, 2, 3, 4]
    # The console relay lives on the driver's node, so the restarted worker still reaches it.
    assert "node-loss: 1 worker(s) resuming after epoch" in result.stdout, result.stdout[-3000:]


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


@pytest.mark.slow
def test_sweep_stops_lagging_trials_and_resumes_after_its_driver_is_killed(env):
    """A 4-trial ASHA sweep over beta, two trials at a time: its driver is killed once the
    first trial has finished; the same command then restores the experiment without
    rerunning that trial, ASHA stops at least one trial early, and the rest finish."""
    storage = str(env["base"] / "runs-sweep")
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "sweep",
        f"data={env['data']}",
        f"cache={env['cache']}",
        "student=resnet8",
        "epochs=2",
        "batch_size=32",
        "lr_decay_epochs=[1]",
        "num_workers=1",
        "loader_workers=0",
        "cpus_per_worker=1",
        f"storage_path={storage}",
        "name=beta",
        # The total loss grows with beta (CE + beta x CAT), so ranking by it makes ASHA's
        # decisions certain: a trial reaching the rung after a lower beta's is stopped.
        "--space",
        "beta=grid:0.5,8,32,64",
        "--metric",
        "train_loss",
        "--mode",
        "min",
        "--max-concurrent",
        "2",
    ]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, env=_env(), cwd=ROOT
    )
    lines, deadline = [], time.time() + 300
    while not any(line.endswith(": finished") for line in lines):
        line = proc.stdout.readline().decode()
        assert line and time.time() < deadline, "".join(lines)[-3000:]
        lines.append(line.rstrip())
    first = next(line for line in lines if line.endswith(": finished")).split()[1].rstrip(":")
    # Two trials shared the machine: both had started before the first one finished.
    assert sum(line.endswith(": started") for line in lines) >= 2, "\n".join(lines)
    time.sleep(3)  # Tune records its state every second (pipeline.train.sweep.STATE_PERIOD_S)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=400, env=_env(), cwd=ROOT)
    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, output[-3000:]
    assert "resuming" in output and f"{first}: started" not in output, output[-3000:]
    summary = json.loads(open(os.path.join(storage, "beta", "sweep.json")).read())
    trials = {row["trial"]: row for row in summary["trials"]}
    assert len(trials) == 4 and summary["metric"] == "train_loss"
    statuses = [row["status"] for row in trials.values()]
    assert "stopped" in statuses and "finished" in statuses and "failed" not in statuses, output[-3000:]
    assert trials[first]["status"] == "finished" and trials[first]["params"]["beta"] in (0.5, 8.0)
    # The rungs' records from before the restart were replayed (ResumableASHA): the high
    # betas that reached the rung afterwards were compared with them and stopped.
    by_beta = {row["params"]["beta"]: row["status"] for row in trials.values()}
    assert by_beta[32.0] == "stopped" and by_beta[64.0] == "stopped", output[-3000:]
    for row in trials.values():
        assert row["epochs"] >= 1 and row["images_per_s"] > 0 and row["cat_after_epoch_1"] > 0
        assert row["beta_cat_after_epoch_1"] == pytest.approx(row["params"]["beta"] * row["cat_after_epoch_1"])
        assert row["status"] == "stopped" or row["epochs"] == 2
        assert os.path.isdir(os.path.join(storage, "beta", row["trial"], "tensorboard"))
    assert "stopped@1" in output and "beta*CAT ep 1" in output
    assert open(os.path.join(storage, "beta", "sweep.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
