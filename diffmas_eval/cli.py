"""`diffmas-eval`: the whole lm-eval CLI with our backends registered and our `tasks/` on the include path.

diffmas-eval --model latent-mas --model_args latent_steps=10 --tasks mas_gsm8k --limit 8
diffmas-eval ls tasks            # lm-eval's listing, including this project's tasks
diffmas-eval models              # the methods, their model args, and the embedded models
diffmas-eval models latent-mas   # one method's model args
"""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path

_LM_EVAL_COMMANDS = ("run", "ls", "validate")


def _has_option(argv: list[str], option: str) -> bool:
    return any(arg == option or arg.startswith(option + "=") for arg in argv)


def _option_value(argv: list[str], option: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == option and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
    return None


def _set_option(argv: list[str], option: str, value: str) -> list[str]:
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == option and i + 1 < len(out):
            out[i + 1] = value
            return out
        if arg.startswith(option + "="):
            out[i] = f"{option}={value}"
            return out
    return out + [option, value]


def with_project_defaults(argv: list[str]) -> list[str]:
    """lm-eval arguments plus this project's defaults: `--include_path tasks/` when none is given, and a side-car
    file beside the results (model arg `sidecar`) when `--output_path` is given for one of our models."""
    from diffmas_eval.paths import tasks_dir
    from diffmas_eval.registry import model_names

    argv = list(argv)
    is_lm_eval_run = bool(argv) and (argv[0] in _LM_EVAL_COMMANDS or argv[0].startswith("-"))
    if is_lm_eval_run and not _has_option(argv, "--include_path") and "-h" not in argv and "--help" not in argv:
        argv += ["--include_path", str(tasks_dir())]
    model = _option_value(argv, "--model")
    output = _option_value(argv, "--output_path")
    model_args = _option_value(argv, "--model_args") or ""
    if model and output and "sidecar=" not in model_args and model in model_names():
        directory = Path(output) if not output.endswith(".json") else Path(output).parent
        # A random part: two evaluations started in the same second must not share a side-car (a resume store).
        name = f"{model}_{time.strftime('%Y-%m-%dT%H-%M-%S')}_{uuid.uuid4().hex[:8]}.jsonl"
        sidecar = directory.resolve() / "sidecars" / name
        argv = _set_option(argv, "--model_args", ",".join(filter(None, [model_args, f"sidecar={sidecar}"])))
    return argv


def _print_models(only: list[str]) -> None:
    """The registered methods with their model args (type, default, help; * = part of the run identity), then the
    embedded models."""
    from diffmas_eval.embedded import DEFAULT_EMBEDDED_MODEL, EMBEDDED_MODELS
    from diffmas_eval.lm_backend import BackendArgs
    from diffmas_eval.methods.registry import get_method, methods
    from diffmas_eval.settings import describe

    names = only or list(methods())
    print("methods (lm_eval --model NAME --model_args k=v,...; * = part of the run's identity):")
    for name in names:
        method = get_method(name)
        trains = f"; train with diffmas-train --method {name}" if method.objective else ""
        print(f"\n{name}: {method.description}{trains}")
        for arg, type_name, default, help_text, identity in describe(method.config_class):
            print(f"  {'*' if identity else ' '} {arg} ({type_name}, default {default!r}): {help_text}")
    print("\nevery method also takes:")
    for arg, type_name, default, help_text, _ in describe(BackendArgs):
        print(f"    {arg} ({type_name}, default {default!r}): {help_text}")
    print("\nembedded models (model arg pretrained=NAME):")
    for name, model in EMBEDDED_MODELS.items():
        default = " (default)" if name == DEFAULT_EMBEDDED_MODEL else ""
        print(f"  {name}{default}: {model.description}")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["models"]:
        _print_models(argv[1:])
        return
    if argv[:1] == ["reproduce"]:
        from diffmas_eval.reproduce import main as reproduce

        sys.exit(reproduce(argv[1:]))
    if _has_option(argv, "--apply_chat_template"):
        sys.exit("diffmas-eval: the backends template every agent's turn themselves; drop --apply_chat_template")
    from diffmas_eval.registry import register_models

    register_models()
    sys.argv = ["diffmas-eval", *with_project_defaults(argv)]
    from lm_eval.__main__ import cli_evaluate

    try:
        cli_evaluate()
    finally:
        output = _option_value(argv, "--output_path")
        if output and Path(output).exists():
            from diffmas_eval.paths import data_dir
            from diffmas_eval.portable import make_portable

            # Results without this machine's paths (relative ones are resolved from the results file).
            make_portable([Path(output)], root=Path.cwd(), data_dir=data_dir())


if __name__ == "__main__":
    main()
