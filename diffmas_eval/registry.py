"""Registering the backends with lm-eval's model registry: one name per registered method (`methods/registry.py`)."""

from __future__ import annotations


def model_names() -> list[str]:
    """The lm-eval model names of every registered method (built-ins and plugins)."""
    from diffmas_eval.methods.registry import methods

    return list(methods())


def register_models() -> None:
    """Add our model names to lm-eval's registry, keeping its built-ins, idempotently.

    lm-eval 0.4.13 imports its built-in models (`hf`, `dummy`, ...) only while the registry is empty, so they are
    imported first; a name already present (registered by an entry point or an earlier call) is left alone.
    """
    import lm_eval.models  # noqa: F401  (built-ins first, or they would vanish)
    from lm_eval.api.registry import model_registry

    from diffmas_eval.lm_backend import backend_class

    for name in model_names():
        if name not in model_registry:
            model_registry.register(name, target=backend_class(name))


def suggest_model(name: str) -> str:
    """ " Did you mean 'x'?" for a mistyped model name, or an empty string."""
    import difflib

    from lm_eval.api.registry import model_registry

    close = difflib.get_close_matches(name, list(model_registry.keys()), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""
