"""A normal run's console holds catkd's own lines only; ``verbose`` brings Ray's back."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from pipeline.data.shard_writer import ShardConfig, shard_dataset

# catkd's own console lines; anything else on a quiet run's console came from Ray.
OWN_LINE = re.compile(r"^\[(train|ray)\] ")
# What Ray's loggers and log forwarding look like: "(RayTrainWorker pid=...)" prefixes,
# glog lines ("[2026-... E 123 456] core_worker.cc:..."), Python logging from ray.*.
RAY_LINE = re.compile(r"\(\w+ pid=\d+\)|\.cc:\d+|^\[?\d{4}-\d\d-\d\d .*(INFO|WARNING|ERROR)|ray\.\w+")


def _run(args: list[str], timeout: float = 600) -> list[str]:
    done = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, env=os.environ | {"PYTHONUNBUFFERED": "1"}
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]


@pytest.mark.slow
def test_training_console_has_only_catkd_lines(ray_local, tmp_path):
    data = str(tmp_path / "shapes")
    shard_dataset(
        ShardConfig(
            "synthetic:shapes",
            data,
            samples_per_shard=32,
            synthetic={"train_samples": 64, "test_samples": 32},
            progress=False,
        )
    )
    catkd = os.path.join(os.path.dirname(sys.executable), "catkd")
    lines = _run(
        [catkd, "train", "mode=ce", "student=resnet8", f"data={data}", "epochs=2", "lr_decay_epochs=[1]"]
        + ["batch_size=16", "num_workers=1", "loader_workers=1", f"storage_path={tmp_path}/runs", "name=quiet"]
    )
    assert [line for line in lines if not OWN_LINE.match(line)] == []
    assert [line for line in lines if RAY_LINE.search(line)] == []
    text = "\n".join(lines)
    # The workers' lines arrive through the driver, once each and in order.
    assert text.count("[train] quiet: 1 worker(s) started") == 1
    assert [line.split()[2] for line in lines if line.startswith("[train] epoch")] == ["1/2", "2/2"]
    assert "[train] done: quiet: test top-1" in text


@pytest.mark.parametrize("verbose", [False, True])
def test_worker_output_reaches_the_console_only_when_verbose(ray_local, verbose):
    script = (
        "import ray\n"
        "from pipeline.ray_setup import init_ray\n"
        f"init_ray(verbose={verbose})\n"
        "@ray.remote(num_cpus=0)\n"
        "def shout():\n"
        "    print('a line from a Ray worker', flush=True)\n"
        "ray.get(shout.remote())\n"
        "import time; time.sleep(2)  # log forwarding is asynchronous\n"
    )
    lines = _run([sys.executable, "-c", script], timeout=300)
    forwarded = [line for line in lines if "a line from a Ray worker" in line]
    if verbose:
        assert forwarded and re.search(r"\(shout pid=\d+\)", forwarded[0])
    else:
        assert forwarded == []
        assert [line for line in lines if not OWN_LINE.match(line)] == []
