"""Shared fixtures: the tiny in-code model (no downloads) and the full offline data directory (when there is one)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def pytest_configure(config) -> None:
    """Make a relative `$DIFFMAS_DATA_DIR` absolute: tests that start lm-eval in a temporary directory inherit it."""
    explicit = os.environ.get("DIFFMAS_DATA_DIR")
    if explicit:
        os.environ["DIFFMAS_DATA_DIR"] = str(Path(explicit).expanduser().absolute())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny tied-embedding Qwen2 model directory, built once per test session."""
    from diffmas_eval.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-tied"))


@pytest.fixture(scope="session")
def tiny_untied_model_dir(tmp_path_factory) -> Path:
    """A tiny model with a separate lm_head (realignment is not the identity)."""
    from diffmas_eval.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-untied"), tie_word_embeddings=False, seed=1)


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The full offline benchmark copies: `$DIFFMAS_DATA_DIR`, else `../shared/data` beside the repo (CI has both).

    Without either (a fresh clone) the tests that check the full copies skip; everything else runs on
    tests/fixtures/data. A DIFFMAS_DATA_DIR that is set but names no directory fails them: a typo must not skip.
    """
    explicit = os.environ.get("DIFFMAS_DATA_DIR")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            pytest.fail(f"DIFFMAS_DATA_DIR={explicit!r} is not a directory: fix it, or unset it to skip these tests")
        return path
    if not SHARED_DATA.is_dir():
        pytest.skip("needs the full benchmark copies: set DIFFMAS_DATA_DIR or put ../shared beside the repo")
    return SHARED_DATA
