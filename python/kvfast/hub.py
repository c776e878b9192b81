"""Resolve what the user passed as `model` to a local checkpoint directory."""

from __future__ import annotations

import os
import re
from pathlib import Path

EMBEDDED_MODEL = Path(__file__).parent / "data" / "qwen3-tiny"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.jinja"]


def resolve_model(model: str | os.PathLike[str] | None) -> Path:
    """The checkpoint directory for `model`: None (embedded model), a path, or a hub id."""
    if model is None:
        return EMBEDDED_MODEL
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a checkpoint directory")
        return path
    if path.is_file():
        if path.suffix == ".gguf":
            raise ValueError(f"{path}: GGUF checkpoints are not supported yet")
        raise ValueError(f"{path} is a file; pass the checkpoint directory that contains it")
    if isinstance(model, str) and _HUB_ID.match(model) and not model.startswith((".", "/", "~")):
        return _download(model)
    raise FileNotFoundError(f"model path not found: {path}")


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_PATTERNS))
    except Exception as e:  # offline, unknown repo, auth, network: one clear message
        raise FileNotFoundError(
            f"could not find or download model {repo_id!r} from the Hugging Face Hub "
            f"({type(e).__name__}: {e})"
        ) from e
