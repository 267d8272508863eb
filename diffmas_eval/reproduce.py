"""`diffmas-eval reproduce CONFIG`: a set of (method x task) evaluations, resumable piece by piece, then the report.

A config (YAML) names a backbone, defaults, runs (method + model args) and tasks (optionally a `limit` per task, or
`{limit: N, gen_kwargs: {...}}`: a task's own decoding, e.g. a larger final-agent budget where answers run long):

    name: smollm2-cpu
    backbone: smollm2-135m-instruct
    defaults: {model_args: {dtype: bfloat16}, batch_size: 8, gen_kwargs: {max_gen_toks: 256}}
    runs:
      - {name: single-agent, model: single-agent}
      - {name: latent-mas-m10, model: latent-mas, model_args: {latent_steps: 10}}
      - {name: realign, model: latent-mas, model_args: {realign: true}, tasks: [mas_gsm8k]}   # some tasks only
    tasks: {mas_gsm8k: {limit: 40, gen_kwargs: {max_gen_toks: 512}}, mas_arc_easy_mc: 200}

A piece's decoding is the defaults', then its task's, then its run's (a run's sampling settings apply to every task).
A run (or a task entry) with `part_size: N` is evaluated in parts of N documents per task
(`OUT/<run>/<task>/docs-<first>-<end>/`, lm-eval's `--samples`), for rows too slow to finish a whole task in one
sitting: each part is a piece, committed as it finishes, and the report joins a cell's parts
(`reporting.load.join_parts`). A run's part size overrides its task's; parts need the task's limit.

Each (run, task) is one piece with its own output directory `OUT/<run>/<task>/`, evaluated by the `diffmas-eval` CLI in
a subprocess (the exact command is written to `command.sh` there). A piece with a results file for the same limit, made
with the same trained artefacts' weights, is skipped; an interrupted piece resumes from its side-car (`sidecar.jsonl`),
so finished documents are never redone.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from diffmas_eval.artifacts import weights_fingerprint
from diffmas_eval.registry import model_names
from diffmas_eval.settings import BUDGET_KEYS, parsed_args

_CODE_TASKS = {"mas_humaneval_plus", "mas_mbpp_plus", "mas_code"}
_RUN_KEYS = {"name", "model", "model_args", "gen_kwargs", "batch_size", "note", "tasks", "part_size"}
# Model args naming a trained artefact directory (DiffMAS / Interlat adapter, NeuroMAS adapters, C2C fuser).
ARTEFACT_ARGS = ("adapter", "adapters", "fuser")
_TOP_KEYS = {"name", "backbone", "defaults", "runs", "tasks", "notes", "source", "hyperparameters", "paper", "slim"}
_TASK_KEYS = {"limit", "gen_kwargs", "part_size"}


@dataclass
class Piece:
    """One (run, task) evaluation, or one part of it (documents `part[0]` to `part[1] - 1`)."""

    run: str
    task: str
    model: str
    model_args: dict[str, Any]
    gen_kwargs: dict[str, Any]
    batch_size: int
    limit: int | None
    directory: Path
    extra: list[str] = field(default_factory=list)
    slim: bool = False  # drop benchmark text from the finished piece's samples and side-car (`diffmas_eval.slim`)
    part: tuple[int, int] | None = None
    covered: int = 0  # a part's task: its first documents, evaluated whole before the task had a part size

    @property
    def documents(self) -> int | None:
        """How many documents this piece evaluates (None: the whole task, size unknown here)."""
        return self.part[1] - self.part[0] if self.part else self.limit

    @property
    def logs_samples(self) -> bool:
        """GPQA's authors ask that its questions never appear in plain text: no samples files for it."""
        return "gpqa" not in self.task

    def describe(self) -> str:
        return f"docs {self.part[0]}-{self.part[1] - 1}" if self.part else f"limit {self.limit}"

    def command(self) -> list[str]:
        args = {**self.model_args, "sidecar": str(self.directory / "sidecar.jsonl")}
        if self.part:  # lm-eval numbers the selected documents from 0: the side-car records their index in the task
            args["doc_offset"] = self.part[0]
        command = [
            "diffmas-eval",
            "--model",
            self.model,
            "--model_args",
            ",".join(f"{k}={v}" for k, v in args.items()),
            "--tasks",
            self.task,
            "--batch_size",
            str(self.batch_size),
            "--output_path",
            str(self.directory),
        ]
        if self.gen_kwargs:
            command += ["--gen_kwargs", ",".join(f"{k}={v}" for k, v in self.gen_kwargs.items())]
        if self.part:
            command += ["--samples", json.dumps({self.task: list(range(*self.part))}, separators=(",", ":"))]
        elif self.limit is not None:
            command += ["--limit", str(self.limit)]
        if self.logs_samples:
            command.append("--log_samples")
        if self.task in _CODE_TASKS:
            command.append("--confirm_run_unsafe_code")
        return command + self.extra

    def _results_configs(self) -> list[tuple[Path, dict[str, Any]]]:
        found = []
        for path in sorted(glob.glob(str(self.directory / "**" / "results_*.json"), recursive=True)):
            try:
                found.append((Path(path), json.loads(Path(path).read_text())["config"]))
            except (OSError, ValueError, KeyError):
                continue
        return found

    def evaluated_whole(self) -> int:
        """How many of the task's first documents its directory holds results for, evaluated whole (a `--limit`
        outside any part's directory) with this piece's settings and budget, and with the trained artefacts now at
        the run's paths where they exist: the largest such limit, 0 without any."""
        artefacts = self.artefact_fingerprints_here()
        return max(
            (
                int(config["limit"])
                for path, config in self._whole_results()
                if config.get("limit") and artefacts_match(config, artefacts) and not self._differences(config)
            ),
            default=0,
        )

    def _whole_results(self) -> list[tuple[Path, dict[str, Any]]]:
        """Results in this piece's directory, outside any part's directory (`docs-*`)."""
        return [
            (path, config)
            for path, config in self._results_configs()
            if not path.relative_to(self.directory).parts[0].startswith("docs-")
        ]

    def finished(self) -> bool:
        """True when a results file for this piece, at this limit, exists, made with the trained artefacts (adapter,
        fuser) now at the run's paths: results of an artefact since retrained there do not count (`artefacts_match`).
        A part's directory holds only that part's documents (`--samples`, no limit)."""
        limit = float(self.limit) if self.limit is not None and not self.part else None
        artefacts = self.artefact_fingerprints()
        results = self._results_configs() if self.part else self._whole_results()  # a task's parts are not its whole
        return any(config.get("limit") == limit and artefacts_match(config, artefacts) for _, config in results)

    def _differences(self, config: dict[str, Any]) -> list[str]:
        """This piece's settings against a results file's `config` (see `conflict`): what differs, as text."""
        ours = {"model": self.model, **parsed_args(",".join(f"{k}={v}" for k, v in self.model_args.items()))}
        our_gen = parsed_args(",".join(f"{k}={v}" for k, v in self.gen_kwargs.items()))
        theirs = {"model": config.get("model"), **parsed_args(config.get("model_args"))}
        differ = _differences(theirs, ours, skip=(*ARTEFACT_ARGS, "sidecar", "doc_offset"))
        return differ + [f"gen_kwargs {d}" for d in _differences(parsed_args(config.get("gen_kwargs")), our_gen)]

    def artefact_fingerprints_here(self) -> dict[str, str]:
        """`artefact_fingerprints()` when every trained artefact is at its path, else {} (any results match)."""
        present = all(Path(self.model_args[arg]).is_dir() for arg in ARTEFACT_ARGS if self.model_args.get(arg))
        return self.artefact_fingerprints() if present else {}

    def artefact_fingerprints(self) -> dict[str, str]:
        """`<arg>_fingerprint` (as results record it) of each trained artefact this piece loads, from its weights."""
        return {
            f"{arg}_fingerprint": weights_fingerprint(self.model_args[arg])
            for arg in ARTEFACT_ARGS
            if self.model_args.get(arg)
        }

    def conflict(self) -> str | None:
        """What differs between this piece's settings and a results file already in its directory (a config edited
        after the piece ran: another dtype, seed, model arg or decoding, or one added or removed), or None.

        Both sides are compared as lm-eval parses them from the command line (`realign=1` and `True` agree, as do
        `1e-3` and `0.001`); artefact and side-car paths are not compared, and other paths only by their last
        component (results record them rewritten by `diffmas_eval.portable`)."""
        for path, config in self._results_configs():
            if differ := self._differences(config):
                hint = ""
                if all(d.startswith(tuple(f"gen_kwargs {k}=" for k in BUDGET_KEYS)) for d in differ):
                    hint = (
                        ". Only the final-agent budget differs: move that results file and its samples away and keep "
                        "sidecar.jsonl; under greedy decoding and batch-invariant kernels, the generations that ended "
                        "before the old budget are reused where their text is (the machine that ran them)"
                    )
                return f"{path} was made with other settings ({'; '.join(differ)}){hint}"
        return None


def artefacts_match(config: dict[str, Any], fingerprints: dict[str, str]) -> bool:
    """Whether a results file's `config` was made with artefacts of these fingerprints. A results file that records
    none (written before results recorded them) cannot be told apart and counts as a match."""
    recorded = config.get("diffmas") or {}
    return all(recorded.get(key) in (None, value) for key, value in fingerprints.items())


def _differences(theirs: dict[str, Any], ours: dict[str, Any], skip: tuple[str, ...] = ()) -> list[str]:
    """`key=theirs there, ours here` for every key either side sets differently (a path by its last component)."""

    def comparable(value: Any) -> Any:
        return Path(value).name if isinstance(value, str) and "/" in value else value

    return [
        f"{key}={theirs.get(key)!r} there, {ours.get(key)!r} here"
        for key in sorted(set(theirs) | set(ours), key=str)
        if key not in skip and comparable(theirs.get(key)) != comparable(ours.get(key))
    ]


def load_config(path: str | Path) -> dict[str, Any]:
    """Read and validate a reproduction config; one clear error for anything malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reproduction config {path} does not exist")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(config, dict):
        raise ValueError(
            f"{path}: a reproduction config is a mapping (name, runs, tasks, ...), not {type(config).__name__}"
        )
    unknown = set(config) - _TOP_KEYS - {"_dir"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    if not config.get("runs") or not config.get("tasks"):
        raise ValueError(f"{path}: needs non-empty `runs` and `tasks`")
    if not isinstance(config.get("slim", False), bool):
        raise ValueError(f"{path}: `slim` must be true or false, not {config['slim']!r}")
    names = set()
    for run in config["runs"]:
        if set(run) - _RUN_KEYS or "name" not in run or "model" not in run:
            raise ValueError(f"{path}: each run needs `name` and `model` (allowed keys {sorted(_RUN_KEYS)}): {run}")
        if run["model"] not in model_names():
            raise ValueError(f"{path}: run {run['name']!r} has unknown model {run['model']!r}")
        if run["name"] in names:
            raise ValueError(f"{path}: run name {run['name']!r} is used twice")
        _check_part_size(run.get("part_size"), f"{path}: run {run['name']!r}")
        stray = set(run.get("tasks") or []) - set(config["tasks"])
        if stray:  # a run's `tasks` restricts it to some of the config's tasks
            raise ValueError(f"{path}: run {run['name']!r} names tasks the config does not list: {sorted(stray)}")
        names.add(run["name"])
    if isinstance(config["tasks"], dict):
        for task, entry in config["tasks"].items():
            task_gen = (entry.get("gen_kwargs") or {}) if isinstance(entry, dict) else {}
            if isinstance(entry, dict) and (
                set(entry) - _TASK_KEYS
                or not isinstance(task_gen, dict)
                or not all(isinstance(v, (str, int, float, bool)) for v in task_gen.values())
            ):
                raise ValueError(
                    f"{path}: task {task!r}: give a limit, or a mapping with {sorted(_TASK_KEYS)} "
                    f"(gen_kwargs a mapping of single values, as `--gen_kwargs k=v,...` takes them), not {entry!r}"
                )
            limit = entry.get("limit") if isinstance(entry, dict) else entry
            _check_part_size(entry.get("part_size") if isinstance(entry, dict) else None, f"{path}: task {task!r}")
            if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
                raise ValueError(f"{path}: task {task!r}: the limit must be a positive whole number, not {limit!r}")
    config["_dir"] = str(path.resolve().parent)
    return config


def _check_part_size(part_size: Any, where: str) -> None:
    if part_size is not None and (isinstance(part_size, bool) or not isinstance(part_size, int) or part_size < 1):
        raise ValueError(f"{where}: part_size must be a positive whole number, not {part_size!r}")


def plan(
    config: dict[str, Any],
    out: Path,
    *,
    limit: int | None = None,
    backbone: str | None = None,
    only: list[str] | None = None,
    tasks: list[str] | None = None,
    check_artefacts: bool = True,
) -> list[Piece]:
    """Expand a config into pieces (run x task), applying the command-line overrides. A run whose trained artefact
    does not exist is an error, unless `check_artefacts` is off (for reading progress, not for running)."""
    defaults = config.get("defaults") or {}
    task_entries = config["tasks"] if isinstance(config["tasks"], dict) else dict.fromkeys(config["tasks"])
    chosen_backbone = backbone or config.get("backbone")
    runs = []
    for run in config["runs"]:
        if only and run["name"] not in only:
            continue
        model_args = {**(defaults.get("model_args") or {}), **(run.get("model_args") or {})}
        if chosen_backbone:
            model_args["pretrained"] = chosen_backbone
        for arg in ARTEFACT_ARGS:
            artefact = model_args.get(arg)
            if artefact and not Path(artefact).is_absolute():  # relative to the config file, never to the cwd
                artefact = model_args[arg] = str((Path(config.get("_dir", ".")) / artefact).resolve())
            if artefact and check_artefacts and not Path(artefact).is_dir():
                raise FileNotFoundError(
                    f"run {run['name']!r}: {arg} {artefact} does not exist; train it first "
                    "(see the config's comments) or leave the run out with --only"
                )
        batch_size = int(run.get("batch_size", defaults.get("batch_size", 1)))
        runs.append((run, model_args, batch_size))
    pieces = []
    # Task-major order: each task's row of the leaderboard completes across methods before the next task starts.
    for task, entry in task_entries.items():
        if tasks and task not in tasks:
            continue
        task_limit, task_gen, task_part_size = (
            (entry.get("limit"), entry.get("gen_kwargs") or {}, entry.get("part_size"))
            if isinstance(entry, dict)
            else (entry, {}, None)
        )
        piece_limit = limit if limit is not None else (task_limit if task_limit is not None else defaults.get("limit"))
        for run, model_args, batch_size in runs:
            gen_kwargs = {**(defaults.get("gen_kwargs") or {}), **task_gen, **(run.get("gen_kwargs") or {})}
            if run.get("tasks") and task not in run["tasks"]:
                continue
            piece = Piece(
                run=run["name"],
                task=task,
                model=run["model"],
                model_args=model_args,
                gen_kwargs=gen_kwargs,
                batch_size=batch_size,
                limit=piece_limit,
                directory=out / run["name"] / task,
                slim=config.get("slim", False),
            )
            pieces.extend(_parts(piece, run.get("part_size", task_part_size)))
    return pieces


def _parts(piece: Piece, size: int | None) -> list[Piece]:
    """The piece itself, or its parts of `size` documents each (the last may be shorter). Documents the task's piece
    evaluated whole before it had a part size (its first N, with the run's settings: `evaluated_whole`) are not
    parted again: the parts start after them (the report joins the two), and a piece evaluated whole to its limit
    stays whole."""
    if size is None:
        return [piece]
    if piece.limit is None:
        raise ValueError(
            f"run {piece.run!r}, task {piece.task!r}: part_size {size} but no limit: give the task's size as its limit "
            "in the config (or --limit), so the parts can be planned"
        )
    if not piece.logs_samples:  # parts join by their samples
        raise ValueError(f"run {piece.run!r}, task {piece.task!r}: GPQA pieces keep no samples and cannot be parted")
    covered = piece.evaluated_whole()
    if covered >= piece.limit:
        return [piece]
    if piece.model_args.get("communication") == "other_doc" and (piece.limit - covered) % size == 1:
        raise ValueError(
            f"run {piece.run!r}, task {piece.task!r}: the last part would hold one document, and the other_doc "
            f"control pairs documents within a part: choose another part_size than {size}"
        )
    return [
        replace(piece, part=(first, end), directory=piece.directory / f"docs-{first}-{end}", covered=covered)
        for first in range(covered, piece.limit, size)
        for end in [min(first + size, piece.limit)]
    ]


@contextlib.contextmanager
def child_stops_with_this_process() -> Iterator[None]:
    """While a piece's evaluation runs: SIGTERM and SIGHUP stop it along with this process.

    By default they end Python at once and leave the `diffmas-eval` child running, still appending to the piece's
    side-car, so a rerun of the piece races it on the same files. Raised as an exception instead, they unwind through
    `subprocess.run`, which kills and reaps its child before re-raising. The previous handlers come back afterwards.
    """

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_piece(piece: Piece) -> int:
    """Evaluate one piece in a subprocess; returns its exit code."""
    piece.directory.mkdir(parents=True, exist_ok=True)
    from diffmas_eval.portable import replace_text
    from diffmas_eval.slim import with_full_text

    for sidecar in piece.directory.glob("sidecar*.jsonl"):  # a slimmed piece extended: its generations' text back
        if (full := with_full_text(sidecar)) is not None and full != sidecar.read_text(encoding="utf-8"):
            replace_text(sidecar, full)
    command = piece.command()
    (piece.directory / "command.sh").write_text(shlex.join(command) + "\n")
    executable = Path(sys.executable).parent / "diffmas-eval"
    argv = [str(executable) if executable.exists() else command[0], *command[1:]]
    from diffmas_eval.portable import running_marker

    marker = running_marker(piece.directory)  # `portable` and `slim` leave the piece alone while it runs
    marker.write_text(f"{os.getpid()}\n")
    try:
        with (piece.directory / "log.txt").open("a") as log, child_stops_with_this_process():
            code = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy()).returncode
    finally:  # stopped or failed too: no text is left in the files a commit takes
        from diffmas_eval.paths import data_dir
        from diffmas_eval.portable import make_portable

        marker.unlink(missing_ok=True)
        make_portable([piece.directory], root=Path.cwd(), data_dir=data_dir())  # command.sh and log.txt too
        if piece.slim:  # finished or not: the text it drops stays in the local full copy, the resume cache
            from diffmas_eval.slim import slim_results

            slim_results([piece.directory])
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffmas-eval reproduce", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="reproduction config (YAML)")
    parser.add_argument("--out", help="output directory (default: results/<config name>)")
    parser.add_argument("--limit", type=int, help="documents per task, overriding the config (small machines)")
    parser.add_argument("--backbone", help="pretrained model for every run, overriding the config")
    parser.add_argument("--only", help="comma-separated run names to evaluate")
    parser.add_argument("--tasks", help="comma-separated task names to evaluate")
    parser.add_argument(
        "--max-pieces", type=int, help="evaluate at most this many unfinished pieces, then stop (one sitting's work)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the commands, run nothing")
    parser.add_argument("--no-report", action="store_true", help="skip the report at the end")
    args = parser.parse_args(argv)
    try:  # a bad config or a missing artefact: one line, before anything runs
        config = load_config(args.config)
        out = Path(args.out or Path("results") / (config.get("name") or Path(args.config).stem)).resolve()
        pieces = plan(
            config,
            out,
            limit=args.limit,
            backbone=args.backbone,
            only=args.only.split(",") if args.only else None,
            tasks=args.tasks.split(",") if args.tasks else None,
        )
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # Before anything runs: a piece directory holds one configuration's results, never two mixed.
    conflicts = [c for c in (piece.conflict() for piece in pieces) if c]
    if conflicts:
        print("error: " + "\n       ".join(conflicts), file=sys.stderr)
        print("Give these runs their own --out (or move the old pieces away), then rerun.", file=sys.stderr)
        if not args.dry_run:
            return 2
    if args.max_pieces is not None and args.max_pieces < 1:
        print(f"error: --max-pieces must be at least 1, not {args.max_pieces}", file=sys.stderr)
        return 2
    failed, started = [], 0
    for number, piece in enumerate(pieces, 1):
        status = "done" if piece.finished() else "todo"
        print(f"[{number}/{len(pieces)}] {piece.run} / {piece.task} ({piece.describe()}): {status}", flush=True)
        if args.dry_run:
            print("   ", shlex.join(piece.command()))
            continue
        if status == "done":
            continue
        if args.max_pieces is not None and started == args.max_pieces:
            print(f"    --max-pieces {args.max_pieces} evaluated; stopping here", flush=True)
            break
        started += 1
        code = run_piece(piece)
        if code != 0 or not piece.finished():
            failed.append(piece)
            print(f"    failed (exit {code}); see {piece.directory / 'log.txt'}", flush=True)
    if not args.dry_run and not args.no_report:
        from diffmas_eval.reporting.cli import main as report

        report([str(out), "--out", str(out / "report")])
    if failed:
        print(f"{len(failed)} piece(s) failed: " + ", ".join(f"{p.run}/{p.task}" for p in failed))
        return 1
    return 0
