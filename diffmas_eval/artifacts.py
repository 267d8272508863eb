"""Trained artefacts: a directory with the trained weights and `manifest.json`.

The manifest says which method trained it, on which backbones (names and weight fingerprints), with which config and
data, at which git revision. The evaluating method reads it and refuses a mismatch (another backbone, another
method). `diffmas-train` writes it (`training/trainer.py`); LoRA artefacts keep peft's standard adapter layout beside
it, so other tools read the weights as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffmas_eval.core.backbone import Backbone

MANIFEST = "manifest.json"
LEGACY_MANIFEST = "diffmas_adapter.json"  # adapters written before the manifest had its name


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a trained-artefact directory.

    Raises:
        FileNotFoundError: not a directory written by `diffmas-train`.
    """
    path = Path(directory).expanduser()
    for name in (MANIFEST, LEGACY_MANIFEST):
        if (path / name).is_file():
            return json.loads((path / name).read_text())
    raise FileNotFoundError(
        f"{directory!r} is not a trained-artefact directory (no {MANIFEST}); train one with `diffmas-train`"
    )


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Write `manifest.json` atomically (a reader never sees half a file)."""
    tmp = directory / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    tmp.replace(directory / MANIFEST)


def manifest_backbones(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Role -> {name, fingerprint} of the backbones an artefact was trained on (legacy manifests: one backbone)."""
    if isinstance(manifest.get("backbones"), dict):
        return manifest["backbones"]
    return {"backbone": {"name": manifest.get("backbone"), "fingerprint": manifest.get("backbone_fingerprint")}}


def check_backbones(manifest: dict[str, Any], backbones: dict[str, Backbone], directory: str | Path) -> None:
    """Refuse an artefact trained on other backbones (weight fingerprints compared, not names)."""
    trained = manifest_backbones(manifest)
    for role, backbone in backbones.items():
        expected = (trained.get(role) or {}).get("fingerprint")
        if expected != backbone.fingerprint:
            raise ValueError(
                f"{directory} was trained with {role} {(trained.get(role) or {}).get('name')!r} (fingerprint "
                f"{expected}), but the loaded {role} {backbone.name!r} has fingerprint {backbone.fingerprint}; "
                f"load the same model it was trained on"
            )


def check_method(manifest: dict[str, Any], accepted: tuple[str, ...], directory: str | Path, what: str) -> None:
    """Refuse an artefact trained by a method other than `accepted`."""
    method = manifest.get("method")
    if method not in accepted:
        raise ValueError(
            f"{directory} was trained by `diffmas-train --method {method}`; {what} needs one trained by "
            f"{' or '.join(accepted)}"
        )


def weights_fingerprint(directory: str | Path) -> str:
    """sha256 (16 hex digits) of the weight files of an artefact directory, recursively, in path order.

    Results record an artefact by this, plus its path, so that two directories holding the same weights are one run
    and a retrained artefact at the same path is another."""
    root = Path(directory).expanduser()
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.suffix in (".safetensors", ".bin", ".pt") and "checkpoints" not in path.relative_to(root).parts:
            digest.update(str(path.relative_to(root)).encode())
            with path.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()[:16]


def portable_path(path: str | Path, base: Path | None = None) -> str:
    """`path` relative to `base` (default: the current directory) when it lies below it, else as given: results
    never carry one machine's absolute paths for things inside the repo or the output directory."""
    resolved = Path(path).expanduser().resolve()
    base = (base or Path.cwd()).resolve()
    try:
        return str(resolved.relative_to(base))
    except ValueError:
        return str(path)
