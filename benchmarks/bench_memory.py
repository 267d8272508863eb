"""Target 5: the trace holds <= 1.05x (real positions x per-token KV bytes); no per-agent or per-continuation copies.

Each variant (LatentMAS latent steps m, batch size, pool) runs in its own subprocess. The child builds the trace with
the method's `prepare` on one batch of GSM8K questions, taken as the backend would form it in an evaluation of the
first `pool` questions (sorted longest first by tokens, as the backends sort): the batch from the middle of that order.
Pool = batch puts whole unsorted questions side by side (the worst case for padding); a large pool gives the
similar-length batches of a real evaluation. The child then measures:
- trace bytes: the distinct storages reachable from `cache.layers[*].keys/values`, vs real positions x
  (2 x layers x kv_heads x head_dim x bytes per element) and vs all slots (batch x trace length, pads included);
- live tensor bytes: every tensor the garbage collector can see, minus those alive before `prepare` (model
  weights), so a per-agent copy kept alive anywhere would show up beside the trace;
- the same after scoring 4 continuations per row against the trace (`score_continuations` forks per round), so a
  per-continuation copy kept alive would show up;
- over every batch of the pool, trace slots / real positions computed from the prompts' token counts (the measured
  batch's ratio is this same arithmetic);
- the process's peak RSS (`resource.getrusage`) over its RSS after loading the model and one warm-up `prepare` and
  scoring (weights are memory-mapped: the first forward pages them in, and packs the CPU linears' weights; neither is
  the trace's cost).
"""

from __future__ import annotations

import gc
import json
import resource
import subprocess
import sys
from pathlib import Path

import _common as c
import torch


def _live_storages() -> dict[int, int]:
    """data_ptr -> nbytes of the storage of every tensor the garbage collector tracks."""
    out = {}
    for obj in gc.get_objects():
        # oneDNN-packed weights (`core/linear.py`) are opaque tensors without a storage; they are weights, not trace.
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_mkldnn:
            storage = obj.untyped_storage()
            out[storage.data_ptr()] = storage.nbytes()
    return out


def _current_rss() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def _trace_bytes(cache) -> tuple[int, int, bool]:
    """(distinct storage bytes, tensor numel bytes, every tensor owns exactly its storage) of a KV cache."""
    storages, numel_bytes, exact = {}, 0, True
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            numel_bytes += tensor.numel() * tensor.element_size()
            exact &= storage.nbytes() == tensor.numel() * tensor.element_size()
    return sum(storages.values()), numel_bytes, exact


def _evaluation_ratio(method, ordered: list[str], batch: int, m: int) -> float:
    """Trace slots over real positions summed over every batch of an evaluation of `ordered`, from token counts.

    Each upstream block pads to its longest row and latent steps add `m` real positions per row per agent; the
    measured middle batch equals this arithmetic (its `trace / real`), so it extends the measurement to all batches.
    """
    lengths = [[len(method.render(role, q)) for role in method.upstream_roles] for q in ordered]
    slots = real = 0
    for begin in range(0, len(ordered), batch):
        rows = lengths[begin : begin + batch]
        steps = m * len(method.upstream_roles)
        slots += len(rows) * (sum(max(col) for col in zip(*rows, strict=True)) + steps)
        real += sum(sum(row) + steps for row in rows)
    return slots / real


def child(args) -> dict:
    from diffmas_eval.core.backbone import load_backbone
    from diffmas_eval.core.decode import DecodingConfig
    from diffmas_eval.core.score import score_continuations
    from diffmas_eval.methods import LatentMAS, Question

    backbone = load_backbone(args.pretrained, dtype=args.dtype, device="cpu")
    config = backbone.causal_lm.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * backbone.dtype.itemsize
    method = LatentMAS(backbone, latent_steps=args.m)
    method.aligner  # noqa: B018  (solved before measuring)
    ordered = sorted(c.gsm8k_questions(args.pool), key=lambda q: len(backbone.encode(q)), reverse=True)
    first = (len(ordered) - args.batch) // 2
    texts = ordered[first : first + args.batch]
    evaluation_ratio = _evaluation_ratio(method, ordered, args.batch, args.m)
    questions = [Question(t, "boxed_number") for t in texts]
    letters = [backbone.encode(x) for x in "ABCD"]
    with torch.inference_mode():  # warm-up: also packs the CPU linears' weights (LM head included) before measuring
        warm = method.prepare([Question("Warm up.", "boxed_number")], DecodingConfig(max_new_tokens=1))
        score_continuations(backbone, warm.prompts, warm.trace, [letters])
        del warm
    gc.collect()
    rss_loaded = _current_rss()
    baseline = _live_storages()
    with torch.inference_mode():
        start = method.prepare(questions, DecodingConfig(max_new_tokens=1))
        trace = start.trace
        gc.collect()
        cache = trace.cache  # scoring consumes the trace handle; the cache it grows is measured afterwards
        trace_bytes, numel_bytes, exact = _trace_bytes(cache)
        real, length = int(trace.mask.sum()), trace.length
        live = _live_storages()
        new_live = sum(b for p, b in live.items() if p not in baseline)
        score_continuations(backbone, start.prompts, trace, [letters] * len(questions))
        gc.collect()
        after_bytes, _, _ = _trace_bytes(cache)
        # Scoring prefills the judger's prompts onto the same cache (the trace is consumed), then scores on forks.
        after_real = real + sum(len(prompt) for prompt in start.prompts)
        after_live = sum(b for p, b in _live_storages().items() if p not in baseline)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "m": args.m,
        "batch": args.batch,
        "pool": args.pool,
        "per_token_kv_bytes": per_token,
        "trace_length": length,
        "real_positions": real,
        "trace_bytes": trace_bytes,
        "trace_numel_bytes": numel_bytes,
        "storages_exact": exact,
        "ratio_to_real": trace_bytes / (real * per_token),
        "evaluation_ratio_all_batches": evaluation_ratio,
        "pad_fraction": 1 - real / (len(questions) * length),
        "live_new_bytes_after_prepare": new_live,
        "live_over_trace_after_prepare": new_live / trace_bytes,
        "after_scoring_trace_bytes": after_bytes,
        "after_scoring_ratio_to_real": after_bytes / (after_real * per_token),
        "live_new_bytes_after_scoring": after_live,
        "live_over_trace_after_scoring": after_live / after_bytes,
        "rss_after_load": rss_loaded,
        "peak_rss": peak,
        "peak_over_loaded_bytes": peak - rss_loaded,
    }


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, nargs="+", default=[0, 40], help="latent steps m per variant")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument(
        "--pools", type=int, nargs="+", default=[8, 256, 1319], help="evaluation sizes the batch is drawn from"
    )
    p.add_argument("--pool", type=int, default=8, help=argparse_hidden())
    p.add_argument("--child", action="store_true", help=argparse_hidden())
    p.add_argument("--m", type=int, default=0, help=argparse_hidden())
    p.add_argument("--batch", type=int, default=1, help=argparse_hidden())
    p.set_defaults(repeats=1)
    args = p.parse_args()
    c.setup(args)
    if args.child:
        print(json.dumps(child(args)))
        return
    variants, rows = [], []
    grid = [(m, b, pool) for m in args.steps for b in args.batches for pool in (args.pools if b > 1 else [b])]
    for m, batch, pool in grid:
        cmd = [sys.executable, __file__, "--child", "--m", str(m), "--batch", str(batch), "--dtype", args.dtype]
        cmd += ["--pool", str(max(pool, batch)), "--threads", str(args.threads)]
        if args.pretrained:
            cmd += ["--pretrained", args.pretrained]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        v = json.loads(done.stdout.strip().splitlines()[-1])
        variants.append(v)
        ok = all(
            v[k] <= 1.05 for k in ("ratio_to_real", "evaluation_ratio_all_batches", "live_over_trace_after_scoring")
        )
        rows.append(
            f"| {m} | {batch} | {v['pool']} | {v['pad_fraction']:.3f} | {v['real_positions']} | "
            f"{v['trace_bytes'] / 2**20:.2f} | "
            f"{v['ratio_to_real']:.3f} | {v['evaluation_ratio_all_batches']:.3f} | "
            f"{v['live_over_trace_after_prepare']:.3f} | "
            f"{v['after_scoring_ratio_to_real']:.3f} | {v['live_over_trace_after_scoring']:.3f} | "
            f"{v['peak_over_loaded_bytes'] / 2**20:.1f} | {'yes' if ok else 'NO'} |"
        )
        print(rows[-1], flush=True)
    md = [
        "LatentMAS sequential (3 upstream agents); each batch is the middle batch of the first `pool` GSM8K questions "
        f"sorted longest first by tokens; per-token KV bytes = {variants[0]['per_token_kv_bytes']}. Peak RSS includes "
        "allocator high-water marks and transient activations (not a measure of what the trace keeps).",
        "",
        "| m | batch | pool | pad fraction | real positions | trace MiB | trace / real | all batches of the pool: "
        "slots / real | live new / trace | after scoring: trace / real | live new / trace | peak RSS over loaded MiB "
        "| <= 1.05x |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    c.write_result(args, "memory", {"variants": variants}, md)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
