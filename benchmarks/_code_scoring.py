"""Shared by `bench_code_scoring.py` and `check_code_agreement.py`: the full HumanEval+ / MBPP+ programs
(canonical, and deterministic mutants of them) and one scoring run, in a fresh subprocess, of evalplus's own
evaluator (`evalplus.evaluate.evaluate`, its process pool, its ground-truth cache) or of ours
(`code_exec.score_programs`, the warm worker and the sandbox, our ground-truth cache).

Each run reports the seconds from the start of its imports to the end of scoring (ground truth included when its
cache is empty) and every problem's `(base_status, plus_status)`.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import git_revision  # the timed scorers run in fresh interpreters; torch here costs them nothing

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results" / "perf"
BENCHMARKS = {"humaneval": "humaneval_plus", "mbpp": "mbpp_plus"}
EVALPLUS_FILES = {
    "humaneval": ("HUMANEVAL_OVERRIDE_PATH", "humanevalplus/HumanEvalPlus-v0.1.10.jsonl"),
    "mbpp": ("MBPP_OVERRIDE_PATH", "mbppplus/MbppPlus-v0.2.0.jsonl"),
}
# (text, replacement) tried in turn on the canonical solution, starting at a different one per problem.
MUTATIONS = [
    (" + ", " - "), (" - ", " + "), (" < ", " <= "), (" > ", " >= "), (" <= ", " < "), (" >= ", " > "),
    (" == ", " != "), (" != ", " == "), (" and ", " or "), (" or ", " and "), ("return True", "return False"),
    ("return False", "return True"), ("[0]", "[1]"), ("+ 1", "+ 2"), ("- 1", "- 2"), (" * ", " + "),
]  # fmt: skip

# Run in a fresh interpreter; `os._exit` because evalplus's evaluator leaves a watchdog thread that sleeps 20 s.
_EVALPLUS_RUNNER = """
import json, os, sys, time
began = time.perf_counter()
from evalplus.evaluate import evaluate
evaluate(sys.argv[1], samples=sys.argv[2], parallel=int(sys.argv[3]), i_just_wanna_run=True)
seconds = time.perf_counter() - began
print("RESULT " + json.dumps({"seconds": seconds}), flush=True)
os._exit(0)
"""
_OURS_RUNNER = """
import json, os, sys, time
began = time.perf_counter()
from diffmas_eval.benchmarks.code_exec import sandbox_status, score_programs
with open(sys.argv[2]) as handle:
    programs = [(row["task_id"], row["solution"]) for row in map(json.loads, handle)]
verdicts = score_programs(sys.argv[1], programs, parallel=int(sys.argv[3]))
seconds = time.perf_counter() - began
statuses = {task_id: [v.base_status, v.plus_status] for (task_id, _), v in zip(programs, verdicts)}
print("RESULT " + json.dumps({"seconds": seconds, "verdicts": statuses, "sandbox": sandbox_status()}), flush=True)
"""


@dataclass
class ScoringRun:
    """One scorer's pass over a set of programs."""

    scorer: str  # "evalplus" or "ours"
    seconds: float  # imports + ground truth (when not cached) + scoring
    verdicts: dict[str, tuple[str, str]]  # task_id -> (base_status, plus_status)
    sandbox: dict[str, Any] | None = None

    @property
    def passed_plus(self) -> int:
        return sum(base == plus == "pass" for base, plus in self.verdicts.values())


def data_dir() -> Path:
    if "DIFFMAS_DATA_DIR" not in os.environ:
        raise SystemExit("set DIFFMAS_DATA_DIR to the benchmark data directory (e.g. ../shared/data)")
    return Path(os.environ["DIFFMAS_DATA_DIR"]).resolve()


def load_problems(dataset: str) -> dict[str, dict[str, Any]]:
    """The evalplus release file's problems, in file order."""
    _, relative = EVALPLUS_FILES[dataset]
    with (data_dir() / relative).open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return {row["task_id"]: row for row in rows}


def canonical_programs(dataset: str) -> list[tuple[str, str]]:
    """Every problem's prompt plus canonical solution, as evalplus's own samples would hold it."""
    return [(task_id, p["prompt"] + p["canonical_solution"]) for task_id, p in load_problems(dataset).items()]


def mutated_programs(dataset: str) -> list[tuple[str, str]]:
    """One mutant per problem: the first mutation that applies to its canonical solution, trying them from a
    different start per problem; a solution none applies to gets a failing first line instead."""
    programs = []
    for index, (task_id, problem) in enumerate(load_problems(dataset).items()):
        solution = problem["canonical_solution"]
        for offset in range(len(MUTATIONS)):
            text, replacement = MUTATIONS[(index + offset) % len(MUTATIONS)]
            if text in solution:
                solution = solution.replace(text, replacement, 1)
                break
        else:
            solution = "raise RuntimeError('mutant')\n" + solution
        programs.append((task_id, problem["prompt"] + solution))
    return programs


def _result_line(output: str) -> dict[str, Any]:
    for line in output.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"the scoring run printed no result; its output ended with:\n{output[-3000:]}")


def run_scorer(scorer: str, dataset: str, programs: list[tuple[str, str]], parallel: int, cache: Path) -> ScoringRun:
    """Score `programs` with `scorer` ("evalplus" or "ours") in a fresh interpreter, with its ground-truth cache
    in `cache` (empty: computed and timed; filled by an earlier run: loaded)."""
    variable, relative = EVALPLUS_FILES[dataset]
    env = {**os.environ, variable: str(data_dir() / relative), "DIFFMAS_CACHE_DIR": str(cache / "ours")}
    env["XDG_CACHE_HOME"] = str(cache / "xdg")  # where evalplus keeps its ground truth
    with tempfile.TemporaryDirectory(prefix="code-scoring-") as folder:
        samples = Path(folder) / "samples.jsonl"
        with samples.open("w", encoding="utf-8") as handle:
            for task_id, program in programs:
                handle.write(json.dumps({"task_id": task_id, "solution": program}) + "\n")
        runner, target = (_EVALPLUS_RUNNER, dataset) if scorer == "evalplus" else (_OURS_RUNNER, BENCHMARKS[dataset])
        finished = subprocess.run(
            [sys.executable, "-c", runner, target, str(samples), str(parallel)],
            env=env,
            cwd=folder,
            capture_output=True,
            text=True,
        )
        result = _result_line(finished.stdout + finished.stderr)
        if scorer == "evalplus":
            with (Path(folder) / "samples_eval_results.json").open() as handle:
                evaluated = json.load(handle)["eval"]
            result["verdicts"] = {t: [r[0]["base_status"], r[0]["plus_status"]] for t, r in evaluated.items()}
    verdicts = {task_id: tuple(statuses) for task_id, statuses in result["verdicts"].items()}
    return ScoringRun(scorer, result["seconds"], verdicts, result.get("sandbox"))


def run_context() -> dict[str, Any]:
    """The command as typed from the repo root, the revision and the machine."""
    script = Path(sys.argv[0]).resolve()
    script_text = str(script.relative_to(REPO)) if script.is_relative_to(REPO) else str(script)
    import evalplus

    return {
        "command": f"DIFFMAS_DATA_DIR={data_dir()} python {script_text} {shlex.join(sys.argv[1:])}".strip(),
        "git_revision": git_revision(),
        "machine": {
            "cpu_count": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "evalplus": getattr(evalplus, "__version__", "unknown"),
            "kernel": platform.release(),
        },
    }


def write_result(out: Path, name: str, payload: dict[str, Any], markdown: list[str]) -> None:
    """`<out>/<name>.json` and `.md` (figures plus command, revision and machine); prints the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    context = run_context()
    (out / f"{name}.json").write_text(json.dumps({"benchmark": name, **context, **payload}, indent=2) + "\n")
    lines = [
        f"# {name}",
        "",
        f"Command: `{context['command']}`",
        "",
        f"Revision: `{context['git_revision']}`; machine: {json.dumps(context['machine'])}",
        "",
        *markdown,
        "",
    ]
    (out / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))
