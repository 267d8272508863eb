"""Copy the Qwen leaderboard into the README: the leaderboard table of `results/qwen-cpu/report/report.md` and every
paired comparison of `report/paired.csv`, significant ones first, between the `<!-- qwen-table -->` markers.

    diffmas-report results/qwen-cpu --out results/qwen-cpu/report && python results/readme_table.py
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "results" / "qwen-cpu" / "report"
ALPHA = 0.05


def leaderboard() -> str:
    lines = (REPORT / "report.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| kind"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end])


def paired() -> str:
    table = pd.read_csv(REPORT / "paired.csv")
    if table.empty:
        return "No paired comparison yet."
    table["significant"] = table["p-value"].astype(float) < ALPHA
    table = table.sort_values(["significant", "task"], ascending=[False, True])
    rows = [
        f"Paired comparisons on the documents both rows scored (`report/paired.csv`; exact McNemar, bootstrap 95% CI); "
        f"**bold** = p < {ALPHA}:",
        "",
        "| row | settings | task | versus | ours % | theirs % | difference (pp) [95% CI] | p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for _, r in table.iterrows():
        mark = "**" if r["significant"] else ""
        settings = "" if pd.isna(r["settings"]) else r["settings"]
        adapter = re.search(r"adapter=([^,\s]+)", r["versus"])  # which LoRA control, when several were trained
        versus = f"{r['vs_method']} ({adapter.group(1)})" if adapter else r["vs_method"]
        rows.append(
            f"| {r['kind']} {r['method']} | {settings} | {r['task']} | {versus} | {r['ours']} | "
            f"{r['reference']} | {mark}{r['difference (pp)']} {r['95% CI (pp)']}{mark} | {mark}{r['p-value']}{mark} |"
        )
    return "\n".join(rows)


def main() -> None:
    readme = ROOT / "README.md"
    block = f"{leaderboard()}\n\n{paired()}"
    text, count = re.subn(
        r"(<!-- qwen-table -->\n).*?(\n<!-- /qwen-table -->)",
        lambda m: m.group(1) + block + m.group(2),
        readme.read_text(),
        flags=re.S,
    )
    if count != 1:
        raise SystemExit("README.md needs exactly one <!-- qwen-table --> ... <!-- /qwen-table --> block")
    readme.write_text(text)
    print(f"README.md: Qwen leaderboard block updated from {REPORT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
