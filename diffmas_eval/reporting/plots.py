"""Figures: accuracy vs generated tokens per method, and per-domain bars with error bars (PNG and SVG)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from diffmas_eval.reporting.taxonomy import DOMAIN_ORDER, counts_in_average, task_sort_key  # noqa: E402


def domain_averages(scores: pd.DataFrame) -> pd.DataFrame:
    """Per (row, domain): unweighted mean of the headline task scores and its stderr (sqrt(sum se^2) / k)."""
    if scores.empty:
        return pd.DataFrame(columns=["row", "label", "domain", "value", "stderr", "tasks"])
    head = scores[scores["headline"] & scores["task"].map(counts_in_average)]
    records = []
    for (row, domain), part in head.groupby(["row", "domain"], sort=False):
        errors = part["stderr"]
        stderr = math.nan if errors.isna().any() else math.sqrt(float((errors**2).sum())) / len(part)
        records.append(
            {
                "row": row,
                "label": part["label"].iloc[0],
                "domain": domain,
                "value": float(part["value"].mean()),
                "stderr": stderr,
                "tasks": len(part),
            }
        )
    return pd.DataFrame(records)


def _save(fig: plt.Figure, out: Path, stem: str) -> list[Path]:
    paths = [out / f"{stem}.png", out / f"{stem}.svg"]
    fig.savefig(paths[0], dpi=120, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    return paths


def _empty(ax: plt.Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def plot_domain_bars(scores: pd.DataFrame, out: Path) -> list[Path]:
    """Grouped bars: x = domain, one bar per row, error bars = ±1 stderr; writes domain_bars.png/.svg."""
    averages = domain_averages(scores)
    fig, ax = plt.subplots(figsize=(10, 5))
    if averages.empty:
        _empty(ax, "no task results")
        return _save(fig, out, "domain_bars")
    domains = [d for d in DOMAIN_ORDER if d in set(averages["domain"])]
    labels = list(dict.fromkeys(averages["label"]))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        part = averages[averages["label"] == label].set_index("domain")
        xs = [d_i + (i - (len(labels) - 1) / 2) * width for d_i, d in enumerate(domains) if d in part.index]
        present = [d for d in domains if d in part.index]
        ax.bar(
            xs,
            [100 * part.loc[d, "value"] for d in present],
            width,
            yerr=[100 * part.loc[d, "stderr"] if not math.isnan(part.loc[d, "stderr"]) else 0 for d in present],
            capsize=3,
            label=label,
        )
    ax.set_xticks(range(len(domains)), domains)
    ax.set_ylabel("accuracy (%), mean over tasks")
    ax.set_ylim(0, 100)
    ax.set_title("Per-domain accuracy (error bars: ±1 stderr)")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, out, "domain_bars")


def _cost_axis(ax: plt.Axes, values: pd.Series) -> None:
    """Log scale when costs span more than a decade, else linear; plain-number tick labels at 1-2-5 steps either
    way (a log axis inside one decade would show no labelled tick at all, and all minor labels would overlap)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    low, high = float(values.min()), float(values.max())
    plain = FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 10 else f"{v:g}")
    if high > 10 * low > 0:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        # Integer ticks for counts of tokens, fractional ones for a second or less; a margin relative to the costs.
        ax.xaxis.set_major_locator(MaxNLocator(5, integer=high >= 10, steps=[1, 2, 5, 10]))
        margin = max(0.1 * (high - low), 0.05 * high, 1e-3)
        ax.set_xlim(max(0.0, low - margin), high + margin)
    ax.xaxis.set_major_formatter(plain)
    ax.tick_params(axis="x", which="both", labelsize="small")


# The cost axes of the accuracy-against-cost figures: (cost column, axis label, file stem).
COST_AXES = (
    ("generated_tokens", "generated tokens / problem", "accuracy_vs_tokens"),
    ("seconds", "seconds / problem", "accuracy_vs_seconds"),
)


def plot_accuracy_vs_cost(scores: pd.DataFrame, cost: pd.DataFrame, out: Path) -> list[Path]:
    """Accuracy against each cost axis of `COST_AXES` (tokens and seconds per problem), one figure per axis."""
    return [
        path for column, label, stem in COST_AXES for path in _plot_accuracy_vs(scores, cost, out, column, label, stem)
    ]


def _plot_accuracy_vs(
    scores: pd.DataFrame, cost: pd.DataFrame, out: Path, column: str, xlabel: str, stem: str
) -> list[Path]:
    """One panel per task: accuracy (±1 stderr) vs a cost per problem (`column` of the cost frame; log x when it
    spans more than a decade), one marker per row; writes `<stem>.png/.svg`."""
    merged = pd.DataFrame()
    if not scores.empty and not cost.empty:
        head = scores[scores["headline"]][["row", "label", "task", "value", "stderr"]]
        merged = head.merge(cost[["row", "task", column]].rename(columns={column: "cost"}), on=["row", "task"])
        merged = merged[merged["cost"] > 0]
    tasks = sorted(set(merged["task"]), key=task_sort_key) if not merged.empty else []
    cols = min(3, max(1, len(tasks)))
    rows = max(1, math.ceil(len(tasks) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    if not tasks:
        _empty(axes[0][0], f"no run has both accuracy and per-task {xlabel}")
        return _save(fig, out, stem)
    markers = "osD^v<>ph*"
    labels = list(dict.fromkeys(merged["label"]))
    for ax, task in zip(axes.flat, tasks, strict=False):
        part = merged[merged["task"] == task]
        for i, label in enumerate(labels):
            point = part[part["label"] == label]
            if point.empty:
                continue
            ax.errorbar(
                point["cost"],
                100 * point["value"],
                yerr=100 * point["stderr"].fillna(0),
                fmt=markers[i % len(markers)],
                capsize=3,
                label=label,
            )
        _cost_axis(ax, part["cost"])
        ax.set_ylim(-3, 103)  # accuracy on its whole range, so a 0-vs-0 comparison does not fill the panel
        ax.set_title(task)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy (%)")
    for ax in list(axes.flat)[len(tasks) :]:
        ax.set_axis_off()
    handles, names = axes[0][0].get_legend_handles_labels()
    for ax in list(axes.flat)[1 : len(tasks)]:
        for h, n in zip(*ax.get_legend_handles_labels(), strict=True):
            if n not in names:
                handles.append(h)
                names.append(n)
    fig.legend(handles, names, fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return _save(fig, out, stem)
