"""Resumable checkpoints: trainable weights, optimizer, scheduler, RNG and step, written atomically.

A checkpoint is a directory `checkpoints/step-NNNNNNN/`, first written under a temporary name and then renamed, so
an interrupted write never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

CHECKPOINTS = "checkpoints"
_PREFIX = "step-"


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.removeprefix(_PREFIX)))


def save_checkpoint(
    output_dir: Path,
    step: int,
    trainable: list[tuple[str, torch.nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    config: dict[str, Any],
    keep: int,
) -> Path:
    """Write `checkpoints/step-<step>` atomically and prune all but the `keep` newest."""
    root = output_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step:07d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save({name: p.detach().cpu().clone() for name, p in trainable}, tmp / "trainable.pt")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state()}, tmp / "scheduler.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "config": config}, indent=2, default=str))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(output_dir)[: -max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: Path,
    trainable: list[tuple[str, torch.nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG from `path`; returns its `state.json`."""
    weights = torch.load(path / "trainable.pt", map_location="cpu")
    names = {name for name, _ in trainable}
    if set(weights) != names:
        raise ValueError(f"checkpoint {path} holds other adapter weights than this run builds; resume with its config")
    with torch.no_grad():
        for name, param in trainable:
            param.copy_(weights[name].to(param.device, param.dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu"))
    extra = torch.load(path / "scheduler.pt", map_location="cpu")
    scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["torch_rng"])
    return json.loads((path / "state.json").read_text())
