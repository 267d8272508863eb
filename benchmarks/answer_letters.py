"""Which option letters a leaderboard's rows answer, against the gold letters: is a row choosing, or repeating a letter?

A small model trained to answer a multiple-choice question with `\\boxed{X}` can score near the accuracy of always
giving one letter while looking like a method effect. For each multiple-choice piece of a results directory
(`OUT/<run>/<task>/`, as `diffmas-eval reproduce` writes them) this prints:
- per task and document count, the gold letters' distribution and the accuracy of always answering the commonest gold
  letter (the constant-answer baseline), from the committed samples alone: the gold letter of a document is the option
  letter (or, for the letter-scored `_mc` tasks, the option index) whose SHA-256 is the sample's `target_hash`;
- per generative piece, the letters it answered, the share of its commonest letter, the accuracy a guesser blind to
  the question would expect answering letters at the row's own rates (the sum over letters of answered share times
  gold share), and how often the letters agree with the committed `acc` (a check). The letters come from the
  committed samples' `answer` (slimming keeps it, `diffmas_eval.slim`), else from the generations' text where it is
  on this machine (an unslimmed side-car, or the git-ignored full copy `.sidecar.full.jsonl` that a slimmed piece
  keeps where it ran), extracted as the task scores them; the `answers from` column says which. A piece slimmed
  before samples kept `answer` and made elsewhere has neither; rerunning it (`diffmas-eval reproduce ... --only RUN
  --tasks TASK`) makes the full copy.

    python benchmarks/answer_letters.py results/qwen-cpu [--tasks mas_arc_challenge,...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

import pandas as pd

from diffmas_eval.benchmarks.extract import extract_letter
from diffmas_eval.settings import task_budget
from diffmas_eval.slim import BACKFILL_LETTERS as LETTERS
from diffmas_eval.slim import generations, gold_letter


def _latest(directory: Path, pattern: str) -> Path | None:
    found = sorted(directory.glob(pattern), key=lambda path: path.name)
    return found[-1] if found else None


def _doc_ids(samples: Path) -> set[int]:
    return {int(json.loads(line)["doc_id"]) for line in samples.read_text(encoding="utf-8").splitlines()}


def _started(samples: Path, task: str) -> tuple[float, str]:
    """When the piece's evaluation started, by its results file of the same timestamp (its `date`, which the report
    orders results by; 0 without one), then the samples file's name."""
    stamp = samples.name.removeprefix(f"samples_{task}_").removesuffix(".jsonl")
    results = samples.parent / f"results_{stamp}.json"
    date = json.loads(results.read_text()).get("date", 0) if results.is_file() else 0
    return float(date or 0), samples.name


def _kept(files: list[Path], task: str) -> list[Path]:
    """The pieces the report keeps in one cell (`diffmas_eval.reporting.tables._cell`): the newest, then every older
    one of the same run configuration and final-agent budget on documents no kept piece has; an older piece sharing a
    document with a kept one, or made with other settings, is superseded."""
    newest_first = sorted(files, key=lambda samples: _started(samples, task), reverse=True)
    newest = _run_key_and_budget(newest_first[0].parent, task)
    kept: dict[Path, set[int]] = {}
    for samples in newest_first:
        docs = _doc_ids(samples)
        if _run_key_and_budget(samples.parent, task) == newest and not any(docs & other for other in kept.values()):
            kept[samples] = docs
    return sorted(kept, key=lambda samples: min(kept[samples], default=0))


def _cells(results: Path) -> dict[tuple[str, str], list[Path]]:
    """(run, task) -> the newest samples file of each of its pieces that the report keeps (`_kept`):
    `OUT/<run>/<task>/<model>/` for a whole task, `OUT/<run>/<task>/docs-<first>-<end>/<model>/` for each part of a
    run evaluated in parts."""
    cells = defaultdict(list)
    for pattern, task_level in (("*/*/*/samples_*.jsonl", 1), ("*/*/docs-*/*/samples_*.jsonl", 2)):
        for samples in sorted(results.glob(pattern)):
            task_dir = samples.parents[task_level]
            if samples == _latest(samples.parent, f"samples_{task_dir.name}_*.jsonl"):
                cells[task_dir.parent.name, task_dir.name].append(samples)
    return {(run, task): _kept(files, task) for (run, task), files in sorted(cells.items())}


def _run_key_and_budget(directory: Path, task: str) -> tuple[str | None, int | None]:
    """The run key and the task's final-agent budget its newest results file records (None, None without one)."""
    result_file = _latest(directory, "results_*.json")
    if result_file is None:
        return None, None
    results = json.loads(result_file.read_text())
    return ((results.get("config") or {}).get("diffmas") or {}).get("run_key"), task_budget(results, task)


def _distribution(letters: list[str]) -> str:
    counts = Counter(letters)
    return " ".join(f"{letter}:{100 * counts[letter] / len(letters):.0f}" for letter in sorted(counts))


def gold_letters(samples: Path) -> dict[int, str] | None:
    """doc_id -> gold letter from a samples file's target hashes; None when a target is not an option letter/index."""
    gold = {}
    for line in samples.read_text(encoding="utf-8").splitlines():
        sample = json.loads(line)
        letter = gold_letter(sample.get("target_hash", ""))
        if letter is None:
            return None
        gold[int(sample["doc_id"])] = letter
    return gold


def answered_letters(piece: Path, task: str, run_key: str | None, budget: int | None = None) -> dict[int, str | None]:
    """doc_id -> the letter extracted from the final answer, from the text kept on this machine (empty without it)."""
    return {doc: extract_letter(text, LETTERS) for doc, text in generations(piece, task, run_key, budget).items()}


def letters_table(results: Path, tasks: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per task and n: gold distribution and constant-answer baseline; per piece: accuracy and answered letters)."""
    baselines, pieces = {}, []
    for (run, task), files in _cells(results).items():
        if tasks and task not in tasks:
            continue
        golds = [gold_letters(samples) for samples in files]
        if not all(golds):
            continue
        gold = {doc: letter for part in golds for doc, letter in part.items()}
        lines = [json.loads(line) for samples in files for line in samples.read_text(encoding="utf-8").splitlines()]
        scores = {int(s["doc_id"]): s.get("acc") for s in lines}
        counts = Counter(gold.values())
        top, top_count = counts.most_common(1)[0]
        baselines[(task, len(gold))] = {
            "task": task,
            "n": len(gold),
            "gold letters (%)": _distribution(list(gold.values())),
            "always the commonest letter": f"{top} {100 * top_count / len(gold):.1f}",
        }
        source, answered = "", {}
        if not task.endswith("_mc") and all("answer" in s for s in lines):
            source, answered = "samples", {int(s["doc_id"]): s["answer"] for s in lines}
        elif not task.endswith("_mc"):
            for samples in files:
                answered |= answered_letters(samples.parent.parent, task, *_run_key_and_budget(samples.parent, task))
            answered = {doc: letter for doc, letter in answered.items() if doc in gold}
            source = "text here" if answered else ""
        row = {"run": run, "task": task, "n": len(gold), "acc": 100 * sum(scores.values()) / len(scores)}
        if answered:
            letters = [letter or "-" for letter in answered.values()]
            commonest, commonest_count = Counter(letters).most_common(1)[0]
            agree = sum(int((answered[doc] == gold[doc]) == bool(scores[doc])) for doc in answered)
            answered_counts, gold_counts = Counter(letters), Counter(gold[doc] for doc in answered)
            guess = sum(answered_counts[x] * gold_counts[x] for x in LETTERS) / len(letters) ** 2
            row.update(
                {
                    "answers from": source,
                    "answers": len(answered),
                    "answered letters (%)": _distribution(letters),
                    "commonest answer (%)": f"{commonest} {100 * commonest_count / len(letters):.1f}",
                    "blind guess at these rates": round(100 * guess, 1),
                    "agrees with acc": f"{agree}/{len(answered)}",
                }
            )
        pieces.append(row)
    return pd.DataFrame(list(baselines.values())), pd.DataFrame(pieces).convert_dtypes()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="a reproduce output directory (OUT/<run>/<task>/...)")
    p.add_argument("--tasks", help="comma-separated task names (default: every multiple-choice task found)")
    p.add_argument("--out", type=Path, help="also write baselines.csv and pieces.csv here")
    args = p.parse_args()
    baselines, pieces = letters_table(args.results, args.tasks.split(",") if args.tasks else None)
    with pd.option_context("display.width", 200, "display.max_columns", None, "display.max_rows", None):
        print(baselines.to_string(index=False), "\n")
        print(pieces.round(1).to_string(index=False))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        baselines.to_csv(args.out / "baselines.csv", index=False)
        pieces.to_csv(args.out / "pieces.csv", index=False)


if __name__ == "__main__":
    main()
