"""Elastic students (issue 42; docs/training.md, "Elastic runs"): a run that grows and
shrinks with the cluster against fixed runs on the same data, on a Ray cluster of
one-CPU nodes on this machine (ray.cluster_utils.Cluster).

The drill: an elastic run (``min_workers=1 num_workers=2``) starts on one node; a
second node joins after its first checkpoint (the run grows to two workers); after its
first checkpoint at two workers a node is removed abruptly, as a spot node is (the run
shrinks to one and goes on from its last checkpoint); it finishes on one node. The
fixed run trains with two workers throughout, the same global batch.

    .venv/bin/python bench/elastic_study.py ../shared/data/cifar10-jpeg.tar.gz --out outputs/elastic \\
        --teacher-weights ../shared/data/teachers/cifar10_resnet20.pt
    .venv/bin/python bench/elastic_study.py --report outputs/elastic/results.json --doc docs/training.md
    .venv/bin/python bench/elastic_study.py --drill DATA CACHE STORAGE NAME   # one drill, one JSON line

The data, teacher and cache are bench/study.py's (same subset, teacher, student and
views). Rerunning with the same --out resumes: finished runs are kept in results.json.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt  # noqa: E402
import ray  # noqa: E402
from ray._private.state import available_resources_per_node  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/study.py, run as a script
import study  # noqa: E402
from study_report import regenerate  # noqa: E402

from pipeline.train.config import TrainConfig  # noqa: E402
from pipeline.train.run import train  # noqa: E402


def _history(storage: str, name: str) -> list[dict[str, Any]]:
    """The run's metrics.jsonl as it stands (written by rank 0 after each epoch)."""
    path = os.path.join(storage, name, "metrics.jsonl")
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def _checkpoints_registered(storage: str, name: str) -> float:
    """When the controller last registered a checkpoint (its snapshot file's mtime), 0 if never.
    metrics.jsonl is written before report() uploads the checkpoint: a node lost between the
    two repeats the epoch (correct, but not the restart from a checkpoint the drill is about)."""
    try:
        return os.path.getmtime(os.path.join(storage, name, CHECKPOINT_MANAGER_SNAPSHOT_FILENAME))
    except FileNotFoundError:
        return 0.0


@dataclass
class Drill:
    """What happened to the cluster during a run, and when (seconds after its start)."""

    added_at: float | None = None
    removed_at: float | None = None
    events: list[str] = field(default_factory=list)


# Ray Train's health check every 0.5 s instead of 2 s: a removed node is noticed at once.
# Should the controller still try a size the cluster no longer has, it waits this long
# for it (60 s by default) before starting with the workers that fit.
CLUSTER_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15"}


def start_cluster(nodes: int) -> tuple[Cluster, list[Any]]:
    """A head with no CPUs (the driver and Ray Train's controller; no training worker
    lands there) and ``nodes`` one-CPU nodes, each room for one training worker."""
    # The cluster's processes (Ray Train's controller among them) inherit this environment.
    for key, value in CLUSTER_ENV.items():
        os.environ.setdefault(key, value)
    for attempt in range(1, STARTS + 1):
        before = _children()
        cluster = Cluster()
        try:
            cluster.add_node(num_cpus=0)  # the head
            workers = [cluster.add_node(num_cpus=1) for _ in range(nodes)]
            cluster.wait_for_nodes()
            break
        except Exception as exc:  # Ray gives a node 30 s to register, fixed: a loaded machine misses it
            if "timed out during startup" not in str(exc) or attempt == STARTS:
                raise
            print(f"[elastic] a node of the local cluster did not start in time ({attempt}/{STARTS}); again")
            cluster.shutdown()
            for pid in _children() - before:  # a head that failed is not the cluster's to stop
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    ray.init(address=cluster.address)
    return cluster, workers


STARTS = 3  # tries to bring up the local cluster
LOOK_AGAIN_S = 1.0  # how often the drill has Ray's coordinator look at a grown cluster again
# Room for a grow (the node seen, the group restarted: several of these short epochs on a
# loaded machine) and then a shrink that lands before the last epoch ends.
DRILL_EPOCHS = 20


def _children() -> set[int]:
    """This process's child processes (a Ray node's processes are started as such)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == os.getpid():
                found.add(int(entry))
    return found


def resize_drill(cfg: TrainConfig, timeout_s: float = 600) -> tuple[dict[str, Any], Drill]:
    """Run ``cfg`` (elastic, min_workers=1, num_workers=2) through a grow and a shrink on a
    fresh local cluster; returns train()'s result and what the drill did."""
    cluster, workers = start_cluster(1)
    drill, outcome, failure = Drill(), {}, []
    start = looked = time.time()

    def run() -> None:
        try:
            outcome.update(train(cfg))
        except BaseException as exc:  # reported by the caller
            failure.append(exc)

    runner = threading.Thread(target=run)
    runner.start()
    try:
        while runner.is_alive() and time.time() - start < timeout_s:
            history = _history(cfg.storage_path, cfg.name)
            registered = _checkpoints_registered(cfg.storage_path, cfg.name)
            if drill.added_at is None and history and registered:
                workers.append(cluster.add_node(num_cpus=1))  # capacity returns
                cluster.wait_for_nodes()
                _wait_for_node(workers[-1].node_id, up=True)
                _coordinator_sees_the_cluster()
                looked = time.time()
                drill.added_at = looked - start
                drill.events.append(f"node added after epoch {history[-1]['epoch']}")
            grown = [h for h in history if h.get("world_size") == 2]
            if drill.added_at is not None and not grown and time.time() - looked > LOOK_AGAIN_S:
                # A node's resources can reach Ray's view after the node registered: until
                # the run has grown, the coordinator looks again every LOOK_AGAIN_S.
                _coordinator_sees_the_cluster()
                looked = time.time()
            if drill.removed_at is None and grown and registered >= _written_at(cfg):
                # Every one-CPU node hosts a worker now: lose one, as a reclaimed spot node.
                free = available_resources_per_node()
                victim = next((n for n in workers if free.get(n.node_id, {}).get("CPU", 0) == 0), None)
                if victim is not None:
                    time.sleep(0.3)  # into the next epoch
                    cluster.remove_node(victim)
                    workers.remove(victim)
                    _wait_for_node(victim.node_id, up=False)
                    _coordinator_sees_the_cluster()
                    drill.removed_at = time.time() - start
                    drill.events.append(f"node removed after epoch {grown[-1]['epoch']}")
            time.sleep(0.1)
        runner.join(timeout=max(1.0, timeout_s - (time.time() - start)))
    finally:
        ray.shutdown()
        cluster.shutdown()
    if failure:
        raise failure[0]
    return outcome, drill


def _wait_for_node(node_id: str, up: bool, timeout_s: float = 30) -> None:
    """Until Ray's node table shows the node alive with its CPUs (they may come after its
    registration), or (``up`` False) no longer alive."""

    def seen() -> bool:  # alive, and with its CPUs when waiting for it to come up
        return any(n["NodeID"] == node_id and n["Alive"] and (not up or n["Resources"].get("CPU")) for n in ray.nodes())

    deadline = time.time() + timeout_s
    while time.time() < deadline and seen() != up:
        time.sleep(0.2)


def _coordinator_sees_the_cluster() -> None:
    """Make Ray's autoscaling coordinator, whose reservations Ray Train's elastic policy
    reads, take the cluster as it is now: what its next tick (every 20 s) would do. The
    drill's epochs take seconds, so without this a run could finish before Ray notices a
    node joined; after a loss, the controller would first wait for the lost node's CPUs
    (docs/training.md, "Elastic runs"). A private Ray API: a harness's, not catkd's."""
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    coordinator = get_or_create_autoscaling_coordinator()
    ray.get(coordinator.get_reserved_resources.remote("catkd-drill", recompute=True), timeout=60)


def _written_at(cfg: TrainConfig) -> float:
    path = os.path.join(cfg.storage_path, cfg.name, "metrics.jsonl")
    return os.path.getmtime(path) if os.path.exists(path) else float("inf")


def drill_config(data: str, cache: str, storage: str, name: str, **fields: Any) -> TrainConfig:
    """The drill's run: catkd, 2 one-CPU workers at most, 1 at least, a global batch of 16."""
    base = dict(
        mode="catkd",
        data=data,
        cache=cache,
        student="resnet8",
        epochs=DRILL_EPOCHS,
        batch_size=8,
        lr_decay_epochs=[15],
        num_workers=2,
        min_workers=1,
        resize_check_s=1.0,
        cpus_per_worker=1,
        loader_workers=0,
        max_failures=3,
        storage_path=storage,
        name=name,
    )
    return TrainConfig(**(base | fields))


def main_drill(argv: list[str]) -> None:
    data, cache, storage, name = argv
    outcome, drill = resize_drill(drill_config(data, cache, storage, name))
    history = outcome.get("history", [])
    print(
        json.dumps(
            {
                "epochs": [h["epoch"] for h in history],
                "world_sizes": [h["world_size"] for h in history],
                "train_samples": [h["train_samples"] for h in history],
                "global_batch": [h["global_batch"] for h in history],
                "exported": sorted(outcome.get("exported", {})),
            }
            | asdict(drill)
        ),
        flush=True,
    )


@dataclass
class ElasticStudyConfig(study.StudyConfig):
    out: str = "outputs/elastic"
    subset: int = 2000  # 200 training images a class: a short CPU comparison, not the main study
    epochs: int = 12
    batch_size: int = 32  # per worker at the full size (2 workers): a global batch of 64
    resolution: int = 2
    kinds: list[str] = field(default_factory=lambda: ["fixed", "elastic"])


def run_config(cfg: ElasticStudyConfig, base: TrainConfig, cache: str, kind: str, seed: int) -> TrainConfig:
    """catkd with S = epochs views on 2 one-CPU workers (fixed), or 1 to 2 (elastic, the
    drill's range and checks), the same global batch and learning rate."""
    elastic = {"min_workers": 1, "resize_check_s": 1.0, "max_failures": 3} if kind == "elastic" else {}
    return replace(
        base,
        mode="catkd",
        cache=cache,
        seed=seed,
        name=f"{kind}-seed{seed}",
        num_workers=2,
        lr=cfg.lr,  # for the global batch of 64, whatever the world size
        cpus_per_worker=1,
        loader_workers=0,  # a one-CPU node holds the worker and nothing else
        **elastic,
    )


def run_one(train_cfg: TrainConfig) -> dict[str, Any]:
    """One run on a fresh local cluster: two one-CPU nodes for a fixed run; the drill
    (one node, a second joining, one lost) for an elastic one."""
    start = time.perf_counter()
    if train_cfg.elastic:
        outcome, drill = resize_drill(train_cfg)
    else:
        cluster, _ = start_cluster(2)
        try:
            outcome, drill = train(train_cfg), Drill()
        finally:
            ray.shutdown()
            cluster.shutdown()
    history = outcome["history"]
    return {
        "name": train_cfg.name,
        "kind": "elastic" if train_cfg.elastic else "fixed",
        "seed": train_cfg.seed,
        "test_top1": history[-1]["test_top1"],
        "world_sizes": [h["world_size"] for h in history],
        "seconds": time.perf_counter() - start,
        "drill": asdict(drill),
        "history": history,
    }


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for kind in ("fixed", "elastic"):
        top1 = [r["test_top1"] for r in runs if r["kind"] == kind]
        if top1:
            rows.append({"kind": kind, "seeds": len(top1), "top1": top1, "mean": sum(top1) / len(top1)})
            rows[-1]["std"] = study.spread(top1)
    return rows


def table(summary: dict[str, Any]) -> str:
    lines = [
        "| run | seeds | test top-1 (mean ± std) | per seed | world size per epoch (first seed) |",
        "|---|---|---|---|---|",
    ]
    for row in summary["groups"]:
        sizes = next((r["world_sizes"] for r in summary["runs"] if r["kind"] == row["kind"]), [])
        std = f" ± {row['std']:.2f}" if row["std"] is not None else ""
        lines.append(
            f"| {row['kind']} | {row['seeds']} | {row['mean']:.2f}{std} | {', '.join(f'{v:.2f}' for v in row['top1'])} "
            f"| {' '.join(map(str, sizes))} |"
        )
    return "\n".join(lines)


def epochs_table(summary: dict[str, Any]) -> str:
    """The first elastic run's metrics.jsonl, epoch by epoch: the world it ran on, its
    global batch and learning rate, what it read, where it got to."""
    run = next(r for r in summary["runs"] if r["kind"] == "elastic")
    lines = [
        f"`{run['name']}`: {'; '.join(run['drill']['events'])}.",
        "",
        "| epoch | world_size | global_batch | lr | train_samples | test_top1 |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for h in run["history"]:
        lines.append(
            f"| {h['epoch']} | {h['world_size']} | {h['global_batch']} | {h['lr']:.4g} | {h['train_samples']:.0f} "
            f"| {h['test_top1']:.2f} |"
        )
    return "\n".join(lines)


TABLES = {"comparison": table, "epochs": epochs_table}


def plot(summary: dict[str, Any], path: Path) -> None:
    """Test top-1 per epoch of every run, elastic runs' epochs marked with their world size."""
    fig, (curves, sizes) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=[3, 1])
    colors = {"fixed": "tab:blue", "elastic": "tab:orange"}
    for run in summary["runs"]:
        epochs = [h["epoch"] for h in run["history"]]
        curves.plot(epochs, [h["test_top1"] for h in run["history"]], color=colors[run["kind"]], alpha=0.8)
        sizes.step(epochs, run["world_sizes"], where="mid", color=colors[run["kind"]], alpha=0.6)
    for kind, color in colors.items():
        curves.plot([], [], color=color, label=kind)
    curves.set_ylabel("test top-1 (%)")
    curves.legend()
    curves.set_title("catkd resnet8 on a CIFAR-10 subset: elastic (1-2 workers) vs fixed (2)")
    sizes.set_ylabel("workers")
    sizes.set_yticks([1, 2])
    sizes.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_elastic_study(cfg: ElasticStudyConfig, command: str) -> dict[str, Any]:
    setup = study.set_up(cfg)
    cache = study.study_cache(setup.cfg, setup.data, setup.teacher["weights"], setup.cache_root, cfg.epochs)
    ray.shutdown()  # each run below brings up its own cluster
    path = setup.out / "results.json"
    done = {r["name"]: r for r in json.loads(path.read_text())["runs"]} if path.exists() else {}
    summary = {
        "command": command,
        "date": datetime.now().strftime("%Y-%m-%d"),
        "settings": asdict(cfg),
        "data": setup.data_info,
        "teacher": {k: v for k, v in setup.teacher.items() if k != "history"},
        "cache": cache,
        "runs": [],
    }
    for seed in cfg.seeds:
        for kind in cfg.kinds:
            run_cfg = run_config(cfg, setup.base, cache, kind, seed)
            if run_cfg.name not in done:
                print(f"\n[elastic] {run_cfg.name}", flush=True)
                done[run_cfg.name] = run_one(run_cfg)
            summary["runs"] = [done[name] for name in sorted(done, key=lambda n: (done[n]["seed"], done[n]["kind"]))]
            summary["groups"] = summarize(summary["runs"])
            path.write_text(json.dumps(summary, indent=1))
    plot(summary, setup.out / "elastic.png")
    (setup.out / "results.md").write_text(table(summary) + "\n")
    print("\n" + table(summary))
    return summary


if __name__ == "__main__":
    if sys.argv[1:2] == ["--drill"]:
        main_drill(sys.argv[2:])
    elif "--report" in sys.argv:  # tables only, from a finished run's JSON (docs/training.md's blocks)
        i = sys.argv.index("--report")
        sys.exit(regenerate(sys.argv[1:i] + sys.argv[i + 1 :], TABLES, "elastic", __doc__.splitlines()[0]))
    else:
        run_elastic_study(
            study.parse_args(sys.argv[1:], ElasticStudyConfig, __doc__),
            command=shlex.join(["python", "bench/elastic_study.py", *sys.argv[1:]]),
        )
