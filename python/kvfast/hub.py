"""Resolve what the user passed as `model` to a local checkpoint directory."""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

EMBEDDED_MODEL = Path(__file__).parent / "data" / "qwen3-tiny"

# "org/name" as the Hub spells repo ids; anything else that does not exist is a missing path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Only what the engine and the Python layer read: configs, weights, tokenizer, chat template.
_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.jinja"]


def resolve_model(model: str | os.PathLike[str] | None) -> Path:
    """The checkpoint for `model`: None (embedded qwen3-tiny), a directory, a .gguf file, or a
    hub id.

    Raises FileNotFoundError for a missing path, a directory without config.json, or a hub id
    that cannot be found or downloaded; ValueError for a path to a file.
    """
    if model is None:
        return EMBEDDED_MODEL
    path = Path(model).expanduser()
    if path.is_dir():
        _require_config(path, str(path))
        return path
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return path
        raise ValueError(
            f"{path} is a file; pass the checkpoint directory that contains it, or a .gguf file"
        )
    if isinstance(model, str) and _looks_like_hub_id(model):
        return _download(model)
    raise FileNotFoundError(f"model path not found: {path}")


def _looks_like_hub_id(s: str) -> bool:
    # "./x/y", "/x/y" and "~/x" are paths the user meant literally, never hub ids.
    return bool(_HUB_ID.match(s)) and not s.startswith((".", "/", "~")) and ".." not in s


def _require_config(path: Path, what: str) -> None:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{what}: missing {path / 'config.json'}; not a checkpoint directory"
        )


def _download(repo_id: str) -> Path:
    # Imported here: the hub client (and its HTTP stack) costs import time that local use
    # never needs.
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(repo_id, allow_patterns=_PATTERNS)
    except _hub_errors() as e:
        raise FileNotFoundError(
            f"could not find or download model {repo_id!r} from the Hugging Face Hub "
            f"({type(e).__name__}: {e})"
        ) from e
    path = Path(str(local))
    _require_config(path, f"model {repo_id!r}")
    return path


def _hub_errors() -> tuple[type[Exception], ...]:
    """What a failed download raises, across huggingface_hub versions.

    OSError covers HTTP errors (HfHubHTTPError: unknown, gated or private repo), offline mode,
    missing cache entries (LocalEntryNotFoundError) and connection errors; ValueError covers
    ids the hub rejects (HFValidationError). Newer versions add their HTTP client's base error
    (not an OSError) and EntryNotFoundError.
    """
    try:
        errors = importlib.import_module("huggingface_hub.errors")
    except ImportError:  # older huggingface_hub: everything it raises is covered already
        errors = None
    extra = [getattr(errors, name, None) for name in ("HTTPError", "EntryNotFoundError")]
    return (OSError, ValueError, *(c for c in extra if isinstance(c, type)))
