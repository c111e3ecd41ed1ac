"""The Merlin 23.08 container's stack, stood up on CPU (`make test-compat` builds it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def compat_python() -> Path:
    path = Path(os.environ.get("COMPAT_PYTHON", ROOT / ".venv-compat" / "bin" / "python"))
    assert path.is_file(), f"{path} is missing: run `make test-compat`, which builds the container-stack venv"
    return path


from tests.integration.conftest import hist_server, server  # noqa: E402,F401 - the main stack's servers, to compare with
