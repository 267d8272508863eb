"""Build the whole report from result directories and write it as Markdown, LaTeX, CSV, HTML and figures."""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from diffmas_eval.reporting.baselines import BASELINE_COLUMNS, load_baselines
from diffmas_eval.reporting.load import WarningLog, load_runs
from diffmas_eval.reporting.plots import plot_accuracy_vs_cost, plot_domain_bars
from diffmas_eval.reporting.tables import (
    LIMIT_MARK,
    build_rows,
    cost_frame,
    cost_table,
    leaderboard,
    paired_table,
    paper_other_backbones,
    paper_tables,
    scores_frame,
    seed_spread_table,
    stability_table,
)

SECTIONS = (
    (
        "leaderboard",
        "Leaderboard",
        f"Accuracy in % ± stderr (n documents); code tasks show pass_plus, with pass_base in the `(base)` column. "
        f"Domain and overall averages are unweighted means over the generative tasks a row has (`k/K tasks`), "
        f"`_mc` (loglikelihood) variants are shown but not averaged. {LIMIT_MARK} = a `--limit`-ed subset.",
    ),
    (
        "cost",
        "Cost",
        "Per problem. Ratios are to the single agent on the same backbone and task (same settings "
        "preferred). Side-car = per task; config totals = the whole results file.",
    ),
    (
        "stability",
        "Decoding stability",
        "Share of final-agent generations that stopped before the token budget, "
        "and share with an extractable answer (the tasks' `extracted` metric).",
    ),
    ("seed_spread", "Spread across seeds", "Configurations run with two or more seeds (accuracy %)."),
    (
        "paired",
        "Paired comparisons",
        "On the documents both runs scored (matched by doc_id and doc_hash). "
        "Binary scores: exact McNemar test; other scores: paired permutation test. 95% CI: paired percentile "
        "bootstrap (10,000 resamples, fixed seed).",
    ),
    (
        "paper",
        "Ours beside the papers",
        "Same method, backbone, topology and task. ≈ = approximate (secondary "
        "source); paper topology `unspecified` means the source does not say.",
    ),
    (
        "paper_other",
        "The papers' numbers on other backbones",
        "Same method, task and metric as a row of ours, on a backbone we did not run (marked in its own column): "
        "how far our backbone is from the published ones, not a like-for-like comparison.",
    ),
    (
        "paper_only",
        "Paper numbers without a matching run of ours",
        "Published numbers (baselines/) for backbones or settings we have not run: not comparable rows, shown apart.",
    ),
)


@dataclass
class Report:
    """Every table of a report (display frames), the tidy numbers behind them, warnings and written files."""

    tables: dict[str, pd.DataFrame]
    tidy: dict[str, pd.DataFrame]
    warnings: list[str]
    files: list[Path] = field(default_factory=list)


def build_report(result_dirs: Iterable[Path | str], *, all_runs: bool = False, baselines: Path | None = None) -> Report:
    """Read results below `result_dirs` and compute every table (nothing is written)."""
    log = WarningLog()
    runs = load_runs(result_dirs, log)
    rows = build_rows(runs, all_runs=all_runs, log=log)
    paper = pd.DataFrame(columns=[*BASELINE_COLUMNS, "file"]) if baselines is None else load_baselines(baselines)
    scores = scores_frame(rows)
    cost = cost_frame(rows, log)
    other, other_shown = paper_other_backbones(rows, paper)
    side, only = paper_tables(rows, cost, paper, shown_elsewhere=other_shown)
    tables = {
        "leaderboard": leaderboard(rows),
        "cost": cost_table(cost),
        "stability": stability_table(rows, cost),
        "seed_spread": seed_spread_table(rows),
        "paired": paired_table(rows, log),
        "paper": side,
        "paper_other": other,
        "paper_only": only,
    }
    return Report(tables=tables, tidy={"scores": scores, "cost_numbers": cost}, warnings=log.messages)


def _flat(frame: pd.DataFrame) -> pd.DataFrame:
    """MultiIndex (domain, column) headers -> their last level, for Markdown and CSV."""
    if isinstance(frame.columns, pd.MultiIndex):
        frame = frame.copy()
        frame.columns = [col[-1] for col in frame.columns]
    return frame


def to_markdown(report: Report) -> str:
    """All sections as GitHub Markdown."""
    parts = ["# diffmas-eval report", ""]
    for key, title, caption in SECTIONS:
        frame = report.tables[key]
        parts += [f"## {title}", "", caption, ""]
        parts += [_flat(frame).to_markdown(index=False) if not frame.empty else "_none_", ""]
    parts += ["## Warnings", ""]
    parts += [f"- {w}" for w in report.warnings] or ["_none_"]
    return "\n".join(parts) + "\n"


_LATEX_REPLACEMENTS = {"±": r"$\pm$", LIMIT_MARK: r"$^\dagger$", "≈": r"$\approx$", "–": "--"}


def to_latex(report: Report) -> str:
    """A compilable LaTeX document (booktabs, graphicx) with one table per section."""
    body = []
    for key, title, caption in SECTIONS:
        frame = report.tables[key]
        body.append(f"\\section*{{{_latex_escape(title)}}}\n{_latex_escape(caption)}\n")
        if frame.empty:
            body.append("\\emph{none}\n")
            continue
        tex = frame.to_latex(index=False, escape=True, multicolumn=True, multicolumn_format="c")
        for char, repl in _LATEX_REPLACEMENTS.items():
            tex = tex.replace(char, repl)
        body.append(f"\\begin{{table}}[h]\\centering\\resizebox{{\\textwidth}}{{!}}{{%\n{tex}}}\\end{{table}}\n")
    return (
        "\\documentclass{article}\n\\usepackage[T1]{fontenc}\n\\usepackage[utf8]{inputenc}\n"
        "\\usepackage{booktabs}\n\\usepackage{graphicx}\n\\usepackage[margin=1.5cm,landscape]{geometry}\n"
        "\\begin{document}\n" + "\n".join(body) + "\\end{document}\n"
    )


def _latex_escape(text: str) -> str:
    for char, repl in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"), ("`", "")):
        text = text.replace(char, repl)
    for char, repl in _LATEX_REPLACEMENTS.items():
        text = text.replace(char, repl)
    return text


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; white-space: nowrap; }
th { background: #f2f2f2; }
img { max-width: 100%; border: 1px solid #ddd; }
.warnings li { color: #8a4b00; }
"""


def to_html(report: Report, figures: list[Path]) -> str:
    """A self-contained HTML page: inline CSS, tables, PNG figures embedded as data URIs, warnings."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        "<title>diffmas-eval report</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        "<h1>diffmas-eval report</h1>",
    ]
    for key, title, caption in SECTIONS:
        frame = report.tables[key]
        parts += [f'<h2 id="{key}">{html.escape(title)}</h2>', f"<p>{html.escape(caption)}</p>"]
        parts.append(
            frame.to_html(index=False, escape=True, border=0, na_rep="–") if not frame.empty else "<p><em>none</em></p>"
        )
    parts.append('<h2 id="figures">Figures</h2>')
    for path in figures:
        if path.suffix == ".png":
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            parts.append(
                f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(path.stem)}</figcaption></figure>"
            )
    parts.append('<h2 id="warnings">Warnings</h2>')
    if report.warnings:
        parts.append('<ul class="warnings">' + "".join(f"<li>{html.escape(w)}</li>" for w in report.warnings) + "</ul>")
    else:
        parts.append("<p><em>none</em></p>")
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"


def write_report(report: Report, out: Path) -> list[Path]:
    """Write report.md, report.tex, report.html, one CSV per table (plus tidy CSVs) and the figures into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    for key, frame in {**report.tables, **report.tidy}.items():
        path = out / f"{key}.csv"
        _flat(frame).to_csv(path, index=False)
        files.append(path)
    figures = plot_domain_bars(report.tidy["scores"], out)
    figures += plot_accuracy_vs_cost(report.tidy["scores"], report.tidy["cost_numbers"], out)
    for name, text in (
        ("report.md", to_markdown(report)),
        ("report.tex", to_latex(report)),
        ("report.html", to_html(report, figures)),
    ):
        path = out / name
        path.write_text(text, encoding="utf-8")
        files.append(path)
    report.files = files + figures
    return report.files
