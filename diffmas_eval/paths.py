"""Where things live: the user cache, the benchmark data directory and the shipped lm-eval task configs.

Nothing here depends on the working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "DIFFMAS_DATA_DIR"
CACHE_DIR_ENV = "DIFFMAS_CACHE_DIR"

_PACKAGE_DIR = Path(__file__).resolve().parent


def cache_dir() -> Path:
    """The user cache (converted models, alignment maps): `$DIFFMAS_CACHE_DIR`, else `$XDG_CACHE_HOME/diffmas_eval`."""
    explicit = os.environ.get(CACHE_DIR_ENV)
    if explicit:
        path = Path(explicit).expanduser()
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        path = base / "diffmas_eval"
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def data_dir() -> Path | None:
    """The benchmark data directory named by `$DIFFMAS_DATA_DIR` (layout of `shared/data`), or None when unset.

    Raises:
        FileNotFoundError: the variable names a directory that does not exist.
    """
    explicit = os.environ.get(DATA_DIR_ENV)
    if not explicit:
        return None
    path = Path(explicit).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(
            f"{DATA_DIR_ENV}={explicit!r} is not a directory; point it at a copy of the data layout."
        )
    return path


def project_dir(name: str) -> Path:
    """A top-level project folder (`tasks`, `baselines`): the source checkout's, else the copy shipped in the wheel
    (`diffmas_eval/_<name>`)."""
    checkout = _PACKAGE_DIR.parent / name
    if checkout.is_dir() and (_PACKAGE_DIR.parent / "pyproject.toml").is_file():
        return checkout
    shipped = _PACKAGE_DIR / f"_{name}"
    if shipped.is_dir():
        return shipped
    raise FileNotFoundError(f"no {name}/ found at {checkout} or {shipped}; reinstall diffmas-eval")


def tasks_dir() -> Path:
    """The lm-eval task configs: `tasks/` of a source checkout, else the copy shipped inside the wheel."""
    return project_dir("tasks")
