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
from diffmas_eval.artifacts import LEGACY_MANIFEST, MANIFEST, write_manifest
from diffmas_eval.training.checkpoint import checkpoint_dirs, load_checkpoint, save_checkpoint
from diffmas_eval.training.config import RESUME_FREE_FIELDS, TrainConfig
from diffmas_eval.training.data import DataReport, check_source_names, prepare_items
from diffmas_eval.training.objective import Objective, objective_class

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


def _prepare_output_dir(config: TrainConfig) -> Path:
    output = Path(config.output_dir).expanduser().resolve()
    if output.exists() and not output.is_dir():
        raise ValueError(f"output_dir {output} is a file; choose a directory")
    used = output.is_dir() and (
        (output / MANIFEST).exists() or (output / LEGACY_MANIFEST).exists() or checkpoint_dirs(output)
    )
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


def build_manifest(config: TrainConfig, objective: Objective, report: DataReport, step: int, n: int) -> dict[str, Any]:
    """What the evaluating method checks and a reader wants to know: method, backbones and their fingerprints,
    config, data, git revision, plus the objective's own fields."""
    return {
        "method": config.method,
        "backbones": {
            role: {"name": backbone.name, "fingerprint": backbone.fingerprint}
            for role, backbone in objective.backbones().items()
        },
        **objective.manifest(),
        "data": {
            "sources": config.data,
            "answer_format": config.answer_format,
            "max_items_per_source": config.max_items_per_source,
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
    """Train per `config` with its method's objective; returns the artefact directory (`config.output_dir`). See the
    module docstring.

    Args:
        backbone: an already loaded backbone to train on (tests inspect it afterwards), passed to the objective;
            default: the objective loads what the config names. It must not carry an adapter yet.
    """
    from accelerate import Accelerator
    from transformers import get_scheduler

    config.validate()
    check_source_names(config.data)
    objective_cls = objective_class(config.method)
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
        max_per_source=config.max_items_per_source,
        seed=config.seed,
        balance=config.balance_letters,
    )
    device = accelerator.device if world > 1 or config.device is None else config.device  # launchers decide
    objective = objective_cls(config, device, **({"backbone": backbone} if backbone is not None else {}))
    examples = objective.encode(items)
    report.too_long = getattr(objective, "dropped_too_long", 0)
    report.used = len(examples)
    trainable = objective.trainable()
    objective.train_mode()

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
        objective.on_step(step, total_steps)
        step_tokens = sum(objective.weight(examples[i]) for i in indices)
        nll_total = torch.zeros((), device=trainable[0][1].device)
        for micro in range(config.grad_accum_steps):
            begin = (micro * world + rank) * config.per_device_batch_size
            batch = [examples[i] for i in indices[begin : begin + config.per_device_batch_size]]
            nll_total += objective.backward(batch, step_tokens)
            tokens_seen += sum(objective.positions(ex) for ex in batch)
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
        objective.save(output)
        write_manifest(output, build_manifest(config, objective, report, step, len(examples)))
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
