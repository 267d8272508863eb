"""The training configuration: one flat, printable dataclass; every field has a default and a one-line help.

A run is configured by an optional YAML file (`--config`) whose keys are these field names, then any field given on
the command line (`--latent_steps 8`) overrides it.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from diffmas_eval.settings import build_settings, coerce, field_types, setting, unknown_names_message

ADAPTER_MODES = ("shared", "per_role")
SCHEDULERS = ("constant", "linear", "cosine")
TRACKERS = ("none", "tensorboard", "wandb")


def _help(text: str, default: Any = None, factory: Any = None) -> Any:
    return setting(text, default, factory=factory)


@dataclass
class TrainConfig:
    """Everything that decides what `diffmas-train` computes (recorded in the adapter's `diffmas_adapter.json`)."""

    output_dir: str | None = _help("Directory for the adapter, its config and checkpoints (required).")
    method: str = _help(
        "The method to train, with its objective: `diffmas` (agents + latent trace), `single-agent` (the LoRA "
        "single-agent baseline), or any registered method that declares an objective.",
        "diffmas",
    )
    pretrained: str | None = _help("Backbone: HF dir, hub id or embedded model name (None: embedded default).")
    dtype: str = _help("Backbone dtype: float32, bfloat16 or float16 (LoRA weights stay float32).", "float32")
    data: list[str] = _help(
        "Training sources: train splits (gsm8k, arc_easy, arc_challenge, openbookqa, commonsenseqa, mbpp) and/or "
        "paths of JSONL files with {question, target[, answer_format, id]}.",
        factory=lambda: ["arc_easy"],
    )
    data_dir: str | None = _help("Benchmark data directory (layout of shared/data); default $DIFFMAS_DATA_DIR.")
    answer_format: str | None = _help(
        "Answer format of the targets and of the final agent's instruction (default: each source's evaluation task "
        "format; `letter` matches the `_mc` tasks)."
    )
    max_items_per_source: int | None = _help(
        "Cap each source at a seeded random subset of this many items (after decontamination), so a mix of sources "
        "is not dominated by the largest."
    )
    max_train_items: int | None = _help(
        "Use a seeded random subset of this many items (after decontamination and the per-source cap)."
    )
    balance_letters: bool = _help(
        "Reorder each multiple-choice item's options so the gold letters are uniform (seeded), so the adapter cannot "
        "learn a letter prior.",
        False,
    )
    decontaminate: bool = _help("Drop training items that are also evaluation items (recommended).", True)
    max_length: int | None = _help("Longest total sequence (all agents + target); default the model's context.")
    skip_too_long: bool = _help("Drop items longer than max_length instead of stopping with an error.", False)
    topology: str = _help("Agent topology, as in evaluation: sequential or hierarchical.", "sequential")
    latent_steps: int = _help("m: latent steps per upstream agent (>= 0).", 0)
    realign: bool = _help("Use the ridge realignment map for latent steps (as the latent-mas model arg).", False)
    adapters: str = _help("One LoRA adapter `shared` by all roles, or one `per_role`.", "shared")
    frozen_trace: bool = _help("Build the trace without gradients (the ablation); default coupled.", False)
    recompute: bool = _help("Recompute activations in the backward pass to bound memory (slower).", False)
    prompts: str | None = _help("Prompt set name or YAML path (default diffmas-v1), as the backends' model arg.")
    system_prompt: str | None = _help("Override the prompt set's system message (as the backends' model arg).")
    enable_thinking: bool | None = _help("Passed to the chat template (as the backends' model arg).")
    append_eos: bool = _help("Train the final agent to end its turn after the target (end-of-turn token).", True)
    lora_r: int = _help("LoRA rank.", 8)
    lora_alpha: float = _help("LoRA alpha (scale = alpha / r).", 16.0)
    lora_dropout: float = _help("LoRA dropout.", 0.0)
    lora_target_modules: list[str] = _help(
        "Module names (suffixes) that get LoRA.", factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    learning_rate: float = _help("Peak AdamW learning rate.", 2e-4)
    weight_decay: float = _help("AdamW weight decay.", 0.0)
    lr_scheduler: str = _help("Learning-rate schedule after warmup: constant, linear or cosine.", "linear")
    warmup_steps: int = _help("Linear warmup steps.", 0)
    max_grad_norm: float = _help("Clip the global gradient norm to this (0: no clipping).", 1.0)
    per_device_batch_size: int = _help("Examples per process per micro-batch.", 4)
    grad_accum_steps: int = _help("Micro-batches per optimizer step.", 1)
    max_steps: int | None = _help("Optimizer steps (default: `epochs` over the data).")
    epochs: float = _help("Passes over the data when max_steps is not given.", 1.0)
    seed: int = _help("Seed for adapter init, data subset and data order.", 0)
    checkpoint_every: int = _help("Write a resumable checkpoint every this many steps (0: only at the end).", 50)
    keep_checkpoints: int = _help("Keep this many most recent checkpoints.", 2)
    resume: bool = _help("Continue from the latest checkpoint in output_dir (same data order and optimizer).", False)
    stop_after_steps: int | None = _help("Stop (after checkpointing) once this step is reached; resume later.")
    log_every: int = _help("Log to trackers every this many steps.", 10)
    report_to: str = _help("Tracker through accelerate: none, tensorboard or wandb.", "none")
    device: str | None = _help("Single-process device (default: CUDA if available); accelerate launch decides.")
    progress: bool = _help("Show a progress bar (loss, tokens/s, ETA) on the main process.", True)

    def validate(self) -> None:
        """Raise ValueError with one sentence naming the fix for any bad setting (before any model work)."""
        checks = [
            (self.output_dir, "output_dir is required (--output_dir DIR)"),
            (self.adapters in ADAPTER_MODES, f"adapters must be one of {', '.join(ADAPTER_MODES)}"),
            (self.lr_scheduler in SCHEDULERS, f"lr_scheduler must be one of {', '.join(SCHEDULERS)}"),
            (self.report_to in TRACKERS, f"report_to must be one of {', '.join(TRACKERS)}"),
            (isinstance(self.latent_steps, int) and self.latent_steps >= 0, "latent_steps must be an integer >= 0"),
            (self.data, "data is empty: name at least one training source"),
            (self.lora_target_modules, "lora_target_modules is empty: name at least one module, e.g. q_proj"),
            (self.lora_r > 0, "lora_r must be > 0"),
            (self.per_device_batch_size > 0 and self.grad_accum_steps > 0, "batch sizes must be > 0"),
            (self.max_steps is None or self.max_steps > 0, "max_steps must be > 0"),
            (self.epochs > 0, "epochs must be > 0"),
            (self.max_train_items is None or self.max_train_items > 0, "max_train_items must be > 0"),
            (self.max_items_per_source is None or self.max_items_per_source > 0, "max_items_per_source must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        from diffmas_eval.methods.registry import trainable_methods
        from diffmas_eval.prompts import TOPOLOGIES

        trainable = trainable_methods()
        if self.method not in trainable:
            raise ValueError(f"method must be one of {', '.join(trainable)}, got {self.method!r}")

        if self.topology not in TOPOLOGIES:
            raise ValueError(f"topology must be one of {', '.join(TOPOLOGIES)}, got {self.topology!r}")
        if self.method == "single-agent" and (self.latent_steps or self.adapters != "shared" or self.frozen_trace):
            raise ValueError("method=single-agent has no trace: drop latent_steps, frozen_trace and adapters=per_role")

    def to_dict(self) -> dict[str, Any]:
        """Every field, plus the objective's own settings under `objective_settings` (when it has any)."""
        out = dataclasses.asdict(self)
        settings = getattr(self, "objective_settings", None)
        if settings is not None:
            out["objective_settings"] = dataclasses.asdict(settings)
        return out


# Fields that may differ between a run and its resumption without changing what is computed.
RESUME_FREE_FIELDS = frozenset(
    {
        "resume",
        "stop_after_steps",
        "checkpoint_every",
        "keep_checkpoints",
        "log_every",
        "report_to",
        "progress",
        "device",
    }
)


def objective_settings_class(method: str) -> type | None:
    """The settings dataclass of `method`'s training objective (its own fields, beside TrainConfig's), or None."""
    from diffmas_eval.methods.registry import trainable_methods
    from diffmas_eval.training.objective import objective_class

    if method not in trainable_methods():
        return None
    return getattr(objective_class(method), "settings_class", None)


def build_config(overrides: dict[str, Any], yaml_path: str | Path | None = None) -> TrainConfig:
    """A validated config from an optional YAML file plus overrides (field name -> value or string).

    Keys are TrainConfig's fields plus the fields of the chosen method's objective settings (e.g. a C2C fuser's
    sizes); the latter become `config.objective_settings`."""
    values: dict[str, Any] = {}
    types_ = field_types(TrainConfig)
    if yaml_path is not None:
        path = Path(yaml_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"config file {yaml_path} does not exist; pass an existing YAML file to --config")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {yaml_path} must be a YAML mapping of field names to values")
        values.update(loaded)
    values.update(overrides)
    method = str(values.get("method", TrainConfig.method))
    settings_class = objective_settings_class(method)
    objective_names = {f.name for f in dataclasses.fields(settings_class)} if settings_class else set()
    unknown = sorted(set(values) - set(types_) - objective_names)
    if unknown:
        message = unknown_names_message(unknown, [*types_, *objective_names])
        raise ValueError(f"unknown training setting(s) {message} for method {method!r}; see `diffmas-train --help`")
    config = TrainConfig(**{k: coerce(k, v, types_[k]) for k, v in values.items() if k in types_})
    config.validate()
    if settings_class is not None:
        objective_values = {k: v for k, v in values.items() if k in objective_names}
        config.objective_settings = build_settings(settings_class, objective_values, what="training setting(s)")
        validate = getattr(config.objective_settings, "validate", None)
        if validate is not None:
            validate()
    return config


def argument_parser() -> argparse.ArgumentParser:
    """`--config FILE` plus one `--<field> VALUE` option per config field and per objective setting of every
    trainable method (booleans also as bare flags)."""
    from diffmas_eval.methods.registry import trainable_methods

    parser = argparse.ArgumentParser(
        prog="diffmas-train",
        description="Train a method's trained modules with its objective (DiffMAS adapters, the LoRA single-agent "
        "baseline, and every registered method that declares an objective).",
    )
    parser.add_argument("--config", help="YAML file of settings (field: value); command-line options override it.")
    _add_fields(parser, TrainConfig)
    seen = {f.name for f in dataclasses.fields(TrainConfig)}
    for method in trainable_methods():
        settings_class = objective_settings_class(method)
        if settings_class is None:
            continue
        fresh = [f for f in dataclasses.fields(settings_class) if f.name not in seen]
        seen.update(f.name for f in fresh)
        group = parser.add_argument_group(f"--method {method}")
        _add_fields(group, settings_class, only=fresh)
    return parser


def _add_fields(parser: Any, cls: type, only: list | None = None) -> None:
    types_ = field_types(cls)
    for item in only if only is not None else dataclasses.fields(cls):
        default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": f"{item.metadata['help']} [{default}]"}
        if bool in typing.get_args(types_[item.name]) or types_[item.name] is bool:
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        parser.add_argument(f"--{item.name}", **kwargs)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    args = vars(argument_parser().parse_args(argv))
    yaml_path = args.pop("config", None)
    return build_config(args, yaml_path)
