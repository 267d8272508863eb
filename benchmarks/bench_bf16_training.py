"""LoRA training steps in bf16 on CPU: the packed-linear route (`fast_cpu_kernels=True`) against the stock kernels,
and against the same step in float32.

On a CPU without bf16 kernels (AVX2 only), frozen bf16 weights train through a float32 copy
(`PackedCPULinear._widened_forward`); the stock path multiplies in bf16. On an AVX-512 machine both bf16 variants
take the stock path, so their ratio is about 1. Each variant is a fresh backbone with a LoRA adapter (r = 8 on
q/k/v/o, as `configs/train/qwen_*.yaml`); a step is the forward and backward of the language-model loss on `--batch`
rows of `--tokens` random token ids; steps are interleaved and repeated, and the report gives median seconds and
ratios, and the largest difference between the two bf16 variants' losses.

    python benchmarks/bench_bf16_training.py --pretrained qwen2.5-coder-0.5b-instruct --repeats 3
"""

from __future__ import annotations

import _common as c
import torch

VARIANTS = {  # name -> (dtype, fast_cpu_kernels)
    "bf16, packed route": ("bfloat16", True),
    "bf16, stock kernels": ("bfloat16", False),
    "float32": ("float32", True),
}


def _training_step(dtype: str, fast: bool, args):
    """A closure running one LoRA forward + backward on a fresh backbone built for this variant; returns the loss."""
    from peft import LoraConfig, get_peft_model

    from diffmas_eval.core.backbone import load_backbone

    backbone = load_backbone(args.pretrained, dtype=dtype, device="cpu", fast_cpu_kernels=fast)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(backbone.model, config)
    model.train()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 20_000, (args.batch, args.tokens), generator=generator)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return float(loss)

    return step


def main() -> None:
    p = c.parser(__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=256)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.pretrained = args.pretrained or "qwen2.5-coder-0.5b-instruct"
    args.dtype = "bfloat16+float32"
    steps = {name: _training_step(dtype, fast, args) for name, (dtype, fast) in VARIANTS.items()}
    for step in steps.values():  # warm-up: first-call allocations and the float32 copies
        step()
    times, losses = c.interleaved(steps, args.repeats)
    stock = c.median(times["bf16, stock kernels"])
    rows = [
        f"| {name} | {c.fmt(c.median(times[name]), 2)} | {' / '.join(c.fmt(t, 2) for t in times[name])} | "
        f"{c.fmt(stock / c.median(times[name]), 2)}x | {losses[name]:.4f} |"
        for name in VARIANTS
    ]
    markdown = [
        f"backbone {args.pretrained}, LoRA r = 8 on q/k/v/o, {args.batch} rows x {args.tokens} tokens, forward + "
        f"backward, {args.threads} thread(s), {args.repeats} interleaved repeats after one warm-up step each",
        "",
        "| variant | median s / step | each repeat | stock bf16 / this | loss |",
        "|---|---|---|---|---|",
        *rows,
    ]
    payload = {"times": times, "losses": losses, "batch": args.batch, "tokens": args.tokens}
    c.write_result(args, "bf16_training", payload, markdown)


if __name__ == "__main__":
    main()
