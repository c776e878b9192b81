"""Quantized KV cache (`kv_dtype="int8" | "int4" | "int2"`) on the embedded qwen3-tiny model:
bytes, the cost in NLL, decoding, composition with compaction, conversion, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from kvfast import Session

TEXT = (
    "The old lighthouse keeper lived alone on the rocky island. Every evening he climbed the "
    "stairs, lit the great lamp and watched the ships pass. In winter the storms came from the "
    "north and the waves broke over the rocks. "
) * 8
FORMATS = [None, "int8", "int4", "int2"]


@pytest.fixture(scope="module")
def sessions() -> dict[str | None, Session]:
    return {kv: Session.from_pretrained(kv_dtype=kv) for kv in FORMATS}


def _context(s: Session) -> tuple[list[int], list[int]]:
    ids = s.encode(TEXT)
    return ids[:320], ids[320:400]


def _nll(s: Session, ctx: list[int], cont: list[int]) -> float:
    s.reset()
    s.prefill(ctx, logits=None)
    # One token at a time: each scored token sees every earlier one as the cache stores it.
    return float(np.mean([s.score([t])[0] for t in cont]))


def test_bytes_shrink_and_quality_degrades_with_fewer_bits(
    sessions: dict[str | None, Session],
) -> None:
    ctx, cont = _context(sessions[None])
    nll, per_token = {}, {}
    for kv, s in sessions.items():
        nll[kv] = _nll(s, ctx, cont)
        info = s.cache_info()
        assert info["kv_dtype"] == kv and s.kv_dtype == kv
        assert info["kv_group"] == (None if kv is None else 32)
        per_token[kv] = info["bytes_per_token"]
    # Per head: f32 model, head_dim 64; 400 tokens = 12 groups of 32 + 16 exact residual rows.
    # Codes d*bits/8 for K and V, f16 key scale+minimum per channel and group, f16 value
    # scale+minimum per token and run of 32 channels, and an f32 bias per token.
    n, d, heads = len(ctx) + len(cont), 64, 8
    nq = n // 32 * 32
    for kv, bits in (("int8", 8), ("int4", 4), ("int2", 2)):
        head = nq * 2 * d * bits // 8 + nq // 32 * d * 4 + nq * d // 32 * 4
        head += (n - nq) * 2 * d * 4 + n * 4
        assert per_token[kv] == heads * head / n, kv
    assert per_token[None] == heads * (2 * d * 4 + 4)
    assert per_token["int2"] < per_token["int4"] < per_token["int8"] < per_token[None] / 3
    cost = {kv: nll[kv] - nll[None] for kv in FORMATS[1:]}
    assert abs(cost["int8"]) < 0.01, cost
    assert abs(cost["int4"]) < 0.1, cost
    # int2 visibly costs more than int8 (else the codes would not be read at all).
    assert abs(cost["int2"]) > 5 * abs(cost["int8"]), cost


def test_greedy_decode_from_an_int8_cache_follows_the_full_cache(
    sessions: dict[str | None, Session],
) -> None:
    ctx, _ = _context(sessions[None])
    outs = {}
    for kv in (None, "int8"):
        s = sessions[kv]
        s.reset()
        s.prefill(ctx)
        outs[kv] = s.generate(max_new_tokens=16)
        # The cache keeps growing past group boundaries while decoding.
        assert s.cache_len == len(ctx) + 16
    assert outs["int8"] == outs[None]


def test_quantized_cache_composes_with_compaction(sessions: dict[str | None, Session]) -> None:
    ctx, cont = _context(sessions[None])
    after = {}
    for kv in (None, "int4"):
        s = sessions[kv]
        s.reset()
        s.prefill(ctx, logits=None)
        report = s.compact(ratio=4, recent=16)
        after[kv] = report.bytes_after
        assert s.kv_dtype == kv and report.ratio > 3.5
        nll = s.score(cont)
        assert np.all(np.isfinite(nll))
    # The compacted keys and values are stored as int4 codes too (biases stay f32).
    assert after["int4"] < 0.35 * after[None]


def test_assigning_kv_dtype_converts_what_the_cache_holds(
    sessions: dict[str | None, Session],
) -> None:
    s = sessions[None]
    ctx, cont = _context(s)
    s.reset()
    s.prefill(ctx, logits=None)
    full = s.cache_info()["bytes"]
    s.kv_dtype = "int4"
    quant = s.cache_info()["bytes"]
    assert quant < full / 4
    k4, v4, _ = s.engine.head_cache(1, 0)
    s.kv_dtype = None
    # Back to full precision: the dequantized rows, at full size.
    assert s.cache_info()["bytes"] == full and s.kv_dtype is None
    k, v, _ = s.engine.head_cache(1, 0)
    assert np.array_equal(k, k4) and np.array_equal(v, v4)
    assert np.all(np.isfinite(s.score(cont)))


def test_bad_kv_dtype_is_a_clear_error_and_changes_nothing(
    sessions: dict[str | None, Session],
) -> None:
    with pytest.raises(ValueError, match=r"kv_dtype .*int3.*int8, int4, int2"):
        Session.from_pretrained(kv_dtype="int3")
    s = sessions["int8"]
    ctx, _ = _context(s)
    s.reset()
    s.prefill(ctx, logits=None)
    before = s.cache_info()
    with pytest.raises(ValueError, match="fp8"):
        s.kv_dtype = "fp8"
    assert s.cache_info() == before and s.kv_dtype == "int8"
