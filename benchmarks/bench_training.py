"""Training throughput (tokens/s, forward + backward) and peak memory of the DiffMAS loss for m in {0, 8, 32}.

Each setting runs in a fresh subprocess so that peak memory (max RSS on CPU, `max_memory_allocated` on CUDA) belongs
to that setting alone; the printed table also gives each setting's tokens/s relative to m = 0 measured in the same run.

Overheads, each measured interleaved with its reference in the same process (medians of `--steps` repeats):
- m = 0: a DiffMAS step against a plain peft forward + backward over the same token sequences (the agents' prompts,
  the judger's prompt and the target concatenated, `labels` on the target), i.e. what the trace costs over
  ordinary fine-tuning (target: at most 1.1x);
- m > 0: the unroll's cost per latent step, `(step(m) - step(m=0 unrolled)) / (upstream agents x m)`, against one
  inference decode step of the same batch over a cache of the same length.

    python benchmarks/bench_training.py                      # tiny in-code model
    python benchmarks/bench_training.py --pretrained smollm2-135m-instruct --dtype bfloat16 --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
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


def _timed(run) -> float:
    began = time.perf_counter()
    run()
    return time.perf_counter() - began


def _references(backbone, method, examples, args) -> dict:
    """The computations a DiffMAS step is compared with (see the module docstring), warmed up."""
    import torch

    from diffmas_eval.core.trace import left_pad
    from diffmas_eval.training.unroll import TraceLoss

    if args.m == 0:
        sequences = [[t for part in ex.upstream for t in part] + list(ex.final_prompt + ex.target) for ex in examples]
        ids, mask = left_pad(sequences, backbone.pad_token_id, backbone.device)
        labels = torch.full_like(ids, -100)
        for row, ex in enumerate(examples):
            labels[row, -len(ex.target) :] = ids[row, -len(ex.target) :]
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)

        def plain_peft():
            backbone.model(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels).loss.backward()

        references = {"plain_peft": plain_peft}
    else:
        unrolled = TraceLoss(backbone, method, latent_steps=0, per_role=False, frozen_trace=False, recompute=False)
        unrolled.single_sequence = False  # the m = 0 trace built agent by agent, as the unroll does
        saved_steps = method.latent_steps

        def unroll_m0():
            method.latent_steps = 0
            try:
                unrolled(examples).sum().backward()
            finally:
                method.latent_steps = saved_steps

        length = max(ex.total_length(args.m) for ex in examples)
        feed = torch.zeros((len(examples), 1), dtype=torch.long, device=backbone.device)

        def decode_step():
            from transformers import DynamicCache

            layer_shape = (len(examples), backbone.causal_lm.config.num_key_value_heads, length, _head_dim(backbone))
            cache = DynamicCache(config=backbone.causal_lm.config)
            zeros = torch.zeros(layer_shape, dtype=backbone.dtype, device=backbone.device)
            for index in range(backbone.causal_lm.config.num_hidden_layers):
                cache.update(zeros, zeros, index)
            mask = torch.ones((len(examples), length + 1), dtype=torch.long, device=backbone.device)
            with torch.no_grad():
                backbone.model(
                    input_ids=feed, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1
                )

        references = {"unroll_m0": unroll_m0, "decode_step": decode_step}
    for run in references.values():
        run()
    return references


def _head_dim(backbone) -> int:
    config = backbone.causal_lm.config
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def run_one(args: argparse.Namespace) -> dict:
    import torch

    from diffmas_eval.core.backbone import load_backbone
    from diffmas_eval.training.config import build_config
    from diffmas_eval.training.data import TrainItem
    from diffmas_eval.training.lora import attach_lora
    from diffmas_eval.training.trace_nll import build_method
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
    references = _references(backbone, method, examples, args)
    times: dict[str, list[float]] = {"trace": [], **{name: [] for name in references}}
    for _ in range(args.steps):  # interleaved: trace, reference(s), trace, ...
        times["trace"].append(_timed(lambda: loss(examples).sum().backward()))
        for name, run in references.items():
            times[name].append(_timed(run))
    seconds = sum(times["trace"])
    medians = {name: statistics.median(values) for name, values in times.items()}
    overhead = {}
    if "plain_peft" in medians:
        overhead["trace_over_plain_peft"] = medians["trace"] / medians["plain_peft"]
    if "unroll_m0" in medians:
        per_latent = (medians["trace"] - medians["unroll_m0"]) / (len(method.upstream_roles) * args.m)
        overhead["latent_step_s"] = per_latent
        overhead["decode_step_s"] = medians["decode_step"]
        overhead["latent_step_over_decode_step"] = per_latent / medians["decode_step"]
    return {
        **overhead,
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
    for row in rows:
        if "trace_over_plain_peft" in row:
            ratio = row["trace_over_plain_peft"]
            print(f"m=0: DiffMAS step / plain peft forward+backward over the same tokens: {ratio:.3f}x")
        if "latent_step_over_decode_step" in row:
            print(
                f"m={row['m']}: one latent step in the training unroll costs {row['latent_step_s'] * 1e3:.1f} ms, "
                f"{row['latent_step_over_decode_step']:.2f}x an inference decode step "
                f"({row['decode_step_s'] * 1e3:.1f} ms)"
            )
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
