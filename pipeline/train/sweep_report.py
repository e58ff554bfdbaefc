"""What a finished sweep shows: a table sorted by the metric, ``sweep.json`` and
``sweep.png`` (the metric against each swept field, and every trial's learning curve,
stopped trials marked). Rows come from each trial's own run (its metrics.jsonl holds
every epoch, also those before a driver restart), so a restored sweep reports whole runs.
"""

from __future__ import annotations

import io
import json
import math
import posixpath
from typing import Any

from catkd.errors import CatkdError, user_error
from pipeline.storage import filesystem, join, write_atomic
from pipeline.train.config import TrainConfig
from pipeline.train.search_space import Dimension


def run_history(storage_path: str, name: str) -> list[dict[str, Any]]:
    """A run's per-epoch metrics (metrics.jsonl, rewritten with each checkpoint)."""
    fs, root = filesystem(storage_path)
    path = join(root, name, "metrics.jsonl")
    if not fs.exists(path):
        return []
    return [json.loads(line) for line in fs.cat_file(path).decode().splitlines() if line.strip()]


def trial_rows(grid: Any, base: TrainConfig, dims: list[Dimension], sweep: Any) -> list[dict[str, Any]]:
    """One row per trial of a Tune ResultGrid, best first by ``sweep.metric``."""
    rows = []
    for result in grid:
        folder = posixpath.basename(str(result.path).rstrip("/"))
        history = run_history(base.storage_path, join(base.name, folder))
        planned = result.config.get("epochs", base.epochs)
        # The epoch Tune last heard of: below the plan, the scheduler stopped the trial
        # there (its run may have finished one more epoch before the stop reached it).
        reported = (result.metrics or {}).get("epoch", 0)
        params = {d.field: result.config.get(d.field) for d in dims}
        beta = result.config.get("beta", base.beta)
        rows.append(_row(folder, params, history, planned, reported, beta, sweep))
        if result.error is not None:
            rows[-1] |= {"status": "failed", "error": error_line(result.error)}
    return sort_rows(rows, sweep.metric, sweep.mode)


def error_line(error: BaseException) -> str:
    """A failed trial's error in one line: a bad-input error's own message, else the last
    line of what Tune recorded (its traceback is in the trial's error.txt)."""
    cause = user_error(error)
    if isinstance(cause, CatkdError):
        return f"{type(cause).__name__}: {cause}"
    return (str(error).strip().splitlines() or [type(error).__name__])[-1]


def _row(
    trial: str, params: dict[str, Any], history: list[dict], planned: int, reported: int, beta: float, sweep: Any
) -> dict[str, Any]:
    metric = [h[sweep.metric] for h in history if sweep.metric in h]
    top1 = [h["test_top1"] for h in history]
    best = max if sweep.mode == "max" else min
    cat = history[0].get("train_cat") if history else None
    return {
        "trial": trial,
        "params": params,
        "status": "finished" if reported >= planned else "stopped",
        "stopped_at": reported if reported < planned else None,
        "epochs": len(history),
        "planned_epochs": planned,
        "metric_last": metric[-1] if metric else None,
        "metric_best": best(metric) if metric else None,
        "top1_last": top1[-1] if top1 else None,
        "top1_best": max(top1) if top1 else None,
        "images_per_s": sum(h["images_per_s"] for h in history) / len(history) if history else None,
        # The CAT loss of epoch 1 (its mean), unweighted and weighted by beta: the reference
        # code's rule for beta is a weighted CAT loss of about 1-50 after the first epoch.
        "cat_after_epoch_1": cat,
        "beta_cat_after_epoch_1": beta * cat if cat is not None else None,
        "history": history,
    }


def sort_rows(rows: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """Best first by the last value of the metric; failed and empty trials last."""

    def key(row: dict[str, Any]) -> tuple[int, float]:
        value = row["metric_last"]
        if value is None or row["status"] == "failed":
            return (1, 0.0)
        return (0, -value if mode == "max" else value)

    return sorted(rows, key=key)


def table(rows: list[dict[str, Any]], metric: str) -> str:
    """The printed table: one line per trial."""
    fields = list(rows[0]["params"]) if rows else []
    extra = metric not in ("test_top1",)
    head = ["trial", "status"] + fields + ([f"{metric} last"] if extra else [])
    head += ["top-1 last", "top-1 best", "epochs", "img/s", "beta*CAT ep 1"]
    lines = []
    for row in rows:
        cells = [row["trial"], _status(row)] + [_cell(row["params"][f]) for f in fields]
        cells += [_cell(row["metric_last"])] if extra else []
        cells += [_cell(row["top1_last"], ".2f"), _cell(row["top1_best"], ".2f")]
        cells += [f"{row['epochs']}/{row['planned_epochs']}", _cell(row["images_per_s"], ".0f")]
        cells += [_cell(row["beta_cat_after_epoch_1"], ".3g")]
        lines.append(cells)
    widths = [max(len(str(c)) for c in column) for column in zip(head, *lines, strict=True)]
    out = ["  ".join(f"{c:<{w}}" for c, w in zip(head, widths, strict=True)).rstrip()]
    out += ["  ".join(f"{c:<{w}}" for c, w in zip(cells, widths, strict=True)).rstrip() for cells in lines]
    failed = [row for row in rows if row.get("error")]
    out += [f"{row['trial']} failed: {row['error']}" for row in failed]
    return "\n".join(out)


def _status(row: dict[str, Any]) -> str:
    return f"stopped@{row['stopped_at']}" if row["status"] == "stopped" else row["status"]


def _cell(value: Any, spec: str = ".4g") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, float) else str(value)


def report(rows: list[dict[str, Any]], base: TrainConfig, dims: list[Dimension], sweep: Any, folder: str) -> None:
    """Print the table; write sweep.json and sweep.png into the sweep's folder."""
    fs, root = filesystem(folder)
    summary = {
        "name": base.name,
        "metric": sweep.metric,
        "mode": sweep.mode,
        "scheduler": sweep.scheduler,
        "space": [d.describe() for d in dims],
        "trials": rows,
    }
    write_atomic(fs, join(root, "sweep.json"), json.dumps(summary, indent=1).encode())
    write_atomic(fs, join(root, "sweep.png"), plot(rows, dims, sweep.metric))
    stopped = sum(row["status"] == "stopped" for row in rows)
    print(f"\n{table(rows, sweep.metric)}")
    print(
        f"[sweep] {len(rows)} trial(s), {stopped} stopped early by the scheduler; "
        f"{join(folder, 'sweep.json')}, {join(folder, 'sweep.png')}; per trial, TensorBoard events under "
        f"{folder}/<trial>/tensorboard"
    )


def plot(rows: list[dict[str, Any]], dims: list[Dimension], metric: str) -> bytes:
    """PNG bytes: a panel per swept field (last metric against the value, stopped trials
    as crosses), then every trial's learning curve (stopped ones dashed, ending in a cross)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: clusters and CI have no display
    import matplotlib.pyplot as plt

    panels = len(dims) + 1
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.6), squeeze=False)
    for ax, dim in zip(axes[0], dims, strict=False):
        _against_field(ax, rows, dim, metric)
    curves = axes[0][-1]
    for row in rows:
        epochs = [h["epoch"] for h in row["history"] if metric in h]
        values = [h[metric] for h in row["history"] if metric in h]
        if not values:
            continue
        stopped = row["status"] != "finished"
        (line,) = curves.plot(epochs, values, "--" if stopped else "-", label=row["trial"], linewidth=1.2)
        if stopped:
            curves.plot(epochs[-1:], values[-1:], "x", color=line.get_color(), markersize=8)
    curves.set_xlabel("epoch")
    curves.set_ylabel(metric)
    curves.set_title("learning curves (dashed, x: stopped)")
    if 0 < len(curves.lines) and len(rows) <= 12:
        curves.legend(fontsize=6)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _against_field(ax: Any, rows: list[dict[str, Any]], dim: Dimension, metric: str) -> None:
    import matplotlib.ticker

    shown = [row for row in rows if row["metric_last"] is not None]
    values = [row["params"][dim.field] for row in shown]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if numeric:
        x = values
        positive = [v for v in values if v > 0]
        if dim.kind == "loguniform" or (len(positive) == len(values) and positive and max(x) / min(x) >= 10):
            ax.set_xscale("log")
            if dim.kind != "loguniform":  # a grid: its own values as the ticks, no log-scale minor labels
                ax.set_xticks(sorted(set(x)), [f"{v:g}" for v in sorted(set(x))])
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    else:  # categories (students, lists): in the order first seen
        order = list(dict.fromkeys(map(str, values)))
        x = [order.index(str(v)) for v in values]
        ax.set_xticks(range(len(order)), order, rotation=30, fontsize=7)
    for xi, row in zip(x, shown, strict=True):
        finished = row["status"] == "finished"
        ax.plot(xi, row["metric_last"], "o" if finished else "x", color="C0" if finished else "C3", markersize=7)
    ax.set_xlabel(dim.field)
    ax.set_ylabel(f"{metric} (last epoch)")
    ax.set_title(f"{metric} against {dim.field} (x: stopped)")
    if any(math.isfinite(row["metric_last"]) for row in shown):
        ax.grid(alpha=0.3)
