from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fixture_model import build_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("models") / "tiny-test")


@pytest.fixture(scope="session")
def scorer(tiny_model_dir):
    from perm_lite import Scorer

    return Scorer(tiny_model_dir, provider="cpu", threads=1, batch_size=4)
