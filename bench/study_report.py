"""Tables of the real-data study, generated from its results.json, so that no figure in
docs/RESULTS.md is copied by hand.

    .venv/bin/python bench/study_report.py docs/results/cifar10.json --doc docs/RESULTS.md
    .venv/bin/python bench/study_report.py docs/results/cifar10.json --doc docs/RESULTS.md --check

The document marks each generated table with ``<!-- study:NAME -->`` ...
``<!-- /study:NAME -->``; everything between a pair is rewritten, everything outside it is
left as written. ``--check`` exits 1 when the document is not what the JSON gives.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

MODE_NAMES = {
    "ce": "`ce` (vanilla)",
    "kd": "`kd` (cached logits)",
    "catkd": "`catkd` from the cache",
    "online-catkd": "`online-catkd` (live teacher, same views)",
    "cat": "`cat` (CAT only, no labels)",
}


def _pm(value: float | None) -> str:
    return "" if value is None else f"{value:+.2f}"


def _std(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def accuracy(summary: dict) -> str:
    epochs = summary["settings"]["epochs"]
    lines = ["| student | S | seeds | top-1 mean (%) | std | per seed |", "|---|---:|---:|---:|---:|---|"]
    main = [g for g in summary["groups"] if g["views"] in (None, epochs)]
    for g in sorted(main, key=lambda g: list(MODE_NAMES).index(g["mode"])):
        per_seed = ", ".join(f"{v:.2f}" for v in g["top1"])
        views = "" if g["views"] is None else g["views"]
        lines.append(
            f"| {MODE_NAMES[g['mode']]} | {views} | {len(g['top1'])} | **{g['top1_mean']:.2f}** | "
            f"{_std(g['top1_std'])} | {per_seed} |"
        )
    t = summary["teacher"]
    lines += [
        "",
        f"Teacher `{t['arch']}`: {t['test_top1']:.2f}% top-1 on the same {summary['data']['test_images']:,} test "
        "images.",
    ]
    return "\n".join(lines)


def teacher_line(summary: dict) -> str:
    """The line under a sub-study's accuracy table."""
    t = summary["teacher"]
    return f"Teacher `{t['arch']}`: {t['test_top1']:.2f}% top-1 on the same test images."


def paired_table(summary: dict, label: Callable[[dict], str]) -> str:
    """A sub-study's paired differences (``study.paired_against``'s rows), one line each,
    named by ``label(row)``."""
    lines = ["| difference (same seed) | per seed | mean | std | seeds where positive |", "|---|---|---:|---:|---:|"]
    for row in summary["paired_differences"]:
        per_seed = ", ".join(f"{v:+.2f} (seed {s})" for s, v in row["per_seed"].items())
        lines.append(
            f"| {label(row)} | {per_seed} | **{row['mean']:+.2f}** | {_std(row['std'])} | "
            f"{row['positive']} of {row['seeds']} |"
        )
    return "\n".join(lines)


def paired(summary: dict) -> str:
    lines = ["| difference (same seed) | per seed | mean | std | seeds where positive |", "|---|---|---:|---:|---:|"]
    names = {"catkd_minus_ce": "`catkd` - `ce`", "catkd_minus_kd": "`catkd` - `kd`", "kd_minus_ce": "`kd` - `ce`"}
    for key, label in names.items():
        d = summary["paired_differences"][key]
        per_seed = ", ".join(f"{_pm(v)} (seed {s})" for s, v in d["per_seed"].items())
        lines.append(
            f"| {label} | {per_seed} | **{_pm(d['mean'])}** | {_std(d['std'])} | {d['positive']} of {d['seeds']} |"
        )
    return "\n".join(lines)


def verdict(summary: dict) -> str:
    """The ordering CAT-KD > KD > vanilla, said plainly: each paired mean against its own
    seed-to-seed spread."""
    sentences = []
    for key, better, worse in (
        ("catkd_minus_kd", "CAT-KD", "KD"),
        ("kd_minus_ce", "KD", "vanilla"),
        ("catkd_minus_ce", "CAT-KD", "vanilla"),
    ):
        d = summary["paired_differences"][key]
        holds = d["mean"] > 0
        sizing = ""
        if d["std"]:
            sizing = f", {abs(d['mean']) / d['std']:.1f} times the spread of the paired differences ({d['std']:.2f})"
        sentences.append(
            f"{better} {'>' if holds else '<='} {worse}: {_pm(d['mean'])} points on average{sizing}, "
            f"positive in {d['positive']} of {d['seeds']} seeds."
        )
    order = [summary["paired_differences"][k]["mean"] > 0 for k in ("catkd_minus_kd", "kd_minus_ce")]
    head = (
        "**CAT-KD > KD > vanilla holds at this budget.**"
        if all(order)
        else "**CAT-KD > KD > vanilla does not hold at this budget.**"
    )
    return "\n".join([head, "", *[f"- {s}" for s in sentences]])


def view_study(summary: dict) -> str:
    lines = [
        "| S | seeds | top-1 mean (%) | std | per seed | train top-1 at the end (first seed) |",
        "|---:|---:|---:|---:|---|---:|",
    ]
    first_train = {}
    for run in summary["runs"]:
        first_train.setdefault((run["mode"], run["views"]), run["train_top1"])
    for g in sorted((g for g in summary["groups"] if g["mode"] == "catkd"), key=lambda g: g["views"]):
        per_seed = ", ".join(f"{v:.2f}" for v in g["top1"])
        lines.append(
            f"| {g['views']} | {len(g['top1'])} | {g['top1_mean']:.2f} | {_std(g['top1_std'])} | {per_seed} | "
            f"{first_train[('catkd', g['views'])]:.1f} |"
        )
    return "\n".join(lines)


def cam_agreement(summary: dict) -> str:
    r = summary["settings"]["resolution"]
    order = ["ce", "kd", "catkd", "online-catkd", "cat"]
    entries = sorted(summary["cam_agreement"].items(), key=lambda kv: (order.index(kv[1]["mode"]), kv[1]["views"] or 0))
    some = entries[0][1]
    lines = [
        f"| student | runs | cosine, pooled {r}x{r} | cosine, full {some['cells']} cells | same peak cell |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, e in entries:
        label = MODE_NAMES[e["mode"]] + ("" if key == e["mode"] else f", S = {e['views']}")
        lines.append(
            f"| {label} | {e['runs']} | {e[f'cosine_pooled_r{r}']:.3f} | {e['cosine_full']:.3f} | "
            f"{100 * e['peak_cell_agreement']:.1f}% |"
        )
    return "\n".join(lines)


def speed(summary: dict) -> str:
    t = summary["throughput"]
    base = t["modes"]["ce"]["images_per_s"]
    lines = ["| mode (alone, one epoch) | images/s | vs `ce` | data wait |", "|---|---:|---:|---:|"]
    for mode, m in t["modes"].items():
        lines.append(
            f"| {MODE_NAMES[mode]} | {m['images_per_s']:.0f} | {m['images_per_s'] / base:.2f} | "
            f"{100 * m['data_wait_fraction']:.1f}% |"
        )
    s = summary["settings"]
    f = t["forward_images_per_s"]
    lines += [
        "",
        f"Bare forward at batch {s['batch_size']} on one thread: teacher `{s['teacher']}` {f['teacher']:.0f} images/s, "
        f"student `{s['student']}` {f['student']:.0f} images/s ({f['teacher'] / f['student']:.2f} of the student's "
        "rate).",
        "",
        "| cache | views | build time | views/s | bytes per view | total size |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for views, c in sorted(t["caches"].items(), key=lambda kv: int(kv[0])):
        timed = c["build_seconds"] is not None
        took, rate = (
            (f"{c['build_seconds']:.0f} s", f"{c['views'] / c['build_seconds']:.0f}") if timed else ("not timed", "")
        )
        lines.append(
            f"| S = {views} | {c['views']:,} | {took} | {rate} | {c['bytes_per_view']:.0f} | {c['bytes'] / 1e6:.2f} "
            "MB |"
        )
    seconds = summary["seconds"]
    lines += ["", "Wall time (s): " + ", ".join(f"{k.replace('_', ' ')} {v:.0f}" for k, v in seconds.items()) + "."]
    return "\n".join(lines)


TABLES = {
    "accuracy": accuracy,
    "paired": paired,
    "verdict": verdict,
    "views": view_study,
    "cams": cam_agreement,
    "speed": speed,
}


def markdown(summary: dict, tables: dict = TABLES) -> str:
    """Every table, one after another (the study's results.md)."""
    return "\n\n".join(f"## {name}\n\n{render(summary)}" for name, render in tables.items()) + "\n"


def update_document(text: str, summary: dict, tables: dict = TABLES, prefix: str = "study") -> str:
    """``text`` with every ``<!-- PREFIX:NAME -->`` block regenerated from ``summary``;
    blocks of another prefix (another study's tables in the same page) are left alone."""

    def block(match: re.Match) -> str:
        name = match.group(1)
        if name not in tables:
            raise KeyError(f"unknown generated block {prefix}:{name} (known: {', '.join(tables)})")
        return f"<!-- {prefix}:{name} -->\n{tables[name](summary)}\n<!-- /{prefix}:{name} -->"

    return re.sub(rf"<!-- {prefix}:(\w+) -->.*?<!-- /{prefix}:\1 -->", block, text, flags=re.S)


def regenerate(argv: list[str] | None, tables: dict, prefix: str, description: str) -> int:
    """The command line of a study's report: print its tables, or regenerate (or
    ``--check``) the ``<!-- PREFIX:NAME -->`` blocks of a document."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("results", help="a study's results.json")
    parser.add_argument("--doc", help=f"a Markdown document with <!-- {prefix}:NAME --> blocks to regenerate in place")
    parser.add_argument("--check", action="store_true", help="only say whether --doc is up to date (exit 1 if not)")
    parser.add_argument(
        "--prefix", default=prefix, help=f"the blocks' prefix ({prefix}; another for a second run of the study)"
    )
    args = parser.parse_args(argv)
    prefix = args.prefix
    summary = json.loads(Path(args.results).read_text())
    if not args.doc:
        print(markdown(summary, tables))
        return 0
    doc = Path(args.doc)
    before = doc.read_text()
    after = update_document(before, summary, tables, prefix)
    if args.check:
        if before != after:
            print(f"{doc} is out of date with {args.results}: run without --check to regenerate it", file=sys.stderr)
            return 1
        return 0
    doc.write_text(after)
    print(f"{doc}: {len(re.findall(f'<!-- {prefix}:', after))} tables regenerated from {args.results}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return regenerate(argv, TABLES, "study", __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
