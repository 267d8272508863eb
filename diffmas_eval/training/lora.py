"""LoRA on a frozen backbone: one adapter shared by every role, or one per role (named after the role)."""

from __future__ import annotations

import difflib

import torch

from diffmas_eval.core.backbone import Backbone


def linear_module_names(model: torch.nn.Module) -> set[str]:
    """Short names (last path component) of the model's linear layers: what LoRA `target_modules` match."""
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def check_target_modules(backbone: Backbone, target_modules: list[str]) -> None:
    """Raise one clear error naming unknown LoRA target modules and the ones this backbone has."""
    available = linear_module_names(backbone.causal_lm)
    unknown = [t for t in target_modules if t not in available]
    if unknown:
        hints = [
            f"{u!r}"
            + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(u, sorted(available), 1)) else "")
            for u in unknown
        ]
        raise ValueError(
            f"lora_target_modules {', '.join(hints)} match no linear layer of {backbone.name!r}; "
            f"it has: {', '.join(sorted(available))}"
        )


def attach_lora(
    backbone: Backbone,
    roles: list[str],
    *,
    per_role: bool,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: list[str],
) -> list[tuple[str, torch.nn.Parameter]]:
    """Wrap `backbone.model` in a peft model with fresh LoRA adapter(s) (B = 0: an exact no-op) and return the
    trainable parameters by name. Shared: the adapter `default` (saved at the directory root). Per role: one adapter
    per role, saved in a subdirectory named after it (the layout `methods.diffmas.attach_adapter` reads)."""
    from peft import LoraConfig, get_peft_model

    check_target_modules(backbone, target_modules)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    if per_role:
        model = get_peft_model(backbone.model, config, adapter_name=roles[0])
        for role in roles[1:]:
            model.add_adapter(role, config)
        model.set_requires_grad(roles, True)
    else:
        model = get_peft_model(backbone.model, config)
    backbone.model = model
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable or any("lora_" not in name for name, _ in trainable):
        raise RuntimeError("expected only LoRA weights to be trainable; the backbone must stay frozen")
    return trainable
