"""Reporting on hand-made lm-eval 0.4.13 result fixtures (tests/fixtures/results, see make_fixtures.py there)."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from diffmas_eval.reporting import build_report, write_report
from diffmas_eval.reporting.baselines import baselines_dir, load_baselines
from diffmas_eval.reporting.stats import mcnemar_exact, paired_compare

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "results"
GOOD = FIXTURES / "good"
BAD = FIXTURES / "malformed"
METHODS_DOC = Path(__file__).resolve().parents[2] / "shared" / "docs" / "methods.md"


@pytest.fixture(scope="module")
def report():
    return build_report([GOOD], baselines=baselines_dir())


def _row(frame: pd.DataFrame, **where) -> pd.DataFrame:
    flat = frame.copy()
    if isinstance(flat.columns, pd.MultiIndex):
        flat.columns = [c[-1] for c in flat.columns]
    mask = np.ones(len(flat), dtype=bool)
    for key, value in where.items():
        column = flat[key]
        hit = column.str.contains(value, regex=False) if key == "settings" else column == value
        mask &= hit.to_numpy()
    return flat[mask]


# ----------------------------------------------------------------------------------------------------- statistics


def test_mcnemar_matches_the_binomial_formula_by_hand():
    # 4 documents only A gets right, 1 only B: two-sided exact p = 2 * sum_{k<=1} C(5, k) / 2^5.
    by_hand = 2 * (math.comb(5, 0) + math.comb(5, 1)) / 2**5
    assert by_hand == 0.375
    assert mcnemar_exact(4, 1) == pytest.approx(by_hand)
    assert mcnemar_exact(1, 4) == pytest.approx(by_hand)
    # 7 vs 2: 2 * (1 + 9 + 36) / 512
    assert mcnemar_exact(7, 2) == pytest.approx(2 * (1 + 9 + 36) / 512)
    assert mcnemar_exact(0, 0) == 1.0


def test_paired_compare_binary_counts_interval_and_seed():
    a = np.array([1, 1, 0, 1, 1, 1, 1, 0, 1, 0])
    b = np.array([1, 1, 1, 0, 0, 0, 0, 0, 1, 0])
    cmp = paired_compare(a, b)
    assert (cmp.a_only, cmp.b_only, cmp.n) == (4, 1, 10)
    assert cmp.difference == pytest.approx(0.3)
    assert cmp.p_value == pytest.approx(0.375)
    assert cmp.test == "McNemar exact"
    assert cmp.ci_low < 0.3 < cmp.ci_high and -1 <= cmp.ci_low and cmp.ci_high <= 1
    assert paired_compare(a, b) == cmp  # fixed seed: reproducible
    same = paired_compare(a, a)
    assert (same.difference, same.ci_low, same.ci_high, same.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_paired_compare_non_binary_uses_permutation_and_rejects_bad_shapes():
    rng = np.random.default_rng(0)
    a = rng.uniform(size=40)
    cmp = paired_compare(a, a - 0.2)
    assert cmp.test == "paired permutation" and cmp.a_only is None
    assert cmp.difference == pytest.approx(0.2) and cmp.p_value < 0.01
    with pytest.raises(ValueError, match="equal-length"):
        paired_compare(np.ones(3), np.ones(4))


# ----------------------------------------------------------------------------------------------------- leaderboard


def test_leaderboard_cells_rows_and_domains(report):
    board = report.tables["leaderboard"]
    domains = list(dict.fromkeys(c[0] for c in board.columns if c[0]))
    assert domains == ["math", "science QA", "code", "other", "overall"]  # no commonsense run: no empty column
    latent = _row(board, method="latent-mas", kind="method", settings="seed=0")
    assert len(latent) == 1
    # 7/10 right: stderr = sqrt(0.7 * 0.3 * 10/9 / 10) = 0.153 -> newest run wins over the older 0/10 rerun.
    assert latent["mas_gsm8k"].item() == "70.0 ± 15.3 (n=10)"
    assert latent["mas_humaneval_plus"].item() == "66.7 ± 21.1 (n=6)"  # pass_plus headline
    assert latent["mas_humaneval_plus (base)"].item() == "83.3 ± 16.7 (n=6)"
    assert latent["overall avg"].item().startswith(f"{100 * (0.7 + 0.9 + 4 / 6) / 3:.1f} ±")
    assert "3/4 tasks" in latent["overall avg"].item()
    # The diffmas run sits in a directory called "single-agent": identity comes from config, not the path.
    diffmas = _row(board, method="diffmas")
    assert diffmas["kind"].item() == "method" and "adapter=diffmas-lora-qwen3-8b" in diffmas["settings"].item()
    assert diffmas["mas_arc_easy"].item() == "100.0 ± 0.0 (n=10)"
    control = _row(board, kind="control")
    assert control["method"].item() == "latent-mas" and "communication=none" in control["settings"].item()
    hf = _row(board, kind="lm-eval model")
    assert hf["method"].item() == "hf" and hf["backbone"].item() == "Qwen3-8B"
    assert hf["mas_arc_easy_mc"].item().endswith("†")  # --limit 10 of 20
    assert hf["toy_custom"].item().startswith("60.0")  # unknown task kept, in "other", via exact_match
    assert ("other", "toy_custom") in board.columns and ("science QA", "mas_arc_easy_mc") in board.columns
    assert hf["science QA avg"].item() == "–"  # _mc variants are not averaged


def test_newest_wins_unless_all_runs(report):
    assert any("superseded" in w and "results_2025-12-01" in w for w in report.warnings)
    everything = build_report([GOOD], all_runs=True, baselines=None)
    latent = _row(everything.tables["leaderboard"], method="latent-mas", kind="method", settings="seed=0")
    assert sorted(latent["mas_gsm8k"]) == ["0.0 ± 0.0 (n=10)", "70.0 ± 15.3 (n=10)"]
    assert all("run 20" in s for s in latent["settings"])


# ------------------------------------------------------------------------------------------ cost and stability


def test_cost_table_side_car_totals_and_ratios(report):
    cost = report.tables["cost"]
    latent = _row(cost, method="latent-mas", task="mas_gsm8k")
    # single agent: 8 docs x 200 + 2 budget hits x 512 = 2624 / 10 = 262.4 tokens; latent-mas 100, 1.5 s vs 2 s.
    assert latent["generated tokens / problem"].item() == "100.0"
    assert latent["tokens vs single agent"].item() == f"{100 / 262.4:.2f}x"
    assert latent["seconds vs single agent"].item() == "0.75x"
    assert latent["latent steps / problem"].item() == "30.0" and latent["trace tokens / problem"].item() == "180.0"
    assert _row(cost, method="single-agent", task="mas_gsm8k")["generated tokens / problem"].item() == "262.4"
    diffmas = _row(cost, method="diffmas")
    assert diffmas["task"].item() == "mas_gsm8k+mas_arc_easy" and diffmas["source"].item() == "config totals"
    assert diffmas["generated tokens / problem"].item() == "80.0"  # 1600 tokens / 20 problems
    assert diffmas["seconds / problem"].item() == "2.00"
    # Runs whose totals counted nothing get no cost row rather than zeros.
    assert _row(cost, kind="control").empty


def test_stability_and_seed_spread(report):
    stab = report.tables["stability"]
    single = _row(stab, method="single-agent", task="mas_gsm8k")
    assert single["stopped before budget"].item() == "80.0" and single["extractable answer"].item() == "80.0"
    diffmas = _row(stab, method="diffmas", task="mas_gsm8k")
    assert diffmas["stopped before budget"].item() == "90.0"  # 18 stopped, 2 budget hits
    assert diffmas["stopping source"].item() == "config totals (whole file)"
    spread = report.tables["seed_spread"]
    assert len(spread) == 1
    assert spread.iloc[0]["seeds"] == "0, 1" and spread.iloc[0]["mean"] == "75.0"
    assert spread.iloc[0]["std across seeds"] == f"{100 * np.std([0.7, 0.8], ddof=1):.1f}"


def test_paired_comparisons_on_shared_documents(report):
    paired = report.tables["paired"]
    latent = _row(paired, method="latent-mas", kind="method", settings="seed=0", task="mas_gsm8k")
    assert latent["vs_method"].item() == "single-agent"
    assert latent["discordant (ours only / ref only)"].item() == "4 / 1"
    assert float(latent["p-value"].item()) == pytest.approx(0.375)
    assert latent["difference (pp)"].item() == "+30.0"
    control = _row(paired, kind="control", vs_method="latent-mas")
    assert control["discordant (ours only / ref only)"].item() == "1 / 5"
    assert _row(paired, method="single-agent", kind="method").empty  # a reference is not compared with itself
    assert set(_row(paired, method="diffmas")["vs_method"]) == {"single-agent", "latent-mas"}


# ----------------------------------------------------------------------------------------------- paper numbers


def test_paper_numbers_beside_ours_and_apart(report):
    side = report.tables["paper"]
    gsm = _row(side, method="latent-mas", task="mas_gsm8k", settings="seed=0")
    assert gsm["paper"].item() == "93.8" and gsm["paper topology"].item() == "sequential"
    code = _row(side, method="single-agent", task="mas_humaneval_plus")
    assert code["paper"].item() == "74.4" and code["metric"].item() == "pass_plus"
    only = report.tables["paper_only"]
    diffmas = only[(only["method"] == "diffmas") & (only["metric"] == "acc")]
    assert diffmas["mas_aime24"].item() == "≈76.7" and diffmas["mas_aime25"].item() == "≈56.7 / ≈66.7"
    # matched numbers are not repeated in the paper-only section; unmatched backbones are
    seq8 = only[
        (only["backbone"] == "Qwen3-8B")
        & (only["method"] == "latent-mas")
        & (only["metric"] == "acc")
        & only["table"].str.startswith("Sequential")
    ]
    assert seq8["mas_gsm8k"].item() == "–" and seq8["mas_medqa"].item() == "75.3"
    assert not only[only["backbone"] == "Qwen3-14B"].empty


def test_paper_numbers_on_other_backbones_are_shown_and_marked(report):
    other = report.tables["paper_other"]
    assert not other.empty
    # never our own backbone (those are in the `paper` table), always the same method, task and metric as our row
    assert not other["paper backbone (other)"].str.lower().eq(other["backbone"].str.lower()).any()
    code = _row(other, method="single-agent", task="mas_humaneval_plus")
    assert {"Qwen3-4B", "Qwen3-14B"} <= set(code["paper backbone (other)"])
    assert set(code["paper topology"]) == {"any (single agent)"} and set(code["metric"]) == {"pass_plus"}
    # shown here, so not again among the paper numbers without a run of ours
    only = report.tables["paper_only"]
    single = only[(only["method"] == "single-agent") & only["backbone"].isin(["Qwen3-4B", "Qwen3-14B"])]
    assert single.empty or (single["mas_humaneval_plus"] == "–").all()


def test_baselines_files_are_complete_and_marked():
    frame = load_baselines(baselines_dir())
    per_file = frame["file"].value_counts()
    assert per_file.get("c2c_headline.csv") == 5
    assert len(frame[~frame["file"].isin(["c2c_headline.csv", "interlat.csv"])]) == 54 + 54 + 36 + 6 + 9
    diffmas_acc = frame[(frame["method"] == "diffmas") & frame["metric"].isin(["acc", "pass_plus"])]
    assert diffmas_acc["approximate"].all() and diffmas_acc["note"].str.contains("inferred|inference").all()
    assert not frame[frame["method"] != "diffmas"]["approximate"].any()


@pytest.mark.skipif(not METHODS_DOC.is_file(), reason="needs ../shared/docs/methods.md beside the repository")
def test_baselines_transcribe_methods_doc_section_8():
    doc = METHODS_DOC.read_text(encoding="utf-8")
    section = doc[doc.index("## 8.") : doc.index("## 9.")]
    frame = load_baselines(baselines_dir())
    expected = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] in {"ARC-E", "ARC-C", "GSM8K", "MedQA", "MBPP+", "HumanEval+"}:
            expected.extend(cells[1:])
        elif line.startswith("|") and cells[0] in {"sequential", "hierarchical"}:
            expected.extend(cells[2:])
    in_doc_order = ("latentmas_sequential.csv", "latentmas_hierarchical.csv", "latentmas_reasoning.csv")
    transcribed = [f"{v:.1f}" for name in in_doc_order for v in frame.loc[frame["file"] == name, "value"]]
    assert transcribed == expected


# ----------------------------------------------------------------------------------------------- bad inputs


def test_malformed_and_partial_files_are_named_and_skipped():
    bad = build_report([BAD], baselines=None)
    text = "\n".join(bad.warnings)
    for name in ("truncated", "noconfig", "empty"):
        assert f"malformed/{name}/results_" in text and "file skipped" in text
    assert "not a readable JSON" in text and "cannot be identified" in text
    assert "`acc,none` = 'N/A' is not a number; task skipped" in text
    assert "stderr of `acc` unknown" in text
    assert "partial-samples/samples_mas_gsm8k" in text and "not a complete sample" in text
    assert "stray-samples/samples_mas_gsm8k" in text and "task_hashes" in text
    board = bad.tables["leaderboard"]
    na = _row(board, method="text-mas", topology="sequential")
    assert na["mas_gsm8k"].item() == "40.0 ± n/a (n=10)"  # value kept, unknown stderr never invented
    assert "mas_arc_easy" not in [c[-1] for c in board.columns]
    # partial / stray samples: the task stays (results are fine) but no paired comparison uses the bad samples
    assert not _row(board, method="text-mas", topology="hierarchical").empty
    assert bad.tables["paired"].empty


def test_stderr_recomputed_from_samples_when_na(tmp_path):
    import json
    import shutil

    shutil.copytree(GOOD / "results-a", tmp_path / "a")
    path = next((tmp_path / "a").glob("results_*.json"))
    data = json.loads(path.read_text())
    data["results"]["mas_gsm8k"]["acc_stderr,none"] = "N/A"
    path.write_text(json.dumps(data))
    rep = build_report([tmp_path], baselines=None)
    cell = _row(rep.tables["leaderboard"], method="single-agent")["mas_gsm8k"].item()
    assert cell == "40.0 ± 16.3 (n=10)"
    assert any("computed from samples" in w for w in rep.warnings)


# ----------------------------------------------------------------------------------------------- outputs and CLI


class _TagBalance(HTMLParser):
    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.tables = 0
        self.images = 0

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables += 1
        if tag == "img":
            self.images += int(dict(attrs).get("src", "").startswith("data:image/png;base64,"))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}> after {self.stack[-3:]}"
        self.stack.pop()


def test_cli_writes_every_format(tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "diffmas_eval.reporting", str(GOOD), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "superseded" in proc.stderr
    for name in (
        "report.md",
        "report.tex",
        "report.html",
        "leaderboard.csv",
        "cost.csv",
        "stability.csv",
        "paired.csv",
        "paper.csv",
        "paper_only.csv",
        "paper_other.csv",
        "seed_spread.csv",
        "scores.csv",
        "domain_bars.png",
        "domain_bars.svg",
        "accuracy_vs_tokens.png",
        "accuracy_vs_tokens.svg",
        "accuracy_vs_seconds.png",
        "accuracy_vs_seconds.svg",
    ):
        assert (out / name).stat().st_size > 0, name
    md = (out / "report.md").read_text()
    assert "| 70.0 ± 15.3 (n=10)" in md and "## Paired comparisons" in md
    tex = (out / "report.tex").read_text()
    assert r"\begin{tabular}" in tex and r"$\pm$" in tex and "±" not in tex and r"\end{document}" in tex
    parser = _TagBalance()
    parser.feed((out / "report.html").read_text())
    assert parser.stack == [] and parser.tables >= 6 and parser.images == 3
    assert pd.read_csv(out / "leaderboard.csv")["method"].tolist()[:2] == ["single-agent", "latent-mas"]
    ET.parse(out / "domain_bars.svg")  # well-formed SVG


def test_plots_are_real_images(tmp_path):
    import matplotlib.image as mpimg

    rep = build_report([GOOD], baselines=None)
    write_report(rep, tmp_path)
    for name in ("domain_bars.png", "accuracy_vs_tokens.png", "accuracy_vs_seconds.png"):
        pixels = mpimg.imread(tmp_path / name)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300
        rgb = pixels[..., :3]
        assert (rgb < 0.9).any() and rgb.std() > 0.05  # drawn content, not a blank canvas


def test_cli_rejects_bad_arguments(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "diffmas_eval.reporting", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "not a directory" in proc.stderr
    from diffmas_eval.reporting.cli import main

    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--no-baselines"]) == 2
    assert not (tmp_path / "o").exists()


def test_side_car_keeps_this_runs_last_line_per_request_and_skips_cut_lines(tmp_path):
    """A resumed or re-configured run shares its side-car: only this run's lines count, each request once."""
    import json
    import shutil

    original = build_report([FIXTURES / "good" / "results-b"])
    work = tmp_path / "results-b"
    shutil.copytree(FIXTURES / "good" / "results-b", work)
    (results_file,) = work.glob("results_*.json")
    results = json.loads(results_file.read_text())
    results["config"]["diffmas"]["run_key"] = "this-run"
    results_file.write_text(json.dumps(results))
    (sidecar,) = work.glob("sidecar_*.jsonl")
    lines = [json.loads(line) for line in sidecar.read_text().splitlines()]
    for number, line in enumerate(lines):
        line.update(run_key="this-run", store_key=f"request-{number}")
    duplicate = dict(lines[0])  # the same request recomputed after an interruption
    foreign = dict(lines[0], run_key="another-run", store_key="x", wall_seconds=1e6)
    text = "".join(json.dumps(line) + "\n" for line in [*lines, duplicate, foreign]) + '{"prompt_hash": "ab'
    sidecar.write_text(text)
    resumed = build_report([work])
    columns = ["generated tokens / problem", "seconds / problem", "trace tokens / problem"]
    assert resumed.tables["cost"][columns].equals(original.tables["cost"][columns])
    assert any("unreadable side-car line" in w for w in resumed.warnings)


def test_side_car_documents_beyond_a_limited_run_are_not_counted(tmp_path):
    import json
    import shutil

    original = build_report([FIXTURES / "good" / "results-b"])
    work = tmp_path / "results-b"
    shutil.copytree(FIXTURES / "good" / "results-b", work)
    (sidecar,) = work.glob("sidecar_*.jsonl")
    lines = [json.loads(line) for line in sidecar.read_text().splitlines()]
    # The same side-car earlier served a run with a larger --limit: documents this run never scored.
    extra = [dict(line, doc_id=1000 + int(line["doc_id"]), wall_seconds=1e6) for line in lines]
    sidecar.write_text("".join(json.dumps(line) + "\n" for line in lines + extra))
    columns = ["generated tokens / problem", "seconds / problem"]
    assert build_report([work]).tables["cost"][columns].equals(original.tables["cost"][columns])


def test_a_task_budget_is_a_cell_property_and_only_its_side_car_lines_count(tmp_path):
    """A row may give each task its own final-agent budget; the side-car's lines under another budget (a budget
    raised, its early-ended generations reused) are not counted."""
    original = build_report([FIXTURES / "good" / "results-b"])
    work = tmp_path / "results-b"
    shutil.copytree(FIXTURES / "good" / "results-b", work)
    (results_file,) = work.glob("results_*.json")
    results = json.loads(results_file.read_text())
    results["config"]["gen_kwargs"] = {"max_gen_toks": 512}
    results_file.write_text(json.dumps(results))
    (sidecar,) = work.glob("sidecar_*.jsonl")
    lines = [json.loads(line) for line in sidecar.read_text().splitlines()]
    assert {line["final"]["budget"] for line in lines} == {512}
    older = [dict(line, final={**line["final"], "budget": 256}, wall_seconds=1e6) for line in lines]
    sidecar.write_text("".join(json.dumps(line) + "\n" for line in older + lines))
    raised = build_report([work])
    columns = ["generated tokens / problem", "seconds / problem"]
    assert raised.tables["cost"][columns].equals(original.tables["cost"][columns])
    # The same configuration with a larger budget on one task: one row, each task's budget in the stability table.
    other = tmp_path / "results-b-medqa"
    shutil.copytree(work, other)
    (other_file,) = other.glob("results_*.json")
    data = json.loads(other_file.read_text())
    data["config"]["gen_kwargs"] = {"max_gen_toks": 1024}
    data["configs"]["mas_gsm8k"]["generation_kwargs"]["max_gen_toks"] = 1024  # as lm-eval records the merged value
    data["date"] += 60
    data["results"] = {"mas_gsm8k": data["results"]["mas_gsm8k"]}
    other_file.write_text(json.dumps(data))
    for stray in other.glob("samples_mas_[ah]*"):
        stray.unlink()
    (other_sidecar,) = other.glob("sidecar_*.jsonl")
    other_sidecar.write_text("".join(json.dumps(dict(x, final={**x["final"], "budget": 1024})) + "\n" for x in lines))
    both = build_report([work, other, FIXTURES / "good" / "results-a"])
    (settings,) = set(_row(both.tables["leaderboard"], method="latent-mas")["settings"])
    assert "max_gen_toks=512/1024 by task" in settings
    stability = _row(both.tables["stability"], method="latent-mas")
    assert dict(zip(stability["task"], stability["budget"], strict=True)) == {
        "mas_gsm8k": "1024",
        "mas_arc_easy": "512",
        "mas_humaneval_plus": "512",
    }
    # The single agent ran GSM8K at 512 only: the pairing across budgets is made, and says so.
    paired = _row(both.tables["paired"], method="latent-mas", task="mas_gsm8k", vs_method="single-agent")
    assert list(paired["versus"].str.endswith("(its budget 512, ours 1024)")) == [True]
    assert any("at another budget" in w for w in both.warnings)
    same = _row(both.tables["paired"], method="latent-mas", task="mas_arc_easy", vs_method="single-agent")
    assert not same["versus"].str.contains("budget").any()


def _split_into_parts(
    source: Path, work: Path, cuts: dict[str, int], *, budget: int | None = None, later: int = 0
) -> None:
    """Rewrite a results file (one run) as two parts, as `reproduce` writes a run evaluated in parts: the documents
    below each task's cut in `work/low/`, the rest in `work/high/` (a later run), each with its samples, its side-car
    lines and its own counts, aggregates and task hashes. `budget` gives the high part another final-agent budget."""
    (results_file,) = source.glob("results_*.json")
    data = json.loads(results_file.read_text())
    (sidecar,) = source.glob("sidecar_*.jsonl")
    records = [json.loads(line) for line in sidecar.read_text().splitlines()]
    halves = (("low", lambda t, d: d < cuts[t]), ("high", lambda t, d: d >= cuts[t]))
    for number, (name, keep) in enumerate(halves):
        part = json.loads(json.dumps(data))
        stamp = f"2026-01-01T12-0{number}-{later % 60:02d}.000000"
        part["date"] += 3600 + 60 * number + later
        part["config"]["diffmas"]["sidecar"] = f"sidecar_{stamp}.jsonl"
        if budget is not None and name == "high":
            part["config"]["gen_kwargs"] = {"max_gen_toks": budget}
            for task in part["configs"]:
                part["configs"][task].setdefault("generation_kwargs", {})["max_gen_toks"] = budget
        directory = work / name
        directory.mkdir(parents=True)
        for task in data["results"]:
            (samples_file,) = source.glob(f"samples_{task}_*.jsonl")
            lines = [json.loads(line) for line in samples_file.read_text().splitlines()]
            lines = [line for line in lines if keep(task, line["doc_id"])]
            (directory / f"samples_{task}_{stamp}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
            part["n-samples"][task]["effective"] = len(lines)
            part["task_hashes"][task] = hashlib.sha256(
                "".join(x["doc_hash"] + x["prompt_hash"] + x["target_hash"] for x in lines).encode()
            ).hexdigest()
            for metric in [m for m in lines[0]["metrics"] if f"{m},none" in part["results"][task]]:
                values = [float(x[metric]) for x in lines]
                part["results"][task][f"{metric},none"] = sum(values) / len(values)
        kept = [r for r in records if keep(r["task"], r["doc_id"])]
        (directory / f"sidecar_{stamp}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
        (directory / f"results_{stamp}.json").write_text(json.dumps(part))


def test_a_run_evaluated_in_parts_is_one_cell_equal_to_the_run_evaluated_whole(tmp_path):
    """`reproduce` evaluates a slow run in parts of a task's documents; the report joins the parts of one
    configuration into one cell: score, stderr and n, paired comparisons and cost are those of the whole run."""
    whole = build_report([GOOD / "results-b", GOOD / "results-a"])
    cuts = {"mas_gsm8k": 4, "mas_arc_easy": 7, "mas_humaneval_plus": 3}
    _split_into_parts(GOOD / "results-b", tmp_path / "parts", cuts)
    joined = build_report([tmp_path / "parts", GOOD / "results-a"])
    assert joined.tables["leaderboard"].equals(whole.tables["leaderboard"])
    assert joined.tables["paired"].equals(whole.tables["paired"])
    columns = ["task", "problems", "generated tokens / problem", "seconds / problem"]
    assert joined.tables["cost"][columns].equals(whole.tables["cost"][columns])
    assert joined.tables["stability"].equals(whole.tables["stability"])
    assert not any("superseded" in w for w in joined.warnings)
    cell = _row(joined.tables["leaderboard"], method="latent-mas")["mas_gsm8k"].item()
    assert "(n=10)" in cell and "†" not in cell


def test_a_part_evaluated_again_replaces_only_that_part(tmp_path):
    """A part rerun later (the same documents) supersedes the earlier copy of that part only: the other parts stay
    in the cell, whatever order the results came in."""
    whole = build_report([GOOD / "results-b"])
    cuts = {"mas_gsm8k": 4, "mas_arc_easy": 7, "mas_humaneval_plus": 3}
    _split_into_parts(GOOD / "results-b", tmp_path / "first", cuts)
    _split_into_parts(GOOD / "results-b", tmp_path / "again", cuts, later=600)
    rep = build_report([tmp_path / "first", tmp_path / "again" / "high"])
    assert rep.tables["leaderboard"].equals(whole.tables["leaderboard"])
    superseded = [w for w in rep.warnings if "superseded" in w]
    assert superseded and all(w.startswith(str(tmp_path / "first" / "high")) for w in superseded)


def test_parts_that_share_documents_or_differ_in_budget_are_not_joined(tmp_path):
    """Results that share documents are a rerun, not parts: the newer supersedes the older, as before. Parts at
    different final-agent budgets are not joined either: the newer supersedes."""
    cuts = {"mas_gsm8k": 4, "mas_arc_easy": 4, "mas_humaneval_plus": 3}
    _split_into_parts(GOOD / "results-b", tmp_path / "budget", cuts, budget=1024)
    _split_into_parts(GOOD / "results-b", tmp_path / "same", cuts)
    for directories in ([tmp_path / "budget"], [GOOD / "results-b", tmp_path / "same" / "high"]):
        rep = build_report(directories)
        assert "(n=6)" in _row(rep.tables["leaderboard"], method="latent-mas")["mas_gsm8k"].item()
        assert any("task mas_gsm8k superseded" in w for w in rep.warnings)


def test_settings_labels_name_neuromas_graphs_and_adapters_by_fingerprint():
    """NeuroMAS rows are labelled by graph and adapters' fingerprint, never by paths or training records."""
    from types import SimpleNamespace

    from diffmas_eval.reporting.tables import _settings

    trained = {"method": "neuromas", "graph": "2x2", "adapters_fingerprint": "743123fe04d12b5e", "max_new_tokens": 24}
    run = SimpleNamespace(identity=trained, seed=1234, date=0.0)
    assert _settings(run, with_seed=False, with_date=False) == ["graph=2x2", "adapters=743123fe", "max_new=24"]


def test_a_limit_that_covers_the_whole_task_is_not_marked_as_a_subset():
    from types import SimpleNamespace

    from diffmas_eval.reporting.tables import _limited

    limited_run, full_run = SimpleNamespace(limit=164), SimpleNamespace(limit=None)
    assert not _limited(limited_run, SimpleNamespace(n=164, n_original=164))  # HumanEval+ with --limit 164
    assert _limited(limited_run, SimpleNamespace(n=100, n_original=164))
    assert _limited(limited_run, SimpleNamespace(n=100, n_original=None))  # size unknown: trust the --limit
    assert not _limited(full_run, SimpleNamespace(n=100, n_original=None))


def test_an_adapter_trained_with_a_frozen_trace_is_named_in_the_row_label(tmp_path):
    """The frozen-trace ablation and the coupled DiffMAS adapter differ only in weights: the label tells them apart."""
    from types import SimpleNamespace

    from diffmas_eval.reporting.load import WarningLog, _identity
    from diffmas_eval.reporting.tables import _settings

    def label(frozen: bool) -> list[str]:
        config = {
            "diffmas": {
                "method": "diffmas",
                "backbone": "qwen2.5-coder-0.5b-instruct",
                "latent_steps": 0,
                "realign": False,
                "adapter": "runs/qwen/x",
                "adapter_fingerprint": "2f1ffb307e1398cc",
                "adapter_training": {"method": "diffmas", "latent_steps": 0, "frozen_trace": frozen},
            }
        }
        _, identity, seed = _identity(config, tmp_path / "results.json", WarningLog())
        return _settings(SimpleNamespace(identity=identity, seed=seed, date=0.0), with_seed=False, with_date=False)

    assert label(True) == ["m=0", "no-realign", "adapter=2f1ffb30", "trained with a frozen trace"]
    assert label(False) == ["m=0", "no-realign", "adapter=2f1ffb30"]


def test_a_trained_adapter_row_is_paired_with_the_lora_single_agent_control(tmp_path):
    """DiffMAS's fair baseline is the LoRA single agent trained on the same data: the paired table includes it."""
    source = GOOD / "single-agent"  # a DiffMAS run evaluated with an adapter
    shutil.copytree(source, tmp_path / "diffmas")
    shutil.copytree(source, tmp_path / "lora")
    results = next((tmp_path / "lora").glob("results_*.json"))
    data = json.loads(results.read_text())
    ident = data["config"]["diffmas"]
    for key in ("topology", "latent_steps", "realign", "communication", "max_new_tokens"):
        ident.pop(key)
    ident.update(method="single-agent", adapter="/ckpt/single-agent-lora")
    results.write_text(json.dumps(data))

    paired = build_report([tmp_path]).tables["paired"]
    versus_lora = paired[paired["vs_method"] == "single-agent-lora"]
    assert sorted(versus_lora["task"]) == ["mas_arc_easy", "mas_gsm8k"]
    assert set(versus_lora["method"]) == {"diffmas"} and set(versus_lora["difference (pp)"]) == {"+0.0"}
    assert "single-agent-lora" in versus_lora["versus"].iloc[0]
    # a retrained control (other weights): the row is compared with each, not only with the first one found
    shutil.copytree(tmp_path / "lora", tmp_path / "lora-retrained")
    results = next((tmp_path / "lora-retrained").glob("results_*.json"))
    data = json.loads(results.read_text())
    data["config"]["diffmas"].update(adapter="/ckpt/single-agent-lora-2", adapter_fingerprint="0123456789abcdef")
    results.write_text(json.dumps(data))
    # and the same control at another seed is not a third control: each control adapter's best-matching row only
    shutil.copytree(tmp_path / "lora-retrained", tmp_path / "lora-retrained-seed")
    results = next((tmp_path / "lora-retrained-seed").glob("results_*.json"))
    data = json.loads(results.read_text())
    data["config"]["diffmas"]["seed"] = 99
    results.write_text(json.dumps(data))
    versus_both = build_report([tmp_path]).tables["paired"].query("vs_method == 'single-agent-lora'")
    assert len(versus_both) == 4 and versus_both["versus"].nunique() == 2
    assert not versus_both["versus"].str.contains("seed=99").any()
    shutil.rmtree(tmp_path / "lora-retrained-seed")
    shutil.rmtree(tmp_path / "lora-retrained")
    shutil.rmtree(tmp_path / "lora")
    alone = build_report([tmp_path]).tables["paired"]
    assert (alone["vs_method"] != "single-agent-lora").all()
