"""`benchmarks/cross_machine.py`: per-document agreement of one cell computed on two machines."""

from __future__ import annotations

import json
import runpy
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GOOD = REPO / "tests" / "fixtures" / "results" / "good"


def _one_task(source: Path, target: Path, task: str = "mas_gsm8k") -> Path:
    """A copy of a fixture run keeping one task (its results, samples and side-car lines)."""
    shutil.copytree(source, target)
    (results_file,) = target.glob("results_*.json")
    data = json.loads(results_file.read_text())
    data["results"] = {task: data["results"][task]}
    results_file.write_text(json.dumps(data))
    for stray in target.glob("samples_*.jsonl"):
        if f"samples_{task}_" not in stray.name:
            stray.unlink()
    return results_file


def test_two_machines_agreeing_but_on_one_document(tmp_path):
    compare = runpy.run_path(str(REPO / "benchmarks" / "cross_machine.py"))["compare"]
    _one_task(GOOD / "results-b", tmp_path / "here")
    results_file = _one_task(GOOD / "results-b", tmp_path / "there")
    data = json.loads(results_file.read_text())
    data["config"]["diffmas"]["cpu_kernels"] = "packed via float32"  # another machine: not part of the identity
    results_file.write_text(json.dumps(data))
    # There, document 3 generated one token more (its score unchanged).
    (sidecar,) = (tmp_path / "there").glob("sidecar_*.jsonl")
    lines = [json.loads(line) for line in sidecar.read_text().splitlines()]
    for line in lines:
        if line["task"] == "mas_gsm8k" and line["doc_id"] == 3:
            line["final"]["generated_tokens"] += 1
    sidecar.write_text("".join(json.dumps(line) + "\n" for line in lines))

    numbers = compare(tmp_path / "here", tmp_path / "there")

    assert numbers["documents"] == 10 and numbers["same score"] == "10/10"
    assert numbers["same generated tokens"] == "9/10" and numbers["difference (pp)"] == "+0.0 [+0.0, +0.0]"
    assert numbers["kernels"].endswith("vs packed via float32")


def test_two_configurations_are_refused(tmp_path):
    compare = runpy.run_path(str(REPO / "benchmarks" / "cross_machine.py"))["compare"]
    _one_task(GOOD / "results-a", tmp_path / "a")
    _one_task(GOOD / "results-b", tmp_path / "b")
    with pytest.raises(SystemExit, match="not one configuration"):
        compare(tmp_path / "a", tmp_path / "b")
