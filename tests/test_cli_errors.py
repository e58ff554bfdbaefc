"""Every subcommand turns bad input into one line on stderr naming the field or file,
and exit status 2 (DESIGN section 8); run in-process through ``pipeline.cli.main``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.data.shard_writer import ShardConfig, shard_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "shapes"
    shard_dataset(
        ShardConfig(
            "synthetic:shapes",
            str(out),
            samples_per_shard=20,
            synthetic={"train_samples": 40, "test_samples": 10},
            progress=False,
        )
    )
    return str(out)


def _cases(shards: str, tmp: str) -> list[tuple[list[str], str]]:
    not_a_checkpoint = f"{tmp}/notes.txt"
    with open(not_a_checkpoint, "w") as f:
        f.write("not a checkpoint\n")
    train = ["train", f"data={shards}", "mode=ce", f"storage_path={tmp}/runs"]
    sweep = ["sweep", f"data={shards}", "mode=ce", f"storage_path={tmp}/runs"]
    build = [
        "cache",
        "build",
        "--data",
        shards,
        "--teacher",
        "resnet8",
        "--weights",
        f"{tmp}/teacher.pt",
        "--root",
        f"{tmp}/caches",
    ]
    return [
        (train + ["epochs=abc"], "epochs: expected an integer, got 'abc'"),
        (
            train + ["mode=cee"],
            "mode: expected one of ce, kd, dkd, dist, catkd, cat, online-kd, online-dkd, online-dist, online-catkd, "
            "got 'cee'",
        ),
        (train + ["bogus_key=1"], "bogus_key: unknown key"),
        (train + ["epochs=-1"], "epochs: must be at least 1, got -1"),
        (train + ["resolution=0"], "resolution: must be at least 1, got 0"),
        (train + ["beta=lots"], "beta: expected a number, got 'lots'"),
        (train + ["bf16=maybe"], "bf16: expected true or false, got 'maybe'"),
        (train + ["lr_decay_epochs=[1, x]"], "lr_decay_epochs[1]: expected an integer, got 'x'"),
        (train + ["student=resnet999"], "student: unknown model 'resnet999'"),
        (train + ["mode=catkd"], "cache: mode catkd reads teacher targets from a cache"),
        (["train", f"{tmp}/nowhere.yaml", "epochs=1"], f"{tmp}/nowhere.yaml: cannot read the config file"),
        (["train", f"data={tmp}/no-shards", "mode=ce", f"storage_path={tmp}/runs"], f"{tmp}/no-shards"),
        (train + ["renderer=device"], "use_gpu=false"),
        (
            build[:2] + ["--data", shards, "--teacher", "resnet8", "--weights", "w", "--root", "r", "--num-views", "0"],
            "num_views: must be at least 1, got 0",
        ),
        (
            build[:2] + ["--data", shards, "--teacher", "nonesuch", "--weights", "w", "--root", "r"],
            "teacher: unknown model 'nonesuch'",
        ),
        (build, f"weights: {tmp}/teacher.pt: no such file"),
        (build + ["--renderer", "device"], "runs on the teacher's GPU"),
        (["eval", not_a_checkpoint, "--data", shards], f"{not_a_checkpoint}: cannot be read as a PyTorch checkpoint"),
        (["eval", f"{tmp}/missing.pt", "--data", shards], f"{tmp}/missing.pt: no such checkpoint"),
        (["cache", "info", f"{tmp}"], f"{tmp}: not a catkd cache"),
        (["cache", "verify", f"{tmp}"], f"{tmp}: not a catkd cache"),
        (["cache", "derive", f"{tmp}", "--root", f"{tmp}/d", "--storage", "topk:2"], f"{tmp}: not a catkd cache"),
        (["cache", "derive", f"{tmp}", "--root", f"{tmp}/d", "--num-views", "0"], "num_views: must be at least 1"),
        (["shard", f"imagefolder:{tmp}/nowhere", f"{tmp}/out"], f"{tmp}/nowhere: source path does not exist"),
        (build + ["--num-views", "abc"], "num_views: expected an integer, got 'abc'"),
        (
            build + ["--storage", "bogus"],
            "storage: expected one of float16, float32, int8, features or topk:K (K classes per view), got 'bogus'",
        ),
        (build + ["--storage", "topk:0"], "storage: topk:K keeps K >= 1 classes per view, got 'topk:0'"),
        (build + ["--ops", "autoaugment"], "ops: expected none, trivialaugment or randaugment:N:M"),
        (build + ["--erase", "2"], "erase: the erasing probability must be in [0, 1], got 2.0"),
        (build + ["--mix", "cutmix:0"], "mix: ALPHA of Beta(ALPHA, ALPHA) must be in (0, 10], got 0"),
        (train + ["mix=mixup"], "mix: expected none, mixup:ALPHA or cutmix:ALPHA"),
        (train + ["ops=randaugment:2:31"], "ops: randaugment:N:M takes a magnitude bin M in 0..30, got M=31"),
        (build + ["--storage", "topk:11"], "storage: topk:11 keeps 11 classes per view, but the data has only 10"),
        (build + ["--gpus-per-actor", "-1"], "gpus_per_actor: must be at least 0, got -1.0"),
        (
            ["shard", "synthetic:shapes", f"{tmp}/s", "--samples-per-shard", "0"],
            "samples_per_shard: must be at least 1",
        ),
        (["shard", "synthetic:shapes", f"{tmp}/s", "--jpeg-quality", "101"], "jpeg_quality: must be at most 100"),
        (["shard", "synthetic:shapes", f"{tmp}/s", "--train-samples", "x"], "train_samples: expected an integer"),
        (
            ["shard", f"imagefolder:{tmp}", f"{tmp}/s", "--train-samples", "9"],
            "--train-samples: an option of synthetic",
        ),
        (["shard", "--verify", f"{tmp}/a", f"{tmp}/b"], "--verify takes one argument"),
        (sweep + ["--space", "beta=grid:1,big"], "beta: expected a number, got 'big'"),
        (sweep + ["--space", "betaa=grid:1,2"], "space: betaa: unknown field"),
        (sweep + ["--space", "lr=grid:0.1,-1"], "space: lr: must be positive, got -1.0"),
        (sweep + ["--space", "student=loguniform:1,2"], "space: student: loguniform draws numbers"),
        (sweep + ["--reduction-factor", "1"], "reduction_factor: must be at least 2, got 1"),
        (sweep + ["--metric", "train_kd"], "metric: 'train_kd' is not reported by mode ce"),
    ]


def test_bad_inputs_give_one_line_and_exit_2(shards, tmp_path, capsys):
    failures = []
    for argv, expected in _cases(shards, str(tmp_path)):
        status = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        if status != 2 or len(err) != 1 or expected not in err[0] or not err[0].startswith(f"catkd {argv[0]}: error: "):
            failures.append(f"{' '.join(argv)}: exit {status}, stderr {err}")
    assert not failures, "\n".join(failures)


def test_an_unexpected_error_keeps_its_traceback(monkeypatch):
    import pipeline.cli as cli

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "cmd_models", broken)
    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda command=None: parser)
    parser._subparsers._group_actions[0].choices["models"].set_defaults(func=broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["models"])


def test_flags_come_from_the_dataclass_fields_with_their_defaults():
    """The flags of cache build, shard and sweep are the dataclasses' fields: every field
    has a flag, its help shows the dataclass default, and values given are typed."""
    import argparse
    import dataclasses

    from pipeline.cache.config import CacheBuildConfig
    from pipeline.cli import build_parser
    from pipeline.settings import add_flags, flag_values
    from pipeline.train.sweep import SweepConfig

    parser = argparse.ArgumentParser()
    add_flags(parser, CacheBuildConfig)
    helps = {action.dest: action.help for action in parser._actions}
    for f in dataclasses.fields(CacheBuildConfig):
        assert f.name in helps
        if f.default is not dataclasses.MISSING and f.default is not None:
            shown = str(f.default).lower() if isinstance(f.default, bool) else str(f.default)
            assert f"(default: {shown})" in helps[f.name], f.name
    assert "augmentation views per sample (S)" in helps["num_views"]
    args = parser.parse_args(["--data", "d", "--teacher", "resnet8", "--weights", "w", "--root", "r"])
    assert flag_values(CacheBuildConfig, args) == {"data": "d", "teacher": "resnet8", "weights": "w", "root": "r"}
    args = build_parser().parse_args(["sweep", "--space", "beta=grid:0.5,2", "seed=grid:0,1", "--grace-period", "2"])
    assert SweepConfig(**flag_values(SweepConfig, args)) == SweepConfig(
        space=["beta=grid:0.5,2", "seed=grid:0,1"], grace_period=2
    )
    args = build_parser().parse_args(
        ["cache", "build", "--data", "d", "--teacher", "t", "--weights", "w"]
        + ["--root", "r", "--no-channels-last", "--feed-tasks", "3"]
    )
    assert flag_values(CacheBuildConfig, args) == {
        "data": "d",
        "teacher": "t",
        "weights": "w",
        "root": "r",
        "channels_last": False,
        "feed_tasks": 3,
    }


def test_overrides_are_typed_as_their_fields():
    from pipeline.train.config import load_config

    cfg = load_config(
        None,
        [
            "data=/d",
            "mode=ce",
            "weight_decay=1e-4",
            "beta=2",
            "select_n=null",
            "name=123",
            "lr_decay_epochs=[3, 5]",
            "bf16=true",
        ],
    )
    assert cfg.weight_decay == 1e-4 and cfg.beta == 2.0 and isinstance(cfg.beta, float) and cfg.select_n is None
    assert cfg.name == "123" and cfg.lr_decay_epochs == [3, 5] and cfg.bf16 is True


def test_sharding_loads_neither_torch_nor_torchvision():
    """catkd shard's parser, driver and Ray tasks write and check shards without torch
    (5 s of imports in each process): only the flags of the command run are built."""
    probe = (
        "import sys\n"
        "from pipeline.cli import build_parser\n"
        "import pipeline.data.shard_task, pipeline.data.shard_writer, pipeline.data.sources\n"
        "build_parser('shard').parse_args(['shard', 'synthetic:shapes', 'out', '--train-samples', '8'])\n"
        "print(sorted({'torch', 'torchvision'} & set(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr[-2000:]


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_train_and_sweep_help_list_every_config_field(command, capsys):
    """--help of the key=value commands is derived from TrainConfig: every field, in order,
    with its type, default and comment."""
    import dataclasses

    from pipeline.train.config import TrainConfig

    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for line in ("epochs=240", "beta=1.0", "num_views=0", "lr_decay_epochs=[150,180,210]"):
        assert line in text
    assert (
        "weight of the CAT loss" in text
        and "{ce,kd,dkd,dist,catkd,cat,online-kd,online-dkd,online-dist,online-catkd}" in text
    )
    table = text.split("config fields, each overridable as key=value:", 1)[1]  # the epilog, after the flags
    keys = [line.split("=", 1)[0].strip() for line in table.splitlines() if line.startswith("  ") and "=" in line[:40]]
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert [k for k in keys if k in names] == names
