"""LoRA adapters trained by `diffmas-train` (the trace-NLL objective), attached to a method's backbone.

An adapter directory is a standard peft adapter plus `manifest.json` (`diffmas_eval/artifacts.py`). One adapter is
shared by all roles (saved at the directory root), or each role has its own (a subdirectory named after the role,
loaded under that adapter name; `Method.acting_as` switches them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffmas_eval.artifacts import check_backbones, read_manifest, weights_fingerprint
from diffmas_eval.core.backbone import Backbone

# `diffmas-train` methods whose artefacts are LoRA adapters over one backbone.
LORA_METHODS = ("diffmas", "single-agent")


def read_adapter_manifest(adapter: str | Path) -> dict[str, Any]:
    """The manifest of a LoRA adapter directory, refusing artefacts of other objectives (e.g. a C2C fuser)."""
    manifest = read_manifest(adapter)
    if manifest.get("method", "diffmas") not in LORA_METHODS:
        raise ValueError(
            f"adapter={adapter!r} holds a {manifest.get('method')!r} artefact, not a LoRA adapter; "
            f"pass a directory written by `diffmas-train --method diffmas` or `--method single-agent`"
        )
    return manifest


def attach_adapter(backbone: Backbone, adapter: str | Path) -> dict[str, Any]:
    """Load the adapter(s) onto the backbone's model in place (wrapping it in a peft model); returns the manifest
    with `fingerprint` (of the weight files) added. Refuses an adapter trained on another backbone."""
    from peft import PeftModel

    manifest = read_adapter_manifest(adapter)
    check_backbones(manifest, {"backbone": backbone}, adapter)
    path = Path(adapter).expanduser()
    if manifest.get("adapters") == "per_role":
        roles = manifest["roles"]
        model = PeftModel.from_pretrained(backbone.model, str(path / roles[0]), adapter_name=roles[0])
        for role in roles[1:]:
            model.load_adapter(str(path / role), adapter_name=role)
    else:
        model = PeftModel.from_pretrained(backbone.model, str(path))
    model.eval()
    model.requires_grad_(False)
    backbone.model = model
    return {**manifest, "fingerprint": weights_fingerprint(path)}
