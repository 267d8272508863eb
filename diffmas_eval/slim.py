"""Results without text: keep what the report reads and the scores, drop questions, prompts and model outputs.

lm-eval's samples files hold every document, prompt and response (several MB per piece), which copies benchmark text
into the repo (some benchmarks' authors ask us not to, GPQA's above all); our side-cars hold each agent's messages and
the final agent's text. The report needs none of it:
- samples (`samples_<task>_<stamp>.jsonl`) keep `doc_id`, `filter`, `metrics`, the three hashes the report checks
  against the results file's `task_hashes`, each metric's value and, for generative multiple choice, `answer`: the
  option letter the reply gave as the task extracts it (None when it gave none), one letter and never text, so which
  letters a row answers (`benchmarks/answer_letters.py`) can be read from committed files;
- side-cars (`sidecar.jsonl`) keep counts, timings and keys, and lose the upstream agents' `text` and the `result` of
  every generation (model text: outputs quote and paraphrase questions, and a committed one matched the wording of a
  GPQA explanation). Log-likelihood results (numbers) stay: they are the resume cache, so a multiple-choice piece
  committed at `--limit 200` extends to the whole task later without recomputing its first 200 documents, on a
  machine with the same CPU kernels (`cpu_kernels` is part of the run key). Generations' text is kept on this machine
  only, in a git-ignored full copy beside the side-car (`.sidecar.full.jsonl`): `diffmas-eval reproduce` puts it back
  before it extends a piece, so a generative piece extended on the machine that ran it does not recompute its
  documents either (elsewhere it does).

`diffmas-eval reproduce` slims each piece it finishes when its config says `slim: true`. Pieces slimmed before
samples kept `answer` get it back with `--answers-from-full-copies`, from the full copy where the piece ran (letters
A-E, the document's own letters being gone with it), only when every document's letter agrees with its committed
`acc` and the copy's run key is the results file's.

    python -m diffmas_eval.slim results/qwen-cpu        # rewrite in place (atomically), print what changed
    python -m diffmas_eval.slim --answers-from-full-copies results/qwen-cpu
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

from diffmas_eval.benchmarks.extract import extract_letter
from diffmas_eval.portable import replace_text, running
from diffmas_eval.settings import task_budget

SAMPLE_KEYS = ("doc_id", "filter", "metrics", "doc_hash", "prompt_hash", "target_hash", "answer")
AGENT_TEXT_KEYS = ("text",)
BACKFILL_LETTERS = "ABCDE"
# A multiple-choice sample's gold letter from its `target_hash`: the SHA-256 of the letter (generative tasks) or of
# the option's index (the letter-scored `_mc` tasks).
_GOLD_BY_HASH = {
    hashlib.sha256(target.encode()).hexdigest(): letter
    for index, letter in enumerate(BACKFILL_LETTERS)
    for target in (letter, str(index))
}


def gold_letter(target_hash: str) -> str | None:
    """The option letter whose target (a letter, or its index) has this SHA-256, or None (not a letter task)."""
    return _GOLD_BY_HASH.get(target_hash)


def slim_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """One lm-eval sample line without its text: the identity keys, the values of the metrics it lists and, for a
    generative multiple-choice document (our tasks' docs carry their option `letters`), the letter answered."""
    kept = {key: sample[key] for key in SAMPLE_KEYS if key in sample}
    kept.update({name: sample[name] for name in sample.get("metrics") or [] if name in sample})
    doc, replies = sample.get("doc"), sample.get("filtered_resps")
    if isinstance(doc, dict) and doc.get("letters") and replies and isinstance(replies[0], str):
        kept["answer"] = extract_letter(replies[0], doc["letters"])
    return kept


def slim_sidecar_record(record: dict[str, Any]) -> dict[str, Any]:
    """One side-car line without the upstream agents' messages and, for a generation, without its text (the `result`
    of a log-likelihood request, numbers, stays: it is the resume cache)."""
    kept = dict(record)
    if kept.get("request_type") == "generate_until":
        kept.pop("result", None)
    if isinstance(kept.get("agents"), list):
        kept["agents"] = [
            {k: v for k, v in agent.items() if k not in AGENT_TEXT_KEYS} if isinstance(agent, dict) else agent
            for agent in kept["agents"]
        ]
    return kept


def _slim_lines(text: str, slim_one) -> str:
    """Each JSON line through `slim_one`; a line that is not JSON (a write cut short) is kept as it is."""
    out = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            out.append(line)
            continue
        out.append(json.dumps(slim_one(record), ensure_ascii=False) if isinstance(record, dict) else line)
    return "".join(f"{line}\n" for line in out)


def full_copy(sidecar: Path) -> Path:
    """Where the text slimming drops from a side-car is kept, on this machine only (git-ignored)."""
    return sidecar.with_name(f".{sidecar.stem}.full.jsonl")


def with_full_text(sidecar: Path) -> str | None:
    """The side-car with the text slimming dropped put back from its full copy: the copy's lines, then the lines
    appended to the side-car since. None without a copy, or when the side-car's first lines are not the copy's lines
    slimmed (another side-car, or one edited since)."""
    copy = full_copy(sidecar)
    if not copy.is_file() or not sidecar.is_file():
        return None
    full = copy.read_text(encoding="utf-8").splitlines()
    current = sidecar.read_text(encoding="utf-8").splitlines()
    if (
        len(current) < len(full)
        or _slim_lines("\n".join(full), slim_sidecar_record).splitlines() != current[: len(full)]
    ):
        return None
    return "".join(f"{line}\n" for line in full + current[len(full) :])


def _write_atomically(file: Path, text: str) -> None:
    tmp = file.with_name(f".{file.name}.write-tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(file)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write leaves no second copy of the text behind


def _slimmer(file: Path):
    if file.suffix != ".jsonl":
        return None
    if file.name.startswith("samples_"):
        return slim_sample
    if file.name.startswith("sidecar"):  # `sidecar.jsonl`, or one per process under data parallelism
        return slim_sidecar_record
    return None


def slim_results(paths: list[Path]) -> list[Path]:
    """Rewrite every samples file and side-car below `paths` in place (each atomically); returns those that changed."""
    changed = []
    files = [p for path in paths for p in ([path] if path.is_file() else sorted(path.rglob("*.jsonl")))]
    for file in files:
        slim_one = _slimmer(file)
        if slim_one is None or not file.is_file() or running(file):  # a running piece: slimmed when it ends
            continue
        text = file.read_text(encoding="utf-8")
        full = with_full_text(file) if slim_one is slim_sidecar_record else None
        new = _slim_lines(full or text, slim_one)
        if full is not None or (slim_one is slim_sidecar_record and new != text):
            _write_atomically(full_copy(file), full or text)  # the text dropped, kept here for extending the piece
        if new != text:
            replace_text(file, new)
            changed.append(file)
    return changed


def generations(piece: Path, task: str, run_key: str | None, budget: int | None = None) -> dict[int, str]:
    """doc_id -> the final answer's text of `task` kept on this machine: from the piece's full copy, else from its
    side-car when that was never slimmed; only records under `run_key` (or written before run keys, carrying none;
    any record when `run_key` is None) and under the final-agent `budget` when given (a side-car can hold a task's
    generations under an old and a raised budget). Empty when no text is here."""
    for sidecar in (full_copy(piece / "sidecar.jsonl"), piece / "sidecar.jsonl"):
        texts = {}
        for line in sidecar.read_text(encoding="utf-8").splitlines() if sidecar.is_file() else []:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by an interrupted run
                continue
            if (record.get("task"), record.get("request_type")) != (task, "generate_until") or "result" not in record:
                continue
            if budget is not None and (record.get("final") or {}).get("budget") not in (None, budget):
                continue
            if run_key is None or record.get("run_key") in (None, run_key):
                texts[int(record["doc_id"])] = str(record["result"])
        if texts:
            return texts
    return {}


def answers_from_full_copies(paths: list[Path]) -> dict[Path, str]:
    """Give each slimmed generative multiple-choice samples file below `paths` its `answer`s back from the piece's
    full copy, when every document's text is there under the results file's run key and every letter (A-E) agrees
    with the committed `acc` (equal to the gold letter exactly when the document scored). Rewrites atomically;
    returns, per generative multiple-choice samples file, what was done ("answers added") or why not."""
    outcomes = {}
    files = [p for path in paths for p in ([path] if path.is_file() else sorted(path.rglob("samples_*.jsonl")))]
    for samples in files:
        task, stamp = samples.stem.removeprefix("samples_").rsplit("_", 1)
        lines = [json.loads(line) for line in samples.read_text(encoding="utf-8").splitlines()]
        golds = [gold_letter(sample.get("target_hash", "")) for sample in lines]
        if task.endswith("_mc") or not lines or None in golds:
            continue  # not generative multiple choice
        result_file = samples.with_name(f"results_{stamp}.json")
        if all("answer" in sample for sample in lines):
            outcomes[samples] = "has its answers already"
            continue
        if not result_file.is_file():
            outcomes[samples] = f"no {result_file.name} beside it"
            continue
        results = json.loads(result_file.read_text(encoding="utf-8"))
        run_key = ((results.get("config") or {}).get("diffmas") or {}).get("run_key")
        if not run_key:
            outcomes[samples] = f"no run key in {result_file.name}"
            continue
        texts = generations(samples.parent.parent, task, run_key, task_budget(results, task))
        missing = [sample["doc_id"] for sample in lines if int(sample["doc_id"]) not in texts]
        if missing:
            outcomes[samples] = f"no text on this machine for {len(missing)} of {len(lines)} documents"
            continue
        answers = [extract_letter(texts[int(sample["doc_id"])], BACKFILL_LETTERS) for sample in lines]
        disagree = sum((a == g) != bool(sample.get("acc")) for a, g, sample in zip(answers, golds, lines, strict=True))
        if disagree:
            outcomes[samples] = f"the text's letters disagree with acc on {disagree} documents"
            continue
        replace_text(
            samples, "".join(json.dumps({**s, "answer": a}) + "\n" for s, a in zip(lines, answers, strict=True))
        )
        outcomes[samples] = "answers added"
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffmas_eval.slim", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="result files or directories to rewrite in place")
    parser.add_argument(
        "--answers-from-full-copies",
        action="store_true",
        help="instead of slimming, give slimmed multiple-choice samples their answered letters from local full copies",
    )
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        parser.error(f"no such file or directory: {', '.join(missing)}")
    if args.answers_from_full_copies:
        for file, outcome in answers_from_full_copies(args.paths).items():
            print(f"{file}: {outcome}")
        return 0
    for file in slim_results(args.paths):
        print(file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
