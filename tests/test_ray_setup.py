"""Several catkd commands on one machine share one local Ray: started by the first,
joined by the others, stopped by the last; a dead head's record is never used."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from pipeline import ray_setup
from pipeline.data.shard_writer import ShardConfig, shard_dataset
from pipeline.ray_setup import _group_alive, _pid_alive, _stop_head
from tests.test_console import OWN_LINE, RAY_LINE

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _env(ray_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    return env | {"CATKD_RAY_DIR": str(ray_dir)}


def test_two_trainings_at_once_share_one_ray_and_log_cleanly(tmp_path):
    data = str(tmp_path / "shapes")
    with ProcessPoolExecutor(1) as pool:
        shard_dataset(
            ShardConfig(
                "synthetic:shapes",
                data,
                samples_per_shard=32,
                synthetic={"train_samples": 64, "test_samples": 32},
                progress=False,
            ),
            pool=pool,
        )
    ray_dir = tmp_path / "ray"
    commands = [
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "train",
            "mode=ce",
            "student=resnet8",
            f"data={data}",
            "epochs=2",
            "batch_size=16",
            "lr_decay_epochs=[1]",
            "loader_workers=0",
            f"storage_path={tmp_path / 'runs'}",
            f"name=run{i}",
        ]
        for i in range(2)
    ]
    started = [
        subprocess.Popen(c, cwd=ROOT, env=_env(ray_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for c in commands
    ]
    time.sleep(3)  # the first is starting the head, or has
    head = None
    for _ in range(300):
        state = ray_dir / "head.json"
        if state.exists():
            head = json.loads(state.read_text())
            break
        time.sleep(0.2)
    outputs = [p.communicate(timeout=600)[0] for p in started]
    for process, output in zip(started, outputs, strict=True):
        assert process.returncode == 0, output[-3000:]
        assert "Traceback" not in output and "multiple active Ray instances" not in output, output[-3000:]
        assert output.count("[train] epoch 2/2  train_") == 1, output[-3000:]  # one line per epoch, no duplicate
        # A quiet console: catkd's own lines only, none of Ray's (tests/test_console.py).
        lines = [line for line in output.splitlines() if line.strip()]
        assert [line for line in lines if not OWN_LINE.match(line) or RAY_LINE.search(line)] == [], output[-3000:]
        assert output.count(" 1 worker(s) started; rank 0 on cpu") == 1, output[-3000:]
        # the start-up a user waits through, said once, before the first epoch's line
        first = re.search(r"\[train\] run\d: first batch (\d+\.\d) s after the workers started", output)
        assert first and output.index(first[0]) < output.index("[train] epoch 1/2"), output[-3000:]
    addresses = {
        line.split()[3] for output in outputs for line in output.splitlines() if line.startswith("[ray] local Ray")
    }
    assert addresses == {head["address"]}, outputs  # one Ray, so its scheduler saw the machine's CPUs once
    assert (
        sum("(started;" in output for output in outputs) == 1
        and sum("shared with 1 other" in output for output in outputs) == 1
    )
    # The last one out stopped it.
    assert not (ray_dir / "head.json").exists()
    for _ in range(100):
        if not _pid_alive(head["pid"]):
            break
        time.sleep(0.2)
    assert not _pid_alive(head["pid"])


def test_a_dead_heads_record_is_replaced(tmp_path):
    ray_dir = tmp_path / "ray"
    ray_dir.mkdir(mode=0o700)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (ray_dir / "head.json").write_text(
        json.dumps({"address": "127.0.0.1:1", "pid": dead.pid, "token": "x", "dashboard_port": 1})
    )
    probe = (
        "from pipeline.ray_setup import init_ray; import ray; init_ray(num_cpus=1); "
        "print('cpus', ray.cluster_resources()['CPU'])"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=_env(ray_dir), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cpus 1.0" in done.stdout and "(started;" in done.stderr
    assert not (ray_dir / "head.json").exists()


def test_a_head_whose_last_user_was_killed_stops_by_itself(tmp_path):
    ray_dir = tmp_path / "ray"
    probe = (
        "from pipeline.ray_setup import init_ray; import time; init_ray(num_cpus=1); "
        "print('joined', flush=True); time.sleep(600)"
    )
    user = subprocess.Popen(
        [sys.executable, "-c", probe], cwd=ROOT, env=_env(ray_dir), stdout=subprocess.PIPE, text=True
    )
    assert user.stdout.readline().strip() == "joined"
    head = json.loads((ray_dir / "head.json").read_text())
    user.kill()  # SIGKILL: no chance to leave
    user.wait()
    for _ in range(150):
        if not _pid_alive(head["pid"]):
            break
        time.sleep(0.2)
    assert not _pid_alive(head["pid"]) and not (ray_dir / "head.json").exists()


def test_stopping_a_head_ends_its_process_group(tmp_path, monkeypatch):
    """_stop_head signals the keeper alone, then waits for the group; what ignores the
    signal is killed at the deadline. The keeper, this process's unreaped child here,
    does not count once it is a zombie."""
    monkeypatch.setenv("CATKD_RAY_DIR", str(tmp_path))
    monkeypatch.setattr(ray_setup, "STOP_TIMEOUT_S", 3.0)
    stubborn = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(600)"
    )
    keeper = (
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', {stubborn!r}], stdout=subprocess.PIPE, text=True)\n"
        "print(child.stdout.readline().strip(), child.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    leader = subprocess.Popen([sys.executable, "-c", keeper], stdout=subprocess.PIPE, text=True, start_new_session=True)
    word, child = leader.stdout.readline().split()
    assert word == "up" and _group_alive(leader.pid)
    _stop_head({"pid": leader.pid})
    for _ in range(50):  # SIGKILL is delivered asynchronously
        if not _group_alive(leader.pid):
            break
        time.sleep(0.1)
    assert not _pid_alive(leader.pid) and not _pid_alive(int(child)) and not _group_alive(leader.pid)
    leader.wait()
