"""Start-up hook (installed as `diffmas_eval_hook.pth`) so that `lm_eval --model diffmas` works as typed.

lm-eval 0.4.13 has no plugin discovery. At interpreter start this module only appends a tiny finder to
`sys.meta_path`; it does nothing else until `lm_eval.api.registry` is imported. Then it wraps that module's
`get_model` so that the first model lookup registers our backends (after lm-eval's built-ins). Programs that never
import lm-eval pay one extra `sys.meta_path` entry and nothing more.
"""

import sys

_REGISTRY_MODULE = "lm_eval.api.registry"


def _wrap_get_model(module) -> None:
    original = module.get_model

    def get_model(model_name):
        from diffmas_eval.registry import register_models, suggest_model

        register_models()
        try:
            return original(model_name)
        except ValueError as err:
            raise ValueError(f"{err}{suggest_model(model_name)}") from None

    get_model.__doc__ = original.__doc__
    get_model.__wrapped__ = original
    module.get_model = get_model


class _PatchingLoader:
    """Delegates to the real loader, then wraps `get_model` once the registry module has executed."""

    def __init__(self, loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = self._loader
        module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        try:
            _wrap_get_model(module)
        except AttributeError:  # a future lm-eval without get_model: its entry-point discovery takes over
            pass


class _RegistryFinder:
    def find_spec(self, fullname, path=None, target=None):
        if fullname != _REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)
        from importlib.util import find_spec

        spec = find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader)
        return spec


def install() -> None:
    if not any(isinstance(finder, _RegistryFinder) for finder in sys.meta_path) and _REGISTRY_MODULE not in sys.modules:
        sys.meta_path.insert(0, _RegistryFinder())


install()
