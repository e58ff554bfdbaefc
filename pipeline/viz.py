"""Pictures of CAMs (``catkd viz``): test images with each model's CAM for the true class
overlaid, how often each CAM's peak falls inside the object's box, and how closely a
student's CAMs follow its teacher's."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # headless: clusters and CI have no display
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from catkd.models import CAMClassifier, load_checkpoint, read_checkpoint
from pipeline.data.loader import ReaderConfig, ShardStream
from pipeline.data.views import AugmentSpec, normalize_batch
from pipeline.storage import filesystem


@torch.no_grad()
def raw_true_class_cams(
    model: CAMClassifier, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 500
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, h, w) CAM of each sample's true class at the model's own resolution, unscaled,
    and (N,) the model's predicted classes."""
    model.eval()
    cams, preds = [], []
    for first in range(0, len(inputs), batch_size):
        x, y = inputs[first : first + batch_size], labels[first : first + batch_size]
        logits, cam = model(x)
        cams.append(cam[torch.arange(len(y)), y])
        preds.append(logits.argmax(1))
    return torch.cat(cams), torch.cat(preds)


def true_class_cams(
    model: CAMClassifier, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 500
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H, W) CAM of each sample's true class, upsampled to the input size, in [0, 1],
    and (N,) the model's predicted classes."""
    raw, preds = raw_true_class_cams(model, inputs, labels, batch_size)
    cam = F.interpolate(raw.unsqueeze(1), size=inputs.shape[-2:], mode="bilinear", align_corners=False).squeeze(1)
    low = cam.amin(dim=(1, 2), keepdim=True)
    high = cam.amax(dim=(1, 2), keepdim=True)
    return (cam - low) / (high - low).clamp_min(1e-8), preds


def cam_agreement(teacher_cams: torch.Tensor, student_cams: torch.Tensor, *, resolution: int = 2) -> dict[str, float]:
    """How closely a student's CAMs for the true class (``raw_true_class_cams``) follow
    the teacher's: mean cosine similarity of the maps pooled to ``resolution`` (what CAT
    trains), of the full maps, and the fraction of samples whose two maps peak in the
    same cell (a student map of another size is resized to the teacher's first)."""
    t, s = teacher_cams, student_cams
    if s.shape[-2:] != t.shape[-2:]:
        s = F.interpolate(s[:, None], size=t.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    pooled = F.cosine_similarity(
        F.adaptive_avg_pool2d(t, resolution).flatten(1), F.adaptive_avg_pool2d(s, resolution).flatten(1)
    )
    return {
        f"cosine_pooled_r{resolution}": float(pooled.mean()),
        "cosine_full": float(F.cosine_similarity(t.flatten(1), s.flatten(1)).mean()),
        "peak_cell_agreement": float((t.flatten(1).argmax(1) == s.flatten(1).argmax(1)).float().mean()),
        "cells": int(t[0].numel()),
        "samples": len(t),
    }


def load_split(
    data: str, split: str = "test", spec: str = "cifar", limit: int | None = None
) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[str]]:
    """A whole (small) split in evaluation views, or its first ``limit`` samples (in id
    order: class-mixed): the raw batch (uint8 images, labels and boxes where the dataset
    has them), the normalised inputs and the class names."""
    stream = ShardStream(
        ReaderConfig(
            data=data,
            split=split,
            batch_size=limit or 10**9,
            train=False,
            spec=AugmentSpec.preset(spec),
            normalize=False,
        )
    )
    batch = next(iter(stream))
    return batch, normalize_batch(stream.cfg.spec, batch["image"]), stream.index.classes


def load_model(url: str, num_classes: int) -> CAMClassifier:
    """A checkpoint of the project's format from any fsspec URL, as the architecture it names."""
    fs, path = filesystem(url)
    raw = fs.cat_file(path)
    return load_checkpoint(io.BytesIO(raw), read_checkpoint(io.BytesIO(raw))["arch"], num_classes)


def peak_in_box_rate(cams: torch.Tensor, boxes: torch.Tensor) -> float:
    """Fraction of samples whose CAM maximum lies inside the object's box (x0, y0, x1, y1)."""
    width = cams.shape[2]
    flat = cams.flatten(1).argmax(1)
    ys, xs = flat // width, flat % width
    inside = (xs >= boxes[:, 0]) & (xs < boxes[:, 2]) & (ys >= boxes[:, 1]) & (ys < boxes[:, 3])
    return float(inside.float().mean())


def save_cam_grid(
    path: str,
    images: np.ndarray,
    cams_by_model: dict[str, torch.Tensor],
    titles: list[str],
    captions: dict[str, list[str]] | None = None,
) -> None:
    """One row per image: the image, then each model's overlaid CAM (captioned, e.g. with
    the model's prediction, when ``captions`` gives a line per image for that model)."""
    rows, cols = len(images), 1 + len(cams_by_model)
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 1.8 * rows), squeeze=False)
    for r in range(rows):
        axes[r, 0].imshow(images[r])
        axes[r, 0].set_title(titles[r], fontsize=7)
        for c, (name, cams) in enumerate(cams_by_model.items(), start=1):
            axes[r, c].imshow(images[r])
            axes[r, c].imshow(cams[r].numpy(), cmap="jet", alpha=0.45)
            heading = f"{name}\n" if r == 0 else ""
            caption = captions[name][r] if captions and name in captions else ""
            if heading or caption:
                axes[r, c].set_title(heading + caption, fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    fs, target = filesystem(path)
    with fs.open(target, "wb") as f:
        f.write(buf.getvalue())


def render_cam_report(
    data: str,
    checkpoints: dict[str, str],
    out: str,
    *,
    split: str = "test",
    shown: int = 6,
    spec: str = "cifar",
    limit: int | None = None,
) -> dict[str, float]:
    """Draw ``shown`` test images, evenly spaced over the split (folder datasets are
    class-sorted), with every model's CAM for the true class and its prediction, into
    ``out`` (PNG); return each model's CAM-peak-in-box rate over the whole split (needs a
    dataset with boxes); ``limit``: from the split's first ``limit`` samples only."""
    batch, inputs, classes = load_split(data, split, spec, limit)
    picked = torch.linspace(0, len(inputs) - 1, min(shown, len(inputs))).round().long()
    cams, captions = {}, {}
    for label, url in checkpoints.items():
        cams[label], preds = true_class_cams(load_model(url, len(classes)), inputs, batch["label"])
        captions[label] = [f"says {classes[int(p)]}" for p in preds[picked]]
    titles = [classes[int(k)] for k in batch["label"][picked]]
    images = batch["image"][picked].permute(0, 2, 3, 1).numpy()
    save_cam_grid(out, images, {k: v[picked] for k, v in cams.items()}, titles, captions)
    if "box" not in batch:
        return {}
    return {label: peak_in_box_rate(c, batch["box"]) for label, c in cams.items()}
