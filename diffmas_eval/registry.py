"""Registering the backends with lm-eval's model registry (lazily: the classes load on first use)."""

from __future__ import annotations

MODEL_TARGETS = {
    "single-agent": "diffmas_eval.lm_backend:SingleAgentLM",
    "text-mas": "diffmas_eval.lm_backend:TextMASLM",
    "latent-mas": "diffmas_eval.lm_backend:LatentMASLM",
    "diffmas": "diffmas_eval.lm_backend:DiffMASLM",
}


def register_models() -> None:
    """Add our model names to lm-eval's registry, keeping its built-ins, idempotently.

    lm-eval 0.4.13 imports its built-in models (`hf`, `dummy`, ...) only while the registry is empty, so they are
    imported first; a name already present (registered by an entry point or an earlier call) is left alone.
    """
    import lm_eval.models  # noqa: F401  (built-ins first, or they would vanish)
    from lm_eval.api.registry import model_registry

    for name, target in MODEL_TARGETS.items():
        if name not in model_registry:
            model_registry.register(name, target=target)


def suggest_model(name: str) -> str:
    """ " Did you mean 'x'?" for a mistyped model name, or an empty string."""
    import difflib

    from lm_eval.api.registry import model_registry

    close = difflib.get_close_matches(name, list(model_registry.keys()), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""
