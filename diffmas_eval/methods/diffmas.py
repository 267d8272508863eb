"""DiffMAS (methods.md §4): the LatentMAS pipeline with a LoRA adapter trained end to end through the latent trace.

The adapter directory is a standard peft adapter plus `diffmas_adapter.json` (written by `diffmas-train`), which
records the backbone fingerprint and whether one adapter is shared by all roles or each role has its own (then each
role's adapter sits in a subdirectory named after the role, loaded under that adapter name).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diffmas_eval.core.backbone import Backbone
from diffmas_eval.methods.latent_mas import LatentMAS
from diffmas_eval.prompts import PromptSet

ADAPTER_CONFIG = "diffmas_adapter.json"


def read_adapter_config(adapter: str | Path) -> dict[str, Any]:
    """The `diffmas_adapter.json` of an adapter directory.

    Raises:
        FileNotFoundError: not a DiffMAS adapter directory.
    """
    path = Path(adapter).expanduser()
    if not (path / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(
            f"adapter={adapter!r} is not a DiffMAS adapter directory (no {ADAPTER_CONFIG}); "
            "train one with `diffmas-train`"
        )
    return json.loads((path / ADAPTER_CONFIG).read_text())


def check_adapter_backbone(adapter_config: dict[str, Any], backbone: Backbone, adapter: str | Path) -> None:
    """Refuse an adapter trained on another backbone (compares weight fingerprints, not names)."""
    expected = adapter_config.get("backbone_fingerprint")
    if expected != backbone.fingerprint:
        raise ValueError(
            f"adapter {adapter} was trained on backbone {adapter_config.get('backbone')!r} "
            f"(fingerprint {expected}), but the loaded backbone {backbone.name!r} has fingerprint "
            f"{backbone.fingerprint}; pass the same `pretrained` the adapter was trained on"
        )


def attach_adapter(backbone: Backbone, adapter: str | Path) -> dict[str, Any]:
    """Load the adapter(s) onto the backbone's model in place (wrapping it in a peft model); returns its config."""
    from peft import PeftModel

    config = read_adapter_config(adapter)
    check_adapter_backbone(config, backbone, adapter)
    path = Path(adapter).expanduser()
    if config.get("adapters") == "per_role":
        roles = config["roles"]
        model = PeftModel.from_pretrained(backbone.model, str(path / roles[0]), adapter_name=roles[0])
        for role in roles[1:]:
            model.load_adapter(str(path / role), adapter_name=role)
    else:
        model = PeftModel.from_pretrained(backbone.model, str(path))
    model.eval()
    model.requires_grad_(False)
    backbone.model = model
    return config


class DiffMAS(LatentMAS):
    """LatentMAS whose agents run with the trained adapter (per role when trained per role)."""

    name = "diffmas"

    def __init__(
        self, backbone: Backbone, prompts: PromptSet, *, adapter: str | Path | None = None, **kwargs: Any
    ) -> None:
        if not adapter:
            raise ValueError(
                "diffmas needs adapter=DIR (a directory written by `diffmas-train`); without it the "
                "method would silently be LatentMAS, so use --model latent-mas for that"
            )
        trained = read_adapter_config(adapter)
        # Evaluate as trained unless told otherwise: m and realignment default to the adapter's training values.
        for key in ("latent_steps", "realign"):
            if key not in kwargs and trained.get(key) is not None:
                kwargs[key] = trained[key]
        for key in ("latent_steps", "realign", "topology"):
            if trained.get(key) is not None and kwargs.get(key, trained[key]) != trained[key]:
                warnings.warn(
                    f"adapter {adapter} was trained with {key}={trained[key]!r} but is evaluated with "
                    f"{key}={kwargs[key]!r}",
                    stacklevel=2,
                )
        super().__init__(backbone, prompts, **kwargs)
        self.adapter = str(adapter)
        self.adapter_config = attach_adapter(backbone, adapter)
        self.per_role = self.adapter_config.get("adapters") == "per_role"

    @contextlib.contextmanager
    def acting_as(self, role: str) -> Iterator[None]:
        if self.per_role:
            self.backbone.model.set_adapter(role)
        yield

    def settings(self) -> dict[str, Any]:
        trained = {k: self.adapter_config.get(k) for k in ("latent_steps", "topology", "adapters", "frozen_trace")}
        return {**super().settings(), "adapter": self.adapter, "adapter_training": trained}
