"""Turn loaded runs into the report's tables (pandas frames of display strings plus tidy numeric frames).

Rows are configurations (method, backbone, topology and settings, controls labelled as such); several seeds of one
configuration are separate rows and their spread is its own table. Among reruns of the same configuration and seed,
the newest result per task wins unless `all_runs` is set.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from diffmas_eval.reporting.baselines import UNSPECIFIED, matching_baselines, normalize_backbone
from diffmas_eval.reporting.load import (
    Run,
    TaskResult,
    WarningLog,
    default_communication,
    join_parts,
    method_order,
)
from diffmas_eval.reporting.stats import paired_compare
from diffmas_eval.reporting.taxonomy import (
    DOMAIN_ORDER,
    counts_in_average,
    secondary_metrics,
    task_domain,
    task_sort_key,
)

KIND_ORDER = ("method", "control", "lm-eval model")
ROW_COLUMNS = ["kind", "method", "backbone", "topology", "settings"]
LIMIT_MARK = "†"
NA = "–"


@dataclass
class Row:
    """One leaderboard row: a configuration (and seed), with the newest result per task."""

    key: tuple
    run: Run  # a representative run (the newest) for identity fields
    kind: str
    settings: str = ""
    entries: dict[str, tuple[Run, TaskResult]] = field(default_factory=dict)

    @property
    def identity(self) -> dict[str, Any]:
        return self.run.identity

    @property
    def method(self) -> str:
        return str(self.identity["method"])

    @property
    def backbone(self) -> str:
        return str(self.identity["backbone"])

    @property
    def topology(self) -> str:
        return str(self.identity.get("topology") or "")

    def labels(self) -> dict[str, str]:
        """The row-identifying display columns."""
        backbone = self.backbone.rstrip("/").rsplit("/", 1)[-1]
        return {
            "kind": self.kind,
            "method": self.method,
            "backbone": backbone,
            "topology": self.topology,
            "settings": self.settings,
        }

    def short_label(self) -> str:
        """A one-line label for plots and references."""
        text = " · ".join(p for p in (self.method, self.labels()["backbone"], self.topology, self.settings) if p)
        return f"[control] {text}" if self.kind == "control" else text


def run_kind(run: Run) -> str:
    """`method`, `control` (communication removed or swapped, or a LoRA single agent) or `lm-eval model`."""
    if run.source != "diffmas":
        return "lm-eval model"
    from diffmas_eval.methods.registry import methods

    method = methods().get(run.identity["method"])
    return "control" if method is not None and method.is_control(run.identity) else "method"


def _settings(run: Run, *, with_seed: bool, with_date: bool, budgets: tuple[int, ...] = ()) -> list[str]:
    """The row's settings, for its label. `budgets`: the final-agent budgets of its tasks (a task property, shown
    as one `max_gen_toks` when they agree; the stability table gives each task's)."""
    ident = run.identity
    method = ident["method"]
    parts = []
    if ident.get("latent_steps") is not None:
        parts.append(f"m={ident['latent_steps']}")
    if ident.get("realign") is not None and ident.get("latent_steps") is not None:
        parts.append("realign" if ident["realign"] else "no-realign")
    if ident.get("adapter"):
        parts.append(f"adapter={str(ident['adapter']).rstrip('/').rsplit('/', 1)[-1]}")
    elif ident.get("adapter_fingerprint"):
        parts.append(f"adapter={ident['adapter_fingerprint'][:8]}")
    if ident.get("adapter_frozen_trace"):
        parts.append("trained with a frozen trace")
    for key, label in (("sharer", "sharer"), ("upstream_model", "upstream")):  # C2C's sharer, T2T's writer
        if ident.get(key):
            parts.append(f"{label}={str(ident[key]).rstrip('/').rsplit('/', 1)[-1]}")
    if ident.get("fuser_fingerprint"):
        parts.append(f"fuser={ident['fuser_fingerprint'][:8]}")
    if ident.get("graph") is not None:  # NeuroMAS: the graph, and its trained per-node adapters
        parts.append(f"graph={ident['graph']}")
    if ident.get("adapters_fingerprint"):
        parts.append(f"adapters={ident['adapters_fingerprint'][:8]}")
    comm = ident.get("communication")
    if comm and comm != default_communication(method):
        parts.append(f"communication={comm}")
    if ident.get("enable_thinking"):
        parts.append("thinking")
    if ident.get("max_new_tokens") is not None:
        parts.append(f"max_new={ident['max_new_tokens']}")
    decoding = []
    if budgets:
        decoding.append(f"max_gen_toks={'/'.join(map(str, budgets))}" + (" by task" if len(budgets) > 1 else ""))
    if ident.get("decoding"):
        # Compact `k=v` pairs: the same information as lm-eval's gen_kwargs dict, short enough for a plot legend.
        extra = ident["decoding"]
        decoding += [f"{k}={v}" for k, v in extra.items()] if isinstance(extra, dict) else [str(extra)]
    if decoding:
        parts.append(" ".join(decoding))
    if with_seed and run.seed is not None:
        parts.append(f"seed={run.seed}")
    if with_date:
        parts.append(dt.datetime.fromtimestamp(run.date, tz=dt.timezone.utc).strftime("run %Y-%m-%d %H:%M:%S UTC"))
    return parts


def build_rows(runs: list[Run], *, all_runs: bool, log: WarningLog) -> list[Row]:
    """Group runs into rows; newest result per (configuration, seed, task) unless `all_runs`."""
    seeds_per_config: dict[str, set] = defaultdict(set)
    for run in runs:
        seeds_per_config[run.identity_key].add(str(run.seed))
    rows: dict[tuple, Row] = {}
    results: dict[tuple, dict[str, list[tuple[Run, TaskResult]]]] = defaultdict(lambda: defaultdict(list))
    for run in sorted(runs, key=lambda r: r.date):
        key = (run.identity_key, str(run.seed), str(run.path) if all_runs else "")
        row = rows.get(key)
        if row is None:
            row = rows[key] = Row(key=key, run=run, kind=run_kind(run))
        for task, result in run.tasks.items():
            results[key][task].append((run, result))
        row.run = run
    for key, tasks in results.items():
        for task, candidates in tasks.items():
            rows[key].entries[task] = _cell(task, candidates, log)
    for row in rows.values():
        multi_seed = len(seeds_per_config[row.run.identity_key]) > 1
        budgets = tuple(sorted({result.budget for _, result in row.entries.values()} - {None}))
        row.settings = ", ".join(_settings(row.run, with_seed=multi_seed, with_date=all_runs, budgets=budgets))
    _disambiguate(list(rows.values()))
    method_rank = {m: i for i, m in enumerate(method_order())}
    return sorted(
        rows.values(),
        key=lambda r: (
            KIND_ORDER.index(r.kind),
            normalize_backbone(r.backbone),
            method_rank.get(r.method, 99),
            r.method,
            r.topology,
            r.settings,
        ),
    )


def _cell(task: str, candidates: list[tuple[Run, TaskResult]], log: WarningLog) -> tuple[Run, TaskResult]:
    """One row's cell for `task` from its results, oldest first: the newest, joined with every older result that
    covers other documents of the task (the parts of a run evaluated in parts, `join_parts`); an older result that
    shares a document with a newer one kept, or cannot join it, is superseded."""
    kept: list[tuple[Run, TaskResult]] = []
    for run, result in reversed(candidates):
        if all(join_parts(newer, result) is not None for _, newer in kept):
            kept.append((run, result))
        else:
            log.warn(run.path, f"task {task} superseded by the newer run {kept[0][0].path} (--all-runs keeps both)")
    cell = kept[-1][1]
    for _, result in reversed(kept[:-1]):
        cell = join_parts(cell, result)
    return kept[0][0], cell


def _disambiguate(rows: list[Row]) -> None:
    """Rows whose labels collide get the identity fields that tell them apart appended to their settings."""
    by_label: dict[tuple, list[Row]] = defaultdict(list)
    for row in rows:
        by_label[tuple(row.labels().values())].append(row)
    for group in by_label.values():
        if len(group) < 2:
            continue
        keys = sorted({k for r in group for k in r.identity})
        differing = [k for k in keys if len({str(r.identity.get(k)) for r in group}) > 1]
        for row in group:
            extra = [f"{k}={row.identity.get(k)}" for k in differing] or [f"seed={row.run.seed}"]
            row.settings = ", ".join(p for p in (row.settings, *extra) if p)


def _limited(run: Run, result: TaskResult) -> bool:
    """Whether a result covers only part of its task: fewer documents than the task has when lm-eval recorded the
    task's size (a `--limit` at or above it is the whole set), else whether a `--limit` was given."""
    if result.n_original is not None:
        return result.n < result.n_original
    return run.limit is not None


def _pct(value: float | None, digits: int = 1) -> str:
    return NA if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.{digits}f}"


def format_score(value: float, stderr: float | None, n: int | str, limited: bool = False) -> str:
    """`62.5 ± 3.1 (n=200)` in percent, `± n/a` when the stderr is unknown, `†` for a `--limit`-ed subset."""
    err = "n/a" if stderr is None else _pct(stderr)
    return f"{_pct(value)} ± {err} (n={n})" + (f" {LIMIT_MARK}" if limited else "")


def scores_frame(rows: list[Row]) -> pd.DataFrame:
    """Tidy per-(row, task, metric) numbers: the data behind the leaderboard."""
    records = []
    for row_id, row in enumerate(rows):
        for task, (run, result) in row.entries.items():
            for metric in (result.headline, *secondary_metrics(task), "extracted"):
                if metric not in result.metrics:
                    continue
                mv = result.metrics[metric]
                records.append(
                    {
                        "row": row_id,
                        "label": row.short_label(),
                        **row.labels(),
                        "seed": row.run.seed,
                        "task": task,
                        "domain": task_domain(task),
                        "metric": metric,
                        "headline": metric == result.headline,
                        "value": mv.value,
                        "stderr": mv.stderr,
                        "n": result.n,
                        "n_original": result.n_original,
                        "limited": _limited(run, result),
                        "limit": run.limit,
                        "file": str(run.path),
                    }
                )
    return pd.DataFrame(records)


def _average(cells: list[tuple[float, float | None, int, bool]]) -> tuple[float, float | None, int, bool]:
    """Unweighted mean over tasks; stderr of a mean of independent estimates = sqrt(sum se^2) / k."""
    values = [c[0] for c in cells]
    errors = [c[1] for c in cells]
    stderr = None if any(e is None for e in errors) else math.sqrt(sum(e * e for e in errors)) / len(cells)
    return float(np.mean(values)), stderr, sum(c[2] for c in cells), any(c[3] for c in cells)


def leaderboard(rows: list[Row]) -> pd.DataFrame:
    """Rows x (domain, column) display strings: each task, code `(base)` columns, domain averages, overall."""
    tasks = sorted({t for r in rows for t in r.entries}, key=task_sort_key)
    columns: list[tuple[str, str]] = []
    averaged: dict[str, list[str]] = defaultdict(list)
    for domain in DOMAIN_ORDER:
        domain_tasks = [t for t in tasks if task_domain(t) == domain]
        for task in domain_tasks:
            columns.append((domain, task))
            columns.extend((domain, f"{task} ({m.replace('pass_', '')})") for m in secondary_metrics(task))
            if counts_in_average(task):
                averaged[domain].append(task)
        if averaged[domain]:
            columns.append((domain, f"{domain} avg"))
    columns.append(("overall", "overall avg"))
    table = []
    for row in rows:
        cells: dict[tuple[str, str], str] = {("", k): v for k, v in row.labels().items()}
        everything = []
        for domain in DOMAIN_ORDER:
            in_domain = []
            for task in (t for t in tasks if task_domain(t) == domain):
                if task not in row.entries:
                    continue
                run, result = row.entries[task]
                limited = _limited(run, result)
                head = result.metrics[result.headline]
                cells[(domain, task)] = format_score(head.value, head.stderr, result.n, limited)
                for metric in secondary_metrics(task):
                    if metric in result.metrics:
                        mv = result.metrics[metric]
                        cells[(domain, f"{task} ({metric.replace('pass_', '')})")] = format_score(
                            mv.value, mv.stderr, result.n, limited
                        )
                if counts_in_average(task):
                    in_domain.append((head.value, head.stderr, result.n, limited))
            if in_domain:
                value, stderr, n, limited = _average(in_domain)
                cells[(domain, f"{domain} avg")] = format_score(
                    value, stderr, f"{n}, {len(in_domain)}/{len(averaged[domain])} tasks", limited
                )
                everything.extend(in_domain)
        if everything:
            n_all = sum(len(v) for v in averaged.values())
            value, stderr, n, limited = _average(everything)
            cells[("overall", "overall avg")] = format_score(
                value, stderr, f"{n}, {len(everything)}/{n_all} tasks", limited
            )
        table.append(cells)
    index = pd.MultiIndex.from_tuples([("", c) for c in ROW_COLUMNS] + columns)
    return pd.DataFrame(table, columns=index).fillna(NA)


# --------------------------------------------------------------------------------------------- cost and stability


def _per_problem(frame: pd.DataFrame, column: str) -> float:
    return float(frame[column].mean()) if column in frame and len(frame) else float("nan")


def cost_frame(rows: list[Row], log: WarningLog) -> pd.DataFrame:
    """Per-(row, task) cost per problem from the side-car, else per-file totals from `config.diffmas.totals`."""
    records = []
    for row_id, row in enumerate(rows):
        files_without_sidecar: dict[str, tuple[Run, list[str]]] = {}
        for task, (run, result) in sorted(row.entries.items(), key=lambda kv: task_sort_key(kv[0])):
            base = {
                "row": row_id,
                **row.labels(),
                "method_raw": row.method,
                "backbone_key": normalize_backbone(row.backbone),
                "file": str(run.path),
            }
            if result.sidecar is not None:
                sc = result.sidecar
                generations = sc["generations"].sum() if "generations" in sc else 0
                records.append(
                    {
                        **base,
                        "task": task,
                        "problems": len(sc),
                        "source": "side-car",
                        "generated_tokens": _per_problem(sc, "generated_tokens"),
                        "final_generated_tokens": _per_problem(sc, "final_generated_tokens"),
                        "latent_steps": _per_problem(sc, "latent_steps"),
                        "trace_tokens": _per_problem(sc, "trace_tokens"),
                        "seconds": _per_problem(sc, "wall_seconds"),
                        "stopped_share": float(sc["stopped"].sum() / generations) if generations else math.nan,
                    }
                )
            elif result.parts > 1:  # joined parts: one file's totals would count one part
                log.warn(run.path, f"task {task}: joined parts without a side-car each; no per-problem cost")
            elif run.totals is not None:
                files_without_sidecar.setdefault(str(run.path), (run, []))[1].append(task)
        for path, (run, _) in files_without_sidecar.items():
            problems = sum(r.n for r in run.tasks.values())
            if len(run.tasks) != len(run.all_task_counts) or problems == 0:
                log.warn(path, "config totals cover tasks that were skipped; no per-problem cost from totals")
                continue
            totals = run.totals
            stopped, hit = totals.get("final_stopped"), totals.get("final_budget_hit")

            def per(name: str, totals=totals, problems=problems) -> float:
                value = totals.get(name)
                return float(value) / problems if isinstance(value, (int, float)) else math.nan

            records.append(
                {
                    "row": row_id,
                    **row.labels(),
                    "method_raw": row.method,
                    "backbone_key": normalize_backbone(row.backbone),
                    "file": path,
                    "task": "+".join(sorted(run.tasks, key=task_sort_key)),
                    "problems": problems,
                    "source": "config totals",
                    "generated_tokens": per("generated_tokens"),
                    "final_generated_tokens": per("final_generated_tokens"),
                    "latent_steps": per("latent_steps"),
                    "trace_tokens": per("trace_tokens"),
                    "seconds": per("wall_seconds"),
                    "stopped_share": (stopped / (stopped + hit))
                    if isinstance(stopped, (int, float)) and isinstance(hit, (int, float)) and stopped + hit > 0
                    else math.nan,
                }
            )
    frame = pd.DataFrame(records)
    if frame.empty:
        return frame
    frame["tokens_vs_single"] = math.nan
    frame["seconds_vs_single"] = math.nan
    frame["single_agent_row"] = ""
    for i, rec in frame.iterrows():
        ref = _reference_cost(frame, rows, rec)
        if ref is None:
            continue
        frame.at[i, "tokens_vs_single"] = (
            rec["generated_tokens"] / ref["generated_tokens"] if ref["generated_tokens"] else math.nan
        )
        frame.at[i, "seconds_vs_single"] = rec["seconds"] / ref["seconds"] if ref["seconds"] else math.nan
        ours, theirs = (rows[int(r)].entries.get(rec["task"]) for r in (rec["row"], ref["row"]))
        label = rows[int(ref["row"])].short_label()
        if ours is not None and theirs is not None:
            label += _budget_note(ours[1], theirs[1])
        frame.at[i, "single_agent_row"] = label
    return frame


def _reference_score(candidate: Row, row: Row) -> tuple:
    """How well a reference row matches a row's decoding settings (higher is better)."""
    fields = ("max_new_tokens", "enable_thinking", "decoding", "dtype", "topology", "latent_steps", "realign")
    return tuple(int(str(candidate.identity.get(f)) == str(row.identity.get(f))) for f in fields) + (
        int(str(candidate.run.seed) == str(row.run.seed)),
    )


def reference_rows(rows: list[Row], row: Row, method: str) -> list[Row]:
    """Rows of `method` (uncontrolled, no adapter) on the same backbone, best settings match first; never `row`."""
    candidates = [
        r
        for r in rows
        if r is not row
        and r.method == method
        and r.kind == "method"
        and not r.identity.get("adapter")
        and normalize_backbone(r.backbone) == normalize_backbone(row.backbone)
        and (method != "latent-mas" or r.topology == row.topology or not row.topology)
    ]
    return sorted(candidates, key=lambda r: _reference_score(r, row), reverse=True)


def _budget_note(ours: TaskResult, theirs: TaskResult) -> str:
    """What a comparison's reference label adds when the two cells ran at different final-agent budgets."""
    return "" if ours.budget == theirs.budget else f" (its budget {theirs.budget}, ours {ours.budget})"


def _same_budget_first(references: list[Row], task: str, budget: int | None) -> list[Row]:
    """`references` (best match first) with those that ran `task` at `budget` moved ahead: a paired or cost comparison
    between two final-agent budgets is made only when no reference ran the task at this one."""

    def other_budget(ref: Row) -> bool:
        entry = ref.entries.get(task)
        return entry is not None and entry[1].budget != budget

    return sorted(references, key=other_budget)


def _reference_cost(frame: pd.DataFrame, rows: list[Row], rec: pd.Series) -> pd.Series | None:
    row = rows[int(rec["row"])]
    entry = row.entries.get(rec["task"])
    budget = entry[1].budget if entry is not None else None
    for ref in _same_budget_first(reference_rows(rows, row, "single-agent"), rec["task"], budget):
        match = frame[(frame["row"] == rows.index(ref)) & (frame["task"] == rec["task"])]
        if not match.empty:
            return match.iloc[0]
    return None


def cost_table(cost: pd.DataFrame) -> pd.DataFrame:
    """Display version of `cost_frame`."""
    if cost.empty:
        return pd.DataFrame(columns=[*ROW_COLUMNS, "task"])

    def num(value: float, digits: int = 1) -> str:
        return NA if pd.isna(value) else f"{value:,.{digits}f}"

    def ratio(value: float) -> str:
        return NA if pd.isna(value) else f"{value:.2f}x"

    return pd.DataFrame(
        {
            **{c: cost[c] for c in ROW_COLUMNS},
            "task": cost["task"],
            "problems": cost["problems"],
            "generated tokens / problem": cost["generated_tokens"].map(num),
            "final-agent tokens / problem": cost["final_generated_tokens"].map(num),
            "latent steps / problem": cost["latent_steps"].map(num),
            "trace tokens / problem": cost["trace_tokens"].map(num),
            "seconds / problem": cost["seconds"].map(lambda v: num(v, 2)),
            "tokens vs single agent": cost["tokens_vs_single"].map(ratio),
            "seconds vs single agent": cost["seconds_vs_single"].map(ratio),
            "source": cost["source"],
        }
    )


def stability_table(rows: list[Row], cost: pd.DataFrame) -> pd.DataFrame:
    """Per (row, task): share of final generations stopped before the budget, share with an extractable answer."""
    records = []
    for row_id, row in enumerate(rows):
        for task, (run, result) in sorted(row.entries.items(), key=lambda kv: task_sort_key(kv[0])):
            stopped, source = math.nan, NA
            if not cost.empty:
                mine = cost[(cost["row"] == row_id) & (cost["file"] == str(run.path))]
                exact = mine[mine["task"] == task]
                pick = exact if not exact.empty else mine[mine["task"].str.split("+").map(lambda ts, t=task: t in ts)]
                if not pick.empty:
                    stopped = pick.iloc[0]["stopped_share"]
                    source = "side-car" if not exact.empty else "config totals (whole file)"
            extracted = result.metrics.get("extracted")
            head = result.metrics[result.headline]
            records.append(
                {
                    **row.labels(),
                    "task": task,
                    "n": result.n,
                    "budget": NA if result.budget is None else str(result.budget),
                    "stopped before budget": _pct(None if pd.isna(stopped) else float(stopped)),
                    "stopping source": source if not pd.isna(stopped) else NA,
                    "extractable answer": _pct(extracted.value if extracted else None),
                    "accuracy": format_score(head.value, head.stderr, result.n, _limited(run, result)),
                }
            )
    return pd.DataFrame(
        records,
        columns=[
            *ROW_COLUMNS,
            "task",
            "n",
            "budget",
            "stopped before budget",
            "stopping source",
            "extractable answer",
            "accuracy",
        ],
    )


def seed_spread_table(rows: list[Row]) -> pd.DataFrame:
    """Accuracy across seeds for configurations run with two or more seeds (per task)."""
    by_config: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        by_config[row.run.identity_key + "\0" + (row.key[2] or "")].append(row)
    records = []
    for group in by_config.values():
        if len({str(r.run.seed) for r in group}) < 2:
            continue
        tasks = sorted({t for r in group for t in r.entries}, key=task_sort_key)
        for task in tasks:
            values = [
                (r.run.seed, r.entries[task][1].metrics[r.entries[task][1].headline].value)
                for r in group
                if task in r.entries
            ]
            if len(values) < 2:
                continue
            accs = np.array([v for _, v in values])
            labels = group[0].labels()
            labels["settings"] = ", ".join(p for p in labels["settings"].split(", ") if not p.startswith("seed="))
            records.append(
                {
                    **labels,
                    "task": task,
                    "seeds": ", ".join(str(s) for s, _ in values),
                    "mean": _pct(float(accs.mean())),
                    "std across seeds": _pct(float(accs.std(ddof=1))),
                    "min": _pct(float(accs.min())),
                    "max": _pct(float(accs.max())),
                }
            )
    return pd.DataFrame(records, columns=[*ROW_COLUMNS, "task", "seeds", "mean", "std across seeds", "min", "max"])


# ---------------------------------------------------------------------------------------------- paired comparisons


LORA_CONTROL = "single-agent-lora"  # the `vs_method` of comparisons with the LoRA single-agent control


def _has_adapter(row: Row) -> bool:
    return bool(row.identity.get("adapter_fingerprint") or row.identity.get("adapter"))


def lora_control_rows(rows: list[Row], row: Row) -> list[Row]:
    """For a row of a method evaluated with a trained adapter (DiffMAS): the LoRA single-agent controls on the same
    backbone, the fair baseline trained on the same data and steps, best settings match first; none for other rows."""
    if row.kind != "method" or row.method == "single-agent" or not _has_adapter(row):
        return []
    candidates = [
        r
        for r in rows
        if r.method == "single-agent"
        and r.kind == "control"
        and _has_adapter(r)
        and normalize_backbone(r.backbone) == normalize_backbone(row.backbone)
    ]
    return sorted(candidates, key=lambda r: _reference_score(r, row), reverse=True)


def _control_adapter(row: Row) -> str:
    return str(row.identity.get("adapter_fingerprint") or row.identity.get("adapter"))


def paired_table(rows: list[Row], log: WarningLog) -> pd.DataFrame:
    """Each row vs the single agent and vs LatentMAS (same backbone, the best-matching settings) on the documents both
    scored; a row evaluated with a trained adapter also vs each LoRA single-agent control adapter (its best-matching
    settings): adapters retrained under the same config are separate rows, and no pairing among them is privileged."""
    records = []
    for row in rows:
        for task, (_, result) in sorted(row.entries.items(), key=lambda kv: task_sort_key(kv[0])):
            if result.samples is None:
                continue
            metric = result.headline
            for ref_method in ("single-agent", "latent-mas", LORA_CONTROL):
                if row.kind == "method" and row.method in ("single-agent", ref_method):
                    continue  # the references themselves: their comparisons appear from the other side
                candidates = (
                    lora_control_rows(rows, row)
                    if ref_method == LORA_CONTROL
                    else reference_rows(rows, row, ref_method)
                )
                references = _same_budget_first(candidates, task, result.budget)
                compared_adapters: set[str] = set()
                for ref in references:
                    ref_result = ref.entries.get(task, (None, None))[1]
                    if ref_result is None or ref_result.samples is None:
                        continue
                    if ref_method == LORA_CONTROL and _control_adapter(ref) in compared_adapters:
                        continue  # this control's best-matching settings are compared already
                    joined = result.samples.merge(ref_result.samples, on=["doc_id", "doc_hash"], suffixes=("", "_ref"))
                    if joined.empty:
                        log.warn(ref.entries[task][0].path, f"task {task}: no document shared with {row.short_label()}")
                        continue
                    cmp = paired_compare(joined[metric].to_numpy(), joined[f"{metric}_ref"].to_numpy())
                    versus = ref.short_label() + _budget_note(result, ref_result)
                    if ref_result.budget != result.budget:  # only when no reference ran the task at our budget
                        log.warn(row.run.path, f"task {task}: compared with {ref.short_label()} at another budget")
                    records.append(
                        {
                            **row.labels(),
                            "task": task,
                            "versus": versus,
                            "vs_method": ref_method,
                            "shared docs": cmp.n,
                            "ours": _pct(cmp.mean_a),
                            "reference": _pct(cmp.mean_b),
                            "difference (pp)": f"{100 * cmp.difference:+.1f}",
                            "95% CI (pp)": f"[{100 * cmp.ci_low:+.1f}, {100 * cmp.ci_high:+.1f}]",
                            "p-value": f"{cmp.p_value:.3g}",
                            "test": cmp.test,
                            "discordant (ours only / ref only)": NA
                            if cmp.a_only is None
                            else f"{cmp.a_only} / {cmp.b_only}",
                        }
                    )
                    if ref_method != LORA_CONTROL:
                        break  # the best-matching reference only
                    compared_adapters.add(_control_adapter(ref))  # and each LoRA control's best-matching row
    return pd.DataFrame(
        records,
        columns=[
            *ROW_COLUMNS,
            "task",
            "versus",
            "vs_method",
            "shared docs",
            "ours",
            "reference",
            "difference (pp)",
            "95% CI (pp)",
            "p-value",
            "test",
            "discordant (ours only / ref only)",
        ],
    )


# ------------------------------------------------------------------------------------------------ paper numbers


def _paper_value(rec: pd.Series, percent: bool = True) -> str:
    value = f"{rec['value']:.1f}" if percent else f"{rec['value']:,.0f}"
    return ("≈" if rec["approximate"] else "") + value


def paper_tables(
    rows: list[Row], cost: pd.DataFrame, baselines: pd.DataFrame, shown_elsewhere: set[int] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(ours beside the paper for matching method/backbone/topology/task, paper numbers we did not match); baseline
    rows in `shown_elsewhere` (the other-backbone table's) are left out of the second."""
    used: set[int] = set(shown_elsewhere or ())
    records = []
    for row_id, row in enumerate(rows):
        if row.kind != "method":
            continue
        for task, (run, result) in sorted(row.entries.items(), key=lambda kv: task_sort_key(kv[0])):
            metric = result.headline
            matches = matching_baselines(
                baselines,
                method=row.method,
                backbone=row.backbone,
                topology=row.topology or None,
                task=task,
                metric=metric,
            )
            head = result.metrics[metric]
            used.update(matches.index)
            if row.method == "single-agent":  # one number printed in several tables: show it once
                matches = matches.drop_duplicates(subset=["value", "source"]).assign(topology="any (single agent)")
            for _, rec in matches.iterrows():
                records.append(
                    {
                        **row.labels(),
                        "task": task,
                        "metric": metric,
                        "ours": format_score(head.value, head.stderr, result.n, _limited(run, result)),
                        "paper": _paper_value(rec),
                        "paper topology": rec["topology"],
                        "paper table": f"{rec['source']}, {rec['table']}",
                        "note": rec["note"],
                    }
                )
            sidecar_cost = cost[(cost["row"] == row_id) & (cost["task"] == task)] if not cost.empty else cost
            if sidecar_cost.empty:
                continue
            tokens = matching_baselines(
                baselines,
                method=row.method,
                backbone=row.backbone,
                topology=row.topology or None,
                task=task,
                metric="generated_tokens_per_problem",
            )
            for idx, rec in tokens.iterrows():
                used.add(idx)
                records.append(
                    {
                        **row.labels(),
                        "task": task,
                        "metric": "generated tokens / problem",
                        "ours": f"{sidecar_cost.iloc[0]['generated_tokens']:,.0f}",
                        "paper": _paper_value(rec, percent=False),
                        "paper topology": rec["topology"],
                        "paper table": f"{rec['source']}, {rec['table']}",
                        "note": rec["note"],
                    }
                )
    side = pd.DataFrame(
        records, columns=[*ROW_COLUMNS, "task", "metric", "ours", "paper", "paper topology", "paper table", "note"]
    )
    rest = baselines.drop(index=list(used)) if not baselines.empty else baselines
    if rest.empty:
        return side, pd.DataFrame()
    rest = rest.assign(
        shown=[_paper_value(r, percent=r["metric"] != "generated_tokens_per_problem") for _, r in rest.iterrows()],
        order=rest["task"].map(task_sort_key),
    ).sort_values("order", kind="stable")
    only = rest.pivot_table(
        index=["table", "metric", "backbone", "topology", "method"],
        columns="task",
        values="shown",
        aggfunc=lambda s: " / ".join(s),
        sort=False,
    ).fillna(NA)
    only = only[[t for t in sorted(only.columns, key=task_sort_key)]].reset_index()
    only.columns.name = None
    return side, only


def paper_other_backbones(rows: list[Row], baselines: pd.DataFrame) -> tuple[pd.DataFrame, set[int]]:
    """The papers' numbers for the same method, task and metric as each of our method rows, on backbones other than
    ours: context for a reader (how far our small backbone is from the published ones), not a comparison. Returns
    the table and the baseline rows it shows."""
    records, shown = [], set()
    for row in rows:
        if row.kind != "method" or baselines.empty:
            continue
        for task, (run, result) in sorted(row.entries.items(), key=lambda kv: task_sort_key(kv[0])):
            metric = result.headline
            others = baselines[
                (baselines["method"] == row.method)
                & (baselines["task"] == task)
                & (baselines["metric"] == metric)
                & (baselines["backbone"] != UNSPECIFIED)
                & (baselines["backbone"].map(normalize_backbone) != normalize_backbone(row.backbone))
            ]
            shown.update(others.index)
            if row.method == "single-agent":  # one number printed in several tables: show it once
                others = others.drop_duplicates(subset=["backbone", "value", "source"]).assign(
                    topology="any (single agent)"
                )
            head = result.metrics[metric]
            for _, rec in others.iterrows():
                records.append(
                    {
                        **row.labels(),
                        "task": task,
                        "metric": metric,
                        "ours": format_score(head.value, head.stderr, result.n, _limited(run, result)),
                        "paper backbone (other)": rec["backbone"],
                        "paper": _paper_value(rec),
                        "paper topology": rec["topology"],
                        "paper table": f"{rec['source']}, {rec['table']}",
                    }
                )
    columns = [*ROW_COLUMNS, "task", "metric", "ours", "paper backbone (other)", "paper", "paper topology"]
    return pd.DataFrame(records, columns=[*columns, "paper table"]), shown
