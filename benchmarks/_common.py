"""Shared helpers of the performance benchmarks: arguments, inputs, interleaved timing and result files.

Every benchmark runs the variants it compares in one process, interleaved (A B B A A B ...), repeated, and reports
medians and ratios; absolute times are context only (the machines are shared and noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results" / "perf"


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark takes (--dtype, --n, --repeats, --threads, --out)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--n", type=int, default=8, help="problems (documents) per measurement")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every variant")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1 by default: on a 2-core machine shared with other jobs, 2 OpenMP threads "
        "were measured up to 10x slower than 1 because of spinning at barriers on busy cores)",
    )
    p.add_argument("--pretrained", default=None, help="backbone (default: the embedded default model)")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON and Markdown results")
    return p


def setup(args: argparse.Namespace) -> None:
    """Apply the thread count and check the data directory before any model work."""
    torch.set_num_threads(args.threads)
    if "DIFFMAS_DATA_DIR" not in os.environ:
        raise SystemExit("set DIFFMAS_DATA_DIR to the benchmark data directory (e.g. ../shared/data)")


def gsm8k_questions(n: int) -> list[str]:
    """The first `n` GSM8K test questions from the data directory."""
    from diffmas_eval.paths import data_dir

    with (data_dir() / "gsm8k" / "test.jsonl").open(encoding="utf-8") as handle:
        rows = [json.loads(line) for _, line in zip(range(n), handle, strict=False)]
    return [row["question"] for row in rows]


def gsm8k_rows(n: int) -> list[dict[str, Any]]:
    """The first `n` GSM8K test rows (`question`, `answer`)."""
    from diffmas_eval.paths import data_dir

    with (data_dir() / "gsm8k" / "test.jsonl").open(encoding="utf-8") as handle:
        return [json.loads(line) for _, line in zip(range(n), handle, strict=False)]


def arc_easy_items(n: int) -> list[tuple[str, list[str]]]:
    """The first `n` ARC-Easy test items as (context with `A. ...` option lines, option letters)."""
    from diffmas_eval.paths import data_dir

    items = []
    with (data_dir() / "arc_easy" / "test.jsonl").open(encoding="utf-8") as handle:
        for _, line in zip(range(n), handle, strict=False):
            row = json.loads(line)
            choices = row["question"]["choices"]
            options = "\n".join(f"{c['label']}. {c['text']}" for c in choices)
            items.append((f"{row['question']['stem']}\n{options}", [c["label"] for c in choices]))
    return items


def generate_requests(questions: list[str], max_gen_toks: int, task: str = "gsm8k") -> list[Any]:
    """lm-eval `generate_until` Instances for `questions` (format `boxed_number`, greedy, no stop strings)."""
    from lm_eval.api.instance import Instance

    gen_kwargs = {"until": [], "do_sample": False, "max_gen_toks": max_gen_toks}
    return [
        Instance("generate_until", {"answer_format": "boxed_number"}, (q, dict(gen_kwargs)), 0, (task, i, 1))
        for i, q in enumerate(questions)
    ]


def loglikelihood_requests(items: list[tuple[str, list[str]]], task: str = "arc_easy_mc") -> list[Any]:
    """lm-eval `loglikelihood` Instances: every option letter of every item (format `letter`)."""
    from lm_eval.api.instance import Instance

    return [
        Instance("loglikelihood", {"answer_format": "letter"}, (ctx, letter), k, (task, i, 1))
        for i, (ctx, letters) in enumerate(items)
        for k, letter in enumerate(letters)
    ]


def step_parser(description: str, repeats: int) -> argparse.ArgumentParser:
    """The options of the step benchmarks: steps per timed run, batch sizes, upstream prompts in the trace."""
    p = parser(description)
    p.add_argument("--steps", type=int, default=16, help="k: steps per timed run")
    p.add_argument("--batches", type=int, nargs="+", default=[8, 1])
    p.add_argument("--trace-agents", type=int, default=3, help="upstream prompts prefilled into the trace")
    p.set_defaults(repeats=repeats)
    return p


def upstream_trace(method: Any, questions: list[str], agents: int) -> Any:
    """The trace of the first `agents` upstream agents' prompts for `questions` (one row each), prefilled."""
    from diffmas_eval.core.trace import append_prompts

    trace = None
    for role in method.upstream_roles[:agents]:
        trace, _ = append_prompts(method.backbone, trace, [method.render(role, q) for q in questions])
    return trace


def make_backend(method: str, args: argparse.Namespace, sidecar: Path, **kwargs: Any) -> Any:
    """One lm-eval backend of ours (`single-agent`, `text-mas`, `latent-mas`) on CPU, as the CLI would build it.

    Settings the method does not take (e.g. the upstream budget `max_new_tokens` for methods without text agents)
    are dropped, so one call site can configure every method."""
    from dataclasses import fields

    from diffmas_eval.lm_backend import BackendArgs, backend_class
    from diffmas_eval.methods import get_method

    accepted = {f.name for f in fields(BackendArgs)} | {f.name for f in fields(get_method(method).config_class)}
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    return backend_class(method)(
        pretrained=args.pretrained, dtype=args.dtype, device="cpu", sidecar=str(sidecar), **kwargs
    )


def forget_finished(lm: Any) -> None:
    """Make the backend recompute every request: it reuses results already in its side-car store (so interrupted
    runs resume), which would turn every repeat of a timed call into a lookup."""
    finished = getattr(lm, "_finished", None)
    if finished is not None:
        finished.clear()


class ForwardTimer:
    """Adds up wall time inside the outermost forward of any hooked module, in total (`seconds`, `calls`) and split by
    block width (`by_kind`): `prefill` (a block of several positions per row) or `step` (one position per row: a
    decode or latent step)."""

    def __init__(self, modules: list) -> None:
        self.depth, self.began, self.seconds, self.calls, self.kind = 0, 0.0, 0.0, 0, "step"
        self.by_kind = {"prefill": [0.0, 0], "step": [0.0, 0]}  # kind -> [seconds, calls]
        for module in modules:
            module.register_forward_pre_hook(self._enter, with_kwargs=True)
            module.register_forward_hook(self._leave, with_kwargs=True)

    def _enter(self, module: Any, args: tuple, kwargs: dict) -> None:
        if self.depth == 0:
            block = kwargs.get("input_ids")
            block = kwargs.get("inputs_embeds") if block is None else block
            block = args[0] if block is None and args else block
            self.kind = "prefill" if block is not None and block.shape[1] > 1 else "step"
            self.began = time.perf_counter()
        self.depth += 1

    def _leave(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        self.depth -= 1
        if self.depth == 0:
            elapsed = time.perf_counter() - self.began
            self.seconds += elapsed
            self.calls += 1
            self.by_kind[self.kind][0] += elapsed
            self.by_kind[self.kind][1] += 1

    def snapshot(self) -> dict[str, list[float]]:
        """A copy of `by_kind`, to subtract from a later one."""
        return {kind: list(values) for kind, values in self.by_kind.items()}


def interleaved(variants: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Time every variant `repeats` times, alternating the order each round (ABAB..., then BA...).

    Returns:
        (seconds per variant, the last return value per variant).
    """
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    outputs: dict[str, Any] = {}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            began = time.perf_counter()
            outputs[name] = variants[name]()
            times[name].append(time.perf_counter() - began)
    return times, outputs


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    """What the numbers were measured on (the load average shows how shared the machine was)."""
    import transformers

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": args.dtype,
    }


def git_revision() -> str:
    """HEAD of the repo, with `+dirty` if tracked files under diffmas_eval/ or benchmarks/ differ from it."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            [
                "git",
                "-C",
                str(REPO),
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                "diffmas_eval",
                "benchmarks",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def command_line() -> str:
    """The command that produced a result, as typed from the repo root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_text = str(script.relative_to(REPO))
    except ValueError:
        script_text = str(script)
    env = " ".join(f"{k}={os.environ[k]}" for k in ("DIFFMAS_DATA_DIR",) if k in os.environ)
    return f"{env} python {script_text} {shlex.join(sys.argv[1:])}".strip()


def write_result(args: argparse.Namespace, name: str, payload: dict[str, Any], markdown: list[str]) -> Path:
    """Write `<out>/<name>_<dtype>.json` and `.md` (figures plus command, revision and machine) and print the table."""
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"command": command_line(), "git_revision": git_revision(), "machine": machine_info(args)}
    record = {"benchmark": name, **meta, **payload}
    path = args.out / f"{name}_{args.dtype}.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    lines = [
        f"# {name} ({args.dtype})",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Revision: `{meta['git_revision']}`; machine: {json.dumps(meta['machine'])}",
        "",
        *markdown,
        "",
    ]
    (args.out / f"{name}_{args.dtype}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return path


def fmt(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}"
