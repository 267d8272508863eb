"""NeuroMAS: a layer as one mixed-adapter decode (every row under its node's LoRA, peft `adapter_names=`) against
node-by-node decoding (one decode per node under its adapter), on the same questions and adapters.

Times the hidden layers of `--n` arithmetic problems (`Method.prepare`, greedy, the nodes' budget), interleaved,
and prints the ratio and whether every node's message is identical in both modes (fp32: it must be).

    DIFFMAS_DATA_DIR=... python benchmarks/bench_neuromas.py --adapters runs/neuromas/2x2 --n 16
"""

from __future__ import annotations

import _common as c
import torch


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--adapters", required=True, help="a NeuroMAS artefact (diffmas-train --method neuromas)")
    p.add_argument("--budget", type=int, default=24, help="each node's token budget")
    p.set_defaults(out=c.REPO / "results" / "neuromas")
    args = p.parse_args()
    c.setup(args)
    from diffmas_eval.benchmarks.arithmetic import arithmetic_rows
    from diffmas_eval.core.backbone import load_backbone
    from diffmas_eval.core.decode import DecodingConfig
    from diffmas_eval.methods.base import Question
    from diffmas_eval.methods.neuromas import NeuroMAS

    backbone = load_backbone(args.pretrained, dtype=args.dtype, device="cpu")
    method = NeuroMAS(backbone, adapters=args.adapters, max_new_tokens=args.budget)
    questions = [Question(r["problem"], "boxed_number") for r in arithmetic_rows("test")[: args.n]]
    decoding = DecodingConfig(max_new_tokens=args.budget)

    def run(mode: str):
        def call():
            method.config.batching = mode
            with torch.inference_mode():
                return [[a.text for a in row] for row in method.prepare(questions, decoding).agents]

        return call

    times, outputs = c.interleaved({"mixed": run("mixed"), "per_node": run("per_node")}, args.repeats)
    mixed, per_node = c.median(times["mixed"]), c.median(times["per_node"])
    result = {
        "graph": method.graph.spec,
        "questions": args.n,
        "node_budget": args.budget,
        "seconds": times,
        "per_node_over_mixed": round(per_node / mixed, 3),
        "identical_messages": outputs["mixed"] == outputs["per_node"],
        "machine": c.machine_info(args),
        "git": c.git_revision(),
    }
    lines = [
        f"NeuroMAS {method.graph.spec}, {args.n} mas_arithmetic test problems in one batch, "
        f"nodes' budget {args.budget}, greedy, median of {args.repeats} interleaved repeats.",
        "",
        "| hidden layers decoded | seconds | node-by-node / mixed | identical messages |",
        "|---|---|---|---|",
        f"| one mixed-adapter decode per layer | {mixed:.2f} | {per_node / mixed:.3f}x "
        f"| {result['identical_messages']} |",
        f"| one decode per node | {per_node:.2f} | | |",
    ]
    c.write_result(
        args, "mixed_adapter_layers", {k: v for k, v in result.items() if k not in ("machine", "git")}, lines
    )


if __name__ == "__main__":
    main()
