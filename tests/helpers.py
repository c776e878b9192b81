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
