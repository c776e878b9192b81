"""Bad input raises a Python exception that names the problem; never a panic or a crash."""

from __future__ import annotations

import json
from pathlib import Path

import kvfast
import pytest
from helpers import read_safetensors_header, rewrite_safetensors_header
from kvfast import KvfastError, ModelLoadError, Session


def test_error_hierarchy() -> None:
    # ModelLoadError is both a KvfastError and a ValueError, so `except ValueError` catches it.
    assert issubclass(ModelLoadError, KvfastError)
    assert issubclass(ModelLoadError, ValueError)
    assert issubclass(KvfastError, Exception)


def test_missing_path() -> None:
    with pytest.raises(FileNotFoundError, match="no/such/dir"):
        Session.from_pretrained("no/such/dir/")


def test_directory_without_config(model_copy: Path) -> None:
    (model_copy / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        Session.from_pretrained(model_copy)


def test_not_qwen3(model_copy: Path) -> None:
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["model_type"] = "bert"
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="bert"):
        Session.from_pretrained(model_copy)


def test_config_that_is_not_json(model_copy: Path) -> None:
    (model_copy / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        Session.from_pretrained(model_copy)


def test_missing_tensor(model_copy: Path) -> None:
    st = model_copy / "model.safetensors"
    name = "model.layers.1.mlp.up_proj.weight"
    rewrite_safetensors_header(st, lambda h: h.pop(name))
    assert name not in read_safetensors_header(st)
    with pytest.raises(ModelLoadError, match=name.replace(".", r"\.")):
        Session.from_pretrained(model_copy)


def test_misshapen_tensor(model_copy: Path) -> None:
    st = model_copy / "model.safetensors"
    assert read_safetensors_header(st)["model.norm.weight"]["shape"] == [128]

    def edit(h: dict) -> None:
        h["model.norm.weight"]["shape"] = [64, 2]  # same bytes, wrong shape

    rewrite_safetensors_header(st, edit)
    with pytest.raises(ModelLoadError, match=r"model\.norm\.weight.*\[64, 2\].*\[128\]"):
        Session.from_pretrained(model_copy)


def test_config_that_disagrees_with_the_weights(model_copy: Path) -> None:
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["intermediate_size"] = 256  # the checkpoint's MLP is 384 wide
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"mlp\.\w+_proj\.weight.*384"):
        Session.from_pretrained(model_copy)


@pytest.mark.parametrize("keep", [0.5, 0.999, 20 / 4_000_000, 4 / 4_000_000])
def test_truncated_safetensors(model_copy: Path, keep: float) -> None:
    # Cut in the data, at the very end, inside the JSON header, inside the length prefix.
    st = model_copy / "model.safetensors"
    raw = st.read_bytes()
    st.write_bytes(raw[: max(1, int(len(raw) * keep))])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors.*truncated"):
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


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_is_refused_clearly_where_there_is_none(device: str) -> None:
    # No skip: on a machine where CUDA works the session must load there instead.
    if kvfast._native.cuda_available():
        assert Session.from_pretrained(device=device).device.startswith("cuda")
    else:
        with pytest.raises((RuntimeError, ValueError), match="(?i)cuda"):
            Session.from_pretrained(device=device)


def test_metal_is_refused_clearly_without_the_feature() -> None:
    if "metal" in kvfast._native.build_features():  # a macOS build: it must load there
        assert Session.from_pretrained(device="metal").device.startswith("metal")
    else:
        with pytest.raises(RuntimeError, match="(?i)metal"):
            Session.from_pretrained(device="metal")


def test_token_id_out_of_range(session: Session) -> None:
    session.prefill([1, 2], logits=None)
    with pytest.raises(ValueError, match="8192"):
        session.prefill([1, 2, 8192])
    with pytest.raises(ValueError, match="-5"):
        session.prefill([-5])
    with pytest.raises(ValueError, match="9000"):
        session.score([3, 9000])
    assert session.cache_len == 2  # a rejected call appends nothing
