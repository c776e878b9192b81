"""Shared fixtures: the embedded checkpoint, a shared session, writable checkpoint copies."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import EMBEDDED
from kvfast import Session


@pytest.fixture(scope="module")
def _loaded() -> Session:
    return Session.from_pretrained()


@pytest.fixture
def session(_loaded: Session) -> Iterator[Session]:
    """The embedded model, loaded once per module and reset around every test that uses it."""
    _loaded.reset()
    yield _loaded
    _loaded.reset()


@pytest.fixture
def model_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A writable copy of the embedded checkpoint, to break on purpose.

    Made with `tmp_path_factory` so that the path does not contain the test's name (an error
    message must not match `pytest.raises(match=...)` merely by quoting its path), and with
    copyfile so that the copies are writable even though the packaged files are read-only.
    """
    dst = tmp_path_factory.mktemp("ckpt") / "model"
    shutil.copytree(EMBEDDED, dst, copy_function=shutil.copyfile)
    return dst
