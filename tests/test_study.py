"""The real-data study script (bench/study.py), run as users run it on a small JPEG
archive in the CIFAR-10 layout, so that docs/RESULTS.md's command cannot rot."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from PIL import Image

from pipeline.data.synthetic import CLASSES, make_sample

ROOT = Path(__file__).resolve().parents[1]


def write_jpeg_archive(path: Path, train: int, test: int) -> None:
    """train/<class>/NNNN.jpg and test/... as in ../shared/data/cifar10-jpeg.tar.gz, with
    the synthetic shapes as pictures (learnable, so the run is a real one)."""
    with tarfile.open(path, "w:gz") as tar:
        for split, count, seed in (("train", train, 1), ("test", test, 2)):
            for index in range(count):
                sample = make_sample(seed, index)
                buf = io.BytesIO()
                Image.fromarray(sample.image).save(buf, format="JPEG", quality=90)
                info = tarfile.TarInfo(f"{split}/{CLASSES[sample.label]}/{index:04d}.jpg")
                info.size = len(buf.getvalue())
                tar.addfile(info, io.BytesIO(buf.getvalue()))


def test_study_smoke(tmp_path):
    archive = tmp_path / "shapes-jpeg.tar.gz"
    write_jpeg_archive(archive, train=300, test=100)
    out = tmp_path / "study"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [sys.executable, str(ROOT / "bench" / "study.py"), str(archive), "--out", str(out), "--subset", "0",
               "--teacher", "resnet8", "--student", "resnet8", "--teacher-epochs", "1", "--epochs", "1",
               "--view-counts", "2", "--seeds", "0", "--samples-per-shard", "100", "--loader-workers", "0"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    summary = json.loads((out / "results.json").read_text())
    assert summary["data"] == {"train_images": 300, "test_images": 100, "classes": sorted(CLASSES)}
    students = {(r["mode"], r["views"]) for r in summary["students"]}
    assert students == {("ce", None), ("kd", 1), ("catkd", 1), ("online-catkd", 1), ("cat", 1), ("catkd", 2)}
    assert all(0 <= r["top1_mean"] <= 100 for r in summary["students"])
    assert set(summary["throughput"]) == {"ce", "kd", "catkd", "cat", "online-catkd"}
    assert all(t["images_per_s"] > 0 for t in summary["throughput"].values())
    assert {int(v): c["views"] for v, c in summary["caches"].items()} == {1: 300, 2: 600}
    assert all(c["bytes_per_view"] > 0 for c in summary["caches"].values())
    assert summary["forward_images_per_s"]["teacher"] > 0
    for picture in ("cams.png", "curves.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    assert "| catkd | 2 |" in table and "cached - online CAT-KD" in table
