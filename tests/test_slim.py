"""Slimmed results (`diffmas_eval.slim`) carry no benchmark text and give the same report as the full files."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from diffmas_eval.reporting import build_report
from diffmas_eval.reporting.baselines import baselines_dir
from diffmas_eval.slim import slim_results, slim_sample, slim_sidecar_record

REPO = Path(__file__).resolve().parents[1]
GOOD = REPO / "tests" / "fixtures" / "results" / "good"
TEXT_SAMPLE_KEYS = ("doc", "target", "arguments", "resps", "filtered_resps")
# The committed leaderboards whose pieces are slimmed (their configs say `slim: true`).
SLIM_RESULTS = ("results/qwen-cpu",)


def _text_keys(path: Path) -> set[str]:
    """Text-bearing keys found in the samples files and side-cars at or below `path`."""
    found = set()
    for file in [path] if path.is_file() else path.rglob("*.jsonl"):
        for line in file.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if file.name.startswith("samples_"):
                found |= {key for key in TEXT_SAMPLE_KEYS if key in record}
            elif file.name.startswith("sidecar"):
                found |= {"agents.text" for agent in record.get("agents") or [] if "text" in agent}
                if record.get("request_type") == "generate_until" and "result" in record:
                    found.add("generated result")
    return found


def test_a_sample_keeps_identity_hashes_and_metric_values_only():
    kept = {
        "doc_id": 3,
        "filter": "none",
        "metrics": ["exact_match", "extracted"],
        "doc_hash": "d",
        "prompt_hash": "p",
        "target_hash": "t",
        "exact_match": 1.0,
        "extracted": 1.0,
    }
    text = {
        "doc": {"question": "Which gas do plants take in?"},
        "target": "B",
        "arguments": {"gen_args_0": {"arg_0": "prompt"}},
        "resps": [["\\boxed{B}"]],
        "filtered_resps": ["\\boxed{B}"],
    }
    assert slim_sample({**kept, **text}) == kept
    # generative multiple choice (the doc lists its letters): the letter answered stays, and slimming again keeps it
    lettered = {**kept, **text, "doc": {**text["doc"], "letters": "ABCD"}, "filtered_resps": ["So \\boxed{c}."]}
    assert slim_sample(lettered) == {**kept, "answer": "C"}
    assert slim_sample(slim_sample(lettered)) == {**kept, "answer": "C"}
    assert slim_sample({**lettered, "filtered_resps": ["I cannot tell."]}) == {**kept, "answer": None}
    counts = {
        "doc_id": 3,
        "agents": [{"role": "planner", "prompt_tokens": 9, "generated_tokens": 4}],
        "final": {"generated_tokens": 5, "stopped_before_budget": True},
        "wall_seconds": 1.5,
    }
    written = {**counts, "agents": [{**counts["agents"][0], "text": "a plan"}], "result": "\\boxed{B}"}
    assert slim_sidecar_record({**written, "request_type": "generate_until"}) == {
        **counts,
        "request_type": "generate_until",
    }
    scores = {**written, "request_type": "loglikelihood", "result": [[-1.5, False], [-0.2, True]]}
    assert slim_sidecar_record(scores) == {**counts, "request_type": "loglikelihood", "result": scores["result"]}


def _copy_with_sidecar_text(target: Path) -> None:
    """The fixtures, with each side-car line carrying its output text and agent messages as the backends write them
    today (the fixtures predate those keys)."""
    shutil.copytree(GOOD, target)
    for file in target.rglob("sidecar*.jsonl"):
        lines = []
        for line in file.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            record["result"] = f"answer to {record.get('doc_id')}"
            for agent in record.get("agents") or []:
                agent["text"] = "a message"
            lines.append(json.dumps(record))
        file.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def _relative_files(frame: pd.DataFrame, root: Path) -> pd.DataFrame:
    """The frame with its `file` column relative to `root` (the two copies live in different directories)."""
    if "file" not in frame:
        return frame
    return frame.assign(file=frame["file"].map(lambda path: str(Path(path).relative_to(root))))


def test_the_report_of_slimmed_results_equals_the_report_of_the_full_ones(tmp_path):
    full, slimmed = tmp_path / "full", tmp_path / "slim"
    _copy_with_sidecar_text(full)
    _copy_with_sidecar_text(slimmed)
    # the fixtures hold text, so the check can fail
    assert _text_keys(full) >= {"doc", "resps", "agents.text", "generated result"}
    changed = slim_results([slimmed])
    assert changed and _text_keys(slimmed) == set()
    assert slim_results([slimmed]) == []  # idempotent
    before = build_report([full], baselines=baselines_dir())
    after = build_report([slimmed], baselines=baselines_dir())
    for key, frame in before.tables.items():
        assert not frame.empty or key in ("seed_spread",), key
        pd.testing.assert_frame_equal(frame, after.tables[key], obj=key)
    for key, frame in before.tidy.items():
        pd.testing.assert_frame_equal(_relative_files(frame, full), _relative_files(after.tidy[key], slimmed), obj=key)
    assert [w.replace(str(full), "") for w in before.warnings] == [w.replace(str(slimmed), "") for w in after.warnings]


def test_a_line_cut_short_is_kept_and_the_cli_rejects_a_missing_path(tmp_path):
    sidecar = tmp_path / "sidecar.jsonl"
    sidecar.write_text(json.dumps({"doc_id": 0, "agents": [{"text": "x"}]}) + '\n{"doc_id": 1, "resu\n')
    slim_results([tmp_path])
    assert sidecar.read_text().splitlines() == ['{"doc_id": 0, "agents": [{}]}', '{"doc_id": 1, "resu']
    from diffmas_eval.slim import main

    with pytest.raises(SystemExit):
        main([str(tmp_path / "nowhere")])


@pytest.mark.parametrize("directory", SLIM_RESULTS)
def test_committed_slim_leaderboards_hold_no_benchmark_text(directory):
    listed = subprocess.run(["git", "ls-files", directory], cwd=REPO, capture_output=True, text=True).stdout.split()
    files = [
        REPO / name
        for name in listed
        if name.endswith(".jsonl") and Path(name).name.startswith(("samples_", "sidecar"))
    ]
    if not files:
        pytest.skip(f"{directory} is not in a git checkout here")
    offenders = {str(file.relative_to(REPO)): sorted(keys) for file in files if (keys := _text_keys(file))}
    assert not offenders, f"run `python -m diffmas_eval.slim {directory}` on finished pieces: {offenders}"


def test_slimming_keeps_the_generations_text_in_a_local_full_copy_that_refuses_another_sidecar(tmp_path):
    from diffmas_eval.slim import full_copy, with_full_text

    sidecar = tmp_path / "sidecar.jsonl"
    written = [{"doc_id": i, "request_type": "generate_until", "result": f"answer {i}"} for i in range(2)]
    sidecar.write_text("".join(json.dumps(r) + "\n" for r in written))
    slim_results([tmp_path])
    assert "answer" not in sidecar.read_text() and "answer 1" in full_copy(sidecar).read_text()
    with sidecar.open("a") as handle:  # the piece extended: one more document, with its text
        handle.write(json.dumps({"doc_id": 2, "request_type": "generate_until", "result": "answer 2"}) + "\n")
    restored = [json.loads(line)["result"] for line in with_full_text(sidecar).splitlines()]
    assert restored == ["answer 0", "answer 1", "answer 2"]
    slim_results([tmp_path])  # slimmed again: the copy now holds all three, the side-car none
    assert "answer" not in sidecar.read_text() and "answer 2" in full_copy(sidecar).read_text()
    sidecar.write_text(json.dumps({"doc_id": 9, "request_type": "generate_until"}) + "\n" * 3)  # another side-car
    assert with_full_text(sidecar) is None


def test_answers_come_back_from_a_full_copy_only_when_they_agree_with_the_scores(tmp_path):
    import hashlib

    from diffmas_eval.slim import answers_from_full_copies, full_copy

    gold = ["A", "B", "C"]

    def piece(name: str, replies: list[str], acc: list[int], run_key: str = "k") -> Path:
        model_dir = tmp_path / name / "mas_arc_challenge" / "m"
        model_dir.mkdir(parents=True)
        samples = [
            {"doc_id": i, "target_hash": hashlib.sha256(g.encode()).hexdigest(), "acc": a}
            for i, (g, a) in enumerate(zip(gold, acc, strict=True))
        ]
        file = model_dir / "samples_mas_arc_challenge_2026-01-01T00-00-00.jsonl"
        file.write_text("".join(json.dumps(s) + "\n" for s in samples))
        (model_dir / "results_2026-01-01T00-00-00.json").write_text(
            json.dumps({"config": {"diffmas": {"run_key": "k"}}})
        )
        records = [
            {
                "task": "mas_arc_challenge",
                "doc_id": i,
                "request_type": "generate_until",
                "run_key": run_key,
                "result": r,
            }
            for i, r in enumerate(replies)
        ]
        full_copy(tmp_path / name / "mas_arc_challenge" / "sidecar.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in records)
        )
        return file

    good = piece("good", ["\\boxed{A}", "The answer is D", "no idea"], [1, 0, 0])
    wrong = piece("disagrees", ["\\boxed{A}", "\\boxed{B}", "\\boxed{C}"], [1, 0, 0])  # B scored 0: not this text
    short = piece("short", ["\\boxed{A}", "\\boxed{D}"], [1, 0, 0])
    other = piece("other-run", ["\\boxed{A}", "\\boxed{D}", "\\boxed{D}"], [1, 0, 0], run_key="another")
    before = {file: file.read_text() for file in (wrong, short, other)}

    outcomes = answers_from_full_copies([tmp_path])

    assert outcomes == {
        good: "answers added",
        wrong: "the text's letters disagree with acc on 2 documents",
        short: "no text on this machine for 1 of 3 documents",
        other: "no text on this machine for 3 of 3 documents",
    }
    assert [json.loads(line)["answer"] for line in good.read_text().splitlines()] == ["A", "D", None]
    assert all(file.read_text() == text for file, text in before.items())  # left alone


def test_the_text_kept_here_is_read_under_the_results_files_budget(tmp_path):
    """A side-car can hold a task's generations under an old budget and a raised one: each reads as its own."""
    from diffmas_eval.slim import generations

    def record(doc: int, budget: int, text: str) -> dict:
        final = {"budget": budget, "stopped_before_budget": True}
        return {"task": "t", "doc_id": doc, "request_type": "generate_until", "run_key": "k", "final": final,
                "result": text}  # fmt: skip

    lines = [record(0, 512, "cut off"), record(1, 512, "ended"), record(0, 1024, "longer"), record(1, 1024, "ended")]
    (tmp_path / "sidecar.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert generations(tmp_path, "t", "k", 512) == {0: "cut off", 1: "ended"}
    assert generations(tmp_path, "t", "k", 1024) == {0: "longer", 1: "ended"}
    assert generations(tmp_path, "t", "k") == {0: "longer", 1: "ended"}  # no budget given: the last line per document
