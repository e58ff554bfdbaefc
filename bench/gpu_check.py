"""One prepared GPU check: the cache build and CAT-KD training from the cache on a CUDA GPU.

On a machine with a CUDA GPU, in a few minutes, on generated ImageNet-like JPEGs
(``bench/imagenet_like.py``, nothing downloaded) sharded with the shorter side at 256:

1. the bare teacher forward rate (``tv_resnet34``, random weights, bf16 autocast,
   channels_last) on uint8 batches already on the GPU: the ceiling for the build;
2. an imagenet-spec cache build with that teacher: CPU workers decode each sample once
   and render its S views (``pipeline.cache.feed.render_chunks``), the teacher turns
   them into targets (``pipeline.cache.teacher``) and commits each data shard: build
   views/s, and the GPU's busy fraction sampled through NVML during the build;
3. CAT-KD training of ``tv_resnet18`` from that cache for a few hundred steps (the
   loader joins cached targets; bf16, channels_last): images/s and the fraction of
   step time spent waiting for data.

It drives the same classes that the Ray actors, Ray tasks and Ray Train workers wrap,
in one process with a worker pool, because the lent GPU machines have no Ray (its wheel
is larger than what can be carried there); the figures are those of one GPU fed by
the machine's CPUs, which is what one Ray worker with its CPUs gets.

    python bench/gpu_check.py --work /tmp/gpu_check
    python bench/gpu_check.py --work /tmp/gpu_dry --dry-run   # tiny, on the CPU: checks the script itself
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.imagenet_like import make_folder  # noqa: E402
from catkd.models import build_model, checkpoint_payload, load_checkpoint  # noqa: E402
from pipeline.cache.config import CacheBuildConfig, expected_identity  # noqa: E402
from pipeline.cache.feed import render_chunks  # noqa: E402
from pipeline.cache.identity import file_sha256  # noqa: E402
from pipeline.cache.manifest import write_manifest  # noqa: E402
from pipeline.cache.teacher import ShardTargets, TeacherRunner, TeacherSettings, build_device, commit_shard  # noqa: E402
from pipeline.data.loader import ReaderConfig, ShardStream, make_loader  # noqa: E402
from pipeline.data.shard_format import read_index  # noqa: E402
from pipeline.data.shard_writer import ShardConfig, shard_dataset  # noqa: E402
from pipeline.data.views import AugmentSpec, normalize_batch  # noqa: E402
from pipeline.storage import filesystem, join  # noqa: E402
from pipeline.train.config import load_config  # noqa: E402

PAPER_CONFIG = os.path.join(ROOT, "jobs", "configs", "paper", "imagenet_tv_resnet34_tv_resnet18.yaml")
from pipeline.train.step import cached_targets, loss_terms  # noqa: E402


class GpuBusy:
    """Samples the GPU's utilisation (NVML) every 50 ms while active."""

    def __init__(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        self.samples: list[int] = []
        self.stop = threading.Event()

    def __enter__(self) -> GpuBusy:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            self.samples.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    @property
    def fraction(self) -> float:
        return sum(self.samples) / max(1, len(self.samples)) / 100


class FeedStream(torch.utils.data.IterableDataset):
    """Each DataLoader worker renders whole data shards (its share) into chunks of
    (ids, params, views) tensors, which reach the main process through shared memory."""

    def __init__(self, data: str, spec: AugmentSpec, views: int, chunk_samples: int) -> None:
        self.data, self.spec, self.views, self.chunk_samples = data, spec, views, chunk_samples
        self.index = read_index(data, "train")

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        torch.set_num_threads(1)
        for j in range(worker, len(self.index.shards), workers):
            for c in render_chunks(self.data, self.index, j, self.spec, self.views, self.chunk_samples):
                yield {"j": j, "ids": torch.from_numpy(c.ids), "params": torch.from_numpy(c.params), "views": torch.from_numpy(c.views)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_forward(model: torch.nn.Module, spec: AugmentSpec, batch: int, device: torch.device, bf16: bool, seconds: float = 8.0) -> float:
    x8 = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8, device=device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for _ in range(3):
            model(normalize_batch(spec, x8).contiguous(memory_format=torch.channels_last))
        _sync(device)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model(normalize_batch(spec, x8).contiguous(memory_format=torch.channels_last))
            count += batch
        _sync(device)
    return count / (time.perf_counter() - start)


def build(cfg: CacheBuildConfig, workers: int) -> tuple[str, float, float | None]:
    """The cache build, in-process: (url, views/s, GPU busy fraction)."""
    index = read_index(cfg.data, cfg.split)
    fs, wpath = filesystem(cfg.weights)
    weights = fs.cat_file(wpath)
    identity = expected_identity(cfg, index, file_sha256(weights))
    url = join(cfg.root, identity.cache_id)
    model = load_checkpoint(io.BytesIO(weights), cfg.teacher, index.num_classes)
    settings = TeacherSettings(cfg.resolution, cfg.binarize, cfg.precision, cfg.channels_last, cfg.batch_size)
    spec = AugmentSpec.preset(cfg.spec, cfg.spec_seed)
    runner = TeacherRunner(model, spec, settings, build_device(cfg.gpus_per_actor))
    runner.targets(torch.zeros((cfg.batch_size, 3, 224, 224), dtype=torch.uint8))  # warm-up: cuDNN picks its kernels
    feed = FeedStream(cfg.data, spec, cfg.num_views, max(1, cfg.chunk_views // cfg.num_views))
    cuda = runner.device.type == "cuda"
    loader = torch.utils.data.DataLoader(feed, batch_size=None, num_workers=workers, pin_memory=cuda, prefetch_factor=4)
    pending: dict[int, ShardTargets] = {}
    commits = {}
    start = time.perf_counter()
    busy = GpuBusy() if cuda else None
    # Commits (zarr compression) run in threads while the teacher goes on, as in the actor.
    with busy or contextlib.nullcontext(), ThreadPoolExecutor(4) as committer:
        for chunk in loader:
            j = chunk["j"]
            info = index.shards[j]
            targets = pending.setdefault(j, ShardTargets(j, info.first_id, info.count, cfg.num_views, info.name))
            targets.add(runner, chunk["ids"].numpy(), chunk["params"].numpy(), chunk["views"])
            if targets.complete:
                commits[j] = committer.submit(commit_shard, url, j, info.first_id, targets.arrays(cfg.storage))
                del pending[j]
        records = {j: future.result() for j, future in commits.items()}
    seconds = time.perf_counter() - start
    fs, root = filesystem(url)
    write_manifest(fs, root, identity, index, cfg, [records[j] for j in range(len(index.shards))])
    return url, index.num_samples * cfg.num_views / seconds, busy.fraction if busy else None


def train(data: str, cache: str, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    # The paper's ImageNet recipe (jobs/configs/paper), its lr scaled to this batch.
    cfg = load_config(PAPER_CONFIG, [f"student={args.student}", f"data={data}", f"cache={cache}", f"num_views={args.views}",
                                     f"batch_size={args.train_batch}", f"lr={0.2 * args.train_batch / 512}", f"bf16={args.precision == 'bf16'}"])  # fmt: skip
    stream = ShardStream(ReaderConfig(data=data, batch_size=cfg.batch_size, spec=AugmentSpec.preset("imagenet"), num_views=args.views, normalize=False, cache=cache))
    model = build_model(cfg.student, stream.index.num_classes).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    spec = stream.cfg.spec
    warmup, steps, epoch, images, wait = 10, 0, 0, 0, 0.0
    timed_start = time.perf_counter()
    loss_sum = torch.zeros((), device=device)
    loader = make_loader(stream, args.workers, pin_memory=device.type == "cuda")  # workers persist across epochs, as in the Ray loop
    while steps < args.steps:
        stream.set_epoch(epoch)
        last = time.perf_counter()
        for batch in loader:
            if steps >= warmup:
                wait += time.perf_counter() - last
            x = normalize_batch(spec, batch["image"].to(device, non_blocking=True)).contiguous(memory_format=torch.channels_last)
            labels = batch["label"].to(device, non_blocking=True)
            t_cam, t_logits = cached_targets(batch, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                logits, cam = model(x)
            terms = loss_terms(cfg, logits, cam, labels, t_cam, t_logits)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimizer.step()
            loss_sum += terms["loss"].detach()
            steps += 1
            if steps == warmup:
                _sync(device)
                timed_start = time.perf_counter()
            elif steps > warmup:
                images += len(labels)
            last = time.perf_counter()
            if steps >= args.steps:
                break
        epoch += 1
    _sync(device)
    elapsed = time.perf_counter() - timed_start
    return {"steps": steps, "epochs": epoch, "images_per_s": images / elapsed, "data_wait_fraction": wait / elapsed, "mean_loss": float(loss_sum) / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/gpu_check")
    parser.add_argument("--images", type=int, default=12800)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--teacher", default="tv_resnet34")
    parser.add_argument("--student", default="tv_resnet18")
    parser.add_argument("--batch", type=int, default=512, help="teacher batch (views per forward pass)")
    parser.add_argument("--train-batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--precision", choices=["bf16", "fp32", "tf32"], default="bf16", help="teacher and student compute precision")
    parser.add_argument("--out", help="write the figures here as JSON")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, to check the script before spending GPU time")
    args = parser.parse_args()
    if args.dry_run:
        args.images, args.classes, args.views, args.batch, args.train_batch, args.steps, args.workers = 64, 4, 2, 16, 8, 12, 2
        args.teacher = args.student = "tv_resnet18"
        args.precision = "fp32"  # bf16 on a CPU without bf16 units is ~30x slower
    elif not torch.cuda.is_available():
        raise SystemExit("bench/gpu_check.py needs a CUDA GPU; none is visible to torch here (--dry-run runs it tiny on the CPU)")
    device = torch.device("cpu" if args.dry_run else "cuda")
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "none (dry run on the CPU)"
    print(f"GPU: {gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}); {os.cpu_count()} CPUs, {args.workers} loader workers", flush=True)
    torch.backends.cudnn.benchmark = True
    os.makedirs(args.work, exist_ok=True)
    t = time.perf_counter()
    made = make_folder(os.path.join(args.work, "folder"), args.images, args.classes)
    data = os.path.join(args.work, "shards-256")
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        shard_dataset(ShardConfig(f"imagefolder:{os.path.join(args.work, 'folder')}", data, samples_per_shard=min(256, args.images // 4),
                                  max_short_side=256, progress=False), pool=pool)  # fmt: skip
    print(f"data: {made['images']} ImageNet-like JPEGs ({made['mean_kb']:.0f} KB), sharded at short side 256 in {time.perf_counter() - t:.0f} s", flush=True)

    num_classes = read_index(data, "train").num_classes
    torch.manual_seed(0)
    teacher = build_model(args.teacher, num_classes, bias=True)
    weights = os.path.join(args.work, "teacher.pt")
    torch.save(checkpoint_payload(teacher, args.teacher), weights)
    spec = AugmentSpec.preset("imagenet")
    bare = bare_forward(teacher.eval().to(device).to(memory_format=torch.channels_last), spec, args.batch, device, args.precision == "bf16", 1.0 if args.dry_run else 8.0)
    print(f"bare teacher forward ({args.teacher}, {args.precision}, channels_last, batch {args.batch}): {bare:,.0f} images/s", flush=True)

    resolution = load_config(PAPER_CONFIG, ["cache=-", "data=-"]).resolution
    cfg = CacheBuildConfig(data=data, teacher=args.teacher, weights=weights, root=os.path.join(args.work, "caches"), num_views=args.views, spec="imagenet",
                           resolution=resolution,
                           precision=args.precision, channels_last=True, gpus_per_actor=0 if args.dry_run else 1, batch_size=args.batch, progress=False)  # fmt: skip
    url, rate, busy = build(cfg, args.workers)
    busy_text = f"GPU busy {100 * busy:.0f}% of the build" if busy is not None else "no GPU"
    print(f"cache build: {rate:,.0f} views/s ({rate / bare:.2f} of the bare forward), {busy_text}; "
          f"{args.images * args.views:,} views -> {url}", flush=True)  # fmt: skip
    trained = train(data, url, args, device)
    print(f"training {args.student} (catkd from the cache, {args.precision}, channels_last, batch {args.train_batch}, {args.workers} loader workers): "
          f"{trained['images_per_s']:,.0f} images/s, data wait {100 * trained['data_wait_fraction']:.1f}% of step time "
          f"({trained['steps']} steps, mean loss {trained['mean_loss']:.3f})", flush=True)  # fmt: skip
    figures = {"gpu": gpu, "torch": torch.__version__, "cpus": os.cpu_count(), "loader_workers": args.workers, "data": made,
               "bare_forward_images_per_s": bare, "build_views_per_s": rate, "build_vs_bare": rate / bare, "gpu_busy_fraction": busy,
               "train": trained, "settings": vars(args)}  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
