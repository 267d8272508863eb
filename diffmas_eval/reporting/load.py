"""Read lm-eval result files (and their samples and side-cars) into plain records.

A run is identified only by what its `results_*.json` says about itself (`config`, `config.diffmas`), never by
its file or directory name. Samples files are linked to a results file the way lm-eval writes them (same directory,
same time stamp suffix) and then checked against the results file's `task_hashes`, so a stray or partial samples
file is refused rather than paired with the wrong run.

Every problem with an input (invalid JSON, missing keys, non-numeric metrics, `"N/A"` stderr, partial samples,
unreadable side-car) becomes a warning that names the file; the affected file, task or part is left out.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from diffmas_eval.reporting.taxonomy import OTHER_DOMAIN, headline_metric, secondary_metrics, task_domain
from diffmas_eval.settings import parsed_args, split_budget, task_budget

# Fields of config.diffmas that describe *how* a run was executed, not *what* was run: everything else a method records
# (`Method.settings()`) is its identity. Totals, side-car path, package version and seed are not part of the
# configuration (a rerun with a newer package replaces the older one; seeds are reported side by side); an adapter is
# identified by its weights' fingerprint where results record one, not by its path.
RUN_FIELDS = frozenset(
    {
        "totals",
        "sidecar",
        "sidecars",
        "version",
        "run_key",
        "seed",
        "batch_size",
        "world_size",
        "cpu_kernels",
        "max_gen_toks_default",
        "adapter_training",
        "adapters_training",
    }
)


def method_order() -> list[str]:
    """Registered method names in report order (built-ins first)."""
    from diffmas_eval.methods.registry import methods

    return list(methods())


def default_communication(method: str) -> str | None:
    """What `communication` is for a method's main row (other values are controls); None for unknown methods."""
    from diffmas_eval.methods.registry import methods

    cls = methods().get(method)
    return cls.default_communication if cls is not None else None


class WarningLog:
    """Collects report warnings (each names the file it is about) and echoes them to stderr-style logging."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def warn(self, path: Path | str, message: str) -> None:
        """Record `path: message`."""
        text = f"{path}: {message}"
        if text not in self.messages:
            self.messages.append(text)


@dataclass
class MetricValue:
    """One aggregated metric of one task: value in [0, 1] (or any float), stderr or None when unknown."""

    value: float
    stderr: float | None


@dataclass
class TaskResult:
    """What one results file says about one task."""

    task: str
    filter: str
    headline: str  # the metric the leaderboard shows (taxonomy.headline_metric, or a fallback for unknown tasks)
    metrics: dict[str, MetricValue]
    n: int
    n_original: int | None
    samples: pd.DataFrame | None = None  # columns: doc_id, doc_hash, <metric>... one row per document
    sidecar: pd.DataFrame | None = None  # one row per document: per-problem cost and stopping (see _sidecar_frame)
    # The final agent's token budget (`settings.task_budget`), None for a task that does not generate. A property of
    # the task, like its prompt: not part of the run's identity, so one row may give each task its own budget.
    budget: int | None = None
    parts: int = 1  # results joined into this one (`join_parts`)


@dataclass
class Run:
    """One results file: its identity, when it ran, and its tasks."""

    path: Path
    date: float
    source: str  # "diffmas" (our backends) or "lm-eval" (lm-eval's own models such as `hf`)
    identity: dict[str, Any]  # the configuration, seed excluded
    seed: Any
    limit: float | None
    tasks: dict[str, TaskResult] = field(default_factory=dict)
    totals: dict[str, float] | None = None
    all_task_counts: dict[str, Any] = field(default_factory=dict)  # every task the file lists, usable or not

    @property
    def identity_key(self) -> str:
        """A stable string for grouping runs of the same configuration."""
        return json.dumps(self.identity, sort_keys=True, default=str)


def join_parts(first: TaskResult, second: TaskResult) -> TaskResult | None:
    """One cell from two results of one configuration on disjoint documents of a task (a run evaluated in parts,
    `reproduce`'s `part_size`), or None when they do not join: a document in both, samples missing on either side,
    another filter, budget or task size. Without a side-car on both sides the joined cell has none (no cost).

    Each metric is recomputed over the joined documents from their samples, as lm-eval computes a mean and its
    standard error (sample standard deviation over the square root of n); a metric the samples do not carry per
    document is left out."""
    if first.samples is None or second.samples is None:
        return None
    if (first.filter, first.headline, first.budget, first.n_original) != (
        second.filter,
        second.headline,
        second.budget,
        second.n_original,
    ):
        return None
    if set(first.samples["doc_id"]) & set(second.samples["doc_id"]):
        return None
    samples = pd.concat([first.samples, second.samples], ignore_index=True).sort_values("doc_id", ignore_index=True)
    metrics = {}
    for name in first.metrics.keys() & second.metrics.keys():
        if name in samples and samples[name].notna().all():
            values = samples[name].astype(float)
            stderr = float(values.std(ddof=1)) / math.sqrt(len(values)) if len(values) > 1 else None
            metrics[name] = MetricValue(float(values.mean()), stderr)
    if first.headline not in metrics:
        return None
    sidecar = None
    if first.sidecar is not None and second.sidecar is not None:
        sidecar = pd.concat([first.sidecar, second.sidecar], ignore_index=True)
    parts = first.parts + second.parts
    return replace(first, metrics=metrics, n=len(samples), samples=samples, sidecar=sidecar, parts=parts)


def find_results_files(directories: Iterable[Path | str], log: WarningLog) -> list[Path]:
    """All `results_*.json` below the given directories, sorted; a missing directory is a warning."""
    found: list[Path] = []
    for directory in directories:
        directory = Path(directory)
        if not directory.is_dir():
            log.warn(directory, "not a directory; skipped")
            continue
        found.extend(p for p in directory.rglob("results_*.json") if p.is_file())
    return sorted(set(found))


def load_runs(directories: Iterable[Path | str], log: WarningLog) -> list[Run]:
    """Read every results file below `directories` (with samples and side-cars); bad files become warnings."""
    runs = []
    for path in find_results_files(directories, log):
        run = read_run(path, log)
        if run is not None:
            runs.append(run)
    return runs


def _number(value: Any) -> float | None:
    """A finite float, or None for anything else (strings such as "N/A", None, NaN, booleans)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _identity(config: dict[str, Any], path: Path, log: WarningLog) -> tuple[str, dict[str, Any], Any] | None:
    """(source, identity, seed) from a results file's `config`, or None (with a warning) when it cannot be told."""
    decoding, _ = split_budget(config.get("gen_kwargs"))
    diffmas = config.get("diffmas")
    if diffmas is not None:
        if not isinstance(diffmas, dict) or not diffmas.get("method") or not diffmas.get("backbone"):
            log.warn(path, "config.diffmas lacks `method` or `backbone`; file skipped")
            return None
        identity = {name: value for name, value in diffmas.items() if name not in RUN_FIELDS}
        if identity.get("adapter_fingerprint"):
            identity.pop("adapter", None)
        training = diffmas.get("adapter_training")
        if isinstance(training, dict) and training.get("frozen_trace"):  # the ablation: shown in the row's label
            identity["adapter_frozen_trace"] = True
        if identity.get("fuser_fingerprint"):  # a C2C fuser is identified by its weights, not its path
            identity.pop("fuser", None)
        if identity.get("adapters_fingerprint"):  # NeuroMAS's per-node adapters likewise
            identity.pop("adapters", None)
        prompts = identity.get("prompts")
        identity["prompts"] = prompts.get("sha256") if isinstance(prompts, dict) else prompts
        identity["decoding"] = decoding
        return "diffmas", identity, diffmas.get("seed")
    model = config.get("model")
    if not model:
        log.warn(path, "config has neither `diffmas` nor `model`; cannot tell which run this is; file skipped")
        return None
    args = parsed_args(config.get("model_args"))
    backbone = args.get("pretrained") or args.get("model") or args.get("path") or str(model)
    identity = {
        "method": str(model),
        "backbone": str(backbone),
        "backbone_fingerprint": args.get("revision"),
        "adapter": args.get("peft"),
        "topology": None,
        "latent_steps": None,
        "realign": None,
        "communication": None,
        "enable_thinking": args.get("enable_thinking"),
        "max_new_tokens": args.get("max_gen_toks"),
        "prompts": None,
        "dtype": args.get("dtype"),
        "decoding": decoding,
    }
    return "lm-eval", identity, config.get("random_seed")


def _choose_filter(task: str, res: dict[str, Any], metric: str) -> str | None:
    """The filter whose `<metric>,<filter>` the report uses: `none` if present, else the only one."""
    filters = sorted(key.split(",", 1)[1] for key in res if "," in key and key.split(",", 1)[0] == metric)
    if "none" in filters:
        return "none"
    return filters[0] if len(filters) == 1 else None


def _headline_for(task: str, res: dict[str, Any]) -> str:
    """Known tasks: their TEAM.md headline metric. Unknown tasks (domain `other`): acc, else exact_match, else the
    first metric the file reports, so they are shown rather than dropped."""
    if task_domain(task) != OTHER_DOMAIN:
        return headline_metric(task)
    names = sorted({k.split(",", 1)[0] for k in res if "," in k and "_stderr," not in k} - {"extracted"})
    for preferred in ("acc", "exact_match"):
        if preferred in names:
            return preferred
    return names[0] if names else headline_metric(task)


def read_run(path: Path, log: WarningLog) -> Run | None:
    """Parse one `results_*.json`; None (with a warning naming the file) when it is unusable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        log.warn(path, f"not a readable JSON results file (interrupted run?): {err}; file skipped")
        return None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict) or not data["results"]:
        log.warn(path, "no `results` section (partial or foreign file); file skipped")
        return None
    config = data.get("config")
    if not isinstance(config, dict):
        log.warn(path, "no `config` section, so the run cannot be identified; file skipped")
        return None
    ident = _identity(config, path, log)
    if ident is None:
        return None
    source, identity, seed = ident
    date = _number(data.get("date"))
    if date is None:
        date = path.stat().st_mtime
        log.warn(path, "no `date`; using the file's modification time to order reruns")
    limit = _number(config.get("limit"))
    diffmas = config.get("diffmas") if isinstance(config.get("diffmas"), dict) else {}
    totals = diffmas.get("totals") if isinstance(diffmas.get("totals"), dict) else None
    if totals is not None and not (_number(totals.get("requests")) or 0) > 0:
        totals = None  # nothing was counted (e.g. an older backend): no cost rather than zeros
    run = Run(path=path, date=date, source=source, identity=identity, seed=seed, limit=limit, totals=totals)

    groups = {name for name, children in (data.get("group_subtasks") or {}).items() if children}
    groups |= set(data.get("groups") or {})
    n_samples = data.get("n-samples") if isinstance(data.get("n-samples"), dict) else {}
    for task, res in data["results"].items():
        if task in groups:
            continue
        run.all_task_counts[task] = (
            (n_samples.get(task) or {}).get("effective") if isinstance(n_samples.get(task), dict) else None
        )
        if not isinstance(res, dict):
            log.warn(path, f"results[{task!r}] is not an object; task skipped")
            continue
        result = _read_task(path, task, res, n_samples.get(task), log)
        if result is not None:
            result.budget = task_budget(data, task)
            run.tasks[task] = result
    if not run.tasks:
        log.warn(path, "no usable task results; file skipped")
        return None
    _attach_samples(run, data.get("task_hashes") or {}, log)
    _attach_sidecar(run, diffmas.get("sidecars") or diffmas.get("sidecar"), log, diffmas.get("run_key"))
    return run


def _read_task(path: Path, task: str, res: dict[str, Any], counts: Any, log: WarningLog) -> TaskResult | None:
    """The metrics of one task, or None when its headline metric is missing or not a number."""
    metric = _headline_for(task, res)
    filt = _choose_filter(task, res, metric)
    if filt is None:
        log.warn(path, f"task {task}: no single `{metric},<filter>` entry (found {sorted(res)}); task skipped")
        return None
    metrics: dict[str, MetricValue] = {}
    for name in (metric, *secondary_metrics(task), "extracted"):
        raw = res.get(f"{name},{filt}")
        if raw is None:
            continue
        value = _number(raw)
        if value is None:
            if name == metric:
                log.warn(path, f"task {task}: `{name},{filt}` = {raw!r} is not a number; task skipped")
                return None
            log.warn(path, f"task {task}: `{name},{filt}` = {raw!r} is not a number; ignored")
            continue
        stderr_raw = res.get(f"{name}_stderr,{filt}")
        stderr = _number(stderr_raw)
        if stderr is None and name != "extracted":
            log.warn(path, f"task {task}: `{name}_stderr,{filt}` is {stderr_raw!r}; computed from samples if present")
        metrics[name] = MetricValue(value, stderr)
    n = counts.get("effective") if isinstance(counts, dict) else None
    n = n if isinstance(n, int) else res.get("sample_len")
    if not isinstance(n, int) or n <= 0:
        log.warn(path, f"task {task}: no document count (`n-samples` / `sample_len`); task skipped")
        return None
    original = counts.get("original") if isinstance(counts, dict) else None
    return TaskResult(
        task=task,
        filter=filt,
        headline=metric,
        metrics=metrics,
        n=n,
        n_original=original if isinstance(original, int) else None,
    )


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _attach_samples(run: Run, task_hashes: dict[str, str], log: WarningLog) -> None:
    """Attach `samples_<task>_<stamp>.jsonl` to each task when it exists, is complete and matches `task_hashes`."""
    stamp = run.path.stem[len("results_") :]
    for task, result in run.tasks.items():
        sample_path = run.path.with_name(f"samples_{task}_{stamp}.jsonl")
        if not sample_path.is_file():
            log.warn(run.path, f"task {task}: no samples file {sample_path.name}; paired comparisons skip this task")
            _stderr_without_samples(run, result, log)
            continue
        frame = _read_samples(sample_path, result, task_hashes.get(task), log)
        result.samples = frame
        if frame is None:
            _stderr_without_samples(run, result, log)
            continue
        for name, metric in result.metrics.items():
            if metric.stderr is None and name in frame and len(frame) > 1:
                # lm-eval's stderr for a mean is the sample standard error; recompute it the same way.
                metric.stderr = float(frame[name].std(ddof=1) / math.sqrt(len(frame)))


def _stderr_without_samples(run: Run, result: TaskResult, log: WarningLog) -> None:
    for name, metric in result.metrics.items():
        if metric.stderr is None and name != "extracted":
            log.warn(run.path, f"task {result.task}: stderr of `{name}` unknown, no samples to compute it (n/a)")


def _read_samples(path: Path, result: TaskResult, expected_hash: str | None, log: WarningLog) -> pd.DataFrame | None:
    """Rows (doc_id, doc_hash, prompt_hash, metrics...) for the chosen filter, or None with a warning."""
    rows, hash_parts = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        log.warn(path, f"unreadable samples file ({err}); ignored")
        return None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            sample = json.loads(line)
            hash_parts.append(sample["doc_hash"] + sample["prompt_hash"] + sample["target_hash"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            log.warn(path, f"line {number} is not a complete sample ({err!r}; partial file?); samples ignored")
            return None
        if sample.get("filter", "none") != result.filter:
            continue
        row = {"doc_id": sample.get("doc_id"), "doc_hash": sample["doc_hash"], "prompt_hash": sample["prompt_hash"]}
        for name in result.metrics:
            if name in sample:
                value = _number(sample[name])
                if value is None:
                    log.warn(path, f"line {number}: `{name}` = {sample[name]!r} is not a number; samples ignored")
                    return None
                row[name] = value
        rows.append(row)
    if expected_hash and _sha256("".join(hash_parts)) != expected_hash:
        log.warn(path, "does not match the results file's task_hashes (another run's or a partial file); ignored")
        return None
    frame = pd.DataFrame(rows)
    metric = result.headline
    if frame.empty or metric not in frame or frame[metric].isna().any():
        log.warn(path, f"no `{metric}` value for every document; samples ignored")
        return None
    if len(frame) != result.n or frame["doc_id"].duplicated().any():
        log.warn(path, f"{len(frame)} documents (unique ids required) but the results file says {result.n}; ignored")
        return None
    return frame


def _resolve_sidecar(run: Run, declared: str) -> Path | None:
    """The side-car path as recorded (a relative one from the results file's directory or the output directory
    above it), else a file of the same name near the results file (moved results)."""
    candidate = Path(declared)
    if candidate.is_absolute() and candidate.is_file():
        return candidate
    for folder in (run.path.parent, run.path.parent.parent):
        if not candidate.is_absolute() and (folder / candidate).is_file():
            return folder / candidate
    # Moved results: the same file name beside the results file, or one level up (`<output_path>/sidecar.jsonl` when
    # lm-eval put the results in `<output_path>/<model name>/`).
    for folder in (run.path.parent, run.path.parent.parent):
        if (folder / Path(declared).name).is_file():
            return folder / Path(declared).name
    return None


def _attach_sidecar(run: Run, declared: Any, log: WarningLog, run_key: str | None = None) -> None:
    """Per-document cost and stopping from the backend's side-car JSONL (see TEAM.md for its line format).

    A side-car can hold a task's generations under several final-agent budgets (its budget raised, the generations
    that ended early reused): only those under the budget the task ran with here count."""
    if not declared:
        return
    paths = []
    for one in declared if isinstance(declared, list) else [declared]:  # data parallel: one side-car per process
        path = _resolve_sidecar(run, str(one))
        if path is None:
            log.warn(run.path, f"side-car {one} not found (nor beside the results file); using config totals")
            return
        paths.append(path)
    per_doc: dict[tuple[str, Any], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    records: dict[Any, dict[str, Any]] = {}
    line_no = skipped = 0
    path = paths[0]
    try:
        for line in (line for path in paths for line in path.read_text(encoding="utf-8").splitlines()):
            line_no += 1
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by an interrupted run
                skipped += 1
                continue
            # A side-car can hold several runs (resumed or re-configured): this run's lines, the last per request.
            if run_key and record.get("run_key") not in (None, run_key):
                continue
            budget = getattr(run.tasks.get(record.get("task")), "budget", None)
            if budget is not None and (record.get("final") or {}).get("budget") not in (None, budget):
                continue
            records[record.get("store_key") or line_no] = record
        for record in records.values():
            key = (record["task"], record["doc_id"])
            doc = per_doc[key]
            agents = record.get("agents") or []
            final = record.get("final") or {}
            upstream_generated = sum(float(a.get("generated_tokens") or 0) for a in agents)
            doc["generated_tokens"] += upstream_generated + float(final.get("generated_tokens") or 0)
            doc["final_generated_tokens"] += float(final.get("generated_tokens") or 0)
            doc["latent_steps"] += sum(float(a.get("latent_steps") or 0) for a in agents)
            doc["trace_tokens"] += float(record.get("trace_tokens") or 0)
            doc["wall_seconds"] += float(record["wall_seconds"])
            if record.get("request_type") == "generate_until" and "stopped_before_budget" in final:
                doc["generations"] += 1
                doc["stopped"] += float(bool(final["stopped_before_budget"]))
    except (OSError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        log.warn(path, f"side-car unreadable at line {line_no} ({err!r}); using config totals for {run.path.name}")
        return
    if skipped:
        log.warn(path, f"{skipped} unreadable side-car line(s) skipped (an interrupted write)")
    frame = pd.DataFrame([{"task": t, "doc_id": d, **vals} for (t, d), vals in per_doc.items()])
    for task, result in run.tasks.items():
        part = frame[frame["task"] == task] if not frame.empty else frame
        # A side-car reused across --limit values holds more documents than this run scored: only the documents it
        # scored count (by their samples' doc_id; without samples, the first n).
        if not part.empty and len(part) > result.n:
            scored = set(result.samples["doc_id"]) if result.samples is not None else set(range(result.n))
            part = part[pd.to_numeric(part["doc_id"], errors="coerce").isin(scored)]
        if part.empty:
            log.warn(path, f"no side-car lines for task {task}; its cost comes from config totals")
            continue
        if len(part) != result.n:
            log.warn(path, f"task {task}: side-car covers {len(part)} documents, results {result.n}; cost uses them")
        result.sidecar = part.drop(columns="task").reset_index(drop=True)
