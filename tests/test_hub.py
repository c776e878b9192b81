"""Model resolution: embedded model, local paths, hub ids (never the network in this suite)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import huggingface_hub
import huggingface_hub.constants
import pytest
from helpers import EMBEDDED
from kvfast.hub import EMBEDDED_MODEL, resolve_model


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if resolve_model tries to download anything."""

    def refuse(*args: Any, **kwargs: Any) -> str:
        raise AssertionError(f"unexpected download: {args} {kwargs}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)


def test_none_is_the_embedded_model() -> None:
    assert resolve_model(None) == EMBEDDED_MODEL == EMBEDDED
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (EMBEDDED_MODEL / name).is_file(), f"the package lacks data/qwen3-tiny/{name}"


def test_local_directory_is_itself(no_network: None, tmp_path: Path) -> None:
    assert resolve_model(EMBEDDED) == EMBEDDED
    assert resolve_model(str(EMBEDDED)) == EMBEDDED
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()
    (tmp_path / "org" / "name" / "config.json").write_text("{}")
    # An existing directory wins over a hub id with the same spelling.
    with pytest.MonkeyPatch.context() as m:
        m.chdir(tmp_path)
        assert resolve_model("org/name") == Path("org/name")


def test_directory_without_config_names_the_file(no_network: None, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(tmp_path)


def test_files_are_checkpoints_only_when_gguf(no_network: None, tmp_path: Path) -> None:
    gguf = tmp_path / "model.Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model(gguf) == gguf  # the engine reads (and checks) the file
    with pytest.raises(ValueError, match="directory.*or a .gguf file"):
        resolve_model(EMBEDDED / "config.json")


@pytest.mark.parametrize("name", ["no/such/dir/", "./nope/model", "a/b/c", "/abs/missing"])
def test_missing_paths_are_not_downloaded(no_network: None, name: str) -> None:
    with pytest.raises(FileNotFoundError, match=name.strip("./")):
        resolve_model(name)


def test_hub_id_is_downloaded_with_patterns(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []

    def fake(repo_id: str, **kwargs: Any) -> str:
        calls.append((repo_id, kwargs))
        return str(EMBEDDED)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert resolve_model("Qwen/Qwen3-0.6B") == EMBEDDED
    [(repo_id, kwargs)] = calls
    assert repo_id == "Qwen/Qwen3-0.6B"
    patterns = kwargs["allow_patterns"]
    for needed in ("*.json", "*.safetensors", "tokenizer*"):
        assert needed in patterns
    # Not everything: no pickled torch weights, no GGUF files.
    assert "*" not in patterns
    assert not any(p.endswith((".bin", ".pt", ".pth", ".gguf")) for p in patterns)


def test_downloaded_repo_without_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"'someone/gguf-only'.*config\.json"):
        resolve_model("someone/gguf-only")


def test_hub_id_offline_names_the_id(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Offline with an empty cache. huggingface_hub reads the environment once, at import, so
    # its constants are patched too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(
        FileNotFoundError, match="could not find or download model 'Qwen/Qwen3-0.6B'"
    ):
        resolve_model("Qwen/Qwen3-0.6B")
