"""Interlat training (methods.md §6), `diffmas-train --method interlat`, in the paper's two stages.

Stage 1 (adapter + receiver). The sender's plans and hidden states for the training questions are collected once
into a message store (`MessageStore`: resumable, fingerprinted by everything that decides them) and read back every
epoch. The message adapter (with the markers) and the receiver (LoRA by default, every weight with
`full_finetune`) are trained on, per example,

    L = CE + w_plan · L_plan + w_contrast · L_contrast

- CE: the receiver's mean next-token loss on the target, reading the message between the markers;
- L_plan = 0.7 · KL(p_text ‖ p_latent) + 0.3 · (1 − cos(p_latent, p_text)): the same receiver reading the plan as
  text (under no_grad) is the teacher, over the target positions (the KL averaged over positions, the cosine between
  the flattened probability tables);
- L_contrast = max(0, 0.69 − JS(p_latent, p_negative)), with another question's message (length-matched) as the
  negative, under no_grad;
- the weights follow the paper's rule, from the example's own (detached) term values:
  w_plan = 0.01 + 0.04 · clip(L_plan / 4, 0, 1), w_contrast = 0.01 + 0.49 · clip(L_contrast / 0.69, 0, 1).
The curriculum (`curriculum`, default on) gives each example a mix ratio r in {0.1, ..., 0.9}: its span is the first
round(r·L) adapted hidden states followed by the plan tokens' embeddings after the first round(r·P); the negative
uses the same r and the example's own plan tail, as the reference does.

Stage 2 (compression, `--stage 2 --stage1 DIR`). A student (the sender model with a LoRA, plus a learned start vector
and `h2e`, `methods/interlat_adapter.py`) reads the student prompt and produces K latents autoregressively; they go
through the frozen stage-1 adapter into the frozen receiver. Per example,

    L = CE + 0.1 · KL_unc + 0.1 · (1 − cos(mean_k A(z_k), mean_l A(h_l)))

with KL_unc the uncertainty-weighted KL at temperature 4 from the receiver reading the full stored message (teacher)
to the receiver reading the student's latents: token weights `relu(H_none − H_full)` (entropies of the receiver with
no message and with the full one) over the first 64 target tokens, clipped at the 95% quantile of the positive
weights.

Every random choice (mix ratio, negative) is a function of (seed, step, example id), so a run resumes bit-identically
and does not depend on how a step is split into micro-batches. Differences from the reference code, on purpose: the
adaptive weights and the uncertainty weights are per example (the reference uses the micro-batch); the negative is
drawn from all training questions (the reference: the same batch, across GPUs) and repeated without noise when short;
stage 2's teacher reads the full message (the reference code truncates it to K; the paper's text says full); the
student is LoRA-tuned (the reference trains it fully).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from diffmas_eval.artifacts import check_method, portable_path, read_manifest, weights_fingerprint
from diffmas_eval.core.backbone import Backbone, load_backbone
from diffmas_eval.core.decode import DecodingConfig, derive_seed
from diffmas_eval.methods.interlat import (
    FAMILY,
    RECEIVER_DIR,
    SENDER_ROLE,
    STUDENT_ADAPTER,
    STUDENT_ROLE,
    TOPOLOGY,
    InterlatPrompts,
    Plan,
    ReceiverPrompt,
    generate_plan,
    load_artefact,
    marker_embeddings,
    receiver_inputs,
    running_with,
    token_embeddings,
)
from diffmas_eval.methods.interlat_adapter import (
    ADAPTER_FILE,
    STUDENT_FILE,
    AdapterShape,
    CompressionStudent,
    MessageAdapter,
    StudentShape,
    save_module,
    student_latents,
)
from diffmas_eval.prompts import load_prompt_set
from diffmas_eval.settings import setting
from diffmas_eval.training.config import TrainConfig
from diffmas_eval.training.data import TrainItem
from diffmas_eval.training.lora import attach_lora, check_target_modules
from diffmas_eval.training.objective import Objective
from diffmas_eval.training.unroll import end_of_turn_id

logger = logging.getLogger(__name__)

PLAN_KL_WEIGHT, PLAN_COSINE_WEIGHT = 0.7, 0.3
CONTRAST_MARGIN = 0.69  # nats; JS divergence is at most ln 2 ≈ 0.693
CURRICULUM_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
KL_TEMPERATURE = 4.0
UNCERTAINTY_WINDOW = 64
UNCERTAINTY_QUANTILE = 0.95
COMPRESSION_KL_WEIGHT = COMPRESSION_ALIGN_WEIGHT = 0.1
TERMS_LOG = "interlat_terms.jsonl"  # per micro-batch: the loss terms summed over its examples
STORE_FILE = "store.json"


@dataclass
class InterlatTrainSettings:
    """`diffmas-train --method interlat` settings beside TrainConfig's (whose `pretrained` is the receiver)."""

    stage: int = setting("1: message adapter + receiver; 2: compression student over a stage-1 artefact (--stage1).", 1)
    sender: str | None = setting("Sender model (default: the receiver's `pretrained`; stage 2: stage 1's sender).")
    plan_tokens: int = setting("The sender's plan budget in tokens (stage 1; stage 2 uses stage 1's).", 64)
    message_store: str | None = setting(
        "Directory of the collected sender messages (default: OUTPUT_DIR/messages; stage 2: STAGE1/messages)."
    )
    collect_batch_size: int = setting("Rows per batch when collecting the sender's messages.", 8)
    adapter_heads: int = setting("Attention heads of the message adapter (must divide the receiver's size).", 8)
    adapter_dropout: float = setting("Attention dropout of the message adapter.", 0.1)
    full_finetune: bool = setting(
        "Stage 1: fine-tune every receiver weight (the paper's choice) instead of LoRA.", False
    )
    curriculum: bool = setting("Stage 1: mix hidden states and plan-token embeddings by a per-example ratio.", True)
    stage1: str | None = setting("Stage 2: the stage-1 artefact directory whose adapter and receiver stay frozen.")
    latents: int = setting("Stage 2: K, the number of latents the student produces.", 8)

    def validate(self) -> None:
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        for name in ("plan_tokens", "collect_batch_size", "adapter_heads", "latents"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.adapter_dropout < 1:
            raise ValueError(f"adapter_dropout must be in [0, 1), got {self.adapter_dropout}")
        if self.stage == 2:
            if not self.stage1:
                raise ValueError("stage 2 needs --stage1 DIR, the artefact of a stage-1 run")
            if self.full_finetune:
                raise ValueError("full_finetune applies to stage 1's receiver; stage 2 trains the student's LoRA")
            manifest = read_manifest(self.stage1)
            check_method(manifest, ("interlat",), self.stage1, "--stage1")
            if manifest.get("stage") != 1:
                raise ValueError(
                    f"--stage1 {self.stage1} is a stage-{manifest.get('stage')} artefact; pass a stage-1 one"
                )


# ------------------------------------------------------------------------------------------------------------ losses


def plan_alignment_loss(latent_logits: torch.Tensor, text_logits: torch.Tensor) -> torch.Tensor:
    """`0.7 · mean_t KL(p_text,t ‖ p_latent,t) + 0.3 · (1 − cos(vec P_latent, vec P_text))` from logits `[T, V]`."""
    log_latent = torch.log_softmax(latent_logits.float(), dim=-1)
    log_text = torch.log_softmax(text_logits.float(), dim=-1)
    kl = (log_text.exp() * (log_text - log_latent)).sum(dim=-1).mean()
    cosine = F.cosine_similarity(log_latent.exp().flatten(), log_text.exp().flatten(), dim=0)
    return PLAN_KL_WEIGHT * kl + PLAN_COSINE_WEIGHT * (1 - cosine)


def js_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence in nats between the rows' distributions of logits `[T, V]`, averaged over rows."""
    log_p = torch.log_softmax(logits_p.float(), dim=-1)
    log_q = torch.log_softmax(logits_q.float(), dim=-1)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(dim=-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(dim=-1)
    return (0.5 * (kl_pm + kl_qm)).mean()


def contrastive_hinge(latent_logits: torch.Tensor, negative_logits: torch.Tensor) -> torch.Tensor:
    """`max(0, 0.69 − JS(p_latent, p_negative))`: the receiver's answer must change when the message is another's."""
    return torch.clamp(CONTRAST_MARGIN - js_divergence(latent_logits, negative_logits), min=0.0)


def adaptive_weights(plan_loss: float, contrast_loss: float) -> tuple[float, float]:
    """The paper's dynamic weights `(w_plan, w_contrast)` from the current (detached) term values."""
    plan = 0.01 + 0.04 * min(max(plan_loss / 4, 0.0), 1.0)
    contrast = 0.01 + 0.49 * min(max(contrast_loss / CONTRAST_MARGIN, 0.0), 1.0)
    return plan, contrast


def curriculum_span(adapted: torch.Tensor, plan_embeds: torch.Tensor, ratio: float) -> torch.Tensor:
    """The first `round(ratio·L)` adapted states `[L, D]` followed by the plan embeddings `[P, D]` after the first
    `round(ratio·P)` (ratio 1: the adapted message alone)."""
    hidden_part = adapted[: int(round(len(adapted) * ratio))]
    plan_part = plan_embeds[int(round(len(plan_embeds) * ratio)) :]
    return torch.cat([hidden_part, plan_part.to(adapted.dtype)])


def length_matched(message: torch.Tensor, length: int) -> torch.Tensor:
    """`message [L', D]` cut or repeated (tiled) to `length` rows."""
    repeats = -(-length // len(message))
    return message.repeat(repeats, 1)[:length]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row's distribution, `[T, V]` -> `[T]`."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def uncertainty_weights(entropy_without: torch.Tensor, entropy_with: torch.Tensor) -> torch.Tensor:
    """Per target token: `relu(H_without − H_with)` over the first 64 tokens (0 after), clipped at the 95% quantile of
    the positive weights and divided by their mean (the weighted KL's normaliser makes the scale immaterial)."""
    window = min(UNCERTAINTY_WINDOW, len(entropy_with))
    raw = torch.relu(entropy_without[:window] - entropy_with[:window]).float()
    positive = raw[raw > 0]
    if len(positive):
        raw = raw.clamp(max=float(torch.quantile(positive, UNCERTAINTY_QUANTILE)))
    weights = raw / raw.mean().clamp(min=1e-6)
    return torch.cat([weights, weights.new_zeros(len(entropy_with) - window)])


def uncertainty_weighted_kl(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """`Σ_t w_t · T² · KL(p_teacher,t ‖ p_student,t) / (Σ_t w_t + 1e-6)` at temperature T = 4; logits `[T, V]`."""
    log_teacher = torch.log_softmax(teacher_logits.float() / KL_TEMPERATURE, dim=-1)
    log_student = torch.log_softmax(student_logits.float() / KL_TEMPERATURE, dim=-1)
    kl = KL_TEMPERATURE**2 * (log_teacher.exp() * (log_teacher - log_student)).sum(dim=-1)
    return (weights * kl).sum() / (weights.sum() + 1e-6)


def mean_pooled_cosine(student_span: torch.Tensor, data_span: torch.Tensor) -> torch.Tensor:
    """`1 − cos(mean of the student's adapted latents [K, D], mean of the adapted full message [L, D])`."""
    return 1 - F.cosine_similarity(student_span.mean(dim=0), data_span.mean(dim=0), dim=0)


# ----------------------------------------------------------------------------------------------------- message store


class MessageStore:
    """The sender's plans (tokens, text, hidden states) for training questions, collected once.

    A directory with `store.json` (the settings that decide the messages and their fingerprint) and chunk files
    (`chunk-<hash>.safetensors`, one per collected batch, written atomically). A store collected with other settings
    is refused; an interrupted collection resumes with the missing questions, in the same batches.
    """

    def __init__(self, path: str | Path, settings: dict[str, Any]) -> None:
        self.path = Path(path).expanduser()
        self.settings = settings
        self.fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        self.path.mkdir(parents=True, exist_ok=True)
        info = self.path / STORE_FILE
        if info.is_file():
            saved = json.loads(info.read_text())
            if saved["fingerprint"] != self.fingerprint:
                changed = sorted(
                    k for k in set(saved["settings"]) | set(settings) if saved["settings"].get(k) != settings.get(k)
                )
                raise ValueError(
                    f"message store {self.path} was collected with other settings ({', '.join(changed)}); delete it "
                    "or set message_store to another directory"
                )
        else:
            _write_atomic(info, json.dumps({"fingerprint": self.fingerprint, "settings": settings}, indent=2))
        self.plans: dict[str, Plan] = {}
        for chunk in sorted(self.path.glob("chunk-*.safetensors")):
            self._read(chunk)

    @staticmethod
    def key(question: str) -> str:
        """A question's key in the store (its sender prompt depends on nothing else)."""
        return hashlib.sha256(question.encode()).hexdigest()[:16]

    def _read(self, path: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            entries = json.loads(handle.metadata()["entries"])
            for index, entry in enumerate(entries):
                hidden = handle.get_tensor(f"hidden.{index}")
                self.plans[entry["key"]] = Plan(entry["token_ids"], entry["text"], hidden, entry["stopped"])

    def collect(
        self, sender: Backbone, requests: list[tuple[str, list[int]]], plan_tokens: int, batch_size: int
    ) -> int:
        """Generate and store the plans of the keys not yet stored (greedy, with the sender's base weights).

        Args:
            requests: (key, the sender's prompt token ids), repeats allowed.
        Returns:
            How many plans were collected now.
        """
        missing = {key: prompt for key, prompt in requests if key not in self.plans}
        order = sorted(missing, key=lambda k: (-len(missing[k]), k))  # similar lengths batch together
        decoding = DecodingConfig(max_new_tokens=plan_tokens)
        for begin in tqdm(range(0, len(order), batch_size), desc="collect sender messages", disable=not order):
            keys = order[begin : begin + batch_size]
            with torch.no_grad(), running_with(sender, None):
                plans = generate_plan(sender, [missing[k] for k in keys], decoding)
            self._write(keys, plans)
        return len(order)

    def _write(self, keys: list[str], plans: list[Plan]) -> None:
        from safetensors.torch import save_file

        tensors = {f"hidden.{i}": plan.hidden.detach().float().cpu().contiguous() for i, plan in enumerate(plans)}
        entries = [
            {"key": k, "token_ids": p.token_ids, "text": p.text, "stopped": p.stopped}
            for k, p in zip(keys, plans, strict=True)
        ]
        name = f"chunk-{hashlib.sha256(''.join(keys).encode()).hexdigest()[:16]}.safetensors"
        tmp = self.path / f".{name}.tmp-{os.getpid()}"
        save_file(tensors, str(tmp), metadata={"entries": json.dumps(entries)})
        os.replace(tmp, self.path / name)
        self._read(self.path / name)

    def get(self, key: str) -> Plan:
        return self.plans[key]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------- examples


@dataclass(eq=False)
class InterlatExample:
    """One training example: the prompts of every role, the target, and the stored message.

    Attributes:
        key: the question's key in the message store.
        receiver: the receiver's prompt split at the message slot.
        target: the receiver's reply to learn (token ids, end-of-turn appended when configured).
        plan: the plan's text as the receiver's token ids (the text message and the curriculum's plan part).
        message: the sender's hidden states `[L, D_sender]` (float32).
        student_prompt: the student's prompt (stage 2).
    """

    id: str
    source: str
    key: str
    receiver: ReceiverPrompt
    target: tuple[int, ...]
    plan: tuple[int, ...]
    message: torch.Tensor
    student_prompt: tuple[int, ...] = field(default=())

    def length(self, message_length: int | None = None) -> int:
        """Positions of the receiver's sequence with the longest message it is trained with."""
        span = max(len(self.message), len(self.plan)) if message_length is None else message_length
        return len(self.receiver.prefix) + span + 2 + len(self.receiver.suffix) + len(self.target)


# --------------------------------------------------------------------------------------------------------- objective

IGNORED_TRAIN_FIELDS = {"latent_steps": 0, "frozen_trace": False, "recompute": False, "adapters": "shared"}


class InterlatObjective(Objective):
    """Both stages of Interlat training (see the module docstring); `settings.stage` picks one.

    Args:
        backbone: an already loaded receiver base model (tests inspect it afterwards); default: load
            `config.pretrained`.
    """

    settings_class = InterlatTrainSettings

    def __init__(self, config: TrainConfig, device: Any, backbone: Backbone | None = None) -> None:
        super().__init__(config, device)
        if self.settings is None:
            self.settings = InterlatTrainSettings()
        settings = self.settings
        settings.validate()
        for name, default in IGNORED_TRAIN_FIELDS.items():
            if getattr(config, name) != default:
                raise ValueError(f"{name} does not apply to --method interlat (no latent trace); drop it")
        stage1 = read_manifest(settings.stage1) if settings.stage == 2 else None
        if stage1 is not None and config.lora_dropout:
            raise ValueError("stage 2 needs lora_dropout 0: the student's model also runs the frozen receiver")
        self.stage1_manifest = stage1
        self.receiver_base = backbone or load_backbone(config.pretrained, dtype=config.dtype, device=device)
        sender_name = settings.sender
        if stage1 is not None and sender_name is None:
            sender_name = stage1["backbones"]["sender"]["name"]
        same = sender_name in (None, config.pretrained, self.receiver_base.name)
        self.sender = self.receiver_base if same else load_backbone(sender_name, dtype=config.dtype, device=device)
        self.prompts = InterlatPrompts(load_prompt_set(config.prompts), config.system_prompt, config.enable_thinking)
        self.receiver, self.receiver_adapter = self.receiver_base, "default"
        self.adapter: MessageAdapter | None = None
        self.student: CompressionStudent | None = None
        if stage1 is not None:
            self._check_same_prompts(stage1)
            artefact = load_artefact(settings.stage1, self.receiver_base, self.sender, with_student=False)
            self.receiver, self.receiver_adapter, self.adapter = (
                artefact.receiver,
                artefact.receiver_adapter,
                artefact.adapter,
            )
        self.plan_tokens = int(stage1["plan_tokens"]) if stage1 is not None else settings.plan_tokens
        self.examples: list[InterlatExample] = []
        self.store: MessageStore | None = None
        self.dropped_too_long = 0
        self._trainable: list[tuple[str, torch.nn.Parameter]] | None = None
        self._step = 0
        self._terms_truncated = False

    def _check_same_prompts(self, stage1: dict[str, Any]) -> None:
        prompts = self.prompts.prompts
        same = (
            stage1["prompts"]["sha256"] == prompts.sha256 and stage1.get("system_prompt") == self.prompts.system_prompt
        )
        if not same:
            raise ValueError(
                f"stage 2 must render the prompts as stage 1 did: {self.settings.stage1} was trained with prompt set "
                f"{stage1['prompts']['name']!r} and its system prompt; pass the same prompts and system_prompt"
            )

    # --- data ---

    def store_settings(self) -> dict[str, Any]:
        """What decides the collected messages (the store's fingerprint covers exactly this)."""
        prompts = self.prompts
        return {
            "sender": self.sender.name,
            "sender_fingerprint": self.sender.fingerprint,
            "dtype": str(self.sender.dtype),
            "prompts": prompts.prompts.sha256,
            "sender_template": prompts.prompts.template(FAMILY, TOPOLOGY, SENDER_ROLE),
            "system_prompt": prompts.system_prompt,
            "enable_thinking": prompts.enable_thinking,
            "plan_tokens": self.plan_tokens,
            "decoding": "greedy",
            "collect_batch_size": self.settings.collect_batch_size,
        }

    def encode(self, items: list[TrainItem]) -> list[InterlatExample]:
        """Render every role's prompt, collect the missing messages into the store, and build the examples."""
        settings, config = self.settings, self.config
        default_store = Path(settings.stage1 or config.output_dir) / "messages"
        self.store = MessageStore(settings.message_store or default_store, self.store_settings())
        requests = [
            (MessageStore.key(it.question), self.prompts.upstream(self.sender, SENDER_ROLE, it.question))
            for it in items
        ]
        collected = self.store.collect(self.sender, requests, self.plan_tokens, settings.collect_batch_size)
        logger.info("collected %d sender messages into %s", collected, self.store.path)
        eot = [end_of_turn_id(self.receiver)] if config.append_eos else []
        examples = []
        for item, (key, _) in zip(items, requests, strict=True):
            target = self.receiver.encode(item.target.lstrip()) + eot
            if not target:
                raise ValueError(f"training item {item.id} of {item.source} has an empty target; fix or drop it")
            plan = self.store.get(key)
            student_prompt = ()
            if settings.stage == 2:
                student_prompt = tuple(self.prompts.upstream(self.sender, STUDENT_ROLE, item.question))
            examples.append(
                InterlatExample(
                    id=item.id,
                    source=item.source,
                    key=key,
                    receiver=self.prompts.receiver(self.receiver, item.question, item.answer_format),
                    target=tuple(target),
                    plan=tuple(self.receiver.encode(plan.text)),
                    message=plan.hidden,
                    student_prompt=student_prompt,
                )
            )
        examples = self._check_lengths(examples)
        if settings.stage == 1 and len({ex.key for ex in examples}) < 2:
            raise ValueError("interlat training needs at least two different questions (the contrastive negative)")
        self.examples = examples
        return examples

    def _check_lengths(self, examples: list[InterlatExample]) -> list[InterlatExample]:
        limit = self.config.max_length or int(getattr(self.receiver.causal_lm.config, "max_position_embeddings", 2048))
        k = self.settings.latents if self.settings.stage == 2 else None
        long = [ex for ex in examples if max(ex.length(), ex.length(k) if k else 0) > limit]
        if long and not self.config.skip_too_long:
            raise ValueError(
                f"{len(long)} training item(s) exceed max_length={limit} tokens, e.g. {long[0].id} of {long[0].source} "
                f"needs {long[0].length()} (prompt, markers, message and target); raise max_length, lower "
                "plan_tokens, or pass --skip_too_long"
            )
        kept = [ex for ex in examples if ex not in long]
        if not kept:
            raise ValueError(f"every training item exceeds max_length={limit}; raise max_length")
        self.dropped_too_long = len(long)
        return kept

    # --- trainable modules ---

    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        if self._trainable is None:
            torch.manual_seed(self.config.seed)  # the same fresh modules on every process
            self._trainable = self._stage1_modules() if self.settings.stage == 1 else self._stage2_modules()
            names = {id(p) for _, p in self._trainable}
            for module in self._all_modules():
                for param in module.parameters():
                    if id(param) not in names:
                        param.requires_grad_(False)
        return self._trainable

    def _all_modules(self) -> list[torch.nn.Module]:
        modules = [self.receiver.model, self.sender.model, self.adapter]
        return [m for m in modules if m is not None] + ([self.student] if self.student is not None else [])

    def _stage1_modules(self) -> list[tuple[str, torch.nn.Parameter]]:
        settings, config, receiver = self.settings, self.config, self.receiver_base
        shape = AdapterShape(
            sender_dim=self.sender.input_embeddings.shape[1],
            receiver_dim=receiver.input_embeddings.shape[1],
            num_heads=settings.adapter_heads,
            dropout=settings.adapter_dropout,
        )
        self.adapter = MessageAdapter(shape).to(receiver.device)
        with torch.no_grad():
            self.adapter.init_markers(*marker_embeddings(receiver))
        params = [(f"adapter.{name}", p) for name, p in self.adapter.named_parameters()]
        if settings.full_finetune:
            receiver.model.requires_grad_(True)
            return params + [(f"receiver.{name}", p) for name, p in receiver.model.named_parameters()]
        lora = attach_lora(
            receiver,
            [],
            per_role=False,
            r=config.lora_r,
            alpha=config.lora_alpha,
            dropout=config.lora_dropout,
            target_modules=config.lora_target_modules,
        )
        return params + [(f"receiver.{name}", p) for name, p in lora]

    def _stage2_modules(self) -> list[tuple[str, torch.nn.Parameter]]:
        from peft import LoraConfig, get_peft_model

        config, sender = self.config, self.sender
        if not hasattr(sender.model, "peft_config"):  # a peft-wrapped model's targets are no longer plain linears
            check_target_modules(sender, config.lora_target_modules)
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=0.0,
            target_modules=list(config.lora_target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        if hasattr(sender.model, "peft_config"):
            sender.model.add_adapter(STUDENT_ADAPTER, lora)
        else:
            sender.model = get_peft_model(sender.model, lora, adapter_name=STUDENT_ADAPTER)
        self.student = CompressionStudent(StudentShape(sender.input_embeddings.shape[1])).to(sender.device)
        marker = f".{STUDENT_ADAPTER}."
        student_lora = [(n, p) for n, p in sender.model.named_parameters() if "lora_" in n and marker in n]
        for _, param in student_lora:
            param.requires_grad_(True)
        return [(f"student.{n}", p) for n, p in self.student.named_parameters()] + [
            (f"sender.{n}", p) for n, p in student_lora
        ]

    def train_mode(self) -> None:
        if self.settings.stage == 1:
            self.adapter.train()
            self.receiver.model.train()
        else:  # the frozen adapter and receiver stay deterministic; the student's LoRA has no dropout
            self.student.train()

    # --- loss ---

    def on_step(self, step: int, total_steps: int) -> None:
        self._step = step
        if not self._terms_truncated and self.config.output_dir:  # a resumed run redoes the steps after its checkpoint
            self._terms_truncated = True
            path = Path(self.config.output_dir) / TERMS_LOG
            if path.is_file():
                lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] < step]
                _write_atomic(path, "".join(ln + "\n" for ln in lines))

    def mix_ratio(self, example: InterlatExample) -> float:
        """The curriculum's ratio for an example at the current step (1.0 without the curriculum)."""
        if not self.settings.curriculum:
            return 1.0
        draw = derive_seed(self.config.seed, "curriculum", self._step, example.id)
        return CURRICULUM_RATIOS[draw % len(CURRICULUM_RATIOS)]

    def negative(self, example: InterlatExample) -> InterlatExample:
        """Another question's example whose message is the contrastive negative at the current step."""
        others = [ex for ex in self.examples if ex.key != example.key]
        return others[derive_seed(self.config.seed, "negative", self._step, example.id) % len(others)]

    def target_logits(self, examples: list[InterlatExample], spans: list[torch.Tensor]) -> list[torch.Tensor]:
        """The receiver's logits `[len(target), V]` (float32) at the positions predicting each target token, reading
        `[prefix ; begin ; span ; end ; suffix ; target]` (one left-padded forward, no cache)."""
        receiver = self.receiver
        rows = [
            torch.cat(
                [receiver_inputs(receiver, self.adapter, ex.receiver, span), token_embeddings(receiver, ex.target)]
            )
            for ex, span in zip(examples, spans, strict=True)
        ]
        width = max(len(row) for row in rows)
        embeds = rows[0].new_zeros((len(rows), width, rows[0].shape[-1]))
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=receiver.device)
        for index, row in enumerate(rows):
            embeds[index, width - len(row) :] = row
            mask[index, width - len(row) :] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        with running_with(receiver, self.receiver_adapter):
            hidden = receiver.decoder(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False
            ).last_hidden_state
        head = receiver.causal_lm.get_output_embeddings()
        return [head(hidden[i, width - len(ex.target) - 1 : width - 1]).float() for i, ex in enumerate(examples)]

    def loss(self, batch: list[InterlatExample]) -> torch.Tensor:
        terms = self.stage1_terms(batch) if self.settings.stage == 1 else self.stage2_terms(batch)
        self._log_terms(terms)
        return terms["total"].sum()

    def stage1_terms(self, batch: list[InterlatExample]) -> dict[str, torch.Tensor]:
        """Per example: total, ce, plan, contrast and the weights `[B]` (total in the graph)."""
        adapted = self.adapter([ex.message for ex in batch])
        plans = [token_embeddings(self.receiver, ex.plan).float() for ex in batch]
        ratios = [self.mix_ratio(ex) for ex in batch]
        spans = [curriculum_span(a, p, r) for a, p, r in zip(adapted, plans, ratios, strict=True)]
        latent = self.target_logits(batch, spans)
        with torch.no_grad():
            negatives = self.adapter([length_matched(self.negative(ex).message, len(ex.message)) for ex in batch])
            negative_spans = [curriculum_span(n, p, r) for n, p, r in zip(negatives, plans, ratios, strict=True)]
            text = self.target_logits(batch, plans)
            negative = self.target_logits(batch, negative_spans)
        rows = []
        for ex, lat, txt, neg in zip(batch, latent, text, negative, strict=True):
            ce = F.cross_entropy(lat, torch.tensor(ex.target, device=lat.device))
            plan = plan_alignment_loss(lat, txt)
            contrast = contrastive_hinge(lat, neg)
            w_plan, w_contrast = adaptive_weights(float(plan.detach()), float(contrast.detach()))
            total = ce + w_plan * plan + w_contrast * contrast
            rows.append((total, ce, plan, contrast, lat.new_tensor(w_plan), lat.new_tensor(w_contrast)))
        names = ("total", "ce", "plan", "contrast", "w_plan", "w_contrast")
        return {name: torch.stack(values) for name, values in zip(names, zip(*rows, strict=True), strict=True)}

    def stage2_terms(self, batch: list[InterlatExample]) -> dict[str, torch.Tensor]:
        """Per example: total, ce, kl, align `[B]` (total in the graph)."""
        with running_with(self.sender, STUDENT_ADAPTER):
            latents = student_latents(
                self.sender, [list(ex.student_prompt) for ex in batch], self.student, self.settings.latents
            )
        student_spans = self.adapter(list(latents))
        student = self.target_logits(batch, student_spans)
        with torch.no_grad():
            data_spans = self.adapter([ex.message for ex in batch])
            teacher = self.target_logits(batch, data_spans)
            empty = [span[:0] for span in data_spans]
            without = self.target_logits(batch, empty)
        rows = []
        for index, ex in enumerate(batch):
            ce = F.cross_entropy(student[index], torch.tensor(ex.target, device=student[index].device))
            weights = uncertainty_weights(entropy(without[index]), entropy(teacher[index]))
            kl = uncertainty_weighted_kl(teacher[index], student[index], weights)
            align = mean_pooled_cosine(student_spans[index], data_spans[index])
            rows.append((ce + COMPRESSION_KL_WEIGHT * kl + COMPRESSION_ALIGN_WEIGHT * align, ce, kl, align))
        names = ("total", "ce", "kl", "align")
        return {name: torch.stack(values) for name, values in zip(names, zip(*rows, strict=True), strict=True)}

    def _log_terms(self, terms: dict[str, torch.Tensor]) -> None:
        from accelerate import PartialState

        if not self.config.output_dir or not PartialState().is_main_process:
            return
        line = {"step": self._step, "examples": len(terms["total"])}
        line.update({name: round(float(values.detach().sum()), 6) for name, values in terms.items()})
        directory = Path(self.config.output_dir)
        directory.mkdir(parents=True, exist_ok=True)
        with (directory / TERMS_LOG).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")

    def positions(self, example: InterlatExample) -> int:
        return example.length()

    # --- artefact ---

    def backbones(self) -> dict[str, Backbone]:
        return {"receiver": self.receiver_base, "sender": self.sender}

    def save(self, output_dir: Path) -> None:
        if self.settings.stage == 1:
            save_module(self.adapter, output_dir / ADAPTER_FILE)
            if self.settings.full_finetune:
                self.receiver_base.causal_lm.save_pretrained(str(output_dir / RECEIVER_DIR))
                self.receiver_base.tokenizer.save_pretrained(str(output_dir / RECEIVER_DIR))
            else:
                self.receiver_base.model.save_pretrained(str(output_dir / RECEIVER_DIR), selected_adapters=["default"])
            return
        stage1 = Path(self.settings.stage1).expanduser()
        shutil.copy2(stage1 / ADAPTER_FILE, output_dir / ADAPTER_FILE)
        shutil.copytree(stage1 / RECEIVER_DIR, output_dir / RECEIVER_DIR, dirs_exist_ok=True)
        self.sender.model.save_pretrained(str(output_dir), selected_adapters=[STUDENT_ADAPTER])
        save_module(self.student, output_dir / STUDENT_FILE)

    def manifest(self) -> dict[str, Any]:
        config, settings = self.config, self.settings
        lora = {"r": config.lora_r, "alpha": config.lora_alpha, "target_modules": config.lora_target_modules}
        store = {"path": portable_path(self.store.path), "fingerprint": self.store.fingerprint}
        if settings.stage == 2:
            stage1 = self.stage1_manifest
            inherited = ("plan_tokens", "receiver_training", "curriculum", "adapter_shape", "prompts", "system_prompt")
            return {
                **{key: stage1[key] for key in inherited},
                "enable_thinking": stage1.get("enable_thinking"),
                "lora": stage1.get("lora"),
                "stage": 2,
                "message_store": store,
                "compression": {
                    "latents": settings.latents,
                    "student_lora": {**lora, "dropout": 0.0},
                    "stage1": {
                        "path": portable_path(settings.stage1),
                        "fingerprint": weights_fingerprint(settings.stage1),
                    },
                },
            }
        return {
            "stage": 1,
            "plan_tokens": self.plan_tokens,
            "receiver_training": "full" if settings.full_finetune else "lora",
            "curriculum": settings.curriculum,
            "adapter_shape": asdict(self.adapter.shape),
            "prompts": {"name": self.prompts.prompts.name, "sha256": self.prompts.prompts.sha256},
            "system_prompt": self.prompts.system_prompt,
            "enable_thinking": self.prompts.enable_thinking,
            "lora": None if settings.full_finetune else {**lora, "dropout": config.lora_dropout},
            "message_store": store,
        }
