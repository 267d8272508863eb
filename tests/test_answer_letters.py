"""`benchmarks/answer_letters.py`: gold letters from committed target hashes, answered letters from kept text."""

from __future__ import annotations

import hashlib
import json
import runpy
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _piece(
    out: Path,
    run: str,
    task: str,
    gold: list[str],
    answers: list[str] | None,
    run_key: str = "k",
    first: int | None = None,
    stamp: str = "2026",
) -> None:
    """A piece's committed files (and its kept text when `answers`); with `first`, the part of a run evaluated in
    parts whose documents start there (`docs-<first>-<end>/`); `stamp` is the samples file's timestamp."""
    piece = out / run / task / (f"docs-{first}-{first + len(gold)}" if first is not None else "")
    first = first or 0
    model_dir = piece / "m"
    model_dir.mkdir(parents=True)
    samples = []
    for doc_id, letter in enumerate(gold, start=first):
        answered = answers[doc_id - first] if answers else letter
        samples.append(
            {
                "doc_id": doc_id,
                "target_hash": hashlib.sha256(letter.encode()).hexdigest(),
                "acc": int(answered == letter),
            }
        )
    (model_dir / f"samples_{task}_{stamp}.jsonl").write_text("\n".join(json.dumps(s) for s in samples) + "\n")
    (model_dir / "results_2026.json").write_text(json.dumps({"config": {"diffmas": {"run_key": run_key}}}))
    if answers is None:
        return
    records = [
        {"task": task, "doc_id": i, "request_type": "generate_until", "run_key": run_key, "result": f"\\boxed{{{a}}}"}
        for i, a in enumerate(answers, start=first)
    ]
    # a line of another run configuration, which must not count
    records.append({**records[0], "run_key": "other", "result": "\\boxed{D}"})
    (piece / ".sidecar.full.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")


def test_constant_baseline_and_answered_letters(tmp_path):
    letters_table = runpy.run_path(str(REPO / "benchmarks" / "answer_letters.py"))["letters_table"]
    gold = ["A", "B", "C", "C"]
    _piece(tmp_path, "repeats", "mas_arc_challenge", gold, ["C", "C", "C", "C"])
    _piece(tmp_path, "chooses", "mas_arc_challenge", gold, ["A", "B", "D", "C"])
    _piece(tmp_path, "elsewhere", "mas_arc_challenge", gold, None)  # slimmed on another machine: no text here
    numbers = tmp_path / "n" / "mas_gsm8k" / "m"
    numbers.mkdir(parents=True)  # not multiple choice: skipped
    target = hashlib.sha256(b"42").hexdigest()
    (numbers / "samples_mas_gsm8k_2026.jsonl").write_text(json.dumps({"doc_id": 0, "target_hash": target, "acc": 1}))

    baselines, pieces = letters_table(tmp_path)

    assert baselines.to_dict("records") == [
        {
            "task": "mas_arc_challenge",
            "n": 4,
            "gold letters (%)": "A:25 B:25 C:50",
            "always the commonest letter": "C 50.0",
        }
    ]
    rows = pieces.set_index("run")
    assert set(rows.index) == {"repeats", "chooses", "elsewhere"}
    assert rows.loc["repeats", "acc"] == 50.0 and rows.loc["chooses", "acc"] == 75.0
    assert rows.loc["repeats", "commonest answer (%)"] == "C 100.0"
    assert rows.loc["chooses", "answered letters (%)"] == "A:25 B:25 C:25 D:25"
    assert rows.loc["repeats", "agrees with acc"] == "4/4" and rows.loc["chooses", "agrees with acc"] == "4/4"
    assert rows.loc["repeats", "answers"] == 4 and rows.loc["repeats", "answers from"] == "text here"
    assert rows.loc["repeats", "blind guess at these rates"] == 50.0  # all C, half the golds are C
    assert rows.loc["chooses", "blind guess at these rates"] == 25.0  # (25*25 + 25*25 + 25*50 + 25*0) / 100
    assert pieces.set_index("run").isna().loc["elsewhere", "answers"]


def test_letters_kept_in_the_samples_give_the_table_the_text_gives(tmp_path):
    """A piece slimmed before samples kept `answer`, given them back from its full copy, reads the same from its
    samples alone (the text removed) as from the text: two independent paths to the letters."""
    from diffmas_eval.slim import answers_from_full_copies

    letters_table = runpy.run_path(str(REPO / "benchmarks" / "answer_letters.py"))["letters_table"]
    gold = ["A", "B", "C", "C", "D"]
    for name, answers in (("repeats", ["C"] * 5), ("chooses", ["A", "D", "C", "B", "D"])):
        _piece(tmp_path / "text", name, "mas_openbookqa", gold, answers)
        _piece(tmp_path / "samples", name, "mas_openbookqa", gold, answers)
    _, from_text = letters_table(tmp_path / "text")

    outcomes = answers_from_full_copies([tmp_path / "samples"])
    assert sorted(outcomes.values()) == ["answers added", "answers added"]
    for copy in (tmp_path / "samples").rglob(".sidecar.full.jsonl"):
        copy.unlink()  # no text left: the letters can only come from the samples
    _, from_samples = letters_table(tmp_path / "samples")

    assert set(from_text["answers from"]) == {"text here"} and set(from_samples["answers from"]) == {"samples"}
    columns = [c for c in from_text.columns if c != "answers from"]
    assert from_text[columns].equals(from_samples[columns])
    assert answers_from_full_copies([tmp_path / "samples"]) == {file: "has its answers already" for file in outcomes}


def test_a_run_evaluated_in_parts_is_one_row(tmp_path):
    """The parts of a run (`docs-<first>-<end>/` pieces) give the row a whole evaluation of the same documents gives."""
    letters_table = runpy.run_path(str(REPO / "benchmarks" / "answer_letters.py"))["letters_table"]
    gold, answers = ["A", "B", "C", "C", "D"], ["A", "D", "C", "B", "D"]
    _piece(tmp_path / "whole", "r", "mas_openbookqa", gold, answers)
    _piece(tmp_path / "parts", "r", "mas_openbookqa", gold[:2], answers[:2], first=0)
    _piece(tmp_path / "parts", "r", "mas_openbookqa", gold[2:], answers[2:], first=2)
    whole, parts = letters_table(tmp_path / "whole"), letters_table(tmp_path / "parts")
    assert whole[0].equals(parts[0]) and whole[1].equals(parts[1]) and parts[1]["n"].tolist() == [5]


def test_an_older_piece_a_newer_part_overlaps_is_superseded_as_in_the_report(tmp_path):
    """A whole piece and a newer part on some of its documents: the report keeps the part alone, and so does this."""
    letters_table = runpy.run_path(str(REPO / "benchmarks" / "answer_letters.py"))["letters_table"]
    gold = ["A", "B", "C", "C", "D"]
    _piece(tmp_path / "out", "r", "mas_openbookqa", gold, ["A", "D", "C", "B", "D"], stamp="2026-01-01T00")
    _piece(tmp_path / "out", "r", "mas_openbookqa", gold[:2], ["A", "B"], first=0, stamp="2026-02-01T00")
    _piece(tmp_path / "alone", "r", "mas_openbookqa", gold[:2], ["A", "B"], first=0)
    baselines, pieces = letters_table(tmp_path / "out")
    assert pieces["n"].tolist() == [2] and pieces["acc"].tolist() == [100.0]
    alone_baselines, alone_pieces = letters_table(tmp_path / "alone")
    assert pieces.equals(alone_pieces) and baselines.equals(alone_baselines)


def test_an_older_part_of_another_run_configuration_is_not_joined(tmp_path):
    """Parts on disjoint documents but of two configurations (another run key): the report keeps the newest alone."""
    letters_table = runpy.run_path(str(REPO / "benchmarks" / "answer_letters.py"))["letters_table"]
    gold = ["A", "B", "C", "C", "D"]
    _piece(tmp_path / "out", "r", "mas_openbookqa", gold[:2], ["A", "B"], first=0, stamp="2026-02-01T00")
    _piece(tmp_path / "out", "r", "mas_openbookqa", gold[2:], gold[2:], first=2, run_key="o", stamp="2026-01-01T00")
    _, pieces = letters_table(tmp_path / "out")
    assert pieces["n"].tolist() == [2]
