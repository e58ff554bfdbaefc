"""The fixed costs every short command and test pays, whatever its data: starting the
machine's local Ray head, joining one that runs, a Ray Train run that does nothing,
and stopping the head. Ray Train's controller polls its workers every
``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (Ray's default 2 s; the test suite sets 0.2),
so a run waits up to one poll to start and one to finish: both settings are measured
side by side.

    .venv/bin/python bench/startup.py --rounds 2

Each setting runs in its own process with its own local Ray (its own ``CATKD_RAY_DIR``),
alternating ``--rounds`` times so that the machine's drift hits both alike. Prints the
median of each figure and the ratio of the fast poll to the default.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"default poll (2 s)": "2.0", "test poll (0.2 s)": "0.2"}
FIGURES = ("head start", "join", "no-op fit", "head stop")


def _noop_loop(config: dict) -> None:
    import ray.train

    ray.train.report({"done": 1})


def child(fits: int) -> dict[str, float]:
    """One setting, in this process: start a head, time a second process joining it,
    fit ``fits`` no-op runs, then leave (the last user stops the head)."""
    sys.path.insert(0, str(ROOT))
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.ray_setup import init_ray, leave_local_ray

    figures: dict[str, float] = {}
    t = time.perf_counter()
    init_ray(num_cpus=2)
    figures["head start"] = time.perf_counter() - t
    timed_join = "import time; t = time.perf_counter(); from pipeline.ray_setup import init_ray; init_ray(); "
    probe = [sys.executable, "-c", timed_join + "print(time.perf_counter() - t)"]
    joined = subprocess.run(probe, cwd=ROOT, capture_output=True, text=True, check=True)
    figures["join"] = float(joined.stdout.split()[-1])
    storage = tempfile.mkdtemp(prefix="catkd-startup-")
    times = []
    for index in range(fits):
        t = time.perf_counter()
        run = RunConfig(name=f"noop-{index}", storage_path=storage)
        TorchTrainer(_noop_loop, scaling_config=ScalingConfig(num_workers=1), run_config=run).fit()
        times.append(time.perf_counter() - t)
    figures["no-op fit"] = statistics.median(times)
    t = time.perf_counter()
    leave_local_ray()
    figures["head stop"] = time.perf_counter() - t
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--fits", type=int, default=2, help="no-op Ray Train runs per round")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.fits)), flush=True)
        return
    results: dict[str, list[dict[str, float]]] = {name: [] for name in SETTINGS}
    for round_index in range(args.rounds):
        for name, interval in SETTINGS.items():
            env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
            env |= {
                "CATKD_RAY_DIR": tempfile.mkdtemp(prefix="catkd-ray-"),
                "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": interval,
                "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                "PYTHONPATH": str(ROOT),
            }
            command = [sys.executable, __file__, "--child", "--fits", str(args.fits)]
            done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
            if done.returncode != 0:
                sys.exit(f"{name}: the measuring process failed:\n{done.stderr[-3000:]}")
            results[name].append(json.loads(done.stdout.splitlines()[-1]))
            print(f"[startup] round {round_index + 1}/{args.rounds} {name}: {results[name][-1]}", flush=True)
    medians = {name: {f: statistics.median(r[f] for r in rounds) for f in FIGURES} for name, rounds in results.items()}
    default, fast = medians.values()
    print(f"\n| seconds (median of {args.rounds} rounds) | " + " | ".join(SETTINGS) + " | ratio |")
    print("|---|" + "---:|" * (len(SETTINGS) + 1))
    for figure in FIGURES:
        print(f"| {figure} | {default[figure]:.1f} | {fast[figure]:.1f} | {fast[figure] / default[figure]:.2f} |")


if __name__ == "__main__":
    main()
