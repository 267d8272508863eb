"""DiffMAS (methods.md §4): the LatentMAS pipeline with a LoRA adapter trained end to end through the latent trace.

The adapter is a directory written by `diffmas-train --method diffmas` (`methods/adapter.py`): one adapter shared by
all roles or one per role, and a manifest recording the backbone fingerprint and the training settings.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from diffmas_eval.core.backbone import Backbone
from diffmas_eval.methods.adapter import attach_adapter, read_adapter_manifest
from diffmas_eval.methods.latent_mas import LatentMAS, LatentMASConfig
from diffmas_eval.methods.registry import register_method
from diffmas_eval.methods.single_agent import adapter_settings
from diffmas_eval.settings import setting

MISSING_ADAPTER = (
    "diffmas needs adapter=DIR (a directory written by `diffmas-train`); without it the method would silently be "
    "LatentMAS, so use --model latent-mas for that"
)


@dataclass
class DiffMASConfig(LatentMASConfig):
    latent_steps: int | None = setting("m (default: the adapter's training value).")
    realign: bool | None = setting("Ridge realignment (default: the adapter's training value).")
    adapter: str | None = setting("Directory written by `diffmas-train --method diffmas` (required).", identity=False)

    def validate(self) -> None:
        super().validate()
        if not self.adapter:
            raise ValueError(MISSING_ADAPTER)


@register_method
class DiffMAS(LatentMAS):
    """LatentMAS whose agents run with the trained adapter (per role when trained per role)."""

    name = "diffmas"
    config_class = DiffMASConfig
    description = "DiffMAS (arXiv 2604.21794): LatentMAS with a LoRA adapter trained through the trace"
    objective = "diffmas_eval.training.trace_nll:TraceNLL"

    def __init__(self, backbone: Backbone, config: DiffMASConfig | None = None, **settings: Any) -> None:
        config = config if config is not None else DiffMASConfig(**settings)
        if not config.adapter:
            raise ValueError(MISSING_ADAPTER)
        trained = read_adapter_manifest(config.adapter)
        # Evaluate as trained unless told otherwise: m and realignment default to the adapter's training values.
        defaults = {
            key: trained[key] for key in ("latent_steps", "realign") if getattr(config, key) is None and key in trained
        }
        for key in ("latent_steps", "realign", "topology"):
            given = getattr(config, key)
            if trained.get(key) is not None and given is not None and given != trained[key]:
                warnings.warn(
                    f"adapter {config.adapter} was trained with {key}={trained[key]!r} but is evaluated with "
                    f"{key}={given!r}",
                    stacklevel=2,
                )
        super().__init__(backbone, config, **defaults)
        self.adapter_manifest = attach_adapter(backbone, self.config.adapter)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), **adapter_settings(self.config.adapter, self.adapter_manifest)}
