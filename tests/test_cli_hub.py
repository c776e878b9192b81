"""CLI and model resolution (hub ids go through huggingface_hub; offline here)."""

from __future__ import annotations

from pathlib import Path

import pytest
from kvfast import cli
from kvfast.hub import EMBEDDED_MODEL, resolve_model


def test_cli_generate_streams_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["generate", "--prompt", "Once upon a time", "--max-new-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and "tok/s" in err


def test_cli_generate_chat(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["generate", "--prompt", "Hi", "--chat", "--max-new-tokens", "4"]) == 0
    assert "prompt tokens" in capsys.readouterr().err


def test_cli_info(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "2,033,280" in out and "qwen3" in out and "KV cache per token" in out


def test_cli_error_is_a_message_not_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info", "--dtype", "f8"]) == 2
    assert "kvfast: error:" in capsys.readouterr().err


def test_resolve_embedded_and_local() -> None:
    assert resolve_model(None) == EMBEDDED_MODEL
    assert resolve_model(str(EMBEDDED_MODEL)) == EMBEDDED_MODEL


def test_hub_id_offline_names_the_id(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="Qwen/Qwen3-0.6B"):
        resolve_model("Qwen/Qwen3-0.6B")


def test_gguf_and_files(tmp_path: Path) -> None:
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="GGUF"):
        resolve_model(f)
    with pytest.raises(ValueError, match="directory"):
        resolve_model(EMBEDDED_MODEL / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(tmp_path)
