"""The training loop: data-parallel through accelerate, deterministic data order, atomic checkpoints, resume.

Data order is a pure function of (seed, step): step `s` takes global positions `[s*G, (s+1)*G)` of a seeded
permutation per epoch (`G` = per-device batch x processes x accumulation), process `r` its `r`-th slice. Resuming
therefore continues with exactly the batches an uninterrupted run would have seen, and N processes see the same
global batch as one process with an N times larger batch.

Gradients are summed across processes with one all-reduce per step (the loss of every micro-batch is already divided
by the step's global target-token count), which is what DDP would do; the forward is an unroll of several calls with
per-role adapter switching, which a DDP wrapper's single `forward` does not describe.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from diffmas_eval import __version__
from diffmas_eval.core.backbone import load_backbone
from diffmas_eval.methods import LatentMAS, Method, SingleAgent
from diffmas_eval.methods.diffmas import ADAPTER_CONFIG
from diffmas_eval.prompts import FINAL_ROLE, load_prompt_set
from diffmas_eval.training.checkpoint import checkpoint_dirs, load_checkpoint, save_checkpoint
from diffmas_eval.training.config import RESUME_FREE_FIELDS, TrainConfig
from diffmas_eval.training.data import DataReport, check_source_names, prepare_items
from diffmas_eval.training.lora import attach_lora
from diffmas_eval.training.unroll import EncodedExample, TraceLoss, encode_items

logger = logging.getLogger(__name__)
TRAIN_LOG = "train_log.jsonl"  # one line per optimizer step: step, loss (mean NLL per target token), grad norm, tok/s


def git_revision() -> str | None:
    """The source checkout's commit (with `-dirty` if it has local changes), or None outside a checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def build_method(backbone: Any, config: TrainConfig) -> Method:
    """The evaluation method whose prompts, roles and latent steps training reproduces."""
    prompts = load_prompt_set(config.prompts)
    common = {"system_prompt": config.system_prompt, "enable_thinking": config.enable_thinking}
    if config.method == "single-agent":
        return SingleAgent(backbone, prompts, **common)
    return LatentMAS(
        backbone, prompts, topology=config.topology, latent_steps=config.latent_steps, realign=config.realign, **common
    )


def build_loss(backbone: Any, method: Method, config: TrainConfig) -> TraceLoss:
    """The training loss for `method` with the config's m, adapter layout, trace coupling and recompute."""
    return TraceLoss(
        backbone,
        method,
        latent_steps=config.latent_steps,
        per_role=config.adapters == "per_role",
        frozen_trace=config.frozen_trace,
        recompute=config.recompute,
    )


class _Permutations:
    """Item indices of each optimizer step: a seeded permutation per epoch, epochs concatenated."""

    def __init__(self, n_items: int, seed: int) -> None:
        self.n_items, self.seed, self.cache = n_items, seed, {}

    def indices(self, step: int, global_batch: int) -> list[int]:
        out = []
        for position in range(step * global_batch, (step + 1) * global_batch):
            epoch, offset = divmod(position, self.n_items)
            if epoch not in self.cache:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self.cache = {epoch: torch.randperm(self.n_items, generator=generator).tolist()}
            out.append(self.cache[epoch][offset])
        return out


def check_lengths(examples: list[EncodedExample], config: TrainConfig, limit: int) -> tuple[list[EncodedExample], int]:
    """Drop (skip_too_long) or refuse examples longer than the context limit; returns (kept, dropped)."""
    m = config.latent_steps
    long = [ex for ex in examples if ex.total_length(m) > limit]
    if long and not config.skip_too_long:
        first = long[0]
        raise ValueError(
            f"{len(long)} training item(s) exceed max_length={limit} tokens, e.g. {first.id} of {first.source} needs "
            f"{first.total_length(m)} (agents' prompts, {m} latent steps each, judger prompt and "
            f"{len(first.target)}-token target); raise max_length, lower latent_steps, or pass --skip_too_long"
        )
    kept = [ex for ex in examples if ex.total_length(m) <= limit]
    if not kept:
        raise ValueError(f"every training item exceeds max_length={limit}; raise max_length")
    return kept, len(long)


def _prepare_output_dir(config: TrainConfig) -> Path:
    output = Path(config.output_dir).expanduser().resolve()
    if output.exists() and not output.is_dir():
        raise ValueError(f"output_dir {output} is a file; choose a directory")
    used = output.is_dir() and ((output / ADAPTER_CONFIG).exists() or checkpoint_dirs(output))
    if used and not config.resume:
        raise ValueError(f"output_dir {output} already holds a run; pass --resume to continue it or choose a new one")
    output.mkdir(parents=True, exist_ok=True)
    return output


def _truncate_log(path: Path, last_step: int) -> None:
    """Keep the log lines of steps up to `last_step` (those after the resumed checkpoint are redone)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in lines))


def _adapter_record(
    config: TrainConfig, backbone: Any, method: Method, loss: TraceLoss, report: DataReport, step: int, n: int
) -> dict[str, Any]:
    roles = loss.roles
    return {
        "backbone": backbone.name,
        "backbone_fingerprint": backbone.fingerprint,
        "adapters": config.adapters,
        "roles": roles,
        "method": config.method,
        "topology": None if config.method == "single-agent" else config.topology,
        "latent_steps": config.latent_steps,
        "realign": config.realign,
        "frozen_trace": config.frozen_trace,
        "formulation": loss.formulation,
        "prompts": {"name": method.prompts.name, "sha256": method.prompts.sha256},
        "system_prompt": method.system_prompt,
        "enable_thinking": config.enable_thinking,
        "lora": {
            "r": config.lora_r,
            "alpha": config.lora_alpha,
            "dropout": config.lora_dropout,
            "target_modules": config.lora_target_modules,
        },
        "data": {
            "sources": config.data,
            "answer_format": config.answer_format,
            "max_train_items": config.max_train_items,
            "balance_letters": config.balance_letters,
            "decontaminate": config.decontaminate,
            "counts": report.as_dict(),
            "items": n,
        },
        "seed": config.seed,
        "steps": step,
        "dtype": config.dtype,
        "git_revision": git_revision(),
        "version": __version__,
        "config": config.to_dict(),
    }


def _all_reduce_grads(trainable: list[tuple[str, torch.nn.Parameter]], accelerator: Any) -> None:
    """Sum gradients over processes (a parameter without a gradient anywhere keeps none, as in one process)."""
    params = [p for _, p in trainable]
    has = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    has = accelerator.reduce(has, reduction="sum")
    flat = accelerator.reduce(flat, reduction="sum")
    offset = 0
    for param, flag in zip(params, has.tolist(), strict=True):
        size = param.numel()
        param.grad = flat[offset : offset + size].view_as(param).clone() if flag > 0 else None
        offset += size


def train(config: TrainConfig, backbone: Any = None) -> Path:
    """Train per `config`; returns the adapter directory (`config.output_dir`). See the module docstring.

    Args:
        backbone: an already loaded backbone to train on (tests inspect it afterwards); default: load
            `config.pretrained`. It must not carry an adapter yet.
    """
    from accelerate import Accelerator
    from transformers import get_scheduler

    config.validate()
    check_source_names(config.data)
    output = _prepare_output_dir(config)
    accelerator = Accelerator(
        # On a machine without CUDA, accelerate needs cpu=True to see a torchrun/accelerate-launched process group.
        cpu=config.device == "cpu" or not torch.cuda.is_available(),
        log_with=None if config.report_to == "none" else config.report_to,
        project_dir=str(output),
    )
    world, rank = accelerator.num_processes, accelerator.process_index

    items, report = prepare_items(
        config.data,
        config.answer_format,
        config.data_dir,
        decontaminate_items=config.decontaminate,
        max_items=config.max_train_items,
        seed=config.seed,
        balance=config.balance_letters,
    )
    device = accelerator.device if world > 1 or config.device is None else config.device  # launchers decide
    if backbone is None:
        backbone = load_backbone(config.pretrained, dtype=config.dtype, device=device)
    method = build_method(backbone, config)
    examples = encode_items(backbone, method, items, config.append_eos)
    limit = config.max_length or int(getattr(backbone.causal_lm.config, "max_position_embeddings", 2048))
    examples, report.too_long = check_lengths(examples, config, limit)
    report.used = len(examples)

    torch.manual_seed(config.seed)  # the same fresh adapter on every process
    roles = [*method.upstream_roles, FINAL_ROLE]
    trainable = attach_lora(
        backbone,
        roles,
        per_role=config.adapters == "per_role",
        r=config.lora_r,
        alpha=config.lora_alpha,
        dropout=config.lora_dropout,
        target_modules=config.lora_target_modules,
    )
    loss_fn = build_loss(backbone, method, config)
    if config.recompute and loss_fn.single_sequence:
        backbone.causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    backbone.model.train()

    global_batch = config.per_device_batch_size * world * config.grad_accum_steps
    total_steps = config.max_steps or math.ceil(config.epochs * len(examples) / global_batch)
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = (
        get_scheduler(
            config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=total_steps
        )
        if config.lr_scheduler != "constant"
        else get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=config.warmup_steps)
    )

    start = 0
    saved = checkpoint_dirs(output)
    if config.resume and saved:
        state = load_checkpoint(saved[-1], trainable, optimizer, scheduler)
        _check_resume_config(state["config"], config.to_dict(), saved[-1])
        start = int(state["step"])
        if rank == 0:
            logger.warning("resuming from %s (step %d of %d)", saved[-1], start, total_steps)

    if config.report_to != "none":
        flat = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in config.to_dict().items()}
        accelerator.init_trackers("diffmas-train", config=flat)
    if rank == 0:
        _truncate_log(output / TRAIN_LOG, start)
    permutations = _Permutations(len(examples), config.seed)
    end = min(total_steps, config.stop_after_steps or total_steps)
    bar = tqdm(
        total=total_steps, initial=start, desc=f"train {config.method}", disable=not (config.progress and rank == 0)
    )
    began, tokens_seen = time.perf_counter(), 0
    step = start
    for step in range(start + 1, end + 1):
        indices = permutations.indices(step - 1, global_batch)
        step_tokens = sum(len(examples[i].target) for i in indices)
        nll_total = torch.zeros((), device=backbone.device)
        for micro in range(config.grad_accum_steps):
            begin = (micro * world + rank) * config.per_device_batch_size
            batch = [examples[i] for i in indices[begin : begin + config.per_device_batch_size]]
            nll = loss_fn(batch).sum()
            (nll / step_tokens).backward()
            nll_total += nll.detach()
            tokens_seen += sum(ex.total_length(config.latent_steps) for ex in batch)
        if world > 1:
            _all_reduce_grads(trainable, accelerator)
            nll_total = accelerator.reduce(nll_total, reduction="sum")
        grad_norm = (
            float(torch.nn.utils.clip_grad_norm_([p for _, p in trainable], config.max_grad_norm))
            if config.max_grad_norm > 0
            else float("nan")
        )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(nll_total) / step_tokens
        rate = tokens_seen * world / max(time.perf_counter() - began, 1e-9)
        bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{rate:.0f}")
        if rank == 0:
            with (output / TRAIN_LOG).open("a", encoding="utf-8") as handle:
                handle.write(
                    json.dumps({"step": step, "loss": loss_value, "grad_norm": grad_norm, "tokens_per_s": rate})
                )
                handle.write("\n")
        bar.update(1)
        if config.report_to != "none" and (step % config.log_every == 0 or step == end):
            accelerator.log(
                {"loss": loss_value, "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0], "tokens_per_s": rate},
                step=step,
            )
        if (config.checkpoint_every and step % config.checkpoint_every == 0) or step == end:
            if rank == 0:
                save_checkpoint(
                    output, step, trainable, optimizer, scheduler, config.to_dict(), config.keep_checkpoints
                )
            accelerator.wait_for_everyone()
    bar.close()

    if rank == 0 and step >= total_steps:
        record = _adapter_record(config, backbone, method, loss_fn, report, step, len(examples))
        backbone.model.save_pretrained(str(output))
        tmp = output / f".{ADAPTER_CONFIG}.tmp"
        tmp.write_text(json.dumps(record, indent=2, default=str))
        tmp.replace(output / ADAPTER_CONFIG)
    accelerator.wait_for_everyone()
    if config.report_to != "none":
        accelerator.end_training()
    return output


def _check_resume_config(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    changed = sorted(
        k for k in set(saved) | set(current) if k not in RESUME_FREE_FIELDS and saved.get(k) != current.get(k)
    )
    if changed:
        raise ValueError(
            f"cannot resume from {path}: settings {', '.join(changed)} differ from the interrupted run; "
            "resume with the same config (only logging, checkpoint and stop settings may change)"
        )
