"""A tiny causal LM built in code, for tests and CI: no downloads, builds in a few seconds.

The model is a 2-layer Qwen2 (random weights) with a byte-level BPE tokenizer trained in-process and a Qwen3-style
ChatML template (it honours `enable_thinking`). It is saved as a normal HF directory, so every code path that loads
a real model (`AutoModelForCausalLM.from_pretrained`, peft, lm-eval's `hf` backend) loads it the same way.
"""

from __future__ import annotations

from pathlib import Path

# Qwen2's pre-tokenizer split: AutoTokenizer swaps it in for model_type=qwen2, so the BPE is trained with it too
# (otherwise encodings drift after a save/reload).
_QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# Qwen3-style: with enable_thinking=False the generation prompt carries an empty thinking block.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)

_WORDS = (
    "the a an of to and in is are was were be it that this for on with as by at from or which question answer "
    "plan planner critic refiner judger agent solver math science code summarize reason step think final option "
    "letter number box boxed write python function return def if else for while list int str true false none "
    "what how many much each total left more less than cost costs dollar dollars apple apples train trains day "
    "days hour hours minute minutes student students book books water energy plant plants cell cells force "
    "correct choose following best explain why because therefore so thus we you they he she has have had"
).split()


def _training_corpus(n_lines: int = 400) -> list[str]:
    """Deterministic pseudo-text covering words, digits, LaTeX and code punctuation."""
    lines = []
    for i in range(n_lines):
        words = [_WORDS[(i * 7 + j * 13) % len(_WORDS)] for j in range(12)]
        lines.append(
            " ".join(words).capitalize()
            + f". {i} + {i * 3 % 17} = {i + i * 3 % 17}. \\boxed{{{i % 10}}} (A) (B) (C) (D)\n"
            + f"def f_{i}(x):\n    return x * {i % 9} + [x, {{'k': x}}]\n"
        )
    return lines


def build_tiny_tokenizer():
    """A `Qwen2Tokenizer` (fast, byte-level BPE, ~700 tokens) with the ChatML template above."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_training_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(
    path: str | Path,
    *,
    tie_word_embeddings: bool = True,
    seed: int = 0,
    layers: int = 2,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    kv_heads: int = 2,
    extra_tokens: tuple[str, ...] = (),
) -> Path:
    """Write a tiny random Qwen2 causal LM (4 attention heads) and its tokenizer to `path` (a normal HF directory) and
    return it.

    Args:
        path: target directory (created).
        tie_word_embeddings: False gives an untied lm_head, which exercises the realignment solve for real.
        seed: torch seed for the random weights.
        layers: number of decoder layers.
        hidden_size, intermediate_size, kv_heads: the model's widths and KV heads (e.g. a second model of other
            shapes for C2C).
        extra_tokens: tokens added to the tokenizer (another vocabulary).
    """
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    if extra_tokens:
        tokenizer.add_tokens(list(extra_tokens))
    tokenizer.save_pretrained(path)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # Larger-than-default init so the random model's next-token distribution is far from uniform (fewer ties).
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() >= 2:
                    param.normal_(0.0, 0.2)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    return path


def write_random_adapter(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    per_role: bool = False,
    seed: int = 0,
    roles: list[str] | None = None,
) -> Path:
    """Write a DiffMAS adapter directory with random (non-zero) LoRA weights over `model_dir`, for tests.

    A freshly initialised LoRA adapter is a no-op (its B matrices are zero); this one is not, so a test can tell
    whether the adapter is applied, and to which role.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    from diffmas_eval.artifacts import write_manifest
    from diffmas_eval.core.backbone import load_backbone
    from diffmas_eval.prompts import load_prompt_set

    out_dir = Path(out_dir)
    backbone = load_backbone(str(model_dir), dtype="float32", device="cpu")
    if per_role:
        roles = roles or load_prompt_set().roles("latent_mas", "sequential")
    else:
        roles = ["default"]
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    generator = torch.Generator().manual_seed(seed)
    for index, role in enumerate(roles):
        model = get_peft_model(load_backbone(str(model_dir), dtype="float32", device="cpu").model, lora)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * (0.3 + 0.1 * index))
        model.save_pretrained(out_dir / role if per_role else out_dir)
    manifest = {
        "method": "diffmas",
        "backbones": {"backbone": {"name": str(model_dir), "fingerprint": backbone.fingerprint}},
        "adapters": "per_role" if per_role else "shared",
        "roles": roles if per_role else None,
        "note": "random test adapter (diffmas_eval.testing.write_random_adapter)",
    }
    write_manifest(out_dir, manifest)
    return out_dir
