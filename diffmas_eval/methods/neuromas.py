"""NeuroMAS (methods.md §7; arXiv 2605.16757, of which only the abstract is public): a layered graph of role-free text
agents. Agents are the nodes, their text messages the edges; the topology fixes only who reads whom, and joint RL
(`training/neuromas.py`) decides what each node writes.

The graph is given by its hidden layers' widths (`graph=2x2`: two layers of two nodes, then the output node, which is
the final agent). `connectivity=full` lets each node read every node of the previous layer, `chain` node i of the
previous layer only; a mask file gives any other layered graph (edges from any earlier layer). Each node has its own
LoRA adapter when trained (`adapters=DIR`), named after the node; without adapters the untrained graph runs (the
inference-time baseline). Each layer is one batched decode over all its nodes and rows; with adapters every row
runs under its node's LoRA through peft's mixed-adapter batches (`adapter_names=` per row), so a layer costs one
decode whatever its width (`batching=per_node` decodes node by node instead, for the comparison).

Every choice the abstract leaves open is ours and is recorded in the settings and the trained artefact's manifest:
the node prompts (the prompt set's `neuromas` section), one adapter per node, what a node reads (the question plus its
inputs' messages), and the graph with no hidden layer being the single agent (its prompt included).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from diffmas_eval.artifacts import check_backbones, check_method, read_manifest, weights_fingerprint
from diffmas_eval.core.backbone import Backbone
from diffmas_eval.core.decode import DecodingConfig, Generation, derive_seed, generate
from diffmas_eval.methods.base import AgentCall, FinalAgentStart, Method, MethodConfig, Question
from diffmas_eval.methods.registry import register_method
from diffmas_eval.prompts import FINAL_ROLE
from diffmas_eval.settings import setting

OUTPUT_NODE = "OUT"
CONNECTIVITIES = ("full", "chain")
BATCHING_MODES = ("mixed", "per_node")
DEFAULT_GRAPH = "2x2"
_GRAPH_SPEC = re.compile(r"[1-9]\d*(x[1-9]\d*)*")
_NODE_NAME = re.compile(r"L([1-9]\d*)N([1-9]\d*)")


def parse_graph(spec: str | int) -> tuple[int, ...]:
    """Hidden-layer widths from a graph spec: `2x2` -> (2, 2); `0` -> () (the output node alone)."""
    text = str(spec).strip().lower()
    if text == "0":
        return ()
    if not _GRAPH_SPEC.fullmatch(text):
        raise ValueError(
            f"graph={spec!r} is not a list of layer widths; give e.g. graph=2x2 (two layers of two nodes, then the "
            "output node), graph=3 (one layer of three) or graph=0 (the output node alone)"
        )
    return tuple(int(width) for width in text.split("x"))


def graph_spec(widths: tuple[int, ...]) -> str:
    return "x".join(str(w) for w in widths) or "0"


def node_name(layer: int, index: int) -> str:
    """The name of node `index` of hidden layer `layer` (1-based): `L2N1`; also its adapter's name."""
    return f"L{layer}N{index}"


def node_position(name: str) -> tuple[int, int] | None:
    """(layer, index) of a hidden node's name, None for the output node."""
    match = _NODE_NAME.fullmatch(name)
    return (int(match[1]), int(match[2])) if match else None


def node_label(name: str) -> str:
    """How prompts and transcripts call a node: `2.1`, or `out`."""
    position = node_position(name)
    return f"{position[0]}.{position[1]}" if position else "out"


@dataclass(frozen=True)
class Graph:
    """A layered graph of text agents.

    Attributes:
        widths: nodes per hidden layer (the output node comes after them).
        inputs: every node (hidden nodes and `OUT`) -> the nodes whose messages it reads, in order; only nodes of
            earlier layers.
        connectivity: how `inputs` was built: full, chain or mask.
    """

    widths: tuple[int, ...]
    inputs: dict[str, tuple[str, ...]]
    connectivity: str

    @property
    def spec(self) -> str:
        return graph_spec(self.widths)

    @property
    def layers(self) -> list[list[str]]:
        """The hidden layers' node names, in order."""
        return [[node_name(layer, i) for i in range(1, width + 1)] for layer, width in enumerate(self.widths, 1)]

    @property
    def nodes(self) -> list[str]:
        """Every node in execution order, the output node last."""
        return [name for layer in self.layers for name in layer] + [OUTPUT_NODE]

    def as_dict(self) -> dict[str, Any]:
        return {
            "graph": self.spec,
            "connectivity": self.connectivity,
            "inputs": {k: list(v) for k, v in self.inputs.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Graph:
        widths = parse_graph(data["graph"])
        return cls(widths, {k: tuple(v) for k, v in data["inputs"].items()}, data["connectivity"])

    @classmethod
    def build(cls, widths: tuple[int, ...], connectivity: str = "full", mask: str | Path | None = None) -> Graph:
        """The graph of `widths` with `connectivity` (full or chain), or with the edges of a mask file."""
        layers = [[node_name(layer, i) for i in range(1, width + 1)] for layer, width in enumerate(widths, 1)]
        if mask is not None:
            return cls(widths, _read_mask(mask, layers), "mask")
        if connectivity not in CONNECTIVITIES:
            raise ValueError(
                f"unknown connectivity {connectivity!r}; use one of {', '.join(CONNECTIVITIES)} or mask=FILE"
            )
        if connectivity == "chain" and len(set(widths)) > 1:
            raise ValueError(
                f"connectivity=chain links node i to node i of the previous layer, so it needs equal layer widths "
                f"(graph={graph_spec(widths)}); use connectivity=full or a mask file"
            )
        inputs: dict[str, tuple[str, ...]] = {}
        for depth, layer in enumerate(layers):
            for index, name in enumerate(layer):
                if depth == 0:
                    inputs[name] = ()
                elif connectivity == "full":
                    inputs[name] = tuple(layers[depth - 1])
                else:
                    inputs[name] = (layers[depth - 1][index],)
        inputs[OUTPUT_NODE] = tuple(layers[-1]) if layers else ()
        return cls(widths, inputs, connectivity)


def _read_mask(path: str | Path, layers: list[list[str]]) -> dict[str, tuple[str, ...]]:
    """Edges from a JSON/YAML mask file `{node: [nodes it reads], ...}`; unlisted hidden nodes read no messages."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"mask file {path} does not exist; give a JSON or YAML file of {{node: [inputs]}}")
    data = yaml.safe_load(file.read_text())
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise ValueError(f"mask file {path} must map node names to lists of the node names they read")
    layer_of = {name: depth for depth, layer in enumerate(layers) for name in layer}
    layer_of[OUTPUT_NODE] = len(layers)
    unknown = sorted(set(data) - set(layer_of))
    if unknown:
        raise ValueError(f"mask file {path} names node(s) {unknown} not in the graph; its nodes: {', '.join(layer_of)}")
    inputs: dict[str, tuple[str, ...]] = {}
    for name, depth in layer_of.items():
        sources = [str(s) for s in data.get(name, [])]
        bad = [s for s in sources if layer_of.get(s, depth) >= depth]
        if bad:
            raise ValueError(f"mask file {path}: {name} may read only nodes of earlier layers, not {bad}")
        inputs[name] = tuple(sources)
    read = {source for sources in inputs.values() for source in sources}
    if layers and not inputs[OUTPUT_NODE]:
        raise ValueError(f"mask file {path} gives the output node (OUT) no inputs; the hidden layers would be unused")
    unread = [name for layer in layers for name in layer if name not in read]
    if unread:
        raise ValueError(f"mask file {path}: no node reads {', '.join(unread)}; add them to some node's inputs")
    return inputs


@dataclass
class NeuroMASConfig(MethodConfig):
    graph: str | None = setting(
        "Hidden-layer widths W1xW2x... (2x2: two layers of two nodes, then the output node; 0: the output node "
        "alone). Default: the adapters' graph, else 2x2.",
        identity=False,
    )
    connectivity: str | None = setting(
        "full (each node reads every node of the previous layer) or chain (node i reads node i of the previous "
        "layer). Default: the adapters', else full.",
        identity=False,
    )
    mask: str | None = setting(
        "JSON/YAML file {node: [nodes it reads]} (names L1N1, L2N1, ..., OUT) for any other layered graph.",
        identity=False,
    )
    adapters: str | None = setting(
        "Directory written by `diffmas-train --method neuromas` (one LoRA per node); without it the untrained graph "
        "runs.",
        identity=False,
    )
    max_new_tokens: int = setting("Budget of each node before the output node (tokens).", 256)
    batching: str = setting(
        "mixed: each layer is one decode, every row under its node's LoRA (peft mixed-adapter batch); per_node: one "
        "decode per node under its adapter.",
        "mixed",
    )

    def validate(self) -> None:
        super().validate()
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batching not in BATCHING_MODES:
            raise ValueError(f"unknown batching {self.batching!r}; use one of {', '.join(BATCHING_MODES)}")
        self.resolve_graph()

    def resolve_graph(self) -> Graph:
        """The graph these settings describe: the adapters' (refusing a graph or edges that contradict it), else
        the one `graph`, `connectivity` and `mask` build. Reads only the manifest: called before weights load."""
        if self.mask is not None and self.connectivity is not None:
            raise ValueError("give connectivity or a mask file, not both")
        trained = None
        if self.adapters is not None:
            manifest = read_manifest(self.adapters)
            check_method(manifest, ("neuromas",), self.adapters, "adapters=")
            trained = Graph.from_dict(manifest["graph"])
        default = trained.widths if trained is not None else parse_graph(DEFAULT_GRAPH)
        widths = parse_graph(self.graph) if self.graph is not None else default
        if trained is None:
            return Graph.build(widths, self.connectivity or "full", self.mask)
        if widths != trained.widths:
            raise ValueError(
                f"adapters {self.adapters} were trained for graph={trained.spec}, not graph={self.graph}; drop graph "
                f"(or grow it first: diffmas-train --method neuromas --grow_from {self.adapters} --graph {self.graph})"
            )
        if (self.connectivity or self.mask) and Graph.build(widths, self.connectivity or "full", self.mask).inputs != (
            trained.inputs
        ):
            raise ValueError(
                f"adapters {self.adapters} were trained with other edges (connectivity {trained.connectivity})"
            )
        return trained


@register_method
class NeuroMAS(Method):
    """A layered graph of role-free text agents, each node under its own LoRA when trained."""

    name = "neuromas"
    family = "neuromas"
    config_class = NeuroMASConfig
    description = "NeuroMAS (arXiv 2605.16757): a layered graph of role-free text agents, one LoRA per node (RL)"
    default_communication = "text"
    objective = "diffmas_eval.training.neuromas:NeuroMASGRPO"

    def __init__(self, backbone: Backbone, config: NeuroMASConfig | None = None, **settings: Any) -> None:
        super().__init__(backbone, config, **settings)
        if "neuromas" not in self.prompts.data:
            raise ValueError(f"prompt set {self.prompts.name!r} has no `neuromas` section (the node templates)")
        self.graph = self.config.resolve_graph()
        self.adapter_manifest: dict[str, Any] | None = None
        if self.config.adapters:
            self.adapter_manifest = attach_node_adapters(backbone, self.config.adapters)
        self.max_new_tokens = self.config.max_new_tokens

    @property
    def upstream_roles(self) -> list[str]:
        return [name for layer in self.graph.layers for name in layer]

    def node_adapters(self) -> set[str]:
        """Nodes that have their own LoRA adapter on the backbone."""
        return self.role_adapters()

    @contextlib.contextmanager
    def acting_as(self, role: str) -> Iterator[None]:
        """The final agent is the output node: it runs under the output node's adapter."""
        with super().acting_as(OUTPUT_NODE if role == FINAL_ROLE else role):
            yield

    # --- prompts ---

    @staticmethod
    def _describe(names: tuple[str, ...]) -> str:
        """How a prompt names the nodes a node reads: `node 1.1`, `nodes 1.1 and 1.2`."""
        labels = [node_label(n) for n in names]
        return ("node " if len(labels) == 1 else "nodes ") + _join(labels) if labels else "no node"

    def transcript(self, name: str, messages: dict[str, str]) -> str:
        """What node `name` reads: its inputs' messages, each as the prompt set's `message_entry`."""
        entry = self.prompts.data["neuromas"]["message_entry"]
        return "".join(
            _fill(entry, {"node": node_label(source), "text": messages[source].strip()})
            for source in self.graph.inputs[name]
        )

    def render_node(self, name: str, question: Question, messages: dict[str, str]) -> list[int]:
        """Token ids of a node's chat turn: the role-free template with its position, inputs and their messages.

        The output node gets the task's format instruction; in a graph without hidden layers it is the single agent,
        with the single agent's prompt."""
        templates = self.prompts.data["neuromas"]
        if name == OUTPUT_NODE:
            if not self.graph.layers:
                user = self.prompts.render(
                    "single_agent", "sequential", FINAL_ROLE, question.text, "", question.answer_format
                )
                return self.backbone.render_chat(user, system=self.system_prompt, enable_thinking=self.enable_thinking)
            template, (layer, index) = templates["output_node"], (len(self.graph.widths) + 1, 1)
        else:
            template = templates["inner_node" if self.graph.inputs[name] else "input_node"]
            layer, index = node_position(name)
        values = {
            "question": question.text,
            "transcript": self.transcript(name, messages).rstrip("\n"),
            "node": node_label(name),
            "layer": str(layer),
            "index": str(index),
            "inputs": self._describe(self.graph.inputs[name]),
        }
        user = _fill(template, values)
        if name == OUTPUT_NODE:
            instruction = self.prompts.format_instruction(question.answer_format)
            user = f"{user}\n\n{instruction}" if instruction else user
        return self.backbone.render_chat(user, system=self.system_prompt, enable_thinking=self.enable_thinking)

    def final_prompt(self, question: Question, transcript: str = "") -> list[int]:
        raise NotImplementedError("NeuroMAS renders the output node from its inputs' messages (render_node)")

    # --- running the graph ---

    def run_layer(
        self,
        nodes: list[str],
        questions: list[Question],
        messages: list[dict[str, str]],
        decoding: DecodingConfig,
        seed_parts: tuple[Any, ...] = (),
    ) -> tuple[list[tuple[str, int]], list[list[int]], list[Generation]]:
        """Decode every (node, row) pair of one layer: one batched decode, each row under its node's adapter
        (`batching=per_node`: one decode per node).

        Args:
            messages: per row, the messages written so far (node -> text).
            decoding: the nodes' decoding settings (budget included).
            seed_parts: extra parts of each row's sampling seed (training gives the rollout's index).

        Returns:
            The (node, row) pairs, their prompts and their generations, in the same order.
        """
        pairs = [(node, row) for node in nodes for row in range(len(questions))]
        prompts = [self.render_node(node, questions[row], messages[row]) for node, row in pairs]
        seeds = [derive_seed(questions[row].seed, node, *seed_parts) for node, row in pairs]
        own = self.node_adapters()
        outputs: list[Generation | None] = [None] * len(pairs)
        if not own or self.config.batching == "mixed":
            names = [node if node in own else "__base__" for node, _ in pairs] if own else None
            outputs = generate(self.backbone, prompts, None, decoding, seeds, adapter_names=names)
        else:
            for node in nodes:
                indices = [i for i, (n, _) in enumerate(pairs) if n == node]
                with self.acting_as(node):
                    decoded = generate(
                        self.backbone, [prompts[i] for i in indices], None, decoding, [seeds[i] for i in indices]
                    )
                for index, out in zip(indices, decoded, strict=True):
                    outputs[index] = out
        return pairs, prompts, outputs

    def run_hidden_layers(
        self, questions: list[Question], decoding: DecodingConfig, seed_parts: tuple[Any, ...] = ()
    ) -> tuple[list[dict[str, str]], list[list[AgentCall]], list[tuple[str, int, list[int], Generation]]]:
        """Run the hidden layers in order for a batch.

        Returns:
            Per row the messages (node -> text), per row the nodes' accounting, and every (node, row, prompt,
            generation) in execution order (training reads the token ids from it).
        """
        messages: list[dict[str, str]] = [{} for _ in questions]
        agents: list[list[AgentCall]] = [[] for _ in questions]
        record: list[tuple[str, int, list[int], Generation]] = []
        node_decoding = decoding.for_upstream(self.max_new_tokens)
        for layer in self.graph.layers:
            pairs, prompts, outputs = self.run_layer(layer, questions, messages, node_decoding, seed_parts)
            for (node, row), prompt, out in zip(pairs, prompts, outputs, strict=True):
                messages[row][node] = out.text
                agents[row].append(
                    AgentCall(role=node, prompt_tokens=len(prompt), generated_tokens=len(out.token_ids), text=out.text)
                )
                record.append((node, row, prompt, out))
        return messages, agents, record

    def prepare(self, questions: list[Question], decoding: DecodingConfig) -> FinalAgentStart:
        messages, agents, _ = self.run_hidden_layers(questions, decoding)
        prompts = [self.render_node(OUTPUT_NODE, q, m) for q, m in zip(questions, messages, strict=True)]
        return FinalAgentStart(prompts=prompts, trace=None, agents=agents)

    def settings(self) -> dict[str, Any]:
        info = {**super().settings(), **self.graph.as_dict()}
        if self.adapter_manifest is None:
            info["adapters"] = None
        else:
            info["adapters"] = self.config.adapters
            info["adapters_fingerprint"] = self.adapter_manifest["fingerprint"]
            info["adapters_training"] = {k: self.adapter_manifest.get(k) for k in ("steps", "lineage", "rl")}
        return info

    @classmethod
    def is_control(cls, identity: dict[str, Any]) -> bool:
        return identity.get("graph") == "0"


def _join(items: list[str]) -> str:
    """`a`, `a and b`, `a, b and c`."""
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _fill(template: str, values: dict[str, str]) -> str:
    """Fill the `{name}` placeholders of `values` in one pass (a question or message holding `{node}` is inserted
    verbatim)."""
    pattern = re.compile(r"\{(" + "|".join(map(re.escape, values)) + r")\}")
    return pattern.sub(lambda match: values[match[1]], template)


def attach_node_adapters(backbone: Backbone, directory: str | Path) -> dict[str, Any]:
    """Load one LoRA adapter per node (subdirectories named after the nodes) onto the backbone's model; returns the
    manifest with `fingerprint` (of the weight files) added. Refuses another method's artefact or another backbone."""
    from peft import PeftModel

    manifest = read_manifest(directory)
    check_method(manifest, ("neuromas",), directory, "adapters=")
    check_backbones(manifest, {"backbone": backbone}, directory)
    path = Path(directory).expanduser()
    nodes = Graph.from_dict(manifest["graph"]).nodes
    model = PeftModel.from_pretrained(backbone.model, str(path / nodes[0]), adapter_name=nodes[0])
    for node in nodes[1:]:
        model.load_adapter(str(path / node), adapter_name=node)
    model.eval()
    model.requires_grad_(False)
    backbone.model = model
    return {**manifest, "fingerprint": weights_fingerprint(path)}
