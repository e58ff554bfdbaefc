"""How each stage's cost grows with the shard count, on object storage at a distance
(issue 39): the shape of ImageNet-21k without its bytes.

Datasets of many shards of two tiny images each are made on a loopback S3 server (moto)
that delays every request by ``--delay-ms`` (20 ms by default) and counts requests by
kind (tests/helpers/slow_s3.py). At each size, every stage runs as a user runs it (a
``catkd`` command in a process of its own, with its own local Ray) and reports its wall
time, requests by kind, requests per shard, the driver's peak RSS and the largest Ray
worker's RSS:

    shard_fresh, shard_resume (index lost: every shard complete), shard_rerun (complete),
    build_fresh, build_resume (manifest lost: every shard complete), build_rerun,
    info, verify (--samples 1),
    train_start (``catkd train`` on the cache, stopped at its first batch),
    sweep_resolve (``catkd sweep`` of six trials, stopped once every value is checked)

A run that asks only for later stages makes the data and the cache first without
recording them. The two stopped stages' wall time is the time to the line that stops
them, and their requests are those made up to it.

The marginal cost of a shard is the slope of wall time between two sizes (the fixed cost
of starting Ray cancels). ``--tree`` runs another checkout's code (a git worktree of an
earlier commit: the "before" figures), under its own ``--label``.

The class-count case (``--classes``) builds ``topk:100``, S = 8, r = 4 over one
1,000-image shard whose data has 21,841 classes (a CIFAR-100-format pickle with that many
class names; resnet8 with random weights as the teacher) and reports the teacher actor's
peak RSS; ``--max-rss-gb`` stops a build whose actor goes beyond it (today's path before
the fix needed more than the machine).

    .venv/bin/python bench/scale_curve.py --sizes 50 200 800
    git worktree add /tmp/catkd-before 17459ec
    .venv/bin/python bench/scale_curve.py --tree /tmp/catkd-before --label before --sizes 36 216
    .venv/bin/python bench/scale_curve.py --classes 21841 1000 --label after
    git worktree add /tmp/catkd-prev ed46e8b   # verify, before and after on the same data:
    .venv/bin/python bench/scale_curve.py --sizes 200 800 2000 --stages verify --label verify-after \
        --compare-tree /tmp/catkd-prev --compare-label verify-before
    .venv/bin/python bench/scale_curve.py --manifest 14000 --label after
    .venv/bin/python bench/scale_curve.py --listing 200000 --label after
    .venv/bin/python bench/scale_curve.py --plot --markdown

Results go to docs/results/scale_curve.json as each stage ends (a rerun skips what it
holds) and the picture to docs/img/scale_curve.png.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.helpers.slow_s3 import SlowS3  # noqa: E402

RESULTS = os.path.join(ROOT, "docs", "results", "scale_curve.json")
PICTURE = os.path.join(ROOT, "docs", "img", "scale_curve.png")
BUCKET = "scale"
SAMPLES_PER_SHARD = 2
STAGES = (
    "shard_fresh",
    "shard_resume",
    "shard_rerun",
    "build_fresh",
    "build_resume",
    "build_rerun",
    "info",
    "verify",
    "train_start",
    "sweep_resolve",
)
# What a stage needs made first: the data, then the cache (made, not measured, when the
# run does not ask for those stages' figures).
PREPARES = ("shard_fresh", "build_fresh")
# Stages that only read: --compare-tree runs them with another checkout on the same data.
READ_ONLY = ("info", "verify")
# The lines that end the stopped stages (run_stage's stop_at).
STOP_AT = {"train_start": "[train] start: first batch", "sweep_resolve": "[sweep] resolve: "}
# Run in the checkout under test: catkd's own main, then this process's peak RSS.
WRAPPER = (
    "import resource, sys\n"
    "from pipeline.cli import main\n"
    "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as exc:\n    code = exc.code\n"
    "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
    "print(f'[scale] driver peak {peak:.0f} MB', file=sys.stderr)\n"
    "sys.exit(code)\n"
)


class RaySampler:
    """Polls this machine's Ray worker processes (``ray::...`` in /proc) while a command
    runs; the largest peak RSS (the kernel's high-water mark, VmHWM, so no peak between
    two polls is missed) is the stage's worker peak. Stops the command (``on_limit``)
    when a worker's RSS goes beyond ``limit_mb``."""

    def __init__(self, limit_mb: float | None = None, on_limit=None) -> None:
        self.limit_mb, self.on_limit = limit_mb, on_limit
        self.peak_mb, self.peak_name, self.stopped = 0.0, "", False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _workers():
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                if not cmd.startswith("ray::"):
                    continue
                with open(f"/proc/{pid}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
            except OSError:  # the process ended meanwhile
                continue
            peak, rss = (float(fields.get(name, "0 kB").split()[0]) / 1024 for name in ("VmHWM", "VmRSS"))
            yield cmd.split()[0], peak, rss

    def _run(self) -> None:
        while not self._done.wait(0.1):
            for name, peak_mb, rss_mb in self._workers():
                if peak_mb > self.peak_mb:
                    self.peak_mb, self.peak_name = peak_mb, name
                if self.limit_mb and rss_mb > self.limit_mb and not self.stopped:
                    self.stopped = True
                    self.on_limit()

    def __enter__(self) -> RaySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


def run_stage(
    tree: str,
    env: dict[str, str],
    s3: SlowS3,
    args: list[str],
    limit_mb: float | None = None,
    stop_at: str | None = None,
) -> dict:
    """One catkd command in ``tree``: its wall time, requests, driver and worker peaks.
    With ``stop_at`` (a line's start), the command is stopped (SIGTERM: catkd's clean stop)
    once it prints that line, and the wall time is the time to that line: a training's
    start-up to its first batch, a sweep's checks up to its first trial."""
    s3.reset()
    start, server_cpu = time.perf_counter(), time.process_time()
    proc = subprocess.Popen(
        [sys.executable, "-c", WRAPPER, *args],
        cwd=tree,
        env=env | {"PYTHONPATH": tree},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    reached: list[float] = []  # the time of stop_at's line, once it is printed

    def read_stdout() -> None:
        for line in proc.stdout:
            lines.append(line)
            if stop_at and not reached and line.startswith(stop_at):
                reached.append(time.perf_counter() - start)
                reached_cpu.append(time.process_time())
                requests.update(s3.counts())  # what it took to get there, not the stop's
                proc.send_signal(signal.SIGTERM)

    requests: dict[str, int] = {}
    reached_cpu: list[float] = []
    reader = threading.Thread(target=read_stdout, daemon=True)
    reader.start()
    with RaySampler(limit_mb, lambda: os.killpg(proc.pid, 9)) as sampler:
        err = proc.stderr.read()
        proc.wait()
        reader.join()
    wall = reached[0] if reached else time.perf_counter() - start
    out = "".join(lines)
    # The S3 server runs in this process: its CPU time is the server's work, which a real
    # object store does on its own machines (moto spends milliseconds of Python a request).
    server_cpu = (reached_cpu[0] if reached_cpu else time.process_time()) - server_cpu
    driver = next((float(line.split()[3]) for line in err.splitlines() if line.startswith("[scale] driver peak")), None)
    result = {
        "wall_s": round(wall, 3),
        "server_cpu_s": round(server_cpu, 3),
        "requests": requests or s3.counts(),
        "driver_peak_mb": driver,
        "worker_peak_mb": round(sampler.peak_mb, 1),
        "worker_peak_process": sampler.peak_name,
        "returncode": proc.returncode,
    }
    if sampler.stopped:
        result["stopped"] = f"a Ray worker went beyond {limit_mb:.0f} MB"
    elif stop_at and not reached:
        ended = f"catkd {' '.join(args)} ended ({proc.returncode}) before printing {stop_at!r}"
        raise RuntimeError(f"{ended}:\n{err[-3000:]}\n{out[-2000:]}")
    elif not reached and proc.returncode not in (0, 1):  # verify exits 1 when it finds problems
        raise RuntimeError(f"catkd {' '.join(args)} failed ({proc.returncode}):\n{err[-3000:]}\n{out[-1000:]}")
    return result


class Results:
    """docs/results/scale_curve.json: {label: {"sizes": {N: {stage: figures}}, "classes": ...}}."""

    def __init__(self, path: str = RESULTS) -> None:
        self.path = path
        self.data = json.load(open(path)) if os.path.exists(path) else {}

    def get(self, *keys):
        node = self.data
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
            if node is None:
                return None
        return node

    def put(self, value, *keys) -> None:
        node = self.data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.data, f, indent=1, sort_keys=True)
        os.replace(self.path + ".tmp", self.path)


def teacher_bytes(num_classes: int) -> bytes:
    import torch

    from catkd.models import build_model, checkpoint_payload

    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.save(checkpoint_payload(build_model("resnet8", num_classes, bias=True), "resnet8"), buf)
    return buf.getvalue()


def shard_curve(args, s3: SlowS3, env: dict[str, str], results: Results) -> None:
    fs = s3.filesystem()
    fs.pipe(f"{BUCKET}/teacher.pth", teacher_bytes(10))
    for size in args.sizes:
        base = f"s3://{BUCKET}/{args.label}/{size}"
        data, caches = f"{base}/data", f"{base}/caches"
        shard = ["shard", "synthetic:shapes", data, "--splits", "train", "--image-size", "16"]
        shard += ["--train-samples", str(size * SAMPLES_PER_SHARD), "--test-samples", "2"]
        shard += ["--samples-per-shard", str(SAMPLES_PER_SHARD), "--no-progress"]
        build = ["cache", "build", "--data", data, "--teacher", "resnet8", "--weights", f"s3://{BUCKET}/teacher.pth"]
        build += ["--root", caches, "--num-views", "2", "--no-progress"]

        steps = _steps(fs, data, caches, shard, build, args.work)
        if all(results.get(args.label, "sizes", str(size), stage) is not None for stage in args.stages):
            continue  # done; a size cut short is run again whole (the server's objects went with it)
        recorded = [stage for stage in STAGES if stage in args.stages]
        for stage in [stage for stage in PREPARES if stage not in recorded] + recorded:
            before, command = steps[stage]
            if before:
                before()
            command = command() if callable(command) else command
            if stage in recorded and stage in READ_ONLY and args.compare_tree:
                # the other checkout first, on the same data and cache: side by side
                _record(results, args.compare_label, size, stage, run_stage(args.compare_tree, env, s3, command))
            figures = run_stage(args.tree, env, s3, command, stop_at=STOP_AT.get(stage))
            if stage not in recorded:
                continue
            _record(results, args.label, size, stage, figures)


def _record(results: Results, label: str, size: int, stage: str, figures: dict) -> None:
    figures["requests_per_shard"] = round(sum(figures["requests"].values()) / size, 2)
    results.put(figures, label, "sizes", str(size), stage)
    print(
        f"[scale] {label} {size:>6} shards {stage:<13} {figures['wall_s']:8.1f} s  "
        f"{figures['requests_per_shard']:7.2f} requests/shard {figures['requests']}  "
        f"driver {figures['driver_peak_mb']} MB, largest worker {figures['worker_peak_mb']:.0f} MB",
        flush=True,
    )


def _steps(fs, data: str, caches: str, shard: list[str], build: list[str], work: str) -> dict:
    """stage -> (what to do first, or None; the command, or a function that makes it)."""
    # A training as a user starts one on the cache, stopped at its first batch. Its batch
    # and shuffle buffer are two of these 2-image shards: at ImageNet's 1,000-image shards
    # the default buffer (2,048 samples) fills from three shards, where here it would
    # take a thousand, which would measure reading, not the start-up.
    runs = os.path.join(work, "runs")
    train = ["mode=catkd", "student=resnet8", f"data={data}", "epochs=1", "batch_size=4", "shuffle_buffer=4"]
    train += ["num_workers=1", "loader_workers=0", f"storage_path={runs}", "test_split=train"]  # the data has one split

    def train_command() -> list[str]:
        shutil.rmtree(runs, ignore_errors=True)
        return ["train", *train, f"cache={cache_url()}", "name=start"]

    def sweep_command() -> list[str]:
        # Each value is checked against the data and the cache before the first trial.
        path = os.path.join(work, "sweep.yaml")
        with open(path, "w") as f:
            json.dump({"sweep": {"space": {"mode": ["kd", "dkd", "catkd"], "seed": [0, 1]}, "scheduler": "none"}}, f)
        shutil.rmtree(runs, ignore_errors=True)
        return ["sweep", path, *train, f"cache={cache_url()}", "name=resolve"]

    def cache_url() -> str:
        fs.invalidate_cache()
        (folder,) = fs.ls(caches.removeprefix("s3://"), detail=False)
        return f"s3://{folder}"

    def lose(path: str) -> None:
        fs.invalidate_cache()
        if fs.exists(path):
            fs.rm(path)

    return {
        "shard_fresh": (None, shard),
        "shard_resume": (lambda: lose(f"{data.removeprefix('s3://')}/train.index.json"), shard),
        "shard_rerun": (None, shard),
        "build_fresh": (None, build),
        "build_resume": (lambda: lose(f"{cache_url().removeprefix('s3://')}/manifest.json"), build),
        "build_rerun": (None, build),
        "info": (None, lambda: ["cache", "info", cache_url()]),
        "verify": (None, lambda: ["cache", "verify", cache_url(), "--samples", "1"]),
        "train_start": (None, train_command),
        "sweep_resolve": (None, sweep_command),
    }


def write_cifar_like(folder: str, num_classes: int, train: int, seed: int = 0) -> str:
    """A CIFAR-100-format folder (python pickles) with ``num_classes`` class names and
    ``train`` random 32 x 32 images: data with the class count of ImageNet-21k."""
    rng = np.random.default_rng(seed)
    root = os.path.join(folder, "cifar-100-python")
    os.makedirs(root, exist_ok=True)
    for split, n in (("train", train), ("test", 10)):
        batch = {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "fine_labels": rng.integers(0, num_classes, n).tolist(),
        }
        with open(os.path.join(root, split), "wb") as f:
            pickle.dump(batch, f)
    with open(os.path.join(root, "meta"), "wb") as f:
        pickle.dump({"fine_label_names": [f"class{c:05d}" for c in range(num_classes)]}, f)
    return folder


def class_curve(args, s3: SlowS3, env: dict[str, str], results: Results) -> None:
    """One 1,000-image shard at C classes, topk:100, S = 8, r = 4: the teacher actor's peak."""
    num_classes, images = args.classes
    key = f"{num_classes}x{images}"
    if results.get(args.label, "classes", key) is not None:
        return
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        write_cifar_like(tmp, num_classes, images)
        data = os.path.join(tmp, "shards")
        weights = os.path.join(tmp, "teacher.pth")
        with open(weights, "wb") as f:
            f.write(teacher_bytes(num_classes))
        shard = ["shard", f"cifar100:{tmp}", data, "--splits", "train", "--samples-per-shard", str(images)]
        run_stage(args.tree, env, s3, shard + ["--no-progress"])
        build = ["cache", "build", "--data", data, "--teacher", "resnet8", "--weights", weights]
        build += ["--root", os.path.join(tmp, "caches"), "--storage", "topk:100", "--num-views", "8"]
        build += ["--resolution", "4", "--spec", "cifar", "--actors", "1", "--no-progress"]
        figures = run_stage(args.tree, env, s3, build, limit_mb=args.max_rss_gb * 1024)
    figures |= {"num_classes": num_classes, "images": images, "storage": "topk:100", "num_views": 8, "resolution": 4}
    results.put(figures, args.label, "classes", key)
    print(
        f"[scale] {args.label} C = {num_classes:,}, {images} images, topk:100 S = 8 r = 4: {figures['wall_s']:.1f} s, "
        f"teacher actor peak {figures['worker_peak_mb']:,.0f} MB ({figures['worker_peak_process']})"
        + (f"; {figures['stopped']}" if "stopped" in figures else ""),
        flush=True,
    )


MANIFEST_PROBE = (
    "import gc, json, sys, tracemalloc\n"
    "from pipeline.cache.reader import TargetCache\n"
    "tracemalloc.start()\n"
    "cache = TargetCache(sys.argv[1])\n"
    "gc.collect()\n"
    "held, peak = tracemalloc.get_traced_memory()\n"
    "assert len(cache.records) == int(sys.argv[2])\n"
    "print(json.dumps({'held_mb': held / 2**20, 'peak_mb': peak / 2**20}))\n"
)


def manifest_case(args, s3: SlowS3, env: dict[str, str], results: Results) -> None:
    """What opening a cache of N shards leaves held in a process (a training rank, each of
    its DataLoader workers): a real cache's manifest with its record repeated N times."""
    count = args.manifest
    if results.get(args.label, "manifest", str(count)) is not None:
        return
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        write_cifar_like(tmp, 10, 8)
        data, weights = os.path.join(tmp, "shards"), os.path.join(tmp, "teacher.pth")
        with open(weights, "wb") as f:
            f.write(teacher_bytes(10))
        run_stage(args.tree, env, s3, ["shard", f"cifar100:{tmp}", data, "--splits", "train", "--no-progress"])
        build = ["cache", "build", "--data", data, "--teacher", "resnet8", "--weights", weights, "--num-views", "8"]
        run_stage(args.tree, env, s3, build + ["--root", os.path.join(tmp, "caches"), "--no-progress"])
        (cache_id,) = os.listdir(os.path.join(tmp, "caches"))
        url = os.path.join(tmp, "caches", cache_id)
        manifest = json.load(open(os.path.join(url, "manifest.json")))
        record = manifest["shards"][0]
        manifest["shards"] = [
            record | {"shard": j, "first_id": j * record["count"], "path": f"data/{j:032x}/shard-{j:06d}.zarr"}
            for j in range(count)
        ]
        with open(os.path.join(url, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        size_mb = os.path.getsize(os.path.join(url, "manifest.json")) / 2**20
        probe = subprocess.run(
            [sys.executable, "-c", MANIFEST_PROBE, url, str(count)],
            cwd=args.tree,
            env=env | {"PYTHONPATH": args.tree},
            capture_output=True,
            text=True,
            check=True,
        )
    figures = json.loads(probe.stdout.strip().splitlines()[-1]) | {"manifest_file_mb": size_mb}
    results.put(figures, args.label, "manifest", str(count))
    print(
        f"[scale] {args.label} manifest of {count:,} shards ({size_mb:.1f} MB of JSON): a process holds "
        f"{figures['held_mb']:.1f} MB after opening the cache (peak {figures['peak_mb']:.1f} MB while parsing)",
        flush=True,
    )


# Python's own allocations while listing (tracemalloc: the peak, and what stays held).
LISTING_PROBE = (
    "import json, sys, tracemalloc\n"
    "from pipeline.data.sources import ImageFolderSource\n"
    "import s3fs\n"
    "tracemalloc.start()\n"
    "source = ImageFolderSource(sys.argv[1])\n"
    "files = sum(source.size(split) for split in source.splits())\n"
    "held, peak = tracemalloc.get_traced_memory()\n"
    "print(json.dumps({'files': files, 'peak_mb': peak / 2**20, 'held_mb': held / 2**20}))\n"
)


def listing_case(args, s3: SlowS3, env: dict[str, str], results: Results) -> None:
    """The driver's memory while an image folder of N files on S3 is listed (ImageNet-21k
    has 14M): the peak of Python's allocations during the listing, and what it keeps."""
    count = args.listing
    if results.get(args.label, "listing", str(count)) is not None:
        return
    classes = max(1, count // 1000)
    fs = s3.filesystem()
    base = f"{BUCKET}/listing-{count}"
    fs.invalidate_cache()
    if not fs.exists(f"{base}/train"):
        delay, s3.delay_s = s3.delay_s, 0.0  # uploading is set-up, not measured
        names = [f"{base}/train/n{c:05d}/img{k:07d}.JPEG" for c in range(classes) for k in range(count // classes)]
        for start in range(0, len(names), 10_000):
            fs.pipe({name: b"x" for name in names[start : start + 10_000]})
        s3.delay_s = delay
    s3.reset()
    began = time.perf_counter()
    probe = subprocess.run(
        [sys.executable, "-c", LISTING_PROBE, f"s3://{base}"],
        cwd=args.tree,
        env=env | {"PYTHONPATH": args.tree},
        capture_output=True,
        text=True,
        check=True,
    )
    figures = json.loads(probe.stdout.strip().splitlines()[-1])
    figures |= {"wall_s": round(time.perf_counter() - began, 2), "requests": s3.counts(), "classes": classes}
    figures["bytes_per_file"] = figures["peak_mb"] * 2**20 / figures["files"]
    results.put(figures, args.label, "listing", str(count))
    print(
        f"[scale] {args.label} listing {figures['files']:,} files in {classes} class folders on S3: "
        f"{figures['wall_s']:.1f} s, {figures['requests']}, driver peak +{figures['peak_mb']:.0f} MB "
        f"({figures['bytes_per_file']:.0f} B a file: {figures['bytes_per_file'] * 14e6 / 2**30:.1f} GiB at 14M files)",
        flush=True,
    )


def plot(results: Results) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(results.get(label, "sizes") for label in results.data):
        return  # nothing measured against shard count yet
    stages = STAGES
    fig, axes = plt.subplots(2, (len(stages) + 1) // 2, figsize=(4 * ((len(stages) + 1) // 2), 7), sharex=True)
    colors = {label: f"C{i}" for i, label in enumerate(sorted(results.data))}  # one colour a label in every panel
    for ax, stage in zip(axes.flat, stages, strict=False):
        for label, block in sorted(results.data.items()):
            sizes = sorted(int(n) for n, row in block.get("sizes", {}).items() if stage in row)
            if sizes:
                walls = [block["sizes"][str(n)][stage]["wall_s"] for n in sizes]
                ax.plot(sizes, walls, "o-", label=label, color=colors[label])
        if ax.get_lines():
            ax.legend(fontsize=7)
        ax.set_title(stage)
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)  # linear: the fixed cost (Ray's start) and the growth both show
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("data shards")
    for ax in axes[:, 0]:
        ax.set_ylabel("wall time (s)")
    delay = next((b.get("delay_ms") for b in results.data.values() if b.get("delay_ms")), 20)
    fig.suptitle(f"catkd stage wall time against shard count, S3 on loopback at {delay} ms a request")
    fig.tight_layout()
    os.makedirs(os.path.dirname(PICTURE), exist_ok=True)
    fig.savefig(PICTURE, dpi=110)
    print(f"[scale] {PICTURE}")


IMAGENET = {"ImageNet-1k": 1_300, "ImageNet-21k": 14_000}  # shards of 1,000 images


def markdown(results: Results) -> str:
    """docs/scale.md's tables, from the JSON: per stage and label, wall time at each size,
    requests per shard, the marginal cost of a shard between the two largest sizes and
    the extrapolation to ImageNet's shard counts along the line through them (at the
    measured delay, and at 50 ms a request taking the marginal cost as all latency: an
    upper bound)."""
    lines = []
    for label, block in sorted(results.data.items(), key=lambda item: item[0] != "before"):
        sizes = sorted(int(n) for n in block.get("sizes", {}))
        if not sizes:
            continue
        delay = block.get("delay_ms", 20)
        head = " | ".join(f"{n:,} shards" for n in sizes)
        lines += [
            f"**{label}** ({delay:.0f} ms a request)",
            "",
            f"| stage | {head} | requests/shard | marginal ms/shard | server CPU ms/shard | "
            + " | ".join(f"{name} at {delay:.0f} / 50 ms" for name in IMAGENET)
            + " | driver peak MB | largest worker MB |",
            "|---" * (len(sizes) + 6 + len(IMAGENET)) + "|",
        ]
        for stage in STAGES:
            rows = {n: block["sizes"][str(n)].get(stage) for n in sizes}
            have = [n for n in sizes if rows[n]]
            if not have:
                continue
            last = rows[have[-1]]
            if len(have) >= 2:
                a, b = have[-2], have[-1]
                slope = (rows[b]["wall_s"] - rows[a]["wall_s"]) / (b - a)
                cpu = [rows[n].get("server_cpu_s") for n in (a, b)]
                server = f"{1000 * (cpu[1] - cpu[0]) / (b - a):.1f}" if None not in cpu else ""
                # fixed + slope x N through the two largest sizes; at 50 ms the whole slope
                # taken as latency, scaled by 50 / delay (an upper bound)
                fixed, slope = last["wall_s"] - max(slope, 0) * b, max(slope, 0)
                extrapolated = [
                    " / ".join(_duration(fixed + slope * shards * f) for f in (1, 50 / delay))
                    for shards in IMAGENET.values()
                ]
                marginal = f"{1000 * slope:.1f}"
            else:
                marginal, server, extrapolated = "", "", [""] * len(IMAGENET)
            walls = " | ".join(f"{rows[n]['wall_s']:.1f} s" if rows[n] else "" for n in sizes)
            lines.append(
                f"| {stage} | {walls} | {last['requests_per_shard']:.2f} | {marginal} | {server} | "
                + " | ".join(extrapolated)
                # a stopped stage's driver ends at once (catkd's clean stop): no peak printed
                + f" | {format(last['driver_peak_mb'], '.0f') if last['driver_peak_mb'] else '-'}"
                + f" | {last['worker_peak_mb']:.0f} |"
            )
        lines.append("")
    classes = [
        (label, key, row) for label, block in results.data.items() for key, row in block.get("classes", {}).items()
    ]
    if classes:
        lines += ["| teacher build | code | wall | teacher actor peak |", "|---|---|---|---|"]
        for label, _, row in sorted(classes, key=lambda r: (r[2]["num_classes"], r[0] != "before")):
            what = f"C = {row['num_classes']:,}, {row['images']:,} images, {row['storage']}, "
            what += f"S = {row['num_views']}, r = {row['resolution']}"
            peak = f"{row['worker_peak_mb'] / 1024:.2f} GiB" + (
                " (stopped: beyond the limit)" if "stopped" in row else ""
            )
            lines.append(f"| {what} | {label} | {row['wall_s']:.0f} s | {peak} |")
        lines.append("")
    manifests = [
        (label, n, row) for label, block in results.data.items() for n, row in block.get("manifest", {}).items()
    ]
    if manifests:
        lines += ["| manifest | code | held after opening | peak while parsing |", "|---|---|---|---|"]
        for label, n, row in sorted(manifests, key=lambda r: r[0] != "before"):
            lines.append(
                f"| {int(n):,} shards ({row['manifest_file_mb']:.1f} MB of JSON) | {label} | {row['held_mb']:.1f} MB "
                f"| {row['peak_mb']:.1f} MB |"
            )
        lines.append("")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def marginal_table(results: Results) -> None:
    """Seconds per added shard between consecutive sizes, per stage and label."""
    for label, block in sorted(results.data.items()):
        sizes = sorted(int(n) for n in block.get("sizes", {}))
        for stage in STAGES:
            have = [n for n in sizes if stage in block["sizes"][str(n)]]
            slopes = []
            for a, b in zip(have, have[1:], strict=False):
                wa, wb = (block["sizes"][str(n)][stage]["wall_s"] for n in (a, b))
                slopes.append(f"{a}->{b}: {1000 * (wb - wa) / (b - a):.1f} ms/shard")
            if slopes:
                print(f"[scale] {label:<8} {stage:<13} " + ", ".join(slopes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[])
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--classes", type=int, nargs=2, metavar=("C", "IMAGES"))
    parser.add_argument("--manifest", type=int, metavar="SHARDS", help="memory held by a cache of SHARDS shards")
    parser.add_argument("--listing", type=int, metavar="FILES", help="driver memory listing FILES images on S3")
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--tree", default=ROOT, help="the checkout whose catkd runs")
    parser.add_argument("--label", default="after")
    parser.add_argument(
        "--compare-tree", help="another checkout: its info and verify run just before, on the same data"
    )
    parser.add_argument("--compare-label", default="before")
    parser.add_argument("--max-rss-gb", type=float, default=8.0)
    parser.add_argument("--work", default=os.path.join(ROOT, "outputs", "scale_curve"))
    parser.add_argument("--plot", action="store_true", help="only draw the picture and print the slopes")
    parser.add_argument("--markdown", action="store_true", help="print docs/scale.md's tables")
    args = parser.parse_args()
    args.tree = os.path.abspath(args.tree)
    args.compare_tree = args.compare_tree and os.path.abspath(args.compare_tree)
    os.makedirs(args.work, exist_ok=True)
    results = Results()
    if not args.plot:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
        with SlowS3(delay_s=args.delay_ms / 1000) as s3:
            env |= s3.env()
            fs = s3.filesystem()
            fs.mkdir(BUCKET)
            results.put(args.delay_ms, args.label, "delay_ms")
            if args.sizes:
                shard_curve(args, s3, env, results)
            if args.classes:
                class_curve(args, s3, env, results)
            if args.manifest:
                manifest_case(args, s3, env, results)
            if args.listing:
                listing_case(args, s3, env, results)
    marginal_table(results)
    plot(results)
    if args.markdown:
        print(markdown(results))


if __name__ == "__main__":
    main()
