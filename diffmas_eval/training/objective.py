"""Training objectives: what a trainable method optimises, separate from the loop that optimises it.

The loop (`training/trainer.py`) owns data order, accumulation, the all-reduce across processes, atomic checkpoints,
`--resume` and logging. An objective owns the models (loading them, attaching its trainable modules), turns
training items into examples, computes the loss of a micro-batch, and saves the trained artefact. A method names its
objective (`Method.objective = "module:Class"`); `diffmas-train --method NAME` picks it from the registry.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from diffmas_eval.core.backbone import Backbone
    from diffmas_eval.training.config import TrainConfig
    from diffmas_eval.training.data import TrainItem


class Objective(ABC):
    """One trainable method's loss. The loop calls, in order: `encode`, `trainable`, `train_mode`, then per optimizer
    step `on_step` and per micro-batch `backward` (by default: `loss` divided by the step's summed `weight`s), and
    finally `save` and `manifest` on the main process.

    `settings_class` (optional) is a settings dataclass (`diffmas_eval.settings.setting` fields) of the objective's
    own options; `diffmas-train` accepts them beside TrainConfig's and passes them as `self.settings`.
    """

    settings_class: ClassVar[type | None] = None

    def __init__(self, config: TrainConfig, device: Any) -> None:
        self.config = config
        self.device = device
        self.settings = getattr(config, "objective_settings", None)

    @abstractmethod
    def encode(self, items: list[TrainItem]) -> list[Any]:
        """Training examples from items (refusing or dropping, per the config, what cannot be trained on)."""

    @abstractmethod
    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The parameters the optimizer updates, by name (the same names on every process); nothing else may
        require gradients."""

    @abstractmethod
    def loss(self, batch: list[Any]) -> torch.Tensor:
        """Summed loss of a micro-batch (a 0-d float32 tensor in the autograd graph)."""

    def backward(self, batch: list[Any], normaliser: float) -> torch.Tensor:
        """Accumulate the gradient of `loss(batch) / normaliser`; returns the summed loss, detached. Objectives
        whose micro-batch graph would not fit in memory at once (e.g. one policy forward per graph node) override it
        to backpropagate piece by piece."""
        loss = self.loss(batch)
        (loss / normaliser).backward()
        return loss.detach()

    def weight(self, example: Any) -> int:
        """How much an example counts in a step's normaliser (e.g. its target tokens); the step's loss is
        `sum(loss(micro-batch)) / sum(weight)`."""
        return 1

    def positions(self, example: Any) -> int:
        """Positions the forward processes for an example (the loop logs tokens per second from it)."""
        return self.weight(example)

    def on_step(self, step: int, total_steps: int) -> None:  # noqa: B027  (most objectives need no schedule)
        """Called before optimizer step `step` (1-based) of `total_steps`, also after a resume: a schedule of the
        objective's own (e.g. an annealed temperature) is a function of the step, never of how many calls came
        before."""

    @abstractmethod
    def train_mode(self) -> None:
        """Put the trained modules in training mode (dropout)."""

    @abstractmethod
    def backbones(self) -> dict[str, Backbone]:
        """The frozen models the artefact belongs to, by role (their fingerprints go into the manifest)."""

    @abstractmethod
    def save(self, output_dir: Path) -> None:
        """Write the trained weights into `output_dir` (the loop writes `manifest.json` beside them)."""

    def manifest(self) -> dict[str, Any]:
        """Objective-specific manifest fields (e.g. adapter layout, latent steps) that the evaluating method reads."""
        return {}


def objective_class(method_name: str) -> type[Objective]:
    """The objective a registered method declares, or a ValueError naming the methods that can be trained."""
    from diffmas_eval.methods.registry import get_method, trainable_methods

    method = get_method(method_name)
    if not method.objective:
        raise ValueError(
            f"method {method_name!r} has no training objective; diffmas-train trains: {', '.join(trainable_methods())}"
        )
    module, _, name = method.objective.partition(":")
    return getattr(importlib.import_module(module), name)
