"""Teacher target cache: values, storage forms, resume after a kill, concurrent builds,
identity checks and bad teacher output, on a local Ray with a small teacher."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from catkd.errors import ConfigError
from catkd.losses import cat_loss, teacher_cam_targets
from catkd.models import build_model, checkpoint_payload
from pipeline.cache import (
    CacheBuildConfig,
    CacheBuildError,
    CacheMismatchError,
    TargetCache,
    build_cache,
    expected_identity,
)
from pipeline.cache.identity import file_sha256
from pipeline.cache.verify import cache_info, verify_cache
from pipeline.data.shard_format import decode_image, load_shard, read_index
from pipeline.data.shard_writer import ShardConfig, shard_dataset
from pipeline.data.views import AugmentSpec, normalize_batch, render_views


@pytest.fixture(scope="module")
def setup(ray_local, tmp_path_factory):
    base = tmp_path_factory.mktemp("cache")
    data = str(base / "shapes")
    shard_dataset(
        ShardConfig(
            "synthetic:shapes",
            data,
            samples_per_shard=25,
            synthetic={"train_samples": 75, "test_samples": 10, "seed": 4},
            progress=False,
        )
    )
    torch.manual_seed(0)
    teacher = build_model("resnet8", 10, bias=True)
    with torch.no_grad():
        teacher.bias.normal_()
    weights = str(base / "teacher.pth")
    torch.save(checkpoint_payload(teacher, "resnet8"), weights)
    return {"data": data, "weights": weights, "teacher": teacher.eval(), "base": base}


def _cfg(setup, root, **kw):
    return CacheBuildConfig(
        data=setup["data"],
        teacher="resnet8",
        weights=setup["weights"],
        root=str(root),
        num_views=3,
        batch_size=32,
        progress=False,
        **kw,
    )


def _direct(setup, j, view, binarize=False):
    """The teacher's targets for one data shard and view, computed here without the cache."""
    index = read_index(setup["data"], "train")
    samples = load_shard(setup["data"], index, index.shards[j])
    images = [decode_image(s, index.image_shape, "t") for s in samples]
    ids = np.array([s.id for s in samples])
    spec = AugmentSpec.preset("cifar")
    params, views = render_views(spec, images, ids, view)
    with torch.no_grad():
        logits, cam = setup["teacher"](normalize_batch(spec, views))
    return ids, params, teacher_cam_targets(cam, 2, binarize=binarize).numpy(), logits.numpy()


@pytest.fixture(scope="module")
def float16_cache(setup):
    return build_cache(_cfg(setup, setup["base"] / "root16"))


def test_stored_targets_equal_direct_computation(setup, float16_cache):
    cache = TargetCache(float16_cache)
    for j, view in [(0, 0), (1, 2), (2, 1)]:
        ids, params, cam, logits = _direct(setup, j, view)
        got = cache.read(j, view)
        assert np.array_equal(got["ids"], ids) and np.array_equal(got["params"], params)
        np.testing.assert_allclose(got["cam"], cam, rtol=2e-3, atol=2e-3 * np.abs(cam).max())
        np.testing.assert_allclose(got["logits"], logits, rtol=2e-3, atol=2e-3 * np.abs(logits).max())
    assert cache.manifest["arrays"]["cam"] == {"shape": [25, 3, 10, 2, 2], "dtype": "float16"}


@pytest.mark.parametrize("storage, tolerance", [("float32", 1e-5), ("int8", 1e-2), ("features", 2e-3)])
def test_storage_forms(setup, storage, tolerance):
    url = build_cache(_cfg(setup, setup["base"] / f"root-{storage}", storage=storage))
    got = TargetCache(url).read(1, 1)
    _, _, cam, _ = _direct(setup, 1, 1)
    error = np.abs(got["cam"] - cam).max() / np.abs(cam).max()
    assert error < tolerance
    loss_error = abs(
        float(cat_loss(torch.zeros_like(torch.tensor(cam)), torch.tensor(got["cam"])))
        / float(cat_loss(torch.zeros_like(torch.tensor(cam)), torch.tensor(cam)))
        - 1
    )
    assert loss_error < 0.01
    # The stored form (what training loaders send) decodes on the device to the same values.
    from pipeline.train.step import cached_targets

    cache = TargetCache(url)
    stored = cache.read(1, 1, decode=False)
    assert (
        stored.get("cam", stored.get("features")).dtype
        == {"float32": np.float32, "int8": np.int8, "features": np.float16}[storage]
    )
    head = torch.from_numpy(cache.head_weight) if cache.head_weight is not None else None
    t_cam, t_logits, _ = cached_targets(
        {f"t_{k}": torch.from_numpy(v) for k, v in stored.items() if k not in ("ids", "params")},
        torch.device("cpu"),
        head,
    )
    np.testing.assert_allclose(t_cam.numpy(), got["cam"], rtol=1e-5, atol=1e-6 * np.abs(got["cam"]).max())
    np.testing.assert_array_equal(t_logits.numpy(), got["logits"])


def test_binarized_targets(setup):
    url = build_cache(_cfg(setup, setup["base"] / "root-bin", binarize=True))
    cache = TargetCache(url)
    assert cache.identity.target_kind == "binarized_cam"
    _, _, cam, _ = _direct(setup, 0, 2, binarize=True)
    np.testing.assert_allclose(cache.read(0, 2)["cam"], cam, atol=1e-3)


def test_topk_cache_keeps_the_full_caches_top_classes_and_verifies(setup, float16_cache):
    """The same teacher and views as the float16 cache: topk:3 holds its three highest
    classes per view, the same CAT loss over them, and passes verify's recompute."""
    from catkd.losses import CATKDConfig, catkd_loss

    url = build_cache(_cfg(setup, setup["base"] / "root-topk", storage="topk:3"))
    topk, full = TargetCache(url), TargetCache(float16_cache)
    assert topk.identity.storage == "topk:3" and topk.identity.cache_id != full.identity.cache_id
    assert topk.manifest["arrays"]["classes"] == {"shape": [25, 3, 3], "dtype": "int16"}
    for j, view in [(0, 0), (2, 1)]:
        got, ref = topk.read(j, view), full.read(j, view)
        assert np.array_equal(got["ids"], ref["ids"]) and np.array_equal(got["params"], ref["params"])
        order = np.argsort(-ref["logits"], axis=1, kind="stable")[:, :3]
        assert np.array_equal(got["classes"], order)
        np.testing.assert_array_equal(got["cam"], np.take_along_axis(ref["cam"], order[..., None, None], 1))
        student = torch.randn(len(got["ids"]), 10, 4, 4)
        cat = {
            name: catkd_loss(
                CATKDConfig(ce_weight=0, select_n=3 if name == "full" else None),
                None,
                student,
                torch.from_numpy(t["cam"]),
                teacher_logits=torch.from_numpy(t["logits"]),
                teacher_classes=torch.from_numpy(t["classes"]) if "classes" in t else None,
            )["cat"]
            for name, t in (("full", ref), ("topk", got))
        }
        torch.testing.assert_close(cat["topk"], cat["full"], rtol=1e-6, atol=1e-7)
    info = cache_info(url)
    assert info["raw_bytes_per_view"] == 3 * (2 + 8 + 2) + 2 + 20
    assert info["raw_bytes_per_view"] < cache_info(float16_cache)["raw_bytes_per_view"]
    assert "B per view" in info["size"]
    assert verify_cache(url, sample_views=4) == []


@pytest.mark.parametrize(
    "stages, width",
    [
        ({"ops": "trivialaugment", "erase": 0.5}, 5 + 3 + 5),
        ({"ops": "randaugment:1:9", "mix": "cutmix:1.0"}, 5 + 3 + 6),
    ],
)
def test_a_cache_with_augmentation_stages_replays_them_and_verifies(setup, stages, width):
    """Stages drawn into the views (TrivialAugment and erasing; RandAugment and CutMix
    with a partner from the same data shard): the stored parameters replay to the pixels
    the teacher saw (its targets equal a direct computation on the replayed views),
    verify recomputes them clean, and the repair's build command carries the stages."""
    from pipeline.cache.verify import rebuild_command
    from pipeline.data.partners import shard_mix_source

    cfg = _cfg(setup, setup["base"] / f"root-{'-'.join(map(str, stages.values()))}", **stages)
    cache = TargetCache(build_cache(cfg))
    spec = cfg.augment_spec()
    assert all(cache.identity.spec[key] == value for key, value in stages.items())
    assert cache.manifest["arrays"]["params"] == {"shape": [25, 3, width], "dtype": "int32"}
    index = read_index(setup["data"], "train")
    for j, view in [(0, 1), (2, 2)]:
        got = cache.read(j, view)
        samples = load_shard(setup["data"], index, index.shards[j])
        images = [decode_image(s, index.image_shape, "t") for s in samples]
        stored = {s.id: row for s, row in zip(samples, got["params"], strict=True)}
        mixing = shard_mix_source([samples] * len(samples), index.image_shape, "t", lambda p, rows=stored: rows[p.id])
        _, views = render_views(spec, images, got["ids"], view, stored_params=got["params"], mixing=mixing)
        with torch.no_grad():
            logits, cam = setup["teacher"](normalize_batch(spec, views))
        np.testing.assert_allclose(got["logits"], logits.numpy(), rtol=2e-3, atol=2e-3 * np.abs(logits.numpy()).max())
        plain = render_views(AugmentSpec.preset("cifar"), images, got["ids"], view)[1]
        assert (views != plain).any(dim=(1, 2, 3)).float().mean() > 0.3  # the stages changed the views
    assert verify_cache(cache.url, sample_views=4) == []
    command = rebuild_command(cache)
    assert all(f"--{key} {value}" in command for key, value in stages.items())


def test_topk_above_the_class_count_is_refused_at_start(setup, tmp_path):
    from catkd.errors import ConfigError

    with pytest.raises(ConfigError, match="storage: topk:11 keeps 11 classes per view, but the data has only 10"):
        build_cache(_cfg(setup, tmp_path / "never", storage="topk:11"))
    assert not (tmp_path / "never").exists()


def test_rerun_of_complete_cache_is_a_no_op(setup, float16_cache):
    before = os.stat(os.path.join(float16_cache, "manifest.json")).st_mtime_ns
    assert build_cache(_cfg(setup, setup["base"] / "root16")) == float16_cache
    assert os.stat(os.path.join(float16_cache, "manifest.json")).st_mtime_ns == before


def _cli_build(setup, root):
    args = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "cache",
        "build",
        "--data",
        setup["data"],
        "--teacher",
        "resnet8",
        "--weights",
        setup["weights"],
        "--root",
        str(root),
        "--num-views",
        "3",
        "--batch-size",
        "32",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, env=env)


def _arrays(url):
    cache = TargetCache(url)
    return {(j, v): cache.read(j, v) for j in cache.records for v in range(cache.identity.num_views)}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        for name in a[key]:
            assert np.array_equal(a[key][name], b[key][name]), (key, name)


def test_killed_build_resumes_to_the_same_values(setup, float16_cache):
    root = setup["base"] / "root-killed"
    proc = _cli_build(setup, root)
    cache_dir = root / os.path.basename(float16_cache)
    deadline = time.time() + 120
    while not (cache_dir / "done" / "shard-000000.json").exists():
        assert proc.poll() is None and time.time() < deadline, "build ended before it could be interrupted"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait()
    assert not (cache_dir / "manifest.json").exists()
    with pytest.raises(CacheMismatchError, match="partial cache"):
        TargetCache(str(cache_dir))
    url = build_cache(_cfg(setup, root))
    _assert_same(_arrays(url), _arrays(float16_cache))
    assert verify_cache(url, sample_views=2) == []


def test_two_concurrent_builds_do_not_corrupt_the_cache(setup, float16_cache):
    root = setup["base"] / "root-concurrent"
    procs = [_cli_build(setup, root) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0].decode() for p in procs]  # one shared Ray: the builds may take turns
    assert [p.returncode for p in procs] == [0, 0], outputs
    url = str(root / os.path.basename(float16_cache))
    _assert_same(_arrays(url), _arrays(float16_cache))
    committed = {
        json.loads((root / os.path.basename(url) / "done" / f).read_text())["path"].split("/")[1]
        for f in os.listdir(os.path.join(url, "done"))
    }
    assert set(os.listdir(os.path.join(url, "data"))) == committed  # the losers' copies are gone
    assert verify_cache(url, sample_views=2) == []


def test_identity_mismatch_names_the_field(setup, float16_cache):
    cache = TargetCache(float16_cache)
    index = read_index(setup["data"], "train")
    cfg = _cfg(setup, "unused")
    right = expected_identity(cfg, index, file_sha256(open(setup["weights"], "rb").read()))
    cache.check(right)
    with pytest.raises(CacheMismatchError, match="teacher_sha256"):
        cache.check(expected_identity(cfg, index, "0" * 64))
    with pytest.raises(CacheMismatchError, match="spec.seed: the run needs 9, the cache holds 0"):
        cache.check(expected_identity(_cfg(setup, "unused", spec_seed=9), index, right.teacher_sha256))
    with pytest.raises(CacheMismatchError, match="dataset_fingerprint"):
        index.fingerprint = "f" * 64
        cache.check(expected_identity(cfg, index, right.teacher_sha256))
    with pytest.raises(CacheMismatchError, match="resolution: the run needs 4"):
        cache.check(
            expected_identity(
                _cfg(setup, "unused", resolution=4), read_index(setup["data"], "train"), right.teacher_sha256
            )
        )


def test_foreign_folder_is_not_a_cache(tmp_path):
    with pytest.raises(CacheMismatchError, match="not a catkd cache"):
        TargetCache(str(tmp_path))


def test_non_finite_teacher_output_is_an_error(setup):
    teacher = build_model("resnet8", 10, bias=True)
    with torch.no_grad():
        teacher.head.weight[3].fill_(float("nan"))
    weights = str(setup["base"] / "nan-teacher.pth")
    torch.save(checkpoint_payload(teacher, "resnet8"), weights)
    cfg = _cfg(setup, setup["base"] / "root-nan")
    cfg.weights = weights
    with pytest.raises(
        CacheBuildError, match=r"train-00000\d\.tar: sample 0000000\d\d view 0: non-finite teacher output"
    ):
        build_cache(cfg)
    done = [p for p in (setup["base"] / "root-nan").rglob("done/*.json")]
    assert done == []


def test_info_and_verify_cli(setup, float16_cache):
    info = cache_info(float16_cache)
    assert info["bytes_per_view"] > 0 and info["shards_complete"] == "3/3"
    ok = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "cache", "verify", float16_cache, "--samples", "3"],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stderr


def test_verify_detects_corruption(setup):
    url = build_cache(_cfg(setup, setup["base"] / "root-corrupt", storage="float32"))
    record = TargetCache(url).records[1]
    chunk = next(
        p
        for p in (setup["base"] / "root-corrupt").rglob("*")
        if p.is_file() and "/cam/c/" in str(p) and record["path"] in str(p)
    )
    data = bytearray(chunk.read_bytes())
    data[-20] ^= 0xFF
    chunk.write_bytes(bytes(data))
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "cache", "verify", url, "--samples", "0"], capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "data shard 1" in result.stderr


def test_bf16_cache_verifies_clean_and_a_tampered_value_still_fails(setup):
    url = build_cache(_cfg(setup, setup["base"] / "root-bf16", precision="bf16", storage="float32"))
    cache = TargetCache(url)
    assert cache.identity.precision == "bf16" and cache.manifest["build"]["precision"] == "bf16"
    assert verify_cache(url, sample_views=3) == []
    # Values 20% off, with checksums to match (as a wrong build would write them): the
    # bf16 tolerance is not so loose that recomputing the samples lets them through.
    import zarr

    from pipeline.cache.commit import array_checksums

    group = zarr.open_group(str(next((setup["base"] / "root-bf16").rglob("shard-000000.zarr"))), mode="r+")
    arrays = {name: group[name][:] for name in ("cam", "logits", "params", "ids")}
    arrays["cam"] *= 1.2
    group["cam"][:] = arrays["cam"]
    manifest_path = os.path.join(url, "manifest.json")
    manifest = json.load(open(manifest_path))
    manifest["shards"][0]["checksums"] = array_checksums(arrays)
    json.dump(manifest, open(manifest_path, "w"))
    problems = verify_cache(url, sample_views=4, seed=1)
    assert problems and all("data shard 0" in p and "stored targets differ" in p for p in problems)


def test_precision_is_part_of_the_identity(setup, float16_cache):
    index = read_index(setup["data"], "train")
    sha = file_sha256(open(setup["weights"], "rb").read())
    fp32, bf16 = (expected_identity(_cfg(setup, "unused", precision=p), index, sha) for p in ("fp32", "bf16"))
    assert fp32.cache_id != bf16.cache_id  # a resumed build with another precision never mixes shards
    with pytest.raises(CacheMismatchError, match="precision: the run needs 'bf16', the cache holds 'fp32'"):
        TargetCache(float16_cache).check(bf16)


def test_old_cache_format_is_refused_with_a_clear_message(setup, float16_cache, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(float16_cache, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["identity"]["format_version"] = 1
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheMismatchError, match="cache format version 1, this catkd reads version 4.*rebuild it"):
        TargetCache(str(old))


def test_gpu_asked_without_cuda_is_a_clear_error(setup):
    from pipeline.cache.teacher import build_device

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(CacheBuildError, match="asked for 1.0 GPU per teacher, but torch finds no CUDA device"):
        build_device(1.0)
    with pytest.raises(CacheBuildError, match="the Ray cluster has no GPU"):
        build_cache(_cfg(setup, setup["base"] / "root-gpu", gpus_per_actor=1.0))


def test_orphans_are_removed_only_after_their_lease(setup, float16_cache, tmp_path):
    import shutil

    root = tmp_path / "root"
    cache_dir = root / os.path.basename(float16_cache)
    shutil.copytree(float16_cache, cache_dir)
    os.remove(cache_dir / "manifest.json")
    stray = cache_dir / "data" / "feedbeef" / "shard-000001.zarr"
    stray.mkdir(parents=True)
    (stray / "zarr.json").write_text("{}")
    build_cache(_cfg(setup, root))  # a young folder may be a concurrent build's: it stays
    assert stray.exists()
    os.remove(cache_dir / "manifest.json")
    build_cache(_cfg(setup, root, orphan_lease_s=0.0))
    assert not stray.exists() and verify_cache(str(cache_dir), sample_views=1) == []


def test_actors_holding_every_cpu_still_build(setup, float16_cache):
    """As many CPU actors as the test cluster has CPUs leave none for the feed tasks: the
    feed shares the actors' cores instead of waiting forever."""
    from tests.conftest import SESSION_CPUS

    url = build_cache(_cfg(setup, setup["base"] / "root-busy", actors=SESSION_CPUS))
    _assert_same(_arrays(url), _arrays(float16_cache))


def _damage_chunk(cache_dir, j: int, array: str = "cam") -> None:
    """Cut the stored object of ``array`` of data shard ``j`` to half its bytes (a failed copy)."""
    record = TargetCache(str(cache_dir)).records[j]
    path = next(
        p for p in cache_dir.rglob("*") if p.is_file() and f"/{array}/c/" in str(p) and record["path"] in str(p)
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_damaged_shard_is_named_where_read_and_repaired_alone(setup, float16_cache, capsys):
    """A damaged chunk: reading it names the cache, shard, array and repair; verify
    --repair retires that shard only; the printed build rebuilds it bitwise (and verify
    passes: what a training reads is then what it was); a training fails in one line
    before."""
    import shlex

    from pipeline.cache.reader import CacheDamagedError
    from pipeline.cli import main

    url = build_cache(_cfg(setup, setup["base"] / "root-repair"))
    before = _arrays(url)
    cache_dir = setup["base"] / "root-repair" / os.path.basename(url)
    _damage_chunk(cache_dir, 1)
    with pytest.raises(CacheDamagedError) as damaged:
        TargetCache(url).read(1, 0)
    message = str(damaged.value)
    assert "\n" not in message and f"{url}: data shard 1 (samples from 000000025) is damaged: array cam" in message
    assert f"catkd cache verify {url} --repair" in message
    untouched = {j: (cache_dir / "done" / f"shard-{j:06d}.json").read_bytes() for j in (0, 2)}

    # a training on it stops in one line naming the shard, exit 2
    runs = setup["base"] / "runs-repair"
    train_args = [
        "train",
        "mode=catkd",
        "student=resnet8",
        f"data={setup['data']}",
        f"cache={url}",
        "epochs=1",
        "batch_size=25",
        "loader_workers=1",
        f"storage_path={runs}",
        "name=after-repair",
    ]
    failed = subprocess.run([sys.executable, "-m", "pipeline.cli", *train_args], capture_output=True, text=True)
    assert failed.returncode == 2, failed.stderr[-3000:]
    errors = [line for line in failed.stderr.splitlines() if line.startswith("catkd train: error:")]
    assert len(errors) == 1 and "data shard 1 (samples from 000000025) is damaged" in errors[0], failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr

    capsys.readouterr()
    assert main(["cache", "verify", url, "--samples", "0", "--repair"]) == 1
    out = capsys.readouterr().out
    assert "retired data shard(s) 1:" in out
    command = out.strip().splitlines()[-1]
    assert command.startswith("catkd cache build ")
    with pytest.raises(CacheMismatchError, match="partial cache"):  # never read while it is rebuilt
        TargetCache(url)
    assert {j: (cache_dir / "done" / f"shard-{j:06d}.json").read_bytes() for j in (0, 2)} == untouched
    assert main(shlex.split(command)[1:]) == 0
    assert "[cache] rebuilt 1 of 3 shards" in capsys.readouterr().out
    _assert_same(_arrays(url), before)  # bitwise the values of the original build
    assert verify_cache(url, sample_views=0) == []


def test_damaged_manifest_is_one_line_naming_it_and_the_build_rewrites_it(setup, float16_cache, tmp_path):
    """A manifest cut in half (a failed copy): verify --repair and a reader say so in one
    line naming the file and the repair; the build run again writes it from the
    completion records without recomputing a shard."""
    import shutil

    root = tmp_path / "root"
    cache_dir = root / os.path.basename(float16_cache)
    shutil.copytree(float16_cache, cache_dir)
    manifest = cache_dir / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[: manifest.stat().st_size // 2])
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "cache", "verify", str(cache_dir), "--repair"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "manifest.json: damaged manifest" in lines[0] and "catkd cache build" in lines[0]
    manifest.unlink()
    build_cache(_cfg(setup, root))
    _assert_same(_arrays(str(cache_dir)), _arrays(float16_cache))


# ---------------------------------------------------------------- caches derived without the teacher


@pytest.fixture(scope="module")
def float32_cache(setup):
    # the same root as test_storage_forms' float32 build: whichever runs second finds it complete
    return build_cache(_cfg(setup, setup["base"] / "root-float32", storage="float32"))


def _all_arrays(url: str) -> dict[int, dict[str, np.ndarray]]:
    from pipeline.cache.layout import read_arrays

    cache = TargetCache(url)
    return {
        j: read_arrays(cache.store(j), dict.fromkeys(cache.records[j]["checksums"], slice(None)))
        for j in sorted(cache.records)
    }


def test_derived_caches_equal_direct_builds_and_leave_the_source_alone(setup, float32_cache, capsys):
    """float32 -> topk:3 against the direct topk:3 build (the same kept classes, values to
    float16 rounding: the direct build computes the kept maps from pooled features); S = 3
    -> 2 and r = 2 -> 1 against a direct S = 2, r = 1 build (the same view parameters,
    values to float32 rounding: the teacher's batches differ), which is also what a student
    asking the source for r = 1 gets; the same settings again are the same cache; the
    source is never written; a derived cache verifies against it."""
    from pipeline.cache.derive import DeriveConfig, derive_cache

    source_files = sorted(os.walk(float32_cache))
    root = setup["base"] / "derived"
    topk_url = derive_cache(DeriveConfig(float32_cache, str(root), storage="topk:3", progress=False))
    direct_topk = build_cache(_cfg(setup, setup["base"] / "root-topk", storage="topk:3"))
    derived, direct = _all_arrays(topk_url), _all_arrays(direct_topk)
    for j in direct:
        for name in ("ids", "params", "classes"):
            np.testing.assert_array_equal(derived[j][name], direct[j][name])
        for name in ("cam", "logits"):
            want = direct[j][name].astype(np.float32)
            np.testing.assert_allclose(
                derived[j][name].astype(np.float32), want, rtol=2e-3, atol=1e-3 * np.abs(want).max()
            )

    fewer_url = derive_cache(DeriveConfig(float32_cache, str(root), num_views=2, resolution=1, progress=False))
    direct_fewer = build_cache(
        dataclasses.replace(_cfg(setup, setup["base"] / "root-s2-r1", storage="float32", resolution=1), num_views=2)
    )
    derived, direct = _all_arrays(fewer_url), _all_arrays(direct_fewer)
    for j in direct:
        for name in ("ids", "params"):
            np.testing.assert_array_equal(derived[j][name], direct[j][name])
        # the teacher's float32 arithmetic: a build batches S = 2 views otherwise than S = 3
        for name in ("logits", "cam"):
            want = direct[j][name]
            np.testing.assert_allclose(derived[j][name], want, rtol=1e-5, atol=1e-6 * np.abs(want).max())

    # one cache, every exact resolution: the r = 2 source of resnet8's 8 x 8 CAMs serves r = 1,
    # its maps pooled by the CAT loss being the r = 1 build's (and so its loss)
    from catkd.errors import CatkdError
    from pipeline.train.config import TrainConfig
    from pipeline.train.run import resolve

    source = TargetCache(float32_cache)
    assert source.manifest["teacher_cam_size"] == [8, 8] and source.served_resolutions == [2, 1]
    assert resolve(TrainConfig(data=setup["data"], cache=float32_cache, resolution=1)).resolution == 1
    with pytest.raises(
        CatkdError, match=r"holds r = 2 maps of the teacher's 8x8 CAMs and serves resolution 2, 1; got 4"
    ):
        resolve(TrainConfig(data=setup["data"], cache=float32_cache, resolution=4))
    fine = torch.from_numpy(source.read(0, 1)["cam"])
    coarse = torch.from_numpy(TargetCache(direct_fewer).read(0, 1)["cam"])
    student = torch.randn(fine.shape[0], 10, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cat_loss(student, fine, 1), cat_loss(student, coarse, 1), rtol=1e-5, atol=1e-7)
    assert resolve(TrainConfig(data=setup["data"], cache=fewer_url, resolution=1)).num_views == 2

    ident = TargetCache(topk_url).identity
    assert ident.derived_from == {
        "cache_id": TargetCache(float32_cache).identity.cache_id,
        "transform": {"storage": "topk:3", "num_views": 3, "resolution": 2},
    }
    capsys.readouterr()
    assert derive_cache(DeriveConfig(float32_cache, str(root), storage="topk:3", progress=False)) == topk_url
    assert "complete" in capsys.readouterr().out
    assert sorted(os.walk(float32_cache)) == source_files  # nothing written under the source
    info = cache_info(topk_url)
    assert info["derived_from"]["url"] == float32_cache and info["derived_from"]["transform"]["storage"] == "topk:3"

    # verify derives every shard again from the source: a shard rewritten with sound
    # checksums but other values is found
    assert verify_cache(fewer_url, sample_views=1) == []
    assert "every shard is derived again" in capsys.readouterr().err
    _rewrite_shard(fewer_url, 1, lambda arrays: arrays | {"cam": arrays["cam"] * np.float32(1.5)})
    problems = verify_cache(fewer_url, sample_views=0)
    assert problems == [f"{fewer_url}: data shard 1: array cam differs from what {float32_cache} derives"], problems


def _rewrite_shard(url: str, j: int, change) -> None:
    """Data shard ``j`` replaced by ``change(arrays)`` with a matching record and manifest:
    damage that checksums cannot see."""
    from pipeline.cache.commit import array_checksums, done_path
    from pipeline.cache.layout import read_arrays, write_group

    cache = TargetCache(url)
    record = dict(cache.records[j])
    arrays = change(read_arrays(cache.store(j), dict.fromkeys(record["checksums"], slice(None))))
    record["path"] = f"data/rewritten/shard-{j:06d}.zarr"
    record["checksums"] = array_checksums(arrays)
    write_group(os.path.join(url, record["path"]), arrays)
    with open(done_path(url, j), "w") as f:
        json.dump(record, f)
    manifest_path = os.path.join(url, "manifest.json")
    with open(manifest_path) as f:
        manifest = json.load(f)
    manifest["shards"][j] = record
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)


def test_what_a_cache_cannot_give_is_refused_naming_the_option(setup, float16_cache, tmp_path):
    from pipeline.cache.derive import DeriveConfig, derive_cache

    topk = build_cache(_cfg(setup, setup["base"] / "root-topk", storage="topk:3"))
    cases = [
        (DeriveConfig(topk, str(tmp_path), storage="float16"), "storage: .* keeps the top 3 classes per view"),
        (DeriveConfig(topk, str(tmp_path), storage="topk:5"), "gives topk:K for K <= 3 only"),
        (DeriveConfig(float16_cache, str(tmp_path), storage="features"), "needs the teacher's pooled features"),
        (DeriveConfig(float16_cache, str(tmp_path), num_views=4), "num_views: .* holds 3 views per sample; got 4"),
        (DeriveConfig(float16_cache, str(tmp_path), resolution=3), "resolution: .* serves resolution 2, 1 exactly"),
        (DeriveConfig(float16_cache, str(tmp_path)), "nothing to derive"),
    ]
    for cfg, message in cases:
        with pytest.raises(ConfigError, match=message):
            derive_cache(cfg)
    assert not os.listdir(tmp_path)
