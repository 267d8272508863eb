"""Target 6: cost at pre-declared equal budgets on GSM8K: LatentMAS (m in 0/10/20/40) vs TextMAS vs single agent.

Budgets (declared before running, the same for every configuration): the final agent (judger / single agent) decodes
greedily with `max_gen_toks` 256 and no stop strings; TextMAS's upstream agents have `max_new_tokens` 256 each;
batch size 8; the default prompt set; realignment off (LatentMAS default).

Configurations run chunk by chunk (8 problems), every configuration on a chunk before the next chunk, in a rotating
order, so load on the shared machine spreads over all of them. Each (configuration, chunk) is appended to
`<out>/cost_<dtype>.jsonl` as soon as it finishes; rerunning the same command resumes where it stopped.
Wall time per problem = wall time of the batched `generate_until` call / problems in it. Generated tokens per
problem = text tokens written by all agents (upstream + final), from the backend's side-car; latent steps are
counted separately (they are forwards, not tokens).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import _common as c

CONFIGS = {
    "single-agent": ("single-agent", {}),
    "text-mas": ("text-mas", {}),
    "latent-mas m=0": ("latent-mas", {"latent_steps": 0}),
    "latent-mas m=10": ("latent-mas", {"latent_steps": 10}),
    "latent-mas m=20": ("latent-mas", {"latent_steps": 20}),
    "latent-mas m=40": ("latent-mas", {"latent_steps": 40}),
}


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--final-budget", type=int, default=256, help="max_gen_toks of the final agent")
    p.add_argument("--upstream-budget", type=int, default=256, help="max_new_tokens of TextMAS upstream agents")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), help=f"subset of {list(CONFIGS)}")
    p.add_argument("--summarize-only", action="store_true", help="write the summary of the chunks already logged")
    p.set_defaults(n=32)
    args = p.parse_args()
    unknown = set(args.configs) - set(CONFIGS)
    if unknown:
        raise SystemExit(f"unknown configs {sorted(unknown)}; choose from {list(CONFIGS)}")
    c.setup(args)
    from diffmas_eval.benchmarks.extract import extract_boxed_number
    from diffmas_eval.benchmarks.scoring import numbers_match

    rows = c.gsm8k_rows(args.n)
    requests = c.generate_requests([r["question"] for r in rows], args.final_budget)
    log = args.out / f"cost_{args.dtype}.jsonl"
    args.out.mkdir(parents=True, exist_ok=True)
    budgets = {"final": args.final_budget, "upstream": args.upstream_budget, "batch": args.batch_size, "n": args.n}
    done = {}
    if log.exists():
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            if rec["budgets"] == budgets:
                done[(rec["config"], rec["chunk"])] = rec
    sidecars = args.out / f".cost_sidecars_{args.dtype}"
    sidecars.mkdir(exist_ok=True)
    backends = {}
    chunks = [list(range(s, min(s + args.batch_size, args.n))) for s in range(0, args.n, args.batch_size)]
    for k, chunk in enumerate([] if args.summarize_only else chunks):
        order = args.configs[k % len(args.configs) :] + args.configs[: k % len(args.configs)]
        for name in order:
            if (name, k) in done:
                continue
            if name not in backends:
                method, kwargs = CONFIGS[name]
                sidecar = sidecars / f"{name.replace(' ', '_').replace('=', '')}.jsonl"
                backends[name] = c.make_backend(
                    method, args, sidecar, batch_size=args.batch_size, max_new_tokens=args.upstream_budget, **kwargs
                )
            lm = backends[name]
            before = lm.sidecar_path.read_text().count("\n") if lm.sidecar_path.exists() else 0
            c.forget_finished(lm)
            began = time.perf_counter()
            replies = lm.generate_until([requests[i] for i in chunk], disable_tqdm=True)
            wall = time.perf_counter() - began
            lines = [json.loads(x) for x in lm.sidecar_path.read_text().splitlines()[before:]]
            by_doc = {line["doc_id"]: line for line in lines}
            problems = []
            for i, reply in zip(chunk, replies, strict=True):
                side = by_doc[i]
                upstream = sum(a["generated_tokens"] for a in side["agents"])
                problems.append(
                    {
                        "doc_id": i,
                        "generated_tokens": upstream + side["final"]["generated_tokens"],
                        "final_tokens": side["final"]["generated_tokens"],
                        "latent_steps": sum(a["latent_steps"] for a in side["agents"]),
                        "final_stopped": side["final"]["stopped_before_budget"],
                        "correct": int(numbers_match(extract_boxed_number(reply), rows[i]["answer"].split("####")[-1])),
                    }
                )
            rec = {"config": name, "chunk": k, "budgets": budgets, "wall_seconds": wall, "problems": problems}
            with log.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(rec) + "\n")
            done[(name, k)] = rec
            print(f"chunk {k} {name}: {wall:.1f}s, tokens {sum(x['generated_tokens'] for x in problems)}", flush=True)
    summarize(args, done, chunks, budgets, log)


def summarize(args, done: dict, chunks: list[list[int]], budgets: dict, log: Path) -> None:
    """Per configuration: wall time and generated tokens per problem, and their ratios to TextMAS and single agent."""
    stats = {}
    for name in args.configs:
        recs = [done[(name, k)] for k in range(len(chunks)) if (name, k) in done]
        problems = [p for r in recs for p in r["problems"]]
        if not problems:
            continue
        stats[name] = {
            "problems": len(problems),
            "wall_per_problem": sum(r["wall_seconds"] for r in recs) / len(problems),
            "tokens_per_problem": sum(p["generated_tokens"] for p in problems) / len(problems),
            "final_tokens_per_problem": sum(p["final_tokens"] for p in problems) / len(problems),
            "latent_steps_per_problem": sum(p["latent_steps"] for p in problems) / len(problems),
            "final_stopped_rate": sum(p["final_stopped"] for p in problems) / len(problems),
            "accuracy": sum(p["correct"] for p in problems) / len(problems),
        }
    text = stats.get("text-mas")
    single = stats.get("single-agent")
    md = [
        f"Budgets: final agent {budgets['final']} tokens, TextMAS upstream {budgets['upstream']} tokens each, "
        f"batch {budgets['batch']}, greedy; {args.n} GSM8K test problems (first {args.n}). "
        f"Per-chunk log: `{log.name}`.",
        "",
        "| config | problems | wall s/problem | gen tokens/problem | final tokens | latent steps | final stopped | acc "
        "| TextMAS/this time | tokens vs TextMAS | this/single time |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in stats.items():
        speedup = text["wall_per_problem"] / s["wall_per_problem"] if text else float("nan")
        fewer = 1 - s["tokens_per_problem"] / text["tokens_per_problem"] if text else float("nan")
        vs_single = s["wall_per_problem"] / single["wall_per_problem"] if single else float("nan")
        s.update(speedup_vs_text_mas=speedup, token_reduction_vs_text_mas=fewer, time_ratio_vs_single=vs_single)
        md.append(
            f"| {name} | {s['problems']} | {s['wall_per_problem']:.2f} | {s['tokens_per_problem']:.1f} | "
            f"{s['final_tokens_per_problem']:.1f} | {s['latent_steps_per_problem']:.0f} | "
            f"{s['final_stopped_rate']:.2f} | {s['accuracy']:.3f} | "
            f"{speedup:.2f}x | {fewer * 100:+.1f}% fewer | {vs_single:.2f}x |"
        )
    complete = all(s["problems"] == args.n for s in stats.values()) and len(stats) == len(args.configs)
    md.append("")
    md.append("complete" if complete else "INCOMPLETE: rerun the same command to resume")
    c.write_result(args, "cost", {"budgets": budgets, "complete": complete, "stats": stats}, md)


if __name__ == "__main__":
    main()
