from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The tests run against the installed perm-lite (regular or editable), never the checkout's
# perm_lite/ folder found through sys.path: that one lacks perm_lite.cli and perm_lite.models,
# which the install maps in from cli/ and models/. `python -m pytest` puts the working
# directory first on sys.path; take the repository root off before anything imports perm_lite.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
sys.path.insert(0, str(Path(__file__).parent))

from fixture_model import build_model_dir  # noqa: E402


def pytest_sessionstart(session):
    """Fail at once, not in a few odd tests, when perm_lite is not the installed package."""
    try:
        dist = metadata.distribution("perm-lite")
    except metadata.PackageNotFoundError:
        pytest.exit("perm-lite is not installed: install it first (README, 'Run the tests')", 2)
    url = json.loads(dist.read_text("direct_url.json") or "{}")
    if url.get("dir_info", {}).get("editable"):
        expected = Path(unquote(urlparse(url["url"]).path)) / "perm_lite"
    else:
        expected = Path(dist.locate_file("perm_lite"))
    import perm_lite

    found = Path(perm_lite.__file__).resolve().parent
    if found != expected.resolve():
        pytest.exit(f"testing perm_lite from {found}, but the installed perm-lite is {expected}", 2)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("models") / "tiny-test")


@pytest.fixture(scope="session")
def scorer(tiny_model_dir):
    from perm_lite import Scorer

    return Scorer(tiny_model_dir, provider="cpu", threads=1, batch_size=4)
