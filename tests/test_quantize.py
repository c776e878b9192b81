"""Quantize-on-load of safetensors checkpoints (`dtype="q8_0"`, ...): the matrices become
llama.cpp blocks (candle's QMatMul, f32 activations quantized to 8 bits inside the product).
Tolerances against transformers' f32 logits (the golden fixtures): q8_0 within 5% of the
largest |logit| and argmax agreeing (measured 2.2% on qwen3-tiny); q4_0 within 25% (measured
19%). Memory: the bytes held shrink to the formats' bits per weight."""

from __future__ import annotations

import numpy as np
import pytest
from kvfast import Session
from test_parity import MODELS, golden, ids_of


def test_q8_0_and_q4_0_shrink_the_weights_and_keep_the_logits() -> None:
    g = golden("qwen3-tiny")
    ref = g["logits_f32"]
    base = Session.from_pretrained(MODELS["qwen3-tiny"])
    sizes = {}
    for fmt, tol in (("q8_0", 0.05), ("q4_0", 0.25)):
        s = Session.from_pretrained(MODELS["qwen3-tiny"], dtype=fmt)
        assert s.dtype == "f32"  # the compute dtype; matrices are quantized
        got = s.prefill(ids_of(g), logits="all")[g["positions"]]
        err = float(np.abs(got - ref).max())
        assert err <= tol * float(np.abs(ref).max()), f"{fmt}: max abs logit error {err:.3f}"
        assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.8
        sizes[fmt] = s.engine.weight_bytes
    # bf16-stored matrices (16 bits) -> 8.5 and 4.5 bits per weight, plus f32 norms.
    assert sizes["q8_0"] < 0.6 * base.engine.weight_bytes
    assert sizes["q4_0"] < 0.6 * sizes["q8_0"]


def test_formats_that_do_not_fit_the_shapes_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match=r"rows of 128 values are not a multiple of .* 256"):
        Session.from_pretrained(MODELS["qwen3-tiny"], dtype="q4k")
    with pytest.raises(ValueError, match="q8_0, q4_0"):
        Session.from_pretrained(MODELS["qwen3-tiny"], dtype="q3")


def test_quantized_model_compacts_and_decodes() -> None:
    s = Session.from_pretrained(MODELS["llama-odd"], dtype="q8_0")
    ids = [int(i) for i in np.random.default_rng(1).integers(2, 512, 260)]
    s.prefill(ids[:240], logits=None)
    assert s.compact(ratio=4, queries="repeat", recent=16).ratio > 3
    assert np.isfinite(s.score(ids[240:])).all()
