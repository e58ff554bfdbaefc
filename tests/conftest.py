"""Shared fixtures: one local Ray for the session, and small real datasets on disk."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import tempfile

import numpy as np
import pytest
from PIL import Image

SESSION_CPUS = 4
# Any local Ray the suite starts is its own, never one a user's commands share (a study
# in the background holding that one's CPUs would starve the suite's tasks). Commands the
# tests start as subprocesses inherit it and join the suite's.
os.environ["CATKD_RAY_DIR"] = tempfile.mkdtemp(prefix="catkd-suite-ray-")

# Nothing in the suite downloads: pretrained weights come from hub caches the tests make
# (tests/test_pretrained.py). Set before any hub client is imported, which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def ray_local():
    """The session's local Ray (its own CATKD_RAY_DIR, set above)."""
    import ray

    from pipeline.ray_setup import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    # Ray Train's controller polls its workers every 2 s by default, so each of the
    # suite's many short trainings waited up to a poll to start and another to finish.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    # Each training would also start a spot-preemption watcher actor (one more process);
    # no test preempts a node (tests/test_faults.py removes one, a different path).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Four logical CPUs on this 2-core machine: the suite's trainings are tiny and mostly
    # Ray Train start-ups, so tests start several at once (tests/test_train_run.py).
    init_ray(num_cpus=SESSION_CPUS)
    yield ray
    ray.shutdown()


def _save(img: Image.Image, path: str, fmt: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, format=fmt)


@pytest.fixture(scope="session")
def shapes_64(tmp_path_factory) -> str:
    """Shards of 24 training images of 64 x 64 in two shards (and 8 to test): data for
    ImageNet-spec teachers and students (timm, hub names). Read only. Written by a local
    thread pool: the fast tests that read it start no Ray."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.data.shard_writer import ShardConfig, shard_dataset

    data = str(tmp_path_factory.mktemp("shapes64") / "shapes")
    synthetic = {"train_samples": 24, "test_samples": 8, "image_size": 64, "seed": 3}
    with ThreadPoolExecutor(2) as pool:
        shard_dataset(
            ShardConfig("synthetic:shapes", data, samples_per_shard=12, synthetic=synthetic, progress=False), pool
        )
    return data


@pytest.fixture
def image_folder(tmp_path):
    """train/test splits, 3 classes, mixed JPEG/PNG, one grayscale and one RGBA image."""
    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    for split, per_class in (("train", 5), ("test", 2)):
        for c, cls in enumerate(["cat", "dog", "emu"]):
            for k in range(per_class):
                pixels = rng.integers(0, 255, (20 + c, 24, 3), dtype=np.uint8)
                img = Image.fromarray(pixels)
                fmt = "PNG" if k % 2 else "JPEG"
                if split == "train" and c == 0 and k == 0:
                    img = img.convert("L")
                if split == "train" and c == 1 and k == 1:
                    img = img.convert("RGBA")
                _save(img, str(root / split / cls / f"{k:03d}.{'png' if fmt == 'PNG' else 'jpg'}"), fmt)
    return root


@pytest.fixture
def image_folder_tar(image_folder, tmp_path):
    path = tmp_path / "folder.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(image_folder, arcname=".")
    return path


def write_cifar(root, num_classes: int, train: int = 30, test: int = 10, bad_label: int | None = None) -> str:
    """The python-pickle layout torchvision reads, with random pixels."""
    rng = np.random.default_rng(num_classes)
    folder = os.path.join(root, "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    label_key = "labels" if num_classes == 10 else "fine_labels"

    def dump(name, n, offset):
        labels = [(i + offset) % num_classes for i in range(n)]
        if bad_label is not None and name in ("data_batch_2", "train"):
            labels[3] = bad_label
        batch = {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), label_key: labels}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f)

    names = [f"class{i}" for i in range(num_classes)]
    if num_classes == 10:
        for b in range(1, 6):
            dump(f"data_batch_{b}", train // 5, b)
        dump("test_batch", test, 0)
        meta = ("batches.meta", {"label_names": names})
    else:
        dump("train", train, 0)
        dump("test", test, 0)
        meta = ("meta", {"fine_label_names": names})
    with open(os.path.join(folder, meta[0]), "wb") as f:
        pickle.dump(meta[1], f)
    return str(root)


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def pytest_collection_modifyitems(config, items):
    """Every test that needs a Ray cluster is slow (``make test-fast`` leaves them out):
    Ray start-ups, not the work, are most of such a test's time."""
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
