"""`fast_cpu_kernels` on or off: LatentMAS on GSM8K per dtype and batch size, fresh backends, interleaved repeats.

Issue 16 reported the packed-weight kernels (`fast_cpu_kernels=True`, the default) slower and unstable on
Qwen2.5-Coder-0.5B (fp32, batch 1: 100.8 s and 51.2 s against 72.7 s and 73.2 s for the stock kernels). This measures
both settings for every (dtype, batch) given: each repeat builds a fresh backend per setting (two copies of a 1.5B
model plus packed weights would not fit beside each other), times one LatentMAS evaluation of `--n` GSM8K problems
(greedy, `--budget` tokens for the judger; model loading is not timed), and alternates the order of the settings
every repeat. It reports the median and the spread of the seconds, the ratio stock / fast, and whether the two
settings generated the same text.

    DIFFMAS_DATA_DIR=../shared/data python benchmarks/bench_cpu_kernels.py --pretrained qwen2.5-coder-0.5b-instruct \
        --dtypes float32 bfloat16 --batches 1 8 --n 8 --repeats 2 --threads 2
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import _common as c

SETTINGS = {"fast": True, "stock": False}


def _time_once(args, dtype: str, batch: int, fast: bool, requests, sidecar: Path) -> tuple[float, list[str]]:
    """Seconds of one LatentMAS evaluation on a backend built for this call, and the generated texts."""
    args.dtype = dtype
    lm = c.make_backend(
        "latent-mas", args, sidecar, batch_size=batch, latent_steps=args.latent_steps, fast_cpu_kernels=fast
    )
    began = time.perf_counter()
    texts = lm.generate_until(requests, disable_tqdm=True)
    seconds = time.perf_counter() - began
    del lm
    return seconds, texts


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=("float32", "bfloat16"))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--budget", type=int, default=128, help="judger's max_gen_toks")
    p.add_argument("--latent-steps", type=int, default=10, help="LatentMAS m")
    p.set_defaults(repeats=2, n=8)
    args = p.parse_args()
    c.setup(args)
    requests = c.generate_requests(c.gsm8k_questions(args.n), args.budget)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes:
            for batch in args.batches:
                seconds: dict[str, list[float]] = {name: [] for name in SETTINGS}
                texts: dict[str, list[str]] = {}
                for r in range(args.repeats):
                    for name in SETTINGS if r % 2 == 0 else reversed(SETTINGS):
                        sidecar = Path(tmp) / f"{dtype}_{batch}_{name}_{r}.jsonl"  # fresh: nothing reused
                        took, texts[name] = _time_once(args, dtype, batch, SETTINGS[name], requests, sidecar)
                        seconds[name].append(took)
                        print(f"{dtype} batch {batch} {name} repeat {r + 1}: {took:.1f} s", flush=True)
                fast, stock = c.median(seconds["fast"]), c.median(seconds["stock"])
                rows.append(
                    {
                        "dtype": dtype,
                        "batch": batch,
                        "fast_seconds": seconds["fast"],
                        "stock_seconds": seconds["stock"],
                        "stock_over_fast": stock / fast,
                        "same_text": sum(a == b for a, b in zip(texts["fast"], texts["stock"], strict=True)),
                    }
                )
    args.dtype = "+".join(args.dtypes)
    markdown = [
        f"backbone {args.pretrained or 'default'}, LatentMAS m = {args.latent_steps}, {args.n} GSM8K problems, judger "
        f"budget {args.budget}, {args.threads} thread(s), {args.repeats} interleaved repeats with fresh backends; "
        "ratio > 1: the packed kernels (`fast_cpu_kernels=True`) are faster",
        "",
        "| dtype | batch | fast s (each repeat) | stock s (each repeat) | stock / fast (medians) | same text |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        markdown.append(
            f"| {r['dtype']} | {r['batch']} | {', '.join(f'{s:.1f}' for s in r['fast_seconds'])} | "
            f"{', '.join(f'{s:.1f}' for s in r['stock_seconds'])} | {r['stock_over_fast']:.2f}x | "
            f"{r['same_text']}/{args.n} |"
        )
    name = f"cpu_kernels_{(args.pretrained or 'default').replace('/', '_')}_{args.threads}threads"
    c.write_result(args, name, {"rows": rows}, markdown)


if __name__ == "__main__":
    main()
