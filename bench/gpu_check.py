"""One prepared GPU check: views rendered on the device, the cache build and training
from the cache against the student alone and online CAT-KD, on one CUDA GPU.

On a machine with a CUDA GPU, in about ten minutes, on generated ImageNet-like JPEGs
(``bench/imagenet_like.py``, nothing downloaded) sharded with the shorter side at 256:

1. the bare teacher forward rate (``tv_resnet34``, random weights, bf16 autocast,
   channels_last) on uint8 batches already on the GPU: the ceiling for the build;
2. the renderers on the same views: the largest pixel difference between the CPU
   renderer and the device renderer, and between host JPEG decoding and nvJPEG, with
   the CAT-loss difference each makes (docs/cache.md states the bound); and the strong
   recipe (TrivialAugment + CutMix, partners sent with the batch) on the device
   renderer against the CPU renderer, with the device's views/s with and without it;
3. an imagenet-spec cache build with that teacher, S = 4: loader workers read shards
   and pack the JPEG bytes (``pipeline.cache.feed``), nvJPEG decodes and the device
   renderer renders all S views on the GPU, the teacher turns them into targets and
   each data shard is committed: build views/s, and the GPU's busy fraction (NVML);
4. ``tv_resnet18`` training for a few hundred steps, three ways through the same
   loader with the device renderer (bf16, channels_last): the student alone (``ce``),
   CAT-KD from the cache, and online CAT-KD with the live teacher; images/s and the
   fraction of step time spent waiting for data; and the ceiling: the cached CAT-KD
   step on one batch already on the device.

By default it drives the classes that the Ray actors, tasks and Train workers wrap in
one process with a worker pool (``path: in-process``), so it runs where Ray is not
installed. With ``--ray`` it also runs ``catkd cache build --gpus-per-actor 1`` and
``catkd train ... use_gpu=true`` as a user would (``ray`` in the JSON).

    python bench/gpu_check.py --work /tmp/gpu_check --out docs/results/gpu_check_h200.json [--ray]
    python bench/gpu_check.py --work /tmp/gpu_dry --dry-run [--ray]   # tiny, on the CPU: checks the script itself
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.imagenet_like import make_folder  # noqa: E402
from catkd.losses import teacher_cam_targets  # noqa: E402
from catkd.models import build_model, checkpoint_payload, load_checkpoint  # noqa: E402
from pipeline.cache.commit import commit_shard, write_build_manifest  # noqa: E402
from pipeline.cache.config import CacheBuildConfig, expected_identity  # noqa: E402
from pipeline.cache.feed import render_chunks  # noqa: E402
from pipeline.cache.identity import file_sha256  # noqa: E402
from pipeline.cache.reader import TargetCache  # noqa: E402
from pipeline.cache.teacher import ShardTargets, TeacherRunner, TeacherSettings  # noqa: E402
from pipeline.data import host_images  # noqa: E402
from pipeline.data.device_render import batch_views, render_packed  # noqa: E402
from pipeline.data.host_images import FALLBACK_REASONS  # noqa: E402
from pipeline.data.loader import ReaderConfig, ShardStream, make_loader  # noqa: E402
from pipeline.data.partners import pack_for_device, shard_mix_source  # noqa: E402
from pipeline.data.shard_format import decode_image, load_shard, read_index  # noqa: E402
from pipeline.data.shard_writer import ShardConfig, shard_dataset  # noqa: E402
from pipeline.data.views import AugmentSpec, normalize_batch, render_views, view_params  # noqa: E402
from pipeline.storage import filesystem, join  # noqa: E402
from pipeline.train.config import load_config  # noqa: E402
from pipeline.train.step import cached_targets, live_targets, loss_terms  # noqa: E402

PAPER_CONFIG = os.path.join(ROOT, "jobs", "configs", "paper", "imagenet_tv_resnet34_tv_resnet18.yaml")


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
    """Each DataLoader worker turns whole data shards (its share) into chunks of ids,
    params and either rendered views (cpu renderer) or packed images (device renderer),
    which reach the main process through shared memory."""

    def __init__(self, data: str, spec: AugmentSpec, views: int, chunk_samples: int) -> None:
        self.data, self.spec, self.views, self.chunk_samples = data, spec, views, chunk_samples
        self.index = read_index(data, "train")

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        torch.set_num_threads(1)
        for j in range(worker, len(self.index.shards), workers):
            for c in render_chunks(self.data, self.index, j, self.spec, self.views, self.chunk_samples):
                chunk = {"j": j, "ids": torch.from_numpy(c.ids), "params": torch.from_numpy(c.params)}
                yield chunk | (
                    {"views": torch.from_numpy(c.views)}
                    if c.views is not None
                    else {"images": {k: torch.from_numpy(v) for k, v in c.images.items()}}
                )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_forward(
    model: torch.nn.Module, spec: AugmentSpec, batch: int, device: torch.device, bf16: bool, seconds: float = 8.0
) -> float:
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


def build(cfg: CacheBuildConfig, spec: AugmentSpec, workers: int) -> tuple[str, float, float | None, dict[str, int]]:
    """The cache build, in-process: (url, views/s, GPU busy fraction, host-decoded images by reason)."""
    index = read_index(cfg.data, cfg.split)
    fs, wpath = filesystem(cfg.weights)
    weights = fs.cat_file(wpath)
    identity = expected_identity(cfg, index, file_sha256(weights), spec)
    url = join(cfg.root, identity.cache_id)
    model = load_checkpoint(io.BytesIO(weights), cfg.teacher, index.num_classes)
    runner = TeacherRunner(
        model, spec, TeacherSettings.from_config(cfg), torch.device("cuda" if cfg.gpus_per_actor else "cpu")
    )
    runner.targets(torch.zeros((cfg.batch_size, 3, 224, 224), dtype=torch.uint8))  # warm-up: cuDNN picks its kernels
    feed = FeedStream(cfg.data, spec, cfg.num_views, max(1, cfg.chunk_views // cfg.num_views))
    cuda = runner.device.type == "cuda"
    loader = torch.utils.data.DataLoader(feed, batch_size=None, num_workers=workers, pin_memory=cuda, prefetch_factor=4)
    pending: dict[int, ShardTargets] = {}
    commits = {}
    fallbacks = np.zeros(len(FALLBACK_REASONS), np.int64)
    start = time.perf_counter()
    busy = GpuBusy() if cuda else None
    # Commits (zarr compression) run in threads while the teacher goes on, as in the actor.
    with busy or contextlib.nullcontext(), ThreadPoolExecutor(4) as committer:
        for chunk in loader:
            j = chunk["j"]
            info = index.shards[j]
            targets = pending.setdefault(
                j, ShardTargets(j, info.first_id, info.count, cfg.num_views, info.name, cfg.storage)
            )
            targets.add(runner, chunk["ids"].numpy(), chunk["params"].numpy(), chunk.get("views"), chunk.get("images"))
            if targets.complete:
                fallbacks += targets.fallbacks
                commits[j] = committer.submit(commit_shard, url, j, info.first_id, targets.arrays())
                del pending[j]
        records = {j: future.result() for j, future in commits.items()}
    seconds = time.perf_counter() - start
    fs, root = filesystem(url)
    write_build_manifest(fs, root, identity, index, cfg, records)
    return (
        url,
        index.num_samples * cfg.num_views / seconds,
        busy.fraction if busy else None,
        host_images.fallback_counts(fallbacks),
    )


def _train_config(data: str, cache: str | None, args: argparse.Namespace, mode: str):
    # The paper's ImageNet recipe (jobs/configs/paper), its lr scaled to this batch.
    overrides = [
        f"mode={mode}",
        f"student={args.student}",
        f"teacher={args.teacher}",
        f"data={data}",
        f"cache={cache or 'null'}",
        f"num_views={args.views}",
        f"batch_size={args.train_batch}",
        f"lr={0.2 * args.train_batch / 512}",
        f"bf16={args.precision == 'bf16'}",
        f"use_gpu={not args.dry_run}",
    ]
    if mode == "online-catkd":
        overrides.append(f"teacher_weights={os.path.join(args.work, 'teacher.pt')}")
    return load_config(PAPER_CONFIG, overrides)


def _student_step(cfg, model, optimizer, x, labels, t_cam, t_logits, teacher=None) -> torch.Tensor:
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        if teacher is not None:
            t_cam, t_logits = live_targets(cfg, teacher, x)
        logits, cam = model(x)
    terms = loss_terms(cfg, logits, cam, labels, t_cam, t_logits)
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    optimizer.step()
    return terms["loss"].detach()


def train(
    data: str,
    cache: str | None,
    args: argparse.Namespace,
    device: torch.device,
    mode: str,
    spec: AugmentSpec,
    teacher=None,
) -> dict[str, float]:
    """``args.steps`` training steps of the student in ``mode`` through the loader, as the
    Ray Train loop runs them (views rendered on the device with the device renderer):
    images/s and the fraction of step time spent waiting for data; ``ceiling`` also
    times the same student on one batch already on the device."""
    cfg = _train_config(data, cache, args, mode)
    stream = ShardStream(
        ReaderConfig(
            data=data,
            batch_size=cfg.batch_size,
            spec=spec,
            num_views=args.views if cache else 0,
            normalize=False,
            targets=TargetCache(cache) if cache else None,
        )
    )
    model = build_model(cfg.student, stream.index.num_classes).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    warmup, steps, epoch, images, wait = 10, 0, 0, 0, 0.0
    timed_start = time.perf_counter()
    loss_sum = torch.zeros((), device=device)
    fallbacks = np.zeros(len(FALLBACK_REASONS), np.int64)
    loader = make_loader(
        stream, args.workers, pin_memory=device.type == "cuda"
    )  # workers persist across epochs, as in the Ray loop
    last_batch = None
    while steps < args.steps:
        stream.set_epoch(epoch)
        last = time.perf_counter()
        for batch in loader:
            if steps >= warmup:
                wait += time.perf_counter() - last
            views, batch_fallbacks = batch_views(spec, batch, device, data)
            if batch_fallbacks is not None:
                fallbacks += batch_fallbacks
            x = normalize_batch(spec, views).contiguous(memory_format=torch.channels_last)
            labels = batch["label"].to(device, non_blocking=True)
            t_cam, t_logits, _ = cached_targets(batch, device)
            loss_sum += _student_step(cfg, model, optimizer, x, labels, t_cam, t_logits, teacher)
            last_batch = (x, labels, t_cam, t_logits)
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
    out = {
        "mode": mode,
        "steps": steps,
        "images_per_s": images / elapsed,
        "data_wait_fraction": wait / elapsed,
        "mean_loss": float(loss_sum) / steps,
        "host_decoded": host_images.fallback_counts(fallbacks),
    }
    if mode == "catkd":  # the ceiling: the same steps on one batch already on the device
        for _ in range(3):
            _student_step(cfg, model, optimizer, *last_batch)
        _sync(device)
        start, count = time.perf_counter(), max(10, args.steps // 4)
        for _ in range(count):
            _student_step(cfg, model, optimizer, *last_batch)
        _sync(device)
        out["ceiling_images_per_s"] = count * len(last_batch[1]) / (time.perf_counter() - start)
    return out


def renderer_bounds(
    data: str, teacher: torch.nn.Module, device: torch.device, views: int, resolution: int, count: int = 256
) -> dict[str, float]:
    """On the same views of ``count`` training images: the largest pixel difference
    between the CPU renderer and the device renderer, and between host JPEG decoding
    and the device decoder (nvJPEG on a GPU), with the CAT-loss difference each makes
    (the teacher's pooled CAMs from one against the other, as the loss compares them)."""
    index = read_index(data, "train")
    samples = load_shard(data, index, index.shards[0])[:count]
    ids = np.array([s.id for s in samples], np.int64)
    cpu_spec = AugmentSpec.preset("imagenet")
    decoded = [decode_image(s, index.image_shape, "bounds") for s in samples]
    params = np.stack(
        [view_params(cpu_spec, ids, v, np.array([d.shape[:2] for d in decoded])) for v in range(views)], axis=1
    )
    cpu = torch.stack([render_views(cpu_spec, decoded, ids, v, params[:, v])[1] for v in range(views)], 1).flatten(0, 1)
    device_spec = AugmentSpec.preset("imagenet", renderer="device", decoder="cpu")
    rendered, _ = render_packed(
        device_spec, host_images.pack(samples, index.image_shape, "bounds", "cpu"), params, ids, device, "bounds"
    )
    nvjpeg_spec = AugmentSpec.preset("imagenet", renderer="device", decoder="nvjpeg")
    nvjpeg, _ = render_packed(
        nvjpeg_spec, host_images.pack(samples, index.image_shape, "bounds", "nvjpeg"), params, ids, device, "bounds"
    )
    rendered, nvjpeg = rendered.flatten(0, 1), nvjpeg.flatten(0, 1)

    @torch.inference_mode()
    def pooled(batch: torch.Tensor) -> torch.Tensor:
        out = []
        for part in batch.split(128):
            _, cam = teacher(normalize_batch(cpu_spec, part.to(device)).contiguous(memory_format=torch.channels_last))
            out.append(teacher_cam_targets(cam.float(), resolution))
        return torch.cat(out)

    reference = pooled(cpu)
    figures = {"views": len(cpu)}
    for name, other, base in (("renderer", rendered, cpu), ("decoder", nvjpeg, rendered)):
        diff = (other.cpu().int() - base.cpu().int()).abs()
        targets, base_targets = pooled(other), pooled(base)
        figures[f"{name}_max_pixel_difference"] = int(diff.max())
        figures[f"{name}_fraction_of_pixels_differing"] = float((diff > 0).double().mean())
        # The CAT loss between teacher targets of the two: what the student would be pulled by,
        # relative to the targets' own scale.
        figures[f"{name}_cat_loss_difference"] = float(
            torch.nn.functional.mse_loss(targets, base_targets) / reference.pow(2).mean()
        )
    return figures


def recipe_check(data: str, device: torch.device, count: int = 256, rounds: int = 3) -> dict:
    """The strong recipe on the device renderer (TrivialAugment, then CutMix with a
    partner from the same data shard, its image sent with the batch) against the CPU
    renderer on the same view of ``count`` training images: the largest pixel
    difference; and the device renderer's views/s on the same packed batch with no
    stages, with TrivialAugment and with both (the stages' ops run one view at a time)."""
    index = read_index(data, "train")
    shard = load_shard(data, index, index.shards[0])
    samples, shape = shard[:count], index.image_shape
    ids, shards = np.array([s.id for s in samples], np.int64), [shard] * len(samples)
    cpu_spec = AugmentSpec.preset("imagenet", ops="trivialaugment", mix="cutmix:1.0")
    decoded = [decode_image(s, shape, "recipes") for s in samples]
    cpu_views = render_views(cpu_spec, decoded, ids, 0, mixing=shard_mix_source(shards, shape, "recipes"))[1]
    out: dict = {"views": len(samples)}
    for name, stages in (
        ("plain", {}),
        ("trivialaugment", {"ops": "trivialaugment"}),
        ("trivialaugment_cutmix", {"ops": "trivialaugment", "mix": "cutmix:1.0"}),
    ):
        spec = AugmentSpec.preset("imagenet", renderer="device", decoder="cpu", **stages)
        batch = {n: torch.from_numpy(a) for n, a in pack_for_device(spec, samples, shards, 0, shape, "recipes").items()}
        if spec.mixes:
            out["partner_images_sent"] = len(batch.get("partner_ids", ()))
        best = float("inf")
        for _ in range(rounds):
            _sync(device)
            start = time.perf_counter()
            rendered, _ = batch_views(spec, batch, device, "recipes")
            _sync(device)
            best = min(best, time.perf_counter() - start)
        out[f"{name}_views_per_s"] = len(ids) / best
        if spec.mixes:
            diff = (rendered.cpu().int() - cpu_views.int()).abs()
            out["max_pixel_difference"] = int(diff.max())
            out["fraction_of_pixels_differing"] = float((diff > 0).double().mean())
    return out


def _catkd(*args: str) -> str:
    """One ``catkd`` command as a user runs it; its output (a failure ends the check)."""
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"catkd {' '.join(args[:2])} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return result.stdout + result.stderr


def ray_path(args: argparse.Namespace, data: str, weights: str, resolution: int, device: torch.device) -> dict:
    """The build and the three trainings through the real commands on Ray:
    ``catkd cache build --gpus-per-actor 1`` and ``catkd train ... use_gpu=true``.
    Training figures are those of the last of ``--ray-epochs`` epochs (metrics.jsonl)."""
    on_gpu = device.type == "cuda"
    build_args = [
        "cache",
        "build",
        "--data",
        data,
        "--teacher",
        args.teacher,
        "--weights",
        weights,
        "--root",
        os.path.join(args.work, "ray-caches"),
        "--num-views",
        str(args.views),
        "--resolution",
        str(resolution),
        "--spec",
        "imagenet",
        "--precision",
        args.precision,
        "--batch-size",
        str(args.batch),
        "--gpus-per-actor",
        "1" if on_gpu else "0",
    ]
    if on_gpu:  # a dry run on the CPU takes the cpu renderer: the device renderer needs CUDA
        build_args += ["--renderer", args.renderer, "--decoder", args.decoder, "--cpus-per-actor", "1"]
    with GpuBusy() if on_gpu else contextlib.nullcontext() as busy:
        out = _catkd(*build_args)
    rate = float(
        re.search(r"\[cache\] built [\d,]+ views in [\d.]+ s \(([\d,]+) views/s\)", out).group(1).replace(",", "")
    )
    url = re.search(r"^url (\S+)", out, re.M).group(1)
    figures = {
        "build_views_per_s": rate,
        "gpu_busy_fraction": busy.fraction if on_gpu else None,
        "build_line": re.findall(r"^\[cache\] built.*$", out, re.M),
    }
    for mode, label in (("ce", "alone"), ("catkd", "cached"), ("online-catkd", "online")):
        overrides = [
            f"mode={mode}",
            f"student={args.student}",
            f"teacher={args.teacher}",
            f"data={data}",
            f"epochs={args.ray_epochs}",
            "num_workers=1",
            f"use_gpu={str(on_gpu).lower()}",
            f"batch_size={args.train_batch}",
            f"lr={0.2 * args.train_batch / 512}",
            f"bf16={str(args.precision == 'bf16').lower()}",
            f"loader_workers={args.workers}",
            f"cpus_per_worker={args.workers + 1}",
            f"storage_path={os.path.join(args.work, 'ray-runs')}",
            f"name={label}",
            "test_split=train",
            "warmup_epochs=0",
        ]
        overrides += (
            [f"cache={url}"]
            if mode == "catkd"
            else [f"teacher_weights={weights}", "cache=null"]
            if mode == "online-catkd"
            else ["cache=null"]
        )
        _catkd("train", PAPER_CONFIG, *overrides)
        with open(os.path.join(args.work, "ray-runs", label, "metrics.jsonl")) as f:
            last = [json.loads(line) for line in f][-1]
        figures[label] = {"images_per_s": last["images_per_s"], "data_wait_fraction": last["data_wait_fraction"]}
    return figures


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
    parser.add_argument(
        "--precision", choices=["bf16", "fp32", "tf32"], default="bf16", help="teacher and student compute precision"
    )
    parser.add_argument(
        "--renderer", choices=["device", "cpu"], default="device", help="view renderer of the build and the trainings"
    )
    parser.add_argument(
        "--decoder", choices=["nvjpeg", "cpu"], default="nvjpeg", help="JPEG decoder (nvjpeg needs --renderer device)"
    )
    parser.add_argument(
        "--ray", action="store_true", help="also run the build and the trainings through the real catkd commands on Ray"
    )
    parser.add_argument(
        "--ray-epochs", type=int, default=2, help="epochs of each Ray training (the last one's figures count)"
    )
    parser.add_argument("--out", help="write the figures here as JSON")
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny sizes on the CPU, to check the script before spending GPU time"
    )
    args = parser.parse_args()
    if args.dry_run:
        args.images, args.classes, args.views, args.batch, args.train_batch, args.steps, args.workers = (
            64,
            4,
            2,
            16,
            8,
            12,
            2,
        )
        args.teacher = args.student = "tv_resnet18"
        args.precision = "fp32"  # bf16 on a CPU without bf16 units is ~30x slower
    elif not torch.cuda.is_available():
        raise SystemExit(
            "bench/gpu_check.py needs a CUDA GPU; none is visible to torch here (--dry-run runs it tiny on the CPU)"
        )
    device = torch.device("cpu" if args.dry_run else "cuda")
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "none (dry run on the CPU)"
    print(
        f"GPU: {gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}); {os.cpu_count()} CPUs, {args.workers} "
        "loader workers",
        flush=True,
    )
    torch.backends.cudnn.benchmark = True
    os.makedirs(args.work, exist_ok=True)
    t = time.perf_counter()
    made = make_folder(os.path.join(args.work, "folder"), args.images, args.classes)
    data = os.path.join(args.work, "shards-256")
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        shard_dataset(
            ShardConfig(
                f"imagefolder:{os.path.join(args.work, 'folder')}",
                data,
                samples_per_shard=min(256, args.images // 4),
                max_short_side=256,
                progress=False,
            ),
            pool=pool,
        )
    print(
        f"data: {made['images']} ImageNet-like JPEGs ({made['mean_kb']:.0f} KB), sharded at short side 256 in "
        f"{time.perf_counter() - t:.0f} s",
        flush=True,
    )

    num_classes = read_index(data, "train").num_classes
    torch.manual_seed(0)
    teacher = build_model(args.teacher, num_classes, bias=True)
    weights = os.path.join(args.work, "teacher.pt")
    torch.save(checkpoint_payload(teacher, args.teacher), weights)
    spec = AugmentSpec.preset("imagenet")
    bare = bare_forward(
        teacher.eval().to(device).to(memory_format=torch.channels_last),
        spec,
        args.batch,
        device,
        args.precision == "bf16",
        1.0 if args.dry_run else 8.0,
    )
    print(
        f"bare teacher forward ({args.teacher}, {args.precision}, channels_last, batch {args.batch}): {bare:,.0f} "
        "images/s",
        flush=True,
    )

    resolution = load_config(PAPER_CONFIG, ["cache=-", "data=-"]).resolution
    render_spec = AugmentSpec.preset("imagenet", renderer=args.renderer, decoder=args.decoder)
    bounds = renderer_bounds(data, teacher, device, args.views, resolution, count=16 if args.dry_run else 256)
    print(
        f"renderers on {bounds['views']} views: "
        f"device vs cpu renderer: largest pixel difference {bounds['renderer_max_pixel_difference']} "
        f"({100 * bounds['renderer_fraction_of_pixels_differing']:.4f}% of pixels), CAT loss "
        f"{bounds['renderer_cat_loss_difference']:.2e} of the targets' scale; "
        f"nvJPEG vs host decoding: {bounds['decoder_max_pixel_difference']} "
        f"({100 * bounds['decoder_fraction_of_pixels_differing']:.2f}% of pixels), "
        f"CAT loss {bounds['decoder_cat_loss_difference']:.2e}",
        flush=True,
    )
    recipes = recipe_check(data, device, count=16 if args.dry_run else 256)
    print(
        f"strong recipe on the device renderer ({recipes['views']} views, TrivialAugment + CutMix, "
        f"{recipes['partner_images_sent']} partner images sent with them): largest pixel difference from the cpu "
        f"renderer {recipes['max_pixel_difference']} ({100 * recipes['fraction_of_pixels_differing']:.4f}% of "
        f"pixels); device views/s: plain {recipes['plain_views_per_s']:,.0f}, TrivialAugment "
        f"{recipes['trivialaugment_views_per_s']:,.0f}, + CutMix {recipes['trivialaugment_cutmix_views_per_s']:,.0f}",
        flush=True,
    )
    cfg = CacheBuildConfig(
        data=data,
        teacher=args.teacher,
        weights=weights,
        root=os.path.join(args.work, "caches"),
        num_views=args.views,
        spec="imagenet",
        resolution=resolution,
        renderer=args.renderer,
        decoder=args.decoder,
        precision=args.precision,
        channels_last=True,
        gpus_per_actor=0 if args.dry_run else 1,
        batch_size=args.batch,
        progress=False,
    )
    url, rate, busy, host_decoded = build(cfg, render_spec, args.workers)
    busy_text = f"GPU busy {100 * busy:.0f}% of the build" if busy is not None else "no GPU"
    print(
        f"cache build ({args.renderer} renderer, {args.decoder} decoder): "
        f"{rate:,.0f} views/s ({rate / bare:.2f} of the bare forward), {busy_text}; "
        f"{args.images * args.views:,} views -> {url}; decoded on the host instead of nvJPEG: {host_decoded or 'none'}",
        flush=True,
    )
    live_teacher = teacher.eval().to(device).to(memory_format=torch.channels_last)
    runs = {}
    for mode, cache, label in (("ce", None, "alone"), ("catkd", url, "cached"), ("online-catkd", None, "online")):
        runs[label] = train(
            data, cache, args, device, mode, render_spec, live_teacher if mode == "online-catkd" else None
        )
        print(
            f"training {args.student} {label} ({mode}; {args.precision}, channels_last, batch {args.train_batch}, "
            f"{args.workers} loader workers): "
            f"{runs[label]['images_per_s']:,.0f} images/s, "
            f"data wait {100 * runs[label]['data_wait_fraction']:.1f}% of step time",
            flush=True,
        )
    ceiling = runs["cached"]["ceiling_images_per_s"]
    cached = runs["cached"]["images_per_s"]
    print(
        f"ceiling (the cached CAT-KD step on a batch already on the device): {ceiling:,.0f} images/s; "
        f"cached/ceiling {cached / ceiling:.2f} (target 0.9), "
        f"cached/alone {cached / runs['alone']['images_per_s']:.2f} (target 0.95), "
        f"cached/online {cached / runs['online']['images_per_s']:.2f} (target 1.3)",
        flush=True,
    )
    figures = {
        "gpu": gpu,
        "path": "in-process",
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "loader_workers": args.workers,
        "data": made,
        "bare_forward_images_per_s": bare,
        "build_views_per_s": rate,
        "build_vs_bare": rate / bare,
        "gpu_busy_fraction": busy,
        "build_host_decoded": host_decoded,
        "renderer_bounds": bounds,
        "recipe_check": recipes,
        "train": {
            "alone": runs["alone"]["images_per_s"],
            "cached": cached,
            "online": runs["online"]["images_per_s"],
            "ceiling": ceiling,
            "cached_data_wait_fraction": runs["cached"]["data_wait_fraction"],
            "runs": runs,
        },
        "settings": vars(args),
    }
    if args.ray:
        ray_figures = ray_path(args, data, weights, resolution, device)
        print(
            f"ray path: cache build {ray_figures['build_views_per_s']:,.0f} views/s "
            f"({ray_figures['build_views_per_s'] / bare:.2f} of the bare forward); "
            + "; ".join(
                f"{k} {ray_figures[k]['images_per_s']:,.0f} images/s "
                f"(data wait {100 * ray_figures[k]['data_wait_fraction']:.0f}%)"
                for k in ("alone", "cached", "online")
            ),
            flush=True,
        )
        figures["ray"] = ray_figures | {"path": "ray"}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
