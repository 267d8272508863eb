"""`diffmas-eval reproduce`: planning, validation, skipping finished pieces, and one real tiny run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from diffmas_eval.reproduce import Piece, load_config, plan

REPO = Path(__file__).resolve().parents[1]
FIXTURE_DATA = REPO / "tests" / "fixtures" / "data"


def _write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _reproduce(config: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """`diffmas-eval reproduce CONFIG --out OUT ...` in a subprocess, offline, on the fixture data."""
    env = {**os.environ, "DIFFMAS_DATA_DIR": str(FIXTURE_DATA), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [str(Path(sys.executable).parent / "diffmas-eval"), "reproduce", str(config), "--out", str(out), *extra]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def test_plan_expands_runs_and_tasks_with_overrides(tmp_path):
    config = {
        "name": "x",
        "backbone": "smollm2-135m-instruct",
        "defaults": {"model_args": {"dtype": "bfloat16"}, "batch_size": 4, "gen_kwargs": {"max_gen_toks": 64}},
        "runs": [
            {"name": "sa", "model": "single-agent"},
            {"name": "lm", "model": "latent-mas", "model_args": {"latent_steps": 3}, "batch_size": 2},
        ],
        "tasks": {"mas_gsm8k": 10, "mas_arc_easy_mc": None},
    }
    pieces = plan(load_config(_write(tmp_path, config)), tmp_path / "out")
    assert [(p.task, p.run) for p in pieces] == [
        ("mas_gsm8k", "sa"),
        ("mas_gsm8k", "lm"),
        ("mas_arc_easy_mc", "sa"),
        ("mas_arc_easy_mc", "lm"),
    ]
    assert pieces[1].model_args == {"dtype": "bfloat16", "latent_steps": 3, "pretrained": "smollm2-135m-instruct"}
    assert pieces[1].batch_size == 2 and pieces[0].limit == 10 and pieces[2].limit is None
    command = pieces[1].command()
    assert "--log_samples" in command and command[command.index("--limit") + 1] == "10"
    assert (
        f"sidecar={tmp_path / 'out' / 'lm' / 'mas_gsm8k' / 'sidecar.jsonl'}"
        in command[command.index("--model_args") + 1]
    )
    small = plan(load_config(_write(tmp_path, config)), tmp_path / "out", limit=2, backbone="other", only=["lm"])
    assert {p.limit for p in small} == {2} and {p.model_args["pretrained"] for p in small} == {"other"}
    assert {p.run for p in small} == {"lm"}
    config["runs"][1]["tasks"] = ["mas_arc_easy_mc"]  # a run restricted to some of the tasks
    assert [(p.task, p.run) for p in plan(load_config(_write(tmp_path, config)), tmp_path / "out")] == [
        ("mas_gsm8k", "sa"),
        ("mas_arc_easy_mc", "sa"),
        ("mas_arc_easy_mc", "lm"),
    ]


def test_gpqa_pieces_never_log_samples(tmp_path):
    config = {"runs": [{"name": "sa", "model": "single-agent"}], "tasks": ["mas_gpqa_diamond_mc"]}
    (piece,) = plan(load_config(_write(tmp_path, config)), tmp_path)
    assert "--log_samples" not in piece.command()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"runs": [], "tasks": ["t"]}, "non-empty"),
        ({"runs": [{"name": "a", "model": "nope"}], "tasks": ["t"]}, "unknown model"),
        ({"runs": [{"name": "a", "model": "diffmas"}, {"name": "a", "model": "diffmas"}], "tasks": ["t"]}, "twice"),
        ({"runs": [{"name": "a", "model": "diffmas", "colour": 1}], "tasks": ["t"]}, "allowed keys"),
        ({"runs": [{"name": "a", "model": "diffmas"}], "tasks": ["t"], "tsks": 1}, "unknown keys"),
        ({"runs": [{"name": "a", "model": "diffmas", "tasks": ["u"]}], "tasks": ["t"]}, "does not list"),
        ({"runs": [{"name": "a", "model": "text-mas", "part_size": 0}], "tasks": ["t"]}, "part_size must be"),
        ({"runs": [{"name": "a", "model": "text-mas", "part_size": "32"}], "tasks": ["t"]}, "part_size must be"),
    ],
)
def test_bad_configs_fail_with_one_clear_error(tmp_path, config, message):
    with pytest.raises(ValueError, match=message):
        load_config(_write(tmp_path, config))


def test_missing_adapter_is_reported_before_anything_runs(tmp_path):
    config = {
        "runs": [{"name": "d", "model": "diffmas", "model_args": {"adapter": str(tmp_path / "none")}}],
        "tasks": ["mas_gsm8k"],
    }
    with pytest.raises(FileNotFoundError, match="train it first"):
        plan(load_config(_write(tmp_path, config)), tmp_path)


def test_the_command_gives_a_bad_config_or_missing_adapter_as_one_line_and_exit_code_2(tmp_path, capsys):
    from diffmas_eval.reproduce import main

    missing = {
        "runs": [{"name": "d", "model": "diffmas", "model_args": {"adapter": str(tmp_path / "none")}}],
        "tasks": ["mas_gsm8k"],
    }
    bad = {"runs": [{"name": "d", "model": "no-such-method"}], "tasks": ["mas_gsm8k"]}
    for config, message in (
        (missing, "train it first"),
        (bad, "unknown model"),
        ("runs: [name: d", "not valid YAML"),
        ("- a list", "is a mapping"),
    ):
        if isinstance(config, str):
            path = tmp_path / "config.yaml"
            path.write_text(config)
        else:
            path = _write(tmp_path, config)
        assert main([str(path), "--out", str(tmp_path / "out"), "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_reproduce_runs_pieces_then_skips_them_and_reports(tiny_model_dir, tmp_path):
    config = {
        "name": "tiny",
        "backbone": str(tiny_model_dir),
        "defaults": {"model_args": {"dtype": "float32"}, "batch_size": 2},
        "runs": [
            {"name": "single-agent", "model": "single-agent"},
            {"name": "latent-mas", "model": "latent-mas", "model_args": {"latent_steps": 1}},
            {"name": "text-mas", "model": "text-mas", "model_args": {"max_new_tokens": 4}},
        ],
        "tasks": {"mas_arc_easy_mc": 2},
        "slim": True,
    }
    path = _write(tmp_path, config)
    first = _reproduce(path, tmp_path / "out")
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.count(": todo") == 3
    assert not list((tmp_path / "out").rglob(".running"))  # the marker that keeps `portable` off a running piece
    results = list((tmp_path / "out").glob("*/mas_arc_easy_mc/**/results_*.json"))
    assert len(results) == 3
    methods = {json.loads(r.read_text())["config"]["diffmas"]["method"] for r in results}
    assert methods == {"single-agent", "latent-mas", "text-mas"}
    assert (tmp_path / "out" / "report" / "report.md").is_file()
    # `slim: true`: each finished piece keeps scores and hashes, not the questions or the outputs
    samples = [json.loads(line) for r in results for s in r.parent.glob("samples_*.jsonl") for line in s.open()]
    assert len(samples) == 3 * 2 and all("doc" not in s and "resps" not in s and "acc" in s for s in samples)
    sidecars = [json.loads(line) for p in (tmp_path / "out").rglob("sidecar.jsonl") for line in p.open()]
    assert sidecars and all("result" in record for record in sidecars)  # the resume cache stays
    text_mas = [r for r in sidecars if r["method"] == "text-mas"]
    assert text_mas and all(a and "text" not in a for r in text_mas for a in r["agents"])  # TextMAS writes messages
    second = _reproduce(path, tmp_path / "out", "--no-report")
    assert second.returncode == 0 and second.stdout.count(": done") == 3
    # The config edited after its pieces ran (another dtype): one clear error before anything runs, nothing written.
    path.write_text(path.read_text().replace("float32", "bfloat16"))
    third = _reproduce(path, tmp_path / "out", "--no-report")
    assert third.returncode == 2 and "dtype='float32' there, 'bfloat16' here" in third.stderr, third.stderr
    assert sorted((tmp_path / "out").rglob("results_*.json")) == sorted(results)


def _piece_with_results(tmp_path: Path, recorded: dict, **run) -> Piece:
    """A planned piece whose directory holds a results file whose config is `recorded` (no model is run)."""
    config = {"runs": [{"name": "r", "model": "latent-mas", **run}], "tasks": {"mas_gsm8k": 4}}
    tmp_path.mkdir(parents=True, exist_ok=True)
    (piece,) = plan(load_config(_write(tmp_path, config)), tmp_path / "out")
    results = piece.directory / "model" / "results_x.json"
    results.parent.mkdir(parents=True)
    results.write_text(json.dumps({"config": {"model": "latent-mas", "limit": 4.0, **recorded}}))
    return piece


def test_a_piece_directory_with_results_of_other_settings_is_a_conflict(tmp_path):
    same = {"model_args": "latent_steps=10,realign=True,pretrained=/elsewhere/models/q,sidecar=s.jsonl"}
    piece = _piece_with_results(
        tmp_path,
        {**same, "gen_kwargs": {"temperature": 0.001}},
        model_args={"latent_steps": 10, "realign": True, "pretrained": "~/models/q"},
        gen_kwargs={"temperature": "1e-3"},
    )
    assert piece.finished() and piece.conflict() is None  # a string model_args, a moved path, 1e-3 == 0.001
    removed = _piece_with_results(tmp_path / "a", same, model_args={"realign": True, "pretrained": "q"})
    assert "latent_steps=10 there, None here" in removed.conflict()  # a key the config no longer sets
    typed = _piece_with_results(tmp_path / "b", same, model_args={"latent_steps": 10, "realign": 1, "pretrained": "q"})
    assert typed.conflict() is None  # `realign=1` means what the recorded `True` does
    other = _piece_with_results(tmp_path / "d", same, model_args={"latent_steps": 20, "realign": 1, "pretrained": "q"})
    assert "latent_steps=10 there, 20 here" in other.conflict()
    decoding = _piece_with_results(
        tmp_path / "c",
        {**same, "gen_kwargs": "do_sample=True,temperature=0.6"},
        model_args={"latent_steps": 10, "realign": True, "pretrained": "q"},
    )
    assert "gen_kwargs do_sample=True there, None here" in decoding.conflict()


def test_a_task_can_have_its_own_decoding_and_a_budget_change_says_what_to_keep(tmp_path):
    config = {
        "defaults": {"gen_kwargs": {"max_gen_toks": 512}},
        "runs": [
            {"name": "greedy", "model": "single-agent"},
            {"name": "sampled", "model": "single-agent", "gen_kwargs": {"do_sample": True, "max_gen_toks": 64}},
        ],
        "tasks": {"mas_medqa": {"limit": 30, "gen_kwargs": {"max_gen_toks": 1024}}, "mas_gsm8k": 20},
    }
    pieces = {(p.task, p.run): p for p in plan(load_config(_write(tmp_path, config)), tmp_path / "out")}
    assert pieces["mas_medqa", "greedy"].gen_kwargs == {"max_gen_toks": 1024}
    assert pieces["mas_medqa", "greedy"].limit == 30 and pieces["mas_gsm8k", "greedy"].limit == 20
    assert pieces["mas_gsm8k", "greedy"].gen_kwargs == {"max_gen_toks": 512}
    assert pieces["mas_medqa", "sampled"].gen_kwargs == {"max_gen_toks": 64, "do_sample": True}  # the run's wins
    config["tasks"]["mas_gsm8k"] = {"limit": 20, "gen_kwargs": None}  # nothing of its own
    (piece,) = plan(load_config(_write(tmp_path, config)), tmp_path / "out", only=["greedy"], tasks=["mas_gsm8k"])
    assert piece.gen_kwargs == {"max_gen_toks": 512} and piece.limit == 20
    command = pieces["mas_medqa", "greedy"].command()
    assert command[command.index("--gen_kwargs") + 1] == "max_gen_toks=1024"
    budget = _piece_with_results(
        tmp_path / "b", {"gen_kwargs": {"max_gen_toks": 512}}, gen_kwargs={"max_gen_toks": 1024}
    )
    assert "keep sidecar.jsonl" in budget.conflict()
    both = _piece_with_results(
        tmp_path / "c", {"gen_kwargs": {"max_gen_toks": 512}}, gen_kwargs={"max_gen_toks": 1024, "do_sample": True}
    )
    assert "keep sidecar.jsonl" not in both.conflict()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"limt": 3}, "a mapping with"),
        ({"gen_kwargs": "max_gen_toks=9"}, "a mapping with"),
        (0, "positive"),
        ({"limit": "all"}, "positive"),
        ({"gen_kwargs": {"until": ["\n\n"]}}, "single values"),  # `--gen_kwargs k=v,...` cannot carry a list
        ({"limit": 10, "part_size": 2.5}, "part_size must be"),
    ],
)
def test_bad_task_entries_fail_with_one_clear_error(tmp_path, entry, message):
    config = {"runs": [{"name": "a", "model": "single-agent"}], "tasks": {"mas_gsm8k": entry}}
    with pytest.raises(ValueError, match=message):
        load_config(_write(tmp_path, config))


def test_a_run_with_a_part_size_is_planned_in_parts_of_its_tasks_documents(tmp_path):
    config = {
        "runs": [
            {"name": "whole", "model": "single-agent"},
            {"name": "slow", "model": "text-mas", "part_size": 4, "tasks": ["mas_gsm8k"]},
        ],
        "tasks": {"mas_gsm8k": 10, "mas_arc_easy_mc": None},
    }
    pieces = plan(load_config(_write(tmp_path, config)), tmp_path / "out")
    parts = [p for p in pieces if p.run == "slow"]
    assert [p.part for p in parts] == [(0, 4), (4, 8), (8, 10)] and [p.documents for p in parts] == [4, 4, 2]
    assert [p.directory.name for p in parts] == ["docs-0-4", "docs-4-8", "docs-8-10"]
    assert all(p.directory.parent == tmp_path / "out" / "slow" / "mas_gsm8k" for p in parts)
    command = parts[2].command()
    assert "--limit" not in command and json.loads(command[command.index("--samples") + 1]) == {"mas_gsm8k": [8, 9]}
    assert "doc_offset=8" in command[command.index("--model_args") + 1]
    (whole,) = [p for p in pieces if p.run == "whole" and p.task == "mas_gsm8k"]
    assert whole.part is None and "--samples" not in whole.command() and "doc_offset" not in " ".join(whole.command())
    # A part is done when its own directory holds its results (lm-eval records no limit for --samples); the offset
    # in the recorded model args is not a changed setting.
    results = parts[1].directory / "model" / "results_x.json"
    results.parent.mkdir(parents=True)
    recorded = {"model": "text-mas", "model_args": "doc_offset=4", "limit": None}
    results.write_text(json.dumps({"config": recorded}))
    assert parts[1].finished() and parts[1].conflict() is None
    assert not parts[0].finished() and not parts[2].finished()
    # A task's part size applies to every run of it; a run's own overrides it.
    config["tasks"]["mas_gsm8k"] = {"limit": 10, "part_size": 5}
    by_run: dict = {}
    for piece in plan(load_config(_write(tmp_path, config)), tmp_path / "out"):
        by_run.setdefault(piece.run, []).append(piece.part)
    assert by_run == {"whole": [(0, 5), (5, 10), None], "slow": [(0, 4), (4, 8), (8, 10)]}
    # A row that evaluated the whole task before it had a part size keeps its whole piece; after a first-N piece at
    # the same budget the parts start at N (one at another budget is another cell's).
    config["defaults"] = {"gen_kwargs": {"max_gen_toks": 64}}
    runs = (("whole", "single-agent", 10.0, 64), ("slow", "text-mas", 6.0, 64), ("slow", "text-mas", 9.0, 32))
    for name, model, limit, budget in runs:
        results = tmp_path / "out" / name / "mas_gsm8k" / "model" / f"results_{limit}.json"
        results.parent.mkdir(parents=True, exist_ok=True)
        recorded = {"model": model, "limit": limit, "gen_kwargs": f"max_gen_toks={budget}"}
        results.write_text(json.dumps({"config": recorded}))
    by_run = {}
    for piece in plan(load_config(_write(tmp_path, config)), tmp_path / "out"):
        by_run.setdefault(piece.run, []).append((piece.part, piece.covered))
    assert by_run == {"whole": [(None, 0), (None, 0)], "slow": [((6, 10), 6)]}
    # Parts join by their samples (GPQA keeps none), and other_doc needs two documents in a part.
    for run, tasks, message in (
        ({"model": "single-agent", "part_size": 4}, {"mas_gpqa_diamond": 10}, "cannot be parted"),
        ({"model": "latent-mas", "part_size": 3, "model_args": {"communication": "other_doc"}}, {"t": 10}, "one doc"),
    ):
        bad = {"runs": [{"name": "r", **run}], "tasks": tasks}
        with pytest.raises(ValueError, match=message):
            plan(load_config(_write(tmp_path, bad)), tmp_path / "elsewhere")
    # Parts need the task's size.
    config["runs"][1]["tasks"] = ["mas_arc_easy_mc"]
    with pytest.raises(ValueError, match="task 'mas_arc_easy_mc': part_size 4 but no limit"):
        plan(load_config(_write(tmp_path, config)), tmp_path / "out")


def test_a_task_evaluated_in_parts_equals_the_whole_task_evaluated_at_once(tiny_model_dir, tmp_path):
    """Two independent runs, each from an empty directory: one whole; one of the first document (an earlier
    `--limit 1`), then the rest in parts of 1 document (batch 1, so no document's output depends on its neighbours).
    The report joins the pieces into one cell with the whole run's score and n; every document's generation and score
    agree, and the side-cars record the same document indices."""
    config = {
        "name": "tiny",
        "backbone": str(tiny_model_dir),
        "defaults": {"model_args": {"dtype": "float32"}, "batch_size": 1, "gen_kwargs": {"max_gen_toks": 6}},
        "runs": [{"name": "single-agent", "model": "single-agent"}],
        "tasks": {"mas_gsm8k": 3},
        "slim": True,
    }
    whole_path = _write(tmp_path, config)
    (tmp_path / "parted").mkdir()
    config["runs"][0]["part_size"] = 1
    parted_path = _write(tmp_path / "parted", config)
    outputs = {}
    # The task's first document evaluated whole (an earlier --limit), before the run had a part size.
    earlier = _reproduce(whole_path, tmp_path / "parts", "--limit", "1", "--no-report")
    assert earlier.returncode == 0, earlier.stdout + earlier.stderr
    # One sitting's work: the first part only; the parts start after the first document.
    first = _reproduce(parted_path, tmp_path / "parts", "--max-pieces", "1", "--no-report")
    assert first.returncode == 0 and "--max-pieces 1 evaluated; stopping here" in first.stdout, first.stdout
    assert "(docs 1-1): todo" in first.stdout and "(docs 0-0)" not in first.stdout
    assert len(list((tmp_path / "parts").rglob("results_*.json"))) == 2
    for name, path in (("whole", whole_path), ("parts", parted_path)):
        done = _reproduce(path, tmp_path / name)
        assert done.returncode == 0, done.stdout + done.stderr
        results = sorted((tmp_path / name).rglob("results_*.json"))
        totals = [json.loads(r.read_text())["config"]["diffmas"]["totals"] for r in results]
        assert all(t.get("reused_requests", 0) == 0 for t in totals)  # nothing reused: both sides computed here
        full = [json.loads(line) for p in (tmp_path / name).rglob(".sidecar.full.jsonl") for line in p.open()]
        samples = [json.loads(line) for r in results for s in r.parent.glob("samples_*.jsonl") for line in s.open()]
        leaderboard = (tmp_path / name / "report" / "leaderboard.csv").read_text()
        outputs[name] = (len(results), full, samples, leaderboard)
    assert outputs["whole"][0] == 1 and outputs["parts"][0] == 3
    (_, whole_full, whole_samples, whole_board), (_, part_full, part_samples, part_board) = outputs.values()
    assert {r["doc_id"]: r["result"] for r in part_full} == {r["doc_id"]: r["result"] for r in whole_full}
    assert sorted(r["doc_id"] for r in part_full) == [0, 1, 2]

    def by_doc(samples: list[dict]) -> dict:
        return {s["doc_id"]: (s["doc_hash"], s["acc"]) for s in samples}

    assert by_doc(part_samples) == by_doc(whole_samples) and len(by_doc(whole_samples)) == 3
    assert part_board == whole_board and "(n=3)" in whole_board


def test_slim_must_be_a_boolean(tmp_path):
    config = {"runs": [{"name": "a", "model": "single-agent"}], "tasks": ["t"], "slim": "false"}
    with pytest.raises(ValueError, match="`slim` must be true or false"):
        load_config(_write(tmp_path, config))


def test_relative_adapter_paths_resolve_against_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "adapters" / "a").mkdir(parents=True)
    (tmp_path / "configs").mkdir()
    config = {
        "runs": [{"name": "d", "model": "diffmas", "model_args": {"adapter": "../adapters/a"}}],
        "tasks": ["mas_gsm8k"],
    }
    path = tmp_path / "configs" / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)  # a working directory from which "../adapters/a" does not exist
    (piece,) = plan(load_config(path), tmp_path / "out")
    assert piece.model_args["adapter"] == str((tmp_path / "adapters" / "a").resolve())
    # every artefact arg (C2C's fuser, NeuroMAS's adapters) resolves the same way, and a missing one is refused
    config["runs"] = [{"name": "c", "model": "c2c", "model_args": {"fuser": "../adapters/a", "sharer": "x"}}]
    path.write_text(yaml.safe_dump(config))
    (piece,) = plan(load_config(path), tmp_path / "out")
    assert piece.model_args["fuser"] == str((tmp_path / "adapters" / "a").resolve())
    config["runs"] = [{"name": "n", "model": "neuromas", "model_args": {"adapters": "../adapters/none"}}]
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(FileNotFoundError, match="adapters .* does not exist"):
        plan(load_config(path), tmp_path / "out")


def test_a_slimmed_generative_piece_extended_here_reuses_its_generations(tiny_model_dir, tmp_path):
    """Slimming drops generations' text from the committed side-car but keeps it in a local full copy, so extending
    the piece from 2 to 3 documents on this machine computes only the third; its texts equal a fresh run's."""
    config = {
        "name": "tiny",
        "backbone": str(tiny_model_dir),
        "defaults": {"model_args": {"dtype": "float32"}, "batch_size": 2, "gen_kwargs": {"max_gen_toks": 6}},
        "runs": [{"name": "single-agent", "model": "single-agent"}],
        "tasks": {"mas_gsm8k": 3},
        "slim": True,
    }
    path = _write(tmp_path, config)

    def reproduce(out: str, *extra: str) -> dict:
        done = _reproduce(path, tmp_path / out, "--no-report", *extra)
        assert done.returncode == 0, done.stdout + done.stderr
        newest = max((tmp_path / out).rglob("results_*.json"), key=lambda r: r.stat().st_mtime_ns)
        return json.loads(newest.read_text())["config"]["diffmas"]["totals"]

    def texts(out: str) -> dict:
        piece = tmp_path / out / "single-agent" / "mas_gsm8k"
        committed = [json.loads(line) for line in (piece / "sidecar.jsonl").open()]
        assert committed and all("result" not in record for record in committed)  # slimmed
        kept = [json.loads(line) for line in (piece / ".sidecar.full.jsonl").open()]
        return {record["doc_id"]: record["result"] for record in kept}

    first = reproduce("extended", "--limit", "2")
    assert first["requests"] == 2 and first.get("reused_requests", 0) == 0
    extended = reproduce("extended")
    assert extended["requests"] == 3 and extended.get("reused_requests") == 2
    fresh = reproduce("fresh")
    assert fresh["requests"] == 3 and fresh.get("reused_requests", 0) == 0
    assert texts("extended") == texts("fresh") and len(texts("fresh")) == 3


def test_results_of_an_adapter_since_retrained_at_the_same_path_do_not_finish_the_piece(tmp_path):
    adapter = tmp_path / "runs" / "d"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(b"first training")
    config = {"runs": [{"name": "d", "model": "diffmas", "model_args": {"adapter": str(adapter)}}], "tasks": {"t": 5}}
    (piece,) = plan(load_config(_write(tmp_path, config)), tmp_path / "out")

    def results(name: str, fingerprint: str | None) -> None:
        path = piece.directory / "model" / f"results_{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        recorded = {"adapter_fingerprint": fingerprint} if fingerprint else {}
        path.write_text(json.dumps({"config": {"limit": 5.0, "diffmas": recorded}}))

    first = piece.artefact_fingerprints()["adapter_fingerprint"]
    results("first", first)
    assert piece.finished()
    results("first", None)  # written before results recorded fingerprints: cannot be told apart, so it counts
    assert piece.finished()
    results("first", first)
    (adapter / "adapter_model.safetensors").write_bytes(b"retrained")  # same path, other weights
    second = piece.artefact_fingerprints()["adapter_fingerprint"]
    assert second != first and not piece.finished()
    results("second", second)
    assert piece.finished()


@pytest.mark.parametrize(
    "path", sorted([*(REPO / "results").glob("*.yaml"), *(REPO / "baselines" / "repro").glob("*.yaml")]), ids=str
)
def test_every_committed_reproduction_config_is_valid(path):
    """Each committed config loads, names only known tasks, and gives each method only model args it takes."""
    from dataclasses import fields

    from diffmas_eval.lm_backend import BackendArgs
    from diffmas_eval.methods import get_method
    from diffmas_eval.reproduce import ARTEFACT_ARGS

    config = load_config(path)
    declared = re.compile(r"^(?:task|group): *(\S+)", re.MULTILINE)  # task YAMLs hold lm-eval's !function tags
    known_tasks = {name for f in (REPO / "tasks").rglob("*.yaml") for name in declared.findall(f.read_text())}
    assert set(config["tasks"]) <= known_tasks, sorted(set(config["tasks"]) - known_tasks)
    defaults = (config.get("defaults") or {}).get("model_args") or {}
    for run in config["runs"]:
        accepted = {f.name for f in fields(BackendArgs)} | {
            f.name for f in fields(get_method(run["model"]).config_class)
        }
        stray = set({**defaults, **(run.get("model_args") or {})}) - accepted
        assert not stray, f"run {run['name']!r}: model args {sorted(stray)} are not {run['model']}'s"
    runnable = [r["name"] for r in config["runs"] if not set(r.get("model_args") or {}) & set(ARTEFACT_ARGS)]
    assert plan(config, Path("out"), only=runnable)


def test_a_piece_that_fails_leaves_no_generated_text_in_its_side_car(tmp_path):
    """A slimmed config's piece is slimmed however its run ends (failed here; stopped takes the same path): the text
    of generations stays only in the git-ignored full copy, which the next run of the piece puts back."""
    from diffmas_eval.reproduce import run_piece
    from diffmas_eval.slim import full_copy

    piece = Piece("r", "mas_gsm8k", "no-such-model", {}, {}, 1, 1, tmp_path / "piece", slim=True)
    piece.directory.mkdir()
    sidecar = piece.directory / "sidecar.jsonl"
    sidecar.write_text(json.dumps({"doc_id": 0, "request_type": "generate_until", "result": "an answer"}) + "\n")
    assert run_piece(piece) != 0
    assert "an answer" not in sidecar.read_text() and "an answer" in full_copy(sidecar).read_text()


def test_terminating_reproduce_stops_the_piece_it_runs(tmp_path):
    """A SIGTERM to reproduce (a session ending, `kill`) kills the running piece's evaluation too: an orphaned child
    would keep appending to the side-car that a rerun of the piece resumes from."""
    import signal
    import time

    pid_file = tmp_path / "child.pid"
    sleeper = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120)"
    script = (
        "import subprocess, sys\n"
        "from diffmas_eval.reproduce import child_stops_with_this_process\n"
        "with child_stops_with_this_process():\n"
        f"    subprocess.run([sys.executable, '-c', {sleeper!r}, {str(pid_file)!r}])\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(pid_file.read_text())
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == 128 + signal.SIGTERM
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left running
        os.kill(child, 0)


def test_a_slimmed_generative_multiple_choice_piece_keeps_the_letters_its_text_gives(tiny_model_dir, tmp_path):
    """Slimmed samples of a generative multiple-choice task keep `answer`, the letter the task extracted from the
    reply; it equals the letter extracted here from the reply's text kept in the local full copy."""
    from diffmas_eval.benchmarks.extract import extract_letter

    config = {
        "name": "tiny",
        "backbone": str(tiny_model_dir),
        "defaults": {"model_args": {"dtype": "float32"}, "batch_size": 2, "gen_kwargs": {"max_gen_toks": 8}},
        "runs": [{"name": "single-agent", "model": "single-agent"}],
        "tasks": {"mas_arc_easy": 2},
        "slim": True,
    }
    done = _reproduce(_write(tmp_path, config), tmp_path / "o", "--no-report")
    assert done.returncode == 0, done.stdout + done.stderr
    piece = tmp_path / "o" / "single-agent" / "mas_arc_easy"
    samples = [json.loads(line) for file in piece.rglob("samples_*.jsonl") for line in file.open()]
    texts = {r["doc_id"]: r["result"] for r in map(json.loads, (piece / ".sidecar.full.jsonl").open())}
    assert len(samples) == 2 and all("doc" not in s and "filtered_resps" not in s for s in samples)
    assert {s["doc_id"]: s["answer"] for s in samples} == {doc: extract_letter(text) for doc, text in texts.items()}
