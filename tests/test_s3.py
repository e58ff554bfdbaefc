"""The pipeline on s3:// URLs against an S3-compatible server (moto) on loopback:
shard -> cache -> distill -> eval, and clear errors for a missing bucket. Credentials
come from the environment and never reach manifests, configs or logs."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from catkd.models import build_model, checkpoint_payload

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every test here runs catkd commands as subprocesses against a moto server.
pytestmark = pytest.mark.slow
from tests.helpers.slow_s3 import SECRET, SlowS3  # noqa: E402


@pytest.fixture(scope="module")
def s3_server():
    """moto on loopback, counting requests (tests/helpers/slow_s3.py; no delay here)."""
    with SlowS3(delay_s=0.0) as server:
        yield server


@pytest.fixture(scope="module")
def s3(s3_server):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= s3_server.env() | {"PYTHONPATH": ROOT}
    fs = s3_server.filesystem()
    fs.mkdir("catkd-bucket")
    yield env, fs


def _catkd(env, *args, timeout=400):
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def _build_args(root: str) -> list[str]:
    """catkd cache build of the shared shards and teacher (s3_data) into ``root``."""
    data, weights = "s3://catkd-bucket/data", "s3://catkd-bucket/teacher.pth"
    return [
        "cache",
        "build",
        "--data",
        data,
        "--teacher",
        "resnet8",
        "--weights",
        weights,
        "--root",
        root,
        "--num-views",
        "2",
    ]


def _one_epoch_from(cache: str) -> list[str]:
    """Overrides of a one-epoch resnet8 student on the shared shards (s3_data) and ``cache``."""
    return [
        "data=s3://catkd-bucket/data",
        f"cache={cache}",
        "student=resnet8",
        "epochs=1",
        "batch_size=16",
        "lr_decay_epochs=[1]",
        "num_workers=1",
        "loader_workers=0",
    ]


@pytest.fixture(scope="module")
def s3_data(s3):
    """One set of shards and one teacher on the object store, for every test that reads them."""
    env, fs = s3
    shard = _catkd(
        env,
        "shard",
        "synthetic:shapes",
        "s3://catkd-bucket/data",
        "--train-samples",
        "64",
        "--test-samples",
        "16",
        "--samples-per-shard",
        "16",
    )
    assert shard.returncode == 0, shard.stderr[-3000:]
    assert fs.exists("catkd-bucket/data/train.index.json")
    buf = io.BytesIO()
    torch.save(checkpoint_payload(build_model("resnet8", 10, bias=True), "resnet8"), buf)
    fs.pipe("catkd-bucket/teacher.pth", buf.getvalue())
    return shard


@pytest.fixture(scope="module")
def s3_cache(s3, s3_data):
    """Two ``catkd cache build`` commands of one cache, racing on the object store: the
    race is checked by its own test, and the cache it leaves is the round trip's."""
    env, _ = s3
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", *_build_args("s3://catkd-bucket/caches")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=400) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outputs]
    url = next(line.split()[1] for line in outputs[0][0].splitlines() if line.startswith("url "))
    return url, outputs


def test_round_trip_on_s3(s3, s3_data, s3_cache):
    env, fs = s3
    shard = s3_data
    url, builds = s3_cache
    assert url.startswith("s3://catkd-bucket/caches/")
    train = _catkd(
        env,
        "train",
        "mode=catkd",
        *_one_epoch_from(url),
        "storage_path=s3://catkd-bucket/runs",
        "name=s3run",
    )
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert fs.exists("catkd-bucket/runs/s3run/metrics.jsonl")
    evaluation = _catkd(
        env,
        "eval",
        "s3://catkd-bucket/runs/s3run/student_cam.pt",
        "--data",
        "s3://catkd-bucket/data",
        "--device",
        "cpu",
    )
    assert evaluation.returncode == 0 and "top-1" in evaluation.stdout, evaluation.stderr[-3000:]

    # No credential is written anywhere: manifests, indexes, run records, logs.
    for path in fs.find("catkd-bucket"):
        if path.endswith((".json", ".jsonl")):
            assert SECRET not in fs.cat_file(path).decode(errors="ignore"), path
    for output in (shard, train, evaluation):
        assert SECRET not in output.stdout + output.stderr
    assert all(SECRET not in out + err for out, err in builds)


def test_missing_bucket_is_a_clear_error(s3):
    env, _ = s3
    result = _catkd(
        env,
        "shard",
        "synthetic:shapes",
        "s3://no-such-bucket/data",
        "--train-samples",
        "8",
        "--test-samples",
        "8",
        timeout=120,
    )
    assert result.returncode == 2
    assert "s3://no-such-bucket/data: bucket 'no-such-bucket' does not exist" in result.stderr


def test_image_folder_and_archive_on_s3_shard_like_local(s3, image_folder, tmp_path):
    """An image-folder directory and a .tar.gz on the object store give the same shards
    (same fingerprint) as the same folder on local disk; the archive is streamed."""
    env, fs = s3
    fs.put(str(image_folder), "catkd-bucket/folder", recursive=True)
    archive = tmp_path / "folder.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(image_folder, arcname=".")
    fs.put(str(archive), "catkd-bucket/folder.tar.gz")
    local = _catkd(env, "shard", f"imagefolder:{image_folder}", str(tmp_path / "local"), "--samples-per-shard", "4")
    assert local.returncode == 0, local.stderr[-3000:]
    for name, source in (("from-dir", "s3://catkd-bucket/folder"), ("from-tar", "s3://catkd-bucket/folder.tar.gz")):
        remote = _catkd(env, "shard", f"imagefolder:{source}", f"s3://catkd-bucket/{name}", "--samples-per-shard", "4")
        assert remote.returncode == 0, remote.stderr[-3000:]
        for split in ("train", "test"):
            there = json.loads(fs.cat_file(f"catkd-bucket/{name}/{split}.index.json"))
            here = json.loads((tmp_path / "local" / f"{split}.index.json").read_text())
            assert there["fingerprint"] == here["fingerprint"] and there["num_samples"] == here["num_samples"]
        assert not fs.exists(f"catkd-bucket/{name}/_staging")
    # A rerun trusts the recorded sizes and ETags: nothing is written again.
    records = {p: fs.info(p)["LastModified"] for p in fs.find("catkd-bucket/from-dir") if p.endswith(".tar")}
    fs.rm("catkd-bucket/from-dir/train.index.json")
    again = _catkd(
        env, "shard", "imagefolder:s3://catkd-bucket/folder", "s3://catkd-bucket/from-dir", "--samples-per-shard", "4"
    )
    assert again.returncode == 0 and "4 of 4 shards already complete" in again.stdout + again.stderr, again.stderr[
        -3000:
    ]
    assert {p: fs.info(p)["LastModified"] for p in records} == records
    verify = _catkd(env, "shard", "--verify", "s3://catkd-bucket/from-dir")
    assert verify.returncode == 0 and "every shard matches its index" in verify.stdout, verify.stderr[-3000:]


def test_unreadable_source_location_is_a_clear_error(s3, tmp_path):
    env, _ = s3
    result = _catkd(env, "shard", "imagefolder:s3://no-such-bucket/folder", str(tmp_path / "out"), timeout=120)
    assert result.returncode == 2
    assert "imagefolder:s3://no-such-bucket/folder" in result.stderr or "s3://no-such-bucket/folder" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out" / "train.index.json").exists()


def test_two_concurrent_cache_builds_on_s3_stay_consistent(s3, s3_cache, s3_server):
    """Completion records are conditional writes (If-None-Match): of two builds racing
    for each data shard exactly one wins, and no record points at deleted data. Verify
    reads the manifest once, whatever the shard count (issue 39: each shard's task read
    it again)."""
    env, fs = s3
    url, _ = s3_cache
    root = url.removeprefix("s3://")
    records = [json.loads(fs.cat_file(p)) for p in fs.find(f"{root}/done")]
    assert len(records) == 4
    for record in records:
        assert fs.exists(f"{root}/{record['path']}/zarr.json"), record["path"]
    s3_server.reset()
    verify = _catkd(env, "cache", "verify", url, "--samples", "4")
    assert verify.returncode == 0, verify.stderr[-3000:]
    assert SECRET not in verify.stdout + verify.stderr
    assert s3_server.count_of("GET", "manifest.json") == 1, s3_server.counts()


def test_verify_reads_a_small_shard_whole_and_a_large_one_by_its_sampled_samples(s3, s3_cache, s3_server, monkeypatch):
    """A verify check of one cache shard, counted request by request: the group's
    metadata and each array in one concurrent round, then the data shard: whole when it
    is small (one GET), else the drawn samples' offsets and then their bytes."""
    from pipeline.cache import verify
    from pipeline.cache.reader import TargetCache
    from pipeline.weights import read_weights

    for key, value in s3_server.env().items():  # this process reads the store as the commands do
        monkeypatch.setenv(key, value)
    url, _ = s3_cache
    cache = TargetCache(url)
    weights, _ = read_weights(cache.identity.teacher_arch, cache.manifest["teacher_weights"])
    checker = verify.ShardChecker(url, cache.manifest, sample_views=2, weights=weights, seed=0)
    j = sorted(cache.records)[1]
    record = cache.records[j]
    assert checker.check(j, record) == []  # the first check also loads the teacher and the data index
    drawn = {k for _, k in checker.draws(j, cache.identity.num_views, record["count"])}
    metadata_and_arrays = 1 + len(record["checksums"])
    s3_server.reset()
    assert checker.check(j, record) == []
    assert s3_server.counts() == {"GET": metadata_and_arrays + 1}, s3_server.counts()  # no HEAD
    monkeypatch.setattr(verify, "WHOLE_SHARD_BYTES", 0)  # as an ImageNet shard (~110 MB) is read
    s3_server.reset()
    assert checker.check(j, record) == []
    assert s3_server.counts() == {"GET": metadata_and_arrays + 1 + len(drawn)}, s3_server.counts()


def test_bad_credentials_are_a_clear_error(tmp_path):
    """moto enforces credentials when started with INITIAL_NO_AUTH_ACTION_COUNT=0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server_env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=server_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            import time

            time.sleep(0.1)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env |= {
            "AWS_ACCESS_KEY_ID": "not-a-key",
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "PYTHONPATH": ROOT,
        }
        result = _catkd(
            env,
            "shard",
            "synthetic:shapes",
            "s3://some-bucket/data",
            "--train-samples",
            "8",
            "--test-samples",
            "8",
            timeout=120,
        )
        assert result.returncode == 2, result.stderr[-2000:]
        assert "s3://some-bucket/data:" in result.stderr and (
            "credentials" in result.stderr or "access denied" in result.stderr
        )
        assert "Traceback" not in result.stderr and SECRET not in result.stdout + result.stderr
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_damaged_shard_on_s3_is_named_and_repaired_alone(s3, s3_cache):
    """Half of one object of data shard 1 cut off on the object store: reading it names
    the shard, verify --repair retires it alone, the printed build rebuilds it with the
    same values (the same sha256 per array). Runs last: it leaves the shared cache as it
    found it."""
    import shlex

    env, fs = s3
    url, _ = s3_cache
    root = url.removeprefix("s3://")
    fs.invalidate_cache()
    done = {j: json.loads(fs.cat_file(f"{root}/done/shard-{j:06d}.json")) for j in range(4)}
    cam = next(p for p in fs.find(f"{root}/{done[1]['path']}") if "/cam/c/" in p)
    data = fs.cat_file(cam)
    fs.pipe(cam, data[: len(data) // 2])

    read = subprocess.run(
        [sys.executable, "-c", f"from pipeline.cache import TargetCache; TargetCache({url!r}).read(1, 0)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert "CacheDamagedError" in read.stderr and "data shard 1 (samples from 000000016) is damaged" in read.stderr

    repair = _catkd(env, "cache", "verify", url, "--samples", "0", "--repair")
    assert repair.returncode == 1 and "retired data shard(s) 1:" in repair.stdout, repair.stderr[-3000:]
    fs.invalidate_cache()  # this process's listings predate the repair's deletions
    assert not fs.exists(f"{root}/manifest.json") and not fs.exists(f"{root}/done/shard-000001.json")
    command = shlex.split(repair.stdout.strip().splitlines()[-1])
    assert command[:3] == ["catkd", "cache", "build"]
    rebuild = _catkd(env, *command[1:])
    assert rebuild.returncode == 0 and "[cache] rebuilt 1 of 4 shards" in rebuild.stdout, rebuild.stderr[-3000:]
    fs.invalidate_cache()
    after = {j: json.loads(fs.cat_file(f"{root}/done/shard-{j:06d}.json")) for j in range(4)}
    assert after[1]["checksums"] == done[1]["checksums"] and after[1]["path"] != done[1]["path"]
    # the rebuilt shard holds the same values (its arrays' sha256s), the others are untouched
    assert {j: after[j] for j in (0, 2, 3)} == {j: done[j] for j in (0, 2, 3)}
    assert SECRET not in repair.stdout + repair.stderr + rebuild.stdout + rebuild.stderr


def test_sweep_on_s3_stops_lagging_trials_and_resumes_from_there_after_its_driver_is_killed(
    s3, s3_data, s3_cache, tmp_path
):
    """A 4-trial ASHA sweep over beta, two trials at a time, with storage_path on the
    object store: its driver is killed once the first trial has finished; the same
    command restores the experiment from the store without rerunning that trial, ASHA
    stops at least one trial early, and the rest finish. Tune's state, every trial's run
    and the report are on the store; the trials are runs of one MLflow experiment (a
    local SQLite store) named after the sweep."""
    import mlflow

    env, fs = s3
    url, _ = s3_cache
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "sweep",
        *_one_epoch_from(url),
        "epochs=2",
        "cpus_per_worker=1",
        "storage_path=s3://catkd-bucket/sweeps",
        "name=beta",
        "tracking=mlflow",
        f"tracking_uri={tracking}",
        # The total loss grows with beta (CE + beta x CAT), so ranking by it makes ASHA's
        # decisions certain: a trial reaching the rung after a lower beta's is stopped.
        "--space",
        "beta=grid:0.5,8,32,64",
        "--metric",
        "train_loss",
        "--mode",
        "min",
        "--max-concurrent",
        "2",
    ]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=ROOT
    )
    lines, deadline = [], time.time() + 300
    while not any(line.endswith(": finished") for line in lines):
        line = proc.stdout.readline().decode()
        assert line and time.time() < deadline, "".join(lines)[-3000:]
        lines.append(line.rstrip())
    first = next(line for line in lines if line.endswith(": finished")).split()[1].rstrip(":")
    # Two trials shared the machine: both had started before the first one finished.
    assert sum(line.endswith(": started") for line in lines) >= 2, "\n".join(lines)
    time.sleep(3)  # Tune records its state every second (pipeline.train.sweep.STATE_PERIOD_S)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=400, env=env, cwd=ROOT)
    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, output[-3000:]
    assert "resuming" in output and f"{first}: started" not in output, output[-3000:]
    summary = json.loads(fs.cat_file("catkd-bucket/sweeps/beta/sweep.json"))
    trials = {row["trial"]: row for row in summary["trials"]}
    assert len(trials) == 4 and summary["metric"] == "train_loss"
    statuses = [row["status"] for row in trials.values()]
    assert "stopped" in statuses and "finished" in statuses and "failed" not in statuses, output[-3000:]
    assert trials[first]["status"] == "finished" and trials[first]["params"]["beta"] in (0.5, 8.0)
    # The rungs' records from before the restart were replayed (ResumableASHA): the high
    # betas that reached the rung afterwards were compared with them and stopped.
    by_beta = {row["params"]["beta"]: row["status"] for row in trials.values()}
    assert by_beta[32.0] == "stopped" and by_beta[64.0] == "stopped", output[-3000:]
    for row in trials.values():
        assert row["epochs"] >= 1 and row["images_per_s"] > 0 and row["cat_after_epoch_1"] > 0
        assert row["beta_cat_after_epoch_1"] == pytest.approx(row["params"]["beta"] * row["cat_after_epoch_1"])
        assert row["status"] == "stopped" or row["epochs"] == 2
        assert fs.exists(f"catkd-bucket/sweeps/beta/{row['trial']}/metrics.jsonl")
    assert "stopped@1" in output and "beta*CAT ep 1" in output
    assert fs.cat_file("catkd-bucket/sweeps/beta/sweep.png")[:8] == b"\x89PNG\r\n\x1a\n"
    client = mlflow.MlflowClient(tracking_uri=tracking)
    tracked = client.search_runs([client.get_experiment_by_name("beta").experiment_id])
    # A trial that ran its last epoch ended by itself (its student exported, its run
    # closed); one the scheduler stopped early is closed by the sweep's driver as KILLED.
    status = {str(row["params"]["beta"]): row["status"] for row in trials.values()}
    assert {r.data.params["beta"]: r.info.status for r in tracked} == {
        beta: {"finished": "FINISHED", "stopped": "KILLED"}[end] for beta, end in status.items()
    }
    done = [r for r in tracked if r.info.status == "FINISHED"]
    assert all(r.data.metrics.get("test_top1") is not None for r in done)
    assert all("student_cam.pt" in {a.path for a in client.list_artifacts(r.info.run_id)} for r in done)
    assert SECRET not in "\n".join(lines) + output
