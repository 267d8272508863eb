"""Committed results carry no machine's absolute paths, and the rewrite that removes them keeps results usable."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from diffmas_eval.portable import absolute_paths, make_portable, portable

REPO = Path(__file__).resolve().parents[1]
DATA_SUFFIXES = (".json", ".jsonl", ".md", ".txt", ".csv", ".tex", ".html", ".yaml", ".yml")


def _committed_result_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "results"], cwd=REPO, capture_output=True, text=True, check=False
    ).stdout.split()
    files = [REPO / name for name in listed] or [p for p in (REPO / "results").rglob("*") if p.is_file()]
    return [p for p in files if p.suffix in DATA_SUFFIXES and p.is_file()]


def test_no_committed_result_file_holds_an_absolute_path():
    offenders = {}
    for file in _committed_result_files():
        found = absolute_paths(file.read_text(encoding="utf-8", errors="replace"))
        if found:
            offenders[str(file.relative_to(REPO))] = found[:3]
    assert not offenders, f"absolute paths in results (run `python -m diffmas_eval.portable results`): {offenders}"


def test_the_rewrite_rules(tmp_path):
    root, data = tmp_path / "repo", tmp_path / "shared" / "data"
    results = root / "results" / "run" / "task" / "results.json"
    text = json.dumps(
        {
            "sidecar": str(results.parent / "sidecar.jsonl"),
            "task": str(root / "tasks" / "mas_gsm8k.yaml"),
            "data": str(data / "gsm8k" / "test.jsonl"),
            "warning": "/opt/venv/lib/python3.11/site-packages/transformers/x.py:1: FutureWarning",
            "url": "https://github.com/org/repo/blob/main/file.py",
        }
    )
    got = json.loads(portable(text, file=results, root=root, data_dir=data))
    assert got == {
        "sidecar": "sidecar.jsonl",
        "task": "tasks/mas_gsm8k.yaml",
        "data": "$DIFFMAS_DATA_DIR/gsm8k/test.jsonl",
        "warning": "<site-packages>/transformers/x.py:1: FutureWarning",
        "url": "https://github.com/org/repo/blob/main/file.py",
    }
    assert absolute_paths("see /somewhere/else/file.txt") == ["/somewhere/else/file.txt"]
    assert absolute_paths("the Na+/K+/2Cl- cotransporter") == []  # benchmark text, not a path
    script = 'RUNS=${RUNS:-$(cd "$(dirname "$0")/../.." && pwd)/runs/training}\nOUT=${ROOT}/runs/x\n'
    assert portable(script, file=root / "results" / "run.sh", root=root, data_dir=data) == script  # expansions


def test_rewriting_keeps_a_scripts_mode(tmp_path):
    script = tmp_path / "out" / "run.sh"
    script.parent.mkdir(parents=True)
    script.write_text(f"python {tmp_path}/repo/x.py\n")
    script.chmod(0o755)
    assert make_portable([script], root=tmp_path / "repo", data_dir=None) == [script]
    assert script.read_text() == "python x.py\n" and script.stat().st_mode & 0o777 == 0o755


def test_rewriting_keeps_carriage_returns_and_is_idempotent(tmp_path):
    log = tmp_path / "out" / "task" / "log.txt"
    log.parent.mkdir(parents=True)
    log.write_bytes(f"Loading 50%\rLoading 100%\n{tmp_path}/out/task/sidecar.jsonl\n".encode())
    assert make_portable([tmp_path / "out"], root=tmp_path, data_dir=None) == [log]
    assert log.read_bytes() == b"Loading 50%\rLoading 100%\nsidecar.jsonl\n"
    assert make_portable([tmp_path / "out"], root=tmp_path, data_dir=None) == []


def test_a_piece_being_evaluated_is_left_alone_until_its_process_ends(tmp_path):
    """Rewriting a running piece's log would replace the file its evaluation still writes to (the rest of the log
    would go to a deleted file); a `.running` marker naming a live process keeps `portable` and `slim` off it, and
    one left by a process that has ended does not."""
    import sys

    from diffmas_eval.portable import running_marker
    from diffmas_eval.slim import slim_results

    piece = tmp_path / "out" / "run" / "task"
    (piece / "model").mkdir(parents=True)
    log, samples = piece / "log.txt", piece / "model" / "samples_task_2026.jsonl"
    log.write_text(f"{tmp_path}/out/run/task/sidecar.jsonl\n")
    samples.write_text(json.dumps({"doc_id": 0, "doc": {"question": "q"}, "acc": 1, "metrics": ["acc"]}) + "\n")
    before = {file: file.read_text() for file in (log, samples)}
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)

    running_marker(piece).write_text(f"{os.getpid()}\n")  # this test's process: alive
    assert make_portable([tmp_path / "out"], root=tmp_path, data_dir=None) == []
    assert slim_results([tmp_path / "out"]) == []
    assert {file: file.read_text() for file in before} == before

    running_marker(piece).write_text(ended.stdout)  # a process that has ended: the marker of a killed run
    assert make_portable([tmp_path / "out"], root=tmp_path, data_dir=None) == [log]
    assert slim_results([tmp_path / "out"]) == [samples] and "question" not in samples.read_text()
