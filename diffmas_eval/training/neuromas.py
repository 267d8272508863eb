"""The NeuroMAS objective: joint GRPO over every node of the graph, with verifiable rewards (methods.md §7).

One optimizer step, as separate testable pieces:
1. **rollouts** (`NeuroMASGRPO.rollout`): for each question, G complete graph executions sampled with our own
   `generate` (each layer one mixed-adapter decode, every node under its own LoRA; seeds are a pure function of the
   run's seed, the step, the item and the execution index, so a resumed run samples exactly what an uninterrupted
   one would);
2. **rewards** (`task_reward`): the task's scorer on the output node's answer (the GSM8K / arithmetic number, the
   letter, a math expression), 1 or 0;
3. **advantages** (`group_advantages`): rewards normalised within each question's group, as TRL's GRPO;
4. **loss** (`NeuroMASGRPO.policy_loss`): every node's generated tokens take their execution's advantage under that
   node's LoRA (the simplest joint credit assignment); TRL's clipped-ratio GRPO loss per token (`grpo_token_loss`,
   the formula of `trl.GRPOTrainer._compute_loss`), with an optional KL term to the untrained graph (the adapters
   disabled), averaged per sequence and then over all (node, execution) sequences of the step.

Growth (`grow_from`): a larger graph starts from a trained smaller one. Nodes present in both keep their trained
LoRA; a new node copies the trained node at the nearest position of its layer (a new layer copies the last trained
layer; a graph grown from `graph=0` copies the trained single agent) or, with `grow_init=fresh`, starts as a no-op.
The manifest records the lineage.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffmas_eval.artifacts import check_backbones, check_method, read_manifest, weights_fingerprint
from diffmas_eval.benchmarks.extract import extract_boxed_expression, extract_boxed_number, extract_letter
from diffmas_eval.benchmarks.scoring import expressions_match, letters_match, numbers_match
from diffmas_eval.benchmarks.sources import LETTERS
from diffmas_eval.core.backbone import Backbone, load_backbone
from diffmas_eval.core.decode import DecodingConfig, Generation, derive_seed, generate
from diffmas_eval.methods.base import Question
from diffmas_eval.methods.neuromas import (
    CONNECTIVITIES,
    OUTPUT_NODE,
    Graph,
    NeuroMAS,
    node_name,
    node_position,
    parse_graph,
)
from diffmas_eval.settings import setting
from diffmas_eval.training.config import TrainConfig
from diffmas_eval.training.data import TrainItem
from diffmas_eval.training.lora import attach_lora
from diffmas_eval.training.objective import Objective

logger = logging.getLogger(__name__)
ROLLOUT_LOG = "rollout_log.jsonl"  # one line per micro-batch: step, reward, accuracy, tokens per node, budget used
GROW_INITS = ("neighbour", "fresh")
REWARD_FORMATS = ("boxed_number", "boxed_expression", "boxed_letter", "letter")


@dataclass
class NeuroMASTrainSettings:
    """`diffmas-train --method neuromas` settings beside TrainConfig's (recorded in the manifest under `rl`)."""

    graph: str = setting("Hidden-layer widths of the trained graph, W1xW2x... (0: the output node alone).", "2x2")
    connectivity: str | None = setting("full or chain (default full).")
    mask: str | None = setting("JSON/YAML file {node: [nodes it reads]} for any other layered graph.")
    grow_from: str | None = setting("A trained smaller NeuroMAS artefact to grow from (progressive growth).")
    grow_init: str = setting(
        "Nodes the smaller graph lacks start as a copy of the trained node nearest in their layer (neighbour) or as "
        "a no-op LoRA (fresh).",
        "neighbour",
    )
    group_size: int = setting("G: graph executions sampled per question (the group rewards are normalised in).", 4)
    node_max_new_tokens: int = setting("Budget of each hidden node in rollouts (tokens).", 64)
    answer_max_new_tokens: int = setting("Budget of the output node in rollouts (tokens).", 64)
    temperature: float = setting("Sampling temperature of the rollouts.", 1.0)
    top_p: float = setting("Nucleus sampling of the rollouts.", 1.0)
    epsilon: float = setting("Lower clip of the importance ratio (1 - epsilon), as TRL's epsilon.", 0.2)
    epsilon_high: float = setting("Upper clip (1 + epsilon_high); above epsilon: DAPO's clip-higher.", 0.2)
    beta: float = setting("KL coefficient to the untrained graph (0: no KL term, TRL's default).", 0.0)
    scale_rewards: bool = setting(
        "Divide advantages by the group's reward std (False: Dr. GRPO's centring only).", True
    )
    logprob_batch_size: int = setting("Sequences per forward when scoring the rollouts (bounds training memory).", 8)

    def validate(self) -> None:
        widths = parse_graph(self.graph)
        if self.connectivity is not None and self.mask is not None:
            raise ValueError("give connectivity or a mask file, not both")
        if self.connectivity is not None and self.connectivity not in CONNECTIVITIES:
            raise ValueError(f"unknown connectivity {self.connectivity!r}; use one of {', '.join(CONNECTIVITIES)}")
        Graph.build(widths, self.connectivity or "full", self.mask)
        checks = [
            (self.group_size >= 2, "group_size must be >= 2 (advantages are normalised within a group)"),
            (self.logprob_batch_size >= 1, "logprob_batch_size must be >= 1"),
            (self.node_max_new_tokens >= 1 and self.answer_max_new_tokens >= 1, "token budgets must be >= 1"),
            (self.temperature > 0, "temperature must be > 0 (rollouts are sampled)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.epsilon >= 0 and self.epsilon_high >= 0 and self.beta >= 0, "epsilon, epsilon_high, beta >= 0"),
            (self.grow_init in GROW_INITS, f"grow_init must be one of {', '.join(GROW_INITS)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.grow_from is not None:
            manifest = read_manifest(self.grow_from)
            check_method(manifest, ("neuromas",), self.grow_from, "grow_from")
            check_growth(Graph.from_dict(manifest["graph"]).widths, widths, self.grow_from)

    def build_graph(self) -> Graph:
        return Graph.build(parse_graph(self.graph), self.connectivity or "full", self.mask)


def check_growth(old: tuple[int, ...], new: tuple[int, ...], source: str) -> None:
    """Refuse a graph that does not contain the trained one (fewer layers, or a narrower layer)."""
    if len(new) < len(old) or any(n < o for n, o in zip(new, old, strict=False)) or tuple(new) == tuple(old):
        raise ValueError(
            f"graph={'x'.join(map(str, new)) or 0} does not grow the trained graph {'x'.join(map(str, old)) or 0} of "
            f"{source}: keep its layers at least as wide, add nodes or layers"
        )


def grow_source(node: str, old: tuple[int, ...]) -> str:
    """The trained node a node of the grown graph starts from: itself when it exists, else the nearest node of its
    layer, else (a new layer) the nearest node of the last trained layer, else (grown from 0) the output node."""
    position = node_position(node)
    if position is None:
        return OUTPUT_NODE
    layer, index = position
    if layer <= len(old):
        return node_name(layer, min(index, old[layer - 1]))
    if old:
        return node_name(len(old), min(index, old[-1]))
    return OUTPUT_NODE


@dataclass(frozen=True)
class RLExample:
    """A training question with what its reward needs: the answer format, the gold answer and, for choice items,
    the option letters."""

    id: str
    question: str
    answer_format: str
    gold: str
    letters: str = "ABCDE"


def gold_answer(item: TrainItem) -> str:
    """The answer a reply must give, from a training item's target (or, for choice items, its gold option)."""
    if item.choices is not None:
        return LETTERS[item.choices[2]]
    extract = {
        "boxed_number": extract_boxed_number,
        "boxed_expression": extract_boxed_expression,
        "boxed_letter": extract_letter,
        "letter": extract_letter,
    }[item.answer_format]
    gold = extract(item.target)
    if gold is None:
        raise ValueError(f"training item {item.id} of {item.source}: no {item.answer_format} answer in its target")
    return gold


def task_reward(text: str, example: RLExample) -> float:
    """1.0 when the task's scorer accepts the reply, else 0.0."""
    if example.answer_format == "boxed_number":
        return float(numbers_match(extract_boxed_number(text), example.gold))
    if example.answer_format == "boxed_expression":
        return float(expressions_match(extract_boxed_expression(text), example.gold))
    return float(letters_match(extract_letter(text, example.letters), example.gold))


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """`rewards [Q * G]` (groups contiguous) -> advantages: reward minus its group's mean, divided by the group's
    (unbiased) std + 1e-4 when `scale`, as TRL's GRPO."""
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(dim=1, keepdim=True) + 1e-4)
    return centred.reshape(-1)


def grpo_token_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    epsilon: float,
    epsilon_high: float,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
) -> torch.Tensor:
    """TRL's per-token GRPO loss (`GRPOTrainer._compute_loss`, loss_type grpo, token-level ratios).

    Args:
        logps, old_logps, ref_logps: `[N, T]` log-probabilities of the completion tokens under the policy, the
            policy that sampled them and the reference (untrained) policy.
        advantages: `[N]`.

    Returns:
        `[N, T]`: `-min(r A, clip(r, 1 - eps, 1 + eps_high) A) + beta * KL`, with `r = exp(logps - old_logps)` and
        the k3 estimator `KL = exp(ref - logp) - (ref - logp) - 1`.
    """
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    advantages = advantages[:, None]
    loss = -torch.min(ratio * advantages, clipped * advantages)
    if beta != 0.0:
        delta = ref_logps - logps
        loss = loss + beta * (torch.exp(delta) - delta - 1)
    return loss


@dataclass
class NodeSequence:
    """One node's turn in one graph execution: its prompt and what it generated (end-of-turn token included)."""

    node: str
    row: int
    prompt: list[int]
    completion: list[int]


@dataclass
class Rollout:
    """G graph executions of each question of a micro-batch (rows `q * G + g`)."""

    sequences: list[NodeSequence]
    answers: list[str]
    rewards: torch.Tensor  # [rows]

    def generated_tokens(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for seq in self.sequences:
            out[seq.node] = out.get(seq.node, 0) + len(seq.completion)
        return out


def completion_ids(generation: Generation) -> list[int]:
    """The tokens a node's policy chose: its text's tokens plus the end-of-turn token when it ended its turn."""
    return generation.token_ids + ([generation.end_token_id] if generation.end_token_id is not None else [])


def completion_logps(
    backbone: Backbone, prompts: list[list[int]], completions: list[list[int]], temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of each completion given its prompt under the model's active adapter, in one forward.

    Prompts are left-padded and completions right-padded (as TRL); positions are `cumsum(mask) - 1`. The logits are
    divided by the sampling `temperature`, as TRL scores the distribution the rollouts were drawn from.

    Returns:
        `logps [N, T]` (float32, in the autograd graph when gradients are on) and `mask [N, T]` (1 = real token).
    """
    device = backbone.device
    width_p = max(len(p) for p in prompts)
    width_c = max(max(len(c) for c in completions), 1)
    ids = torch.full((len(prompts), width_p + width_c), backbone.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        ids[row, width_p - len(prompt) : width_p] = torch.tensor(prompt)
        mask[row, width_p - len(prompt) : width_p] = 1
        if completion:
            ids[row, width_p : width_p + len(completion)] = torch.tensor(completion)
            mask[row, width_p : width_p + len(completion)] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    logits = (
        backbone.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=width_c + 1)
        .logits[:, :-1]
        .float()
        / temperature
    )
    targets = ids[:, width_p:]
    logps = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    return logps, mask[:, width_p:].to(logps.dtype)


class NeuroMASGRPO(Objective):
    """GRPO over all nodes of a NeuroMAS graph (see the module docstring). One LoRA adapter per node.

    Args:
        backbone: an already loaded backbone without an adapter (tests inspect it afterwards); default: load
            `config.pretrained`.
    """

    settings_class = NeuroMASTrainSettings

    def __init__(self, config: TrainConfig, device: Any, backbone: Backbone | None = None) -> None:
        super().__init__(config, device)
        if self.settings is None:
            self.settings = NeuroMASTrainSettings()
        self.graph = self.settings.build_graph()
        self.parent = self._read_parent()
        self.backbone = backbone or load_backbone(config.pretrained, dtype=config.dtype, device=device)
        if self.parent is not None:
            check_backbones(self.parent, {"backbone": self.backbone}, self.settings.grow_from)
        self.method = NeuroMAS(
            self.backbone,
            graph=self.graph.spec,
            mask=self.settings.mask,
            connectivity=None if self.settings.mask else (self.settings.connectivity or "full"),
            max_new_tokens=self.settings.node_max_new_tokens,
            prompts=config.prompts,
            system_prompt=config.system_prompt,
            enable_thinking=config.enable_thinking,
        )
        self.step = 0
        self.rollout_tokens = 0  # generated tokens of every rollout so far on this process (the budget's measure)
        self._trainable: list[tuple[str, torch.nn.Parameter]] | None = None
        self._log_checked = False

    def _read_parent(self) -> dict[str, Any] | None:
        if self.settings.grow_from is None:
            return None
        parent = read_manifest(self.settings.grow_from)
        lora = parent.get("lora", {})
        mine = {
            "r": self.config.lora_r,
            "alpha": self.config.lora_alpha,
            "target_modules": self.config.lora_target_modules,
        }
        different = [k for k, v in mine.items() if lora.get(k) != v]
        if different:
            trained = ", ".join(f"{k}={lora.get(k)}" for k in different)
            raise ValueError(
                f"grow_from {self.settings.grow_from} was trained with LoRA {trained}; grow with the same lora_r, "
                "lora_alpha and lora_target_modules"
            )
        return parent

    # --- the loop's interface ---

    def encode(self, items: list[TrainItem]) -> list[RLExample]:
        examples = []
        for item in items:
            if item.answer_format not in REWARD_FORMATS:
                raise ValueError(
                    f"training item {item.id} of {item.source} has answer_format {item.answer_format!r}: NeuroMAS "
                    f"rewards are implemented for {', '.join(REWARD_FORMATS)} (code rewards through the guarded "
                    "executor are not implemented: training items carry no tests)"
                )
            letters = LETTERS[: len(item.choices[1])] if item.choices is not None else "ABCDE"
            examples.append(RLExample(item.id, item.question, item.answer_format, gold_answer(item), letters))
        return examples

    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        if self._trainable is None:
            config = self.config
            torch.manual_seed(config.seed)  # the same fresh adapters on every process
            self._trainable = attach_lora(
                self.backbone,
                self.graph.nodes,
                per_role=True,
                r=config.lora_r,
                alpha=config.lora_alpha,
                dropout=config.lora_dropout,
                target_modules=config.lora_target_modules,
            )
            if self.parent is not None:
                self._grow()
        return self._trainable

    def _grow(self) -> None:
        """Load the trained smaller graph's adapters into the nodes they start (see `grow_source`)."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        old = Graph.from_dict(self.parent["graph"])
        root = Path(self.settings.grow_from).expanduser()
        for node in self.graph.nodes:
            if node not in old.nodes and self.settings.grow_init == "fresh":
                continue
            source = node if node in old.nodes else grow_source(node, old.widths)
            state = load_file(str(root / source / "adapter_model.safetensors"))
            result = set_peft_model_state_dict(self.backbone.model, state, adapter_name=node)
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"{root / source} does not fit this model's LoRA layout: {result.unexpected_keys[:3]}")

    def weight(self, example: RLExample) -> int:
        """Sequences an example contributes: G executions times the nodes (the loss is a mean over sequences)."""
        return self.settings.group_size * len(self.graph.nodes)

    def positions(self, example: RLExample) -> int:
        return self.weight(example)

    def on_step(self, step: int, total_steps: int) -> None:
        self.step = step

    def train_mode(self) -> None:
        self.backbone.model.train()

    def backbones(self) -> dict[str, Backbone]:
        return {"backbone": self.backbone}

    def save(self, output_dir: Path) -> None:
        self.backbone.model.save_pretrained(str(output_dir))  # one subdirectory per node (peft's multi-adapter layout)

    def manifest(self) -> dict[str, Any]:
        config, method = self.config, self.method
        lineage = []
        if self.parent is not None:
            lineage = [
                *self.parent.get("lineage", []),
                {
                    "path": self.settings.grow_from,
                    "fingerprint": weights_fingerprint(self.settings.grow_from),
                    "graph": self.parent["graph"]["graph"],
                    "steps": self.parent.get("steps"),
                    "grow_init": self.settings.grow_init,
                },
            ]
        return {
            "graph": self.graph.as_dict(),
            "nodes": self.graph.nodes,
            "adapters": "per_node",
            "lineage": lineage,
            "rl": {
                "objective": "grpo",
                "credit": "every node's tokens take its execution's advantage",
                **{k: v for k, v in vars(self.settings).items() if k not in ("graph", "connectivity", "mask")},
            },
            "prompts": {"name": method.prompts.name, "sha256": method.prompts.sha256},
            "system_prompt": method.system_prompt,
            "enable_thinking": config.enable_thinking,
            "lora": {
                "r": config.lora_r,
                "alpha": config.lora_alpha,
                "dropout": config.lora_dropout,
                "target_modules": config.lora_target_modules,
            },
        }

    # --- rollouts, rewards, advantages, loss ---

    def reward(self, text: str, example: RLExample) -> float:
        return task_reward(text, example)

    def rollout(self, batch: list[RLExample]) -> Rollout:
        """G sampled executions of the whole graph per question, without gradients and in eval mode (peft's
        mixed-adapter batches refuse training mode; the rollout policy is the one the loss differentiates)."""
        settings, group = self.settings, self.settings.group_size
        questions = [
            Question(ex.question, ex.answer_format, seed=derive_seed(self.config.seed, "rollout", self.step, ex.id, g))
            for ex in batch
            for g in range(group)
        ]
        sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p}
        model, training = self.backbone.model, self.backbone.model.training
        model.eval()
        try:
            with torch.no_grad():
                node_decoding = DecodingConfig(max_new_tokens=settings.node_max_new_tokens, **sampling)
                messages, _, record = self.method.run_hidden_layers(questions, node_decoding)
                prompts = [self.method.render_node(OUTPUT_NODE, q, m) for q, m in zip(questions, messages, strict=True)]
                answers = generate(
                    self.backbone,
                    prompts,
                    None,
                    DecodingConfig(max_new_tokens=settings.answer_max_new_tokens, **sampling),
                    [derive_seed(q.seed, OUTPUT_NODE) for q in questions],
                    adapter_names=[OUTPUT_NODE] * len(questions),
                )
        finally:
            model.train(training)
        sequences = [NodeSequence(node, row, prompt, completion_ids(out)) for node, row, prompt, out in record]
        sequences += [
            NodeSequence(OUTPUT_NODE, row, prompt, completion_ids(out))
            for row, (prompt, out) in enumerate(zip(prompts, answers, strict=True))
        ]
        rewards = torch.tensor([self.reward(out.text, batch[row // group]) for row, out in enumerate(answers)])
        return Rollout(sequences, [out.text for out in answers], rewards)

    def node_losses(self, rollout: Rollout, advantages: torch.Tensor) -> Iterator[torch.Tensor]:
        """The GRPO loss of the rollout's sequences, piece by piece: per node, per chunk of at most
        `logprob_batch_size` sequences, the summed per-sequence loss (in the autograd graph) under that node's
        adapter.

        `advantages [rows]`: each execution's advantage, taken by every token any node generated in it. The
        sampling policy is the current one (one optimizer step per rollout batch), so the ratio is 1 in value and
        the clip never binds; the KL term (beta > 0) compares with the adapters disabled."""
        settings = self.settings
        for node in self.graph.nodes:
            seqs = [s for s in rollout.sequences if s.node == node]
            for begin in range(0, len(seqs), settings.logprob_batch_size):
                chunk = seqs[begin : begin + settings.logprob_batch_size]
                prompts, completions = [s.prompt for s in chunk], [s.completion for s in chunk]
                with self.method.acting_as(node):
                    logps, mask = completion_logps(self.backbone, prompts, completions, settings.temperature)
                ref = None
                if settings.beta != 0.0:
                    with torch.no_grad(), self.backbone.model.disable_adapter():
                        ref, _ = completion_logps(self.backbone, prompts, completions, settings.temperature)
                chunk_advantages = advantages[[s.row for s in chunk]].to(logps.device)
                per_token = grpo_token_loss(
                    logps, logps.detach(), chunk_advantages, settings.epsilon, settings.epsilon_high, ref, settings.beta
                )
                yield ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).sum()

    def policy_loss(self, rollout: Rollout, advantages: torch.Tensor) -> torch.Tensor:
        """The summed per-sequence GRPO loss of every node's sequences, as one tensor (see `node_losses`)."""
        return sum(self.node_losses(rollout, advantages), torch.zeros((), device=self.backbone.device))

    def loss(self, batch: list[RLExample]) -> torch.Tensor:
        rollout = self.rollout(batch)
        self._log(rollout)
        advantages = group_advantages(rollout.rewards, self.settings.group_size, self.settings.scale_rewards)
        return self.policy_loss(rollout, advantages)

    def backward(self, batch: list[RLExample], normaliser: float) -> torch.Tensor:
        """As `loss`, backpropagated one node's chunk at a time: a graph holds one chunk's activations, not every
        node's (a 2x2 step on the embedded 135M model needed 16 GB at once)."""
        rollout = self.rollout(batch)
        self._log(rollout)
        advantages = group_advantages(rollout.rewards, self.settings.group_size, self.settings.scale_rewards)
        total = torch.zeros((), device=self.backbone.device)
        for piece in self.node_losses(rollout, advantages):
            (piece / normaliser).backward()
            total += piece.detach()
        return total

    def _log(self, rollout: Rollout) -> None:
        """Append this micro-batch's rewards and lengths to `rollout_log.jsonl` (main process; lines of steps a
        resumed run redoes are dropped first)."""
        tokens = rollout.generated_tokens()
        main = _is_main_process() and self.config.output_dir
        path = Path(self.config.output_dir or ".").expanduser() / ROLLOUT_LOG
        if main and not self._log_checked and path.is_file():  # a resumed run: drop the steps it redoes
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] < self.step]
            path.write_text("".join(line + "\n" for line in kept))
            self.rollout_tokens = json.loads(kept[-1])["rollout_tokens"] if kept else 0
        self._log_checked = True
        self.rollout_tokens += sum(tokens.values())
        if not main:
            return
        rows = len(rollout.answers)
        record = {
            "step": self.step,
            "reward": float(rollout.rewards.mean()),
            "groups_with_signal": int((rollout.rewards.view(-1, self.settings.group_size).std(dim=1) > 0).sum()),
            "tokens_per_node": {node: round(n / rows, 2) for node, n in tokens.items()},
            "generated_tokens": sum(tokens.values()),
            "rollout_tokens": self.rollout_tokens,
        }
        with path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def _is_main_process() -> bool:
    return (
        not torch.distributed.is_available()
        or not torch.distributed.is_initialized()
        or torch.distributed.get_rank() == 0
    )


__all__ = [
    "NeuroMASGRPO",
    "NeuroMASTrainSettings",
    "group_advantages",
    "grpo_token_loss",
    "grow_source",
    "task_reward",
]
