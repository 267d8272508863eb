"""Results without one machine's paths: rewrite absolute paths in result files so a reader elsewhere can rerun them.

lm-eval and our backends record paths as they were on the machine that ran (task YAMLs, data files, side-cars,
adapters, warnings in logs). Before results are kept, every absolute path is rewritten:
- below the results file's own output directory: relative to the results file's directory (the report resolves
  side-cars from there); scripts (`command.sh`), which run from the repo root, get the next rule instead;
- below the working tree (`root`, the repo): relative to it; a `runs/` directory (the repo's ignored run outputs) on
  another machine's layout becomes `runs/...` too;
- below the benchmark data directory: `$DIFFMAS_DATA_DIR/...`;
- below a Python environment's `site-packages`: `<site-packages>/...`;
- below the home directory: `~/...`.
Anything else absolute is reported, so a test (`tests/test_portable_results.py`) can refuse it.
A piece that `diffmas-eval reproduce` is running (its directory holds a `.running` marker naming a live process) is
left alone: its evaluation still writes its log through the open file that a rewrite would replace (the rest of the
log would go to a deleted file); `reproduce` rewrites the piece itself when it ends.

    python -m diffmas_eval.portable results/            # rewrite in place (atomically), print what changed
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

# An absolute POSIX path inside text: a slash after a delimiter, then at least two path components. A slash right
# after a shell expansion (`$(pwd)/runs/x`, `${ROOT}/runs/x`) continues a relative path, not an absolute one, and
# one after a `+` is chemistry or arithmetic in a benchmark's text (`Na+/K+/2Cl-`).
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~$<>)}+-])(/(?:[\w.+@-]+/)+[\w.+@-]*)")
# Embedded data (images in the HTML report) is not text with paths: it is left alone and not scanned.
EMBEDDED_DATA = re.compile(r"(base64,[A-Za-z0-9+/=]+)")
RUNNING = ".running"
TEXT_SUFFIXES = (".json", ".jsonl", ".md", ".txt", ".yaml", ".yml", ".csv", ".tex", ".html", ".log", ".sh", ".py")


def _relative(path: str, base: Path) -> str | None:
    try:
        return os.path.relpath(path, base) if Path(path).is_relative_to(base) else None
    except ValueError:
        return None


def portable(text: str, *, file: Path, root: Path, data_dir: Path | None) -> str:
    """`text` with every absolute path rewritten by the rules of the module docstring (`file` is where the text
    lives; paths below its output directory become relative to its directory)."""
    output_dir = file.parent.parent.resolve()
    home = Path.home().resolve()

    def rewrite(match: re.Match) -> str:
        path = match.group(1)
        if data_dir is not None and (rel := _relative(path, data_dir)) is not None:
            return "$DIFFMAS_DATA_DIR" + ("" if rel == "." else "/" + rel)
        if "/site-packages/" in path:
            return "<site-packages>/" + path.split("/site-packages/", 1)[1]
        if file.suffix != ".sh" and _relative(path, output_dir) is not None:
            return os.path.relpath(path, file.parent.resolve())
        if (rel := _relative(path, root)) is not None:
            return rel
        if "/runs/" in path:
            return "runs/" + path.split("/runs/", 1)[1]
        if (rel := _relative(path, home)) is not None:
            return "~/" + rel
        return path

    parts = EMBEDDED_DATA.split(text)  # odd indices: embedded data
    return "".join(part if i % 2 else ABSOLUTE_PATH.sub(rewrite, part) for i, part in enumerate(parts))


def absolute_paths(text: str) -> list[str]:
    """The absolute paths left in `text` (embedded data excluded)."""
    parts = EMBEDDED_DATA.split(text)  # odd indices: embedded data
    return [path for i, part in enumerate(parts) if not i % 2 for path in ABSOLUTE_PATH.findall(part)]


def running_marker(directory: Path) -> Path:
    """The file `diffmas-eval reproduce` keeps in a piece's directory while it evaluates it (the process id)."""
    return directory / RUNNING


def running(file: Path) -> bool:
    """Whether `file` lies in a piece being evaluated now: a `.running` marker in its directory or the one above it
    (samples sit one level below the piece) names a live process. A marker left by a killed run counts for nothing."""
    for directory in (file.parent, file.parent.parent):
        marker = running_marker(directory)
        try:
            os.kill(int(marker.read_text(encoding="utf-8").strip()), 0)
        except (OSError, ValueError):  # no marker, an unreadable one, or its process is gone
            continue
        return True
    return False


def make_portable(paths: list[Path], *, root: Path, data_dir: Path | None) -> list[Path]:
    """Rewrite every text file below `paths` in place (each atomically), except in pieces being evaluated now;
    returns the files that changed."""
    changed = []
    files = [p for path in paths for p in ([path] if path.is_file() else sorted(path.rglob("*")))]
    for file in files:
        if not file.is_file() or file.suffix not in TEXT_SUFFIXES or running(file):
            continue
        with file.open(encoding="utf-8", newline="") as handle:  # newline="": carriage returns stay as they are
            text = handle.read()
        new = portable(text, file=file.resolve(), root=root.resolve(), data_dir=data_dir)
        if new != text:
            replace_text(file, new)
            changed.append(file)
    return changed


def replace_text(file: Path, text: str) -> None:
    """Rewrite `file` with `text` atomically (a temporary file renamed over it), keeping its mode and line endings."""
    tmp = file.with_name(f".{file.name}.rewrite-tmp")
    with tmp.open("w", encoding="utf-8", newline="") as handle:  # newline="": carriage returns stay as they are
        handle.write(text)
    tmp.chmod(file.stat().st_mode)  # an executable script stays executable
    tmp.replace(file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffmas_eval.portable", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="result files or directories to rewrite in place")
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="the working tree (default: .)")
    args = parser.parse_args(argv)
    from diffmas_eval.paths import DATA_DIR_ENV

    data = os.environ.get(DATA_DIR_ENV)
    data_dir = Path(data).resolve() if data else (args.root.resolve().parent / "shared" / "data")
    for file in make_portable(args.paths, root=args.root, data_dir=data_dir):
        print(file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
