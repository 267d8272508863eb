"""Shared fixtures: the tiny in-code model (no downloads) and the offline data directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


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
    """`../shared/data`, the offline benchmark copies (what CI points DIFFMAS_DATA_DIR at)."""
    path = Path(os.environ.get("DIFFMAS_DATA_DIR") or SHARED_DATA)
    if not path.is_dir():
        pytest.fail(
            f"benchmark data directory {path} is missing: set DIFFMAS_DATA_DIR or put ../shared beside the repo"
        )
    return path
