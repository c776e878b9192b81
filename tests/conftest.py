from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from kvfast import Session
from kvfast.hub import EMBEDDED_MODEL


@pytest.fixture(scope="module")
def session() -> Session:
    return Session.from_pretrained()


@pytest.fixture
def model_copy(tmp_path: Path) -> Path:
    """A writable copy of the embedded checkpoint, to break on purpose."""
    dst = tmp_path / "model"
    shutil.copytree(EMBEDDED_MODEL, dst)
    return dst
