"""The papers' reported numbers (`baselines/*.csv`) and how they line up with our runs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from diffmas_eval.paths import project_dir

BASELINE_COLUMNS = (
    "method",
    "backbone",
    "topology",
    "task",
    "paper_task",
    "metric",
    "value",
    "approximate",
    "source",
    "table",
    "note",
)
UNSPECIFIED = "unspecified"


def baselines_dir() -> Path:
    """`baselines/` of a source checkout, else the copy shipped inside the wheel (`diffmas_eval/_baselines`)."""
    try:
        return project_dir("baselines")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err}; or pass --baselines DIR or --no-baselines") from None


def load_baselines(directory: Path) -> pd.DataFrame:
    """All `*.csv` in `directory` as one frame with `BASELINE_COLUMNS` (value as float, approximate as bool).

    Raises:
        ValueError: a file lacks a column or holds a non-numeric value (the file is named in the message).
    """
    frames = []
    for path in sorted(Path(directory).glob("*.csv")):
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        missing = [c for c in BASELINE_COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; every baselines file needs {list(BASELINE_COLUMNS)}")
        values = pd.to_numeric(frame["value"], errors="coerce")
        if values.isna().any():
            bad = frame.loc[values.isna(), "value"].tolist()
            raise ValueError(f"{path}: non-numeric `value` entries {bad}; write numbers exactly as the paper prints")
        frame = frame[list(BASELINE_COLUMNS)].assign(
            value=values, approximate=frame["approximate"].str.lower().eq("true"), file=path.name
        )
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=[*BASELINE_COLUMNS, "file"])
    return pd.concat(frames, ignore_index=True)


def normalize_backbone(name: object) -> str:
    """Backbone matching key: last path component, lower case (`Qwen/Qwen3-8B` -> `qwen3-8b`)."""
    text = str(name).rstrip("/").replace("\\", "/")
    return text.rsplit("/", 1)[-1].lower()


def matching_baselines(
    baselines: pd.DataFrame, *, method: str, backbone: str, topology: str | None, task: str, metric: str
) -> pd.DataFrame:
    """Paper rows for the same method, backbone, task and metric.

    Topology must agree, except that the paper's `unspecified` matches any of ours (flagged in the output by the
    note) and the single agent has no topology (all its copies are returned; callers show equal values once).
    """
    if baselines.empty:
        return baselines
    rows = baselines[
        (baselines["method"] == method)
        & (baselines["task"] == task)
        & (baselines["metric"] == metric)
        & (baselines["backbone"].map(normalize_backbone) == normalize_backbone(backbone))
        & (baselines["backbone"] != UNSPECIFIED)
    ]
    if method == "single-agent":
        return rows
    return rows[(rows["topology"] == UNSPECIFIED) | (rows["topology"] == (topology or UNSPECIFIED))]
