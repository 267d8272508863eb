"""Documented settings dataclasses: every field has a default, a one-line help and says whether it is part of a run's
identity. Method model args (`methods/`) and training configs (`training/config.py`) are built from them, so
`--help`, `diffmas-eval models`, validation with "did you mean", results identity and run keys all read one
declaration.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any

import yaml


def setting(help: str, default: Any = None, *, factory: Any = None, identity: bool = True) -> Any:
    """A dataclass field with its one-line `help` and whether it changes what a run computes (`identity`)."""
    metadata = {"help": help, "identity": identity}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type annotation of a settings dataclass."""
    return typing.get_type_hints(cls)


def field_default(item: dataclasses.Field) -> Any:
    return item.default if item.default is not dataclasses.MISSING else item.default_factory()


def coerce(name: str, value: Any, annotation: Any) -> Any:
    """Convert a YAML, CLI or lm-eval model-arg value to the field's type, or raise one clear ValueError."""
    if typing.get_origin(annotation) is list:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            raise ValueError(f"{name} must be a list (YAML list or comma-separated), got {value!r}")
        return [str(v) for v in value]
    args = typing.get_args(annotation)
    optional = type(None) in args
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ValueError(f"{name} cannot be empty")
    base = next(a for a in args if a is not type(None)) if args else annotation
    if isinstance(value, str) and base is not str:
        value = yaml.safe_load(value)
    try:
        if base is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            if not isinstance(value, bool):
                raise TypeError
            return value
        if base is int:
            if isinstance(value, bool) or float(value) != int(value):
                raise TypeError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {getattr(base, '__name__', base)}, got {value!r}") from None


def unknown_names_message(unknown: list[str], known: list[str]) -> str:
    """`'x' (did you mean 'y'?), 'z'` for mistyped setting names."""
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1)
        hints.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    return ", ".join(hints)


def build_settings(cls: type, values: dict[str, Any], *, what: str) -> Any:
    """An instance of settings dataclass `cls` from raw values (strings allowed), refusing unknown names.

    Args:
        what: how an error names these settings, e.g. "--model latent-mas model arg(s)".
    """
    types_ = field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown {what} {unknown_names_message(unknown, names)}; known: {', '.join(names)}")
    return cls(**{k: coerce(k, v, types_[k]) for k, v in values.items()})


def identity_fields(instance: Any) -> dict[str, Any]:
    """The fields of a settings dataclass marked as part of the run's identity, by name."""
    return {f.name: getattr(instance, f.name) for f in dataclasses.fields(instance) if f.metadata.get("identity", True)}


def describe(cls: type) -> list[tuple[str, str, Any, str, bool]]:
    """(name, type, default, help, identity) per field, for `--help` and `diffmas-eval models`."""
    types_ = field_types(cls)
    rows = []
    for item in dataclasses.fields(cls):
        annotation = types_[item.name]
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        type_name = getattr(args[0] if args else annotation, "__name__", str(annotation))
        rows.append(
            (item.name, type_name, field_default(item), item.metadata.get("help", ""), item.metadata.get("identity"))
        )
    return rows


def parsed_args(args: Any) -> dict[str, Any]:
    """Model args or gen_kwargs as lm-eval holds them: a results file may record a dict or a `k=v,...` string, which
    is parsed (typed) as lm-eval parses its command line."""
    if isinstance(args, dict):
        return dict(args)
    if isinstance(args, str) and args.strip():
        from lm_eval.utils import simple_parse_args_string

        return simple_parse_args_string(args)
    return {}


# The final agent's budget in lm-eval generation kwargs, in the order `DecodingConfig.from_gen_kwargs` reads them.
BUDGET_KEYS = ("max_gen_toks", "max_new_tokens")


def _budget_number(value: Any) -> int | None:
    try:
        return None if value is None or isinstance(value, bool) else int(value)
    except (TypeError, ValueError):
        return None


def split_budget(decoding: Any) -> tuple[Any, int | None]:
    """A results file's `gen_kwargs` (a dict, or lm-eval's `k=v,...` string) without the final-agent budget keys, and
    the budget they give (None when they give none)."""
    if not decoding:
        return None, None
    parsed = parsed_args(decoding) if isinstance(decoding, str) else dict(decoding)
    values = [parsed.pop(k) for k in BUDGET_KEYS if k in parsed]
    return (parsed or None), next((b for b in map(_budget_number, values) if b is not None), None)


def task_budget(results: dict[str, Any], task: str) -> int | None:
    """The final-agent budget `task` ran with, from a results file (`results_*.json` as loaded): the task's own
    generation kwargs as lm-eval recorded them (the task's YAML with `--gen_kwargs` merged in), else `config.gen_kwargs`
    for files without per-task configs, else the budget our backends fall back to (`config.diffmas`); None for a task
    that does not generate (letter-scored multiple choice) or when nothing says.
    """
    task_config = (results.get("configs") or {}).get(task)
    if isinstance(task_config, dict):
        if task_config.get("output_type", "generate_until") != "generate_until":
            return None
        budget = split_budget(task_config.get("generation_kwargs"))[1]
    else:
        budget = split_budget((results.get("config") or {}).get("gen_kwargs"))[1]
    if budget is None:  # neither gives one: our backends' own default, which they record
        budget = _budget_number(((results.get("config") or {}).get("diffmas") or {}).get("max_gen_toks_default"))
    return budget
