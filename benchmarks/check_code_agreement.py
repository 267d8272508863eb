"""Per-problem agreement of our sandboxed scorer with evalplus's own evaluator on a full HumanEval+ or MBPP+ set.

Both score the same programs: every canonical solution, and one deterministic mutant of each (an operator or
constant changed, `_code_scoring.mutated_programs`). A problem agrees when both give the same pass/fail for the base
tests and for base + plus. Each disagreement is then scored once more by evalplus's own `check_correctness` in a
fresh interpreter holding only that problem, and explained:
- `evalplus oracle defect (fixed here)`: HumanEval/32, whose evalplus 0.3.1 oracle fails every correct root;
- `evalplus's pool, not the program`: evalplus alone in a fresh process agrees with us (its evaluator's pool workers
  are forked from a parent holding the whole ground truth, so a test child starts near its 4 GiB address-space cap);
- `unexplained`: anything else (the script exits with status 1).
Timing-sensitive: run it alone on the machine, as evalplus's time limits are wall-clock limits.

    DIFFMAS_DATA_DIR=../shared/data python benchmarks/check_code_agreement.py --dataset humaneval
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _code_scoring import (
    BENCHMARKS,
    EVALPLUS_FILES,
    RESULTS,
    canonical_programs,
    data_dir,
    mutated_programs,
    run_scorer,
    write_result,
)

ORACLE_DEFECTS = {"HumanEval/32"}
# evalplus alone, in a fresh interpreter, on one program: the verdict its evaluator would give without the pool.
_FRESH_EVALPLUS = """
import gc, json, sys
from evalplus.data import get_human_eval_plus, get_human_eval_plus_hash, get_mbpp_plus, get_mbpp_plus_hash
from evalplus.evaluate import check_correctness, get_groundtruth
from evalplus.eval._special_oracle import MBPP_OUTPUT_NOT_NONE_TASKS
dataset, task_id, program = sys.argv[1], sys.argv[2], sys.stdin.read()
if dataset == "humaneval":
    problems, digest, not_none = get_human_eval_plus(), get_human_eval_plus_hash(), []
else:
    problems, digest, not_none = get_mbpp_plus(), get_mbpp_plus_hash(), MBPP_OUTPUT_NOT_NONE_TASKS
problem = problems[task_id]
del problems  # only this problem in memory, as in a fresh process of its own
gc.collect()
expected = get_groundtruth({task_id: problem}, digest + "-" + task_id.replace("/", "_"), not_none)[task_id]
result = check_correctness(dataset, 0, problem, program, expected, fast_check=True)
print("RESULT " + json.dumps([result["base"][0], result["plus"][0]]))
"""


def passes(verdict: tuple[str, str]) -> tuple[bool, bool]:
    base, plus = verdict
    return base == "pass", base == plus == "pass"


def fresh_evalplus(dataset: str, task_id: str, program: str, cache: Path) -> tuple[str, str]:
    variable, relative = EVALPLUS_FILES[dataset]
    env = {**os.environ, variable: str(data_dir() / relative), "XDG_CACHE_HOME": str(cache / "fresh")}
    finished = subprocess.run(
        [sys.executable, "-c", _FRESH_EVALPLUS, dataset, task_id],
        input=program,
        env=env,
        capture_output=True,
        text=True,
    )
    for line in finished.stdout.splitlines():
        if line.startswith("RESULT "):
            return tuple(json.loads(line[len("RESULT ") :]))
    raise RuntimeError(f"fresh evalplus run failed for {task_id}:\n{finished.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("humaneval", "mbpp"), required=True)
    parser.add_argument("--parallel", type=int, default=None, help="checks at once (default: half the cores)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    from diffmas_eval.benchmarks.code_exec import default_parallel

    parallel = args.parallel or default_parallel()
    sets = {"canonical": canonical_programs(args.dataset), "mutated": mutated_programs(args.dataset)}
    summary, differences, rows = {}, [], []
    unexplained = 0
    with tempfile.TemporaryDirectory(prefix="code-agreement-") as folder:
        cache = Path(folder)  # both scorers' ground truth, computed once and reused by the second set
        for name, programs in sets.items():
            theirs = run_scorer("evalplus", args.dataset, programs, parallel, cache)
            ours = run_scorer("ours", args.dataset, programs, parallel, cache)
            agree = [t for t, _ in programs if passes(theirs.verdicts[t]) == passes(ours.verdicts[t])]
            summary[name] = {
                "problems": len(programs),
                "agree": len(agree),
                "evalplus_plus_pass": theirs.passed_plus,
                "ours_plus_pass": ours.passed_plus,
            }
            print(f"{name}: {len(agree)}/{len(programs)} agree", flush=True)
            for task_id, program in programs:
                if task_id in agree:
                    continue
                # The defect fails every solution under evalplus, so the only explained difference is that we pass a
                # canonical solution (a correct root) that evalplus fails; anything else there is unexplained too.
                if task_id in ORACLE_DEFECTS and name == "canonical" and passes(ours.verdicts[task_id]):
                    reason, alone = "evalplus oracle defect (fixed here)", None
                else:
                    alone = fresh_evalplus(args.dataset, task_id, program, cache)
                    if passes(alone) == passes(ours.verdicts[task_id]):
                        reason = "evalplus's pool, not the program: evalplus alone agrees with us"
                    else:
                        reason = "unexplained"
                        unexplained += 1
                differences.append(
                    {
                        "set": name,
                        "task_id": task_id,
                        "evalplus": theirs.verdicts[task_id],
                        "ours": ours.verdicts[task_id],
                        "evalplus_alone": alone,
                        "reason": reason,
                    }
                )
    rows += [
        "| programs | problems | agree (pass/fail, base and base+plus) | evalplus base+plus passes | ours |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {s['problems']} | {s['agree']} | {s['evalplus_plus_pass']} | {s['ours_plus_pass']} |"
            for name, s in summary.items()
        ),
        "",
        "Differences (statuses are base, plus):",
        "",
        "| programs | problem | evalplus's evaluator | ours | evalplus alone, fresh process | why |",
        "|---|---|---|---|---|---|",
        *(
            f"| {d['set']} | {d['task_id']} | {'/'.join(d['evalplus'])} | {'/'.join(d['ours'])} | "
            f"{'/'.join(d['evalplus_alone']) if d['evalplus_alone'] else '-'} | {d['reason']} |"
            for d in differences
        ),
        "",
        f"Unexplained differences: {unexplained}. {parallel} check(s) at once.",
    ]
    payload = {
        "dataset": args.dataset,
        "benchmark": BENCHMARKS[args.dataset],
        "parallel": parallel,
        "summary": summary,
        "differences": differences,
        "unexplained": unexplained,
    }
    write_result(args.out, f"code_agreement_{args.dataset}", payload, rows)
    sys.exit(1 if unexplained else 0)


if __name__ == "__main__":
    main()
