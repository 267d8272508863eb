"""`benchmarks/leaderboard_progress.py`: documents done and hours left per piece, from the pieces' own results."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _results(directory: Path, name: str, limit: int, seconds: float, model: str | None = None, **recorded) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    totals = {"requests": limit, "wall_seconds": seconds}
    config = {"model": model, "limit": float(limit), "diffmas": {**recorded, "totals": totals}}
    (directory / f"results_{name}.json").write_text(json.dumps({"config": config}))


def _adapter(tmp_path: Path, name: str, weights: bytes) -> Path:
    """An adapter directory at `runs/<name>` whose weights file holds `weights` (what its fingerprint reads)."""
    adapter = tmp_path / "runs" / name
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(weights)
    return adapter


def test_progress_counts_pieces_of_the_current_artefacts_and_costs_the_rest_at_measured_rates(tmp_path):
    progress = runpy.run_path(str(REPO / "benchmarks" / "leaderboard_progress.py"))["progress"]
    adapter = _adapter(tmp_path, "d", b"retrained")
    config = {
        "name": "p",
        "runs": [
            {"name": "sa", "model": "single-agent"},
            {"name": "d", "model": "diffmas", "model_args": {"adapter": str(adapter)}},
            {"name": "never", "model": "text-mas"},
        ],
        "tasks": {"t_a": 10, "t_b": 10, "t_mc": 10},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    _results(out / "sa" / "t_a" / "m", "x", limit=4, seconds=8.0)  # 2 s per document, 6 left
    _results(out / "d" / "t_a" / "m", "old", limit=10, seconds=30.0, adapter_fingerprint="an earlier adapter")
    frame = progress(path, out).set_index(["run", "task"])

    assert frame.loc[("sa", "t_a"), "done"] == 4 and frame.loc[("sa", "t_a"), "s/doc"] == 2.0
    assert abs(frame.loc[("sa", "t_a"), "hours left"] - 6 * 2.0 / 3600) < 1e-12
    assert frame.loc[("sa", "t_b"), "rate from"] == "run's generate mean"  # the run's rate on its other task
    # the adapter was retrained since its results: none of its documents count, its rate still does
    assert frame.loc[("d", "t_a"), "done"] == 0 and frame.loc[("d", "t_a"), "s/doc"] == 3.0
    assert frame.loc[("never", "t_a"), "s/doc"] != frame.loc[("never", "t_a"), "s/doc"]  # NaN: never measured
    assert frame.loc[("sa", "t_mc"), "s/doc"] != frame.loc[("sa", "t_mc"), "s/doc"]  # no scoring rate measured


def test_a_run_evaluated_in_parts_is_one_line_with_its_finished_parts_documents(tmp_path):
    progress = runpy.run_path(str(REPO / "benchmarks" / "leaderboard_progress.py"))["progress"]
    config = {"name": "p", "runs": [{"name": "tm", "model": "text-mas", "part_size": 4}], "tasks": {"t_a": 10}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    _results(out / "tm" / "t_a" / "docs-0-4" / "m", "x", limit=4, seconds=40.0)  # 10 s per document
    _results(out / "tm" / "t_a" / "docs-8-10" / "m", "x", limit=2, seconds=40.0)  # 20 s per document
    (line,) = progress(path, out).to_dict("records")
    assert (line["target"], line["done"], line["s/doc"]) == (10, 6, 15.0)
    assert abs(line["hours left"] - 4 * 15.0 / 3600) < 1e-12
    # The first 3 documents evaluated whole before the run had a part size, with its settings: its parts start at 3.
    other = tmp_path / "other"
    _results(other / "tm" / "t_a" / "m", "x", limit=3, seconds=30.0, model="text-mas")
    _results(other / "tm" / "t_a" / "docs-3-7" / "m", "x", limit=4, seconds=80.0)
    (line,) = progress(path, other).to_dict("records")
    assert (line["target"], line["done"], line["s/doc"]) == (10, 7, 20.0)


def test_a_row_whose_trained_adapter_is_gone_is_marked_and_left_out_of_the_hours_left(tmp_path, capsys):
    script = runpy.run_path(str(REPO / "benchmarks" / "leaderboard_progress.py"))
    here = _adapter(tmp_path, "here", b"weights")
    config = {
        "name": "p",
        "runs": [
            {"name": "sa", "model": "single-agent"},
            {"name": "here", "model": "diffmas", "model_args": {"adapter": str(here)}},
            {"name": "gone", "model": "diffmas", "model_args": {"adapter": str(tmp_path / "runs" / "gone")}},
            {"name": "new", "model": "diffmas", "model_args": {"adapter": str(tmp_path / "runs" / "new")}},
        ],
        "tasks": {"t_a": 10, "t_b": 10},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    for run in ("here", "gone"):  # 3600 s per document: an hour per document left
        _results(out / run / "t_a" / "m", "x", limit=4, seconds=4 * 3600.0, adapter_fingerprint="f")
    frame = script["progress"](path, out).set_index(["run", "task"])
    status = frame["artefacts"].droplevel("task").groupby(level=0).first().to_dict()
    assert status == {"sa": "", "here": "here", "gone": "gone", "new": "to train"}
    assert frame.loc[("gone", "t_a"), "done"] == 4  # its committed documents count as done

    import sys

    argv = sys.argv
    sys.argv = ["leaderboard_progress.py", str(path), "--out", str(out)]
    try:
        script["main"]()
    finally:
        sys.argv = argv
    printed = capsys.readouterr().out
    # here (its results record another adapter than the one here: all 20 documents left) and new (at the model's
    # rate), 20 hours each; gone is left out; sa was never measured
    assert "hours left at the measured rates: 40.0, plus 2 unmeasured pieces (sa)" in printed
    assert "cannot grow; not in the hours left): gone: 4 of their 20 documents done" in printed
