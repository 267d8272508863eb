"""Training throughput (tokens/s, forward + backward) and peak memory of the DiffMAS loss for m in {0, 8, 32}.

Each setting runs in a fresh subprocess so that peak memory (max RSS on CPU, `max_memory_allocated` on CUDA) belongs
to that setting alone; the printed table also gives each setting's tokens/s relative to m = 0 measured in the same run.

    python benchmarks/bench_training.py                      # tiny in-code model
    python benchmarks/bench_training.py --pretrained smollm2-135m-instruct --dtype bfloat16 --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

QUESTION = (
    "Which factor will most likely cause a person to develop a fever?\nA. a leg muscle relaxing after exercise\n"
    "B. a bacterial population in the bloodstream\nC. several viral particles on the skin\nD. carbohydrates being "
    "digested in the stomach"
)


def _peak_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_one(args: argparse.Namespace) -> dict:
    import torch

    from diffmas_eval.core.backbone import load_backbone
    from diffmas_eval.training.config import build_config
    from diffmas_eval.training.data import TrainItem
    from diffmas_eval.training.lora import attach_lora
    from diffmas_eval.training.trainer import build_method
    from diffmas_eval.training.unroll import TraceLoss, encode_items

    pretrained = args.pretrained
    if pretrained == "tiny":
        from diffmas_eval.testing import build_tiny_model

        pretrained = str(build_tiny_model(tempfile.mkdtemp()))
    backbone = load_backbone(pretrained, dtype=args.dtype, device=args.device)
    config = build_config(
        {"output_dir": "unused", "latent_steps": args.m, "recompute": args.recompute, "frozen_trace": args.frozen}
    )
    method = build_method(backbone, config)
    items = [TrainItem(str(i), QUESTION, "B", "letter", "bench") for i in range(args.batch_size)]
    examples = encode_items(backbone, method, items, append_eos=True)
    torch.manual_seed(0)
    attach_lora(
        backbone,
        [*method.upstream_roles, "judger"],
        per_role=False,
        r=8,
        alpha=16,
        dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    )
    loss = TraceLoss(
        backbone, method, latent_steps=args.m, per_role=False, frozen_trace=args.frozen, recompute=args.recompute
    )
    if backbone.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(backbone.device)
    baseline = _peak_bytes(backbone.device)
    loss(examples).sum().backward()  # warm-up
    tokens = sum(ex.total_length(args.m) for ex in examples) * args.steps
    began = time.perf_counter()
    for _ in range(args.steps):
        loss(examples).sum().backward()
    seconds = time.perf_counter() - began
    return {
        "m": args.m,
        "formulation": loss.formulation,
        "recompute": args.recompute,
        "frozen_trace": args.frozen,
        "batch_size": args.batch_size,
        "tokens_per_step": tokens // args.steps,
        "tokens_per_s": tokens / seconds,
        "seconds_per_step": seconds / args.steps,
        "peak_mib": _peak_bytes(backbone.device) / 2**20,
        "peak_over_loaded_mib": (_peak_bytes(backbone.device) - baseline) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", default="tiny", help="`tiny` (in-code test model) or any backbone name/dir")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--latent_steps", default="0,8,32", help="comma-separated m values")
    parser.add_argument("--recompute", action="store_true")
    parser.add_argument("--frozen", action="store_true")
    parser.add_argument("--m", type=int, help=argparse.SUPPRESS)  # internal: run one setting in this process
    args = parser.parse_args()
    if args.m is not None:
        print(json.dumps(run_one(args)))
        return
    rows = []
    for m in [int(v) for v in args.latent_steps.split(",")]:
        child = [a for a in sys.argv[1:]] + ["--m", str(m)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        done = subprocess.run([sys.executable, __file__, *child], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"m={m} failed:\n{done.stderr[-2000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = rows[0]["tokens_per_s"]
    print(
        f"backbone={args.pretrained} dtype={args.dtype} batch={args.batch_size} recompute={args.recompute} "
        f"frozen_trace={args.frozen} threads={os.environ.get('OMP_NUM_THREADS', 'default')}"
    )
    print(
        f"{'m':>3} {'formulation':>16} {'tok/step':>8} {'tok/s':>9} {'vs m0':>6} {'s/step':>7} {'peak MiB':>9} "
        f"{'+MiB':>8}"
    )
    for row in rows:
        print(
            f"{row['m']:>3} {row['formulation']:>16} {row['tokens_per_step']:>8} {row['tokens_per_s']:>9.1f} "
            f"{row['tokens_per_s'] / base:>6.2f} {row['seconds_per_step']:>7.2f} {row['peak_mib']:>9.0f} "
            f"{row['peak_over_loaded_mib']:>8.0f}"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
