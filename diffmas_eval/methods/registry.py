"""The method registry, as peft registers its tuners: name -> `Method` class (which names its config class and,
optionally, its training objective).

Everything that lists or labels methods reads this one table: the lm-eval model names (the start-up hook and
`diffmas_eval.lm_backend`), `diffmas-eval models`, the run identity in results, `diffmas-train --method`, and the
report's labels and row kinds. A method is registered by decorating its class with `@register_method`; methods of
other installed packages are found through the entry-point group `diffmas_eval.methods` (each entry point names a
module, imported once, whose classes register themselves).
"""

from __future__ import annotations

import difflib
import importlib
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diffmas_eval.methods.base import Method

logger = logging.getLogger(__name__)

PLUGIN_GROUP = "diffmas_eval.methods"
# The methods this package ships, in report order; importing a module registers its classes.
BUILTIN_MODULES = (
    "diffmas_eval.methods.single_agent",
    "diffmas_eval.methods.text_mas",
    "diffmas_eval.methods.latent_mas",
    "diffmas_eval.methods.diffmas",
    "diffmas_eval.methods.c2c",
    "diffmas_eval.methods.neuromas",
    "diffmas_eval.methods.interlat",
)

_METHODS: dict[str, type[Method]] = {}
_loaded = False


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: add a `Method` subclass under its `name` (re-registering the same class is harmless)."""
    for attribute in ("name", "family", "config_class"):
        if not getattr(cls, attribute, None):
            raise TypeError(f"method class {cls.__name__} must set `{attribute}` to be registered")
    existing = _METHODS.get(cls.name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"method name {cls.name!r} is already registered by {existing.__module__}.{existing.__name__}")
    _METHODS[cls.name] = cls
    return cls


def _load() -> None:
    """Import the built-in method modules, then plugin modules from the `diffmas_eval.methods` entry points."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    from importlib.metadata import entry_points

    for entry in entry_points(group=PLUGIN_GROUP):
        try:
            entry.load()
        except Exception as error:  # a broken plugin must not take the built-in methods down with it
            logger.warning("could not load method plugin %s (%s): %s", entry.name, entry.value, error)


def methods() -> dict[str, type[Method]]:
    """Every registered method by name: built-ins first, in `BUILTIN_MODULES` order (the report's), then plugins."""
    _load()

    def rank(cls: type[Method]) -> int:
        return BUILTIN_MODULES.index(cls.__module__) if cls.__module__ in BUILTIN_MODULES else len(BUILTIN_MODULES)

    return {cls.name: cls for cls in sorted(_METHODS.values(), key=rank)}


def get_method(name: str) -> type[Method]:
    """The method class registered as `name`, or a ValueError with a "did you mean"."""
    table = methods()
    if name not in table:
        close = difflib.get_close_matches(name, list(table), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown method {name!r}{hint} (known: {', '.join(table)})")
    return table[name]


def trainable_methods() -> dict[str, type[Method]]:
    """Methods that declare a training objective (what `diffmas-train --method` accepts)."""
    return {name: cls for name, cls in methods().items() if cls.objective}
