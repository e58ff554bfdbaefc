"""A normal run's console holds catkd's own lines only; ``verbose`` brings Ray's back.

The console of real trainings is checked where two ``catkd train`` commands already run
(tests/test_ray_setup.py: every line of both must match OWN_LINE and none RAY_LINE)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

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


def test_relay_prints_worker_lines_in_order_and_says_when_nobody_speaks(ray_local, monkeypatch, capsys):
    import time

    from pipeline import console

    monkeypatch.setattr(console, "WAITING_NOTE_S", 0.3)
    monkeypatch.setattr(console, "POLL_S", 0.05)
    with console.Relay(waiting=lambda: "[train] still waiting for 2 worker(s)") as worker_side:
        time.sleep(1.0)  # silence: the waiting line, once
        worker_side.say("[train] run: 1 worker(s) started")
        worker_side.say("[train] epoch 1/1")
        time.sleep(0.2)
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["[train] still waiting for 2 worker(s)", "[train] run: 1 worker(s) started", "[train] epoch 1/1"]


def test_relay_lives_on_the_drivers_node_and_a_lost_relay_costs_no_training(ray_local, capfd):
    import ray

    from pipeline import console

    relay = console._lines_actor()
    where = ray.get(relay.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))
    assert where == ray.get_runtime_context().get_node_id()  # tests/test_faults.py loses the other nodes
    gone = console._Lines.remote()
    ray.kill(gone)
    worker_side = console.Console(gone, "run")
    worker_side.say("[train] epoch 1/2")  # no error: the line falls back to this process's stdout
    worker_side.say("[train] epoch 2/2")
    assert capfd.readouterr().out.splitlines()[-2:] == ["[train] epoch 1/2", "[train] epoch 2/2"]
