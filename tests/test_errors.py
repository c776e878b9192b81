"""Bad input raises a Python exception that names the problem; never a panic."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import kvfast
import pytest
from kvfast import ModelLoadError, Session


def _rewrite_header(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    """Edit a safetensors file's JSON header in place, keeping the data section valid."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    edit(header)
    # Repack the data so the offsets stay contiguous (entries may have been removed).
    items = sorted(
        ((k, v) for k, v in header.items() if k != "__metadata__"),
        key=lambda kv: kv[1]["data_offsets"][0],
    )
    out, pos = bytearray(), 0
    for _, v in items:
        a, b = v["data_offsets"]
        out += data[a:b]
        v["data_offsets"] = [pos, pos + (b - a)]
        pos += b - a
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(out))


def test_missing_path() -> None:
    with pytest.raises(FileNotFoundError, match="no/such/dir"):
        Session.from_pretrained("no/such/dir/")


def test_not_qwen3(model_copy: Path) -> None:
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["model_type"] = "bert"
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="bert"):
        Session.from_pretrained(model_copy)


def test_missing_tensor(model_copy: Path) -> None:
    st = model_copy / "model.safetensors"
    _rewrite_header(st, lambda h: h.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        Session.from_pretrained(model_copy)


def test_misshapen_tensor(model_copy: Path) -> None:
    def edit(h: dict) -> None:
        v = h["model.norm.weight"]
        n = v["shape"][0]
        v["shape"] = [n // 2, 2]  # same bytes, wrong shape

    _rewrite_header(model_copy / "model.safetensors", edit)
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*\[64, 2\].*\[128\]"):
        Session.from_pretrained(model_copy)


def test_truncated_safetensors(model_copy: Path) -> None:
    st = model_copy / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        Session.from_pretrained(model_copy)


def test_no_weights(model_copy: Path) -> None:
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        Session.from_pretrained(model_copy)


@pytest.mark.parametrize("dtype", ["f8", "int4"])
def test_unknown_dtype(dtype: str) -> None:
    with pytest.raises(ValueError, match=dtype):
        Session.from_pretrained(dtype=dtype)


def test_unknown_device() -> None:
    with pytest.raises(ValueError, match="tpu"):
        Session.from_pretrained(device="tpu")


@pytest.mark.skipif("cuda" in kvfast._native.build_features(), reason="this build has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", "metal"])
def test_device_not_in_this_build(device: str) -> None:
    with pytest.raises(RuntimeError, match=device.split(":")[0]):
        Session.from_pretrained(device=device)


def test_token_id_out_of_range(session: Session) -> None:
    n = session.cache_len
    with pytest.raises(ValueError, match="8192"):
        session.prefill([1, 2, 8192])
    with pytest.raises(ValueError, match="-5"):
        session.prefill([-5])
    assert session.cache_len == n


def test_score_needs_a_prefix() -> None:
    with pytest.raises(ValueError, match="empty"):
        Session.from_pretrained().score([1, 2, 3])


def test_errors_are_exceptions_not_panics() -> None:
    # ModelLoadError is both a KvfastError and a ValueError, and everything is an Exception.
    assert issubclass(ModelLoadError, kvfast.KvfastError)
    assert issubclass(ModelLoadError, ValueError)
    assert issubclass(kvfast.KvfastError, Exception)


def test_no_tokenizer_is_a_clear_error(model_copy: Path) -> None:
    (model_copy / "tokenizer.json").unlink()
    s = Session.from_pretrained(model_copy)
    assert s.prefill([1, 2, 3]).shape == (8192,)
    with pytest.raises(ValueError, match="tokenizer"):
        s.encode("hello")
