"""The engine's one-head Attention-Matching fit against the numpy reference
(`tests/am_reference.py`) on planted problems."""

from __future__ import annotations

import numpy as np
import pytest
from am_reference import fit_head as reference_fit
from kvfast import _native


def problem(m: int, n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(m, d)).astype(np.float32)
    k = rng.normal(size=(n, d)).astype(np.float32)
    v = rng.normal(size=(n, d)).astype(np.float32)
    return q, k, v


def test_duplicated_keys_are_merged_exactly():
    # Planted: every kept key appears c times, so keeping one copy with w = c (beta = log c) and
    # the same value reproduces the attention exactly: mass and output error 0.
    q, k, v = problem(96, 12, 8, 0)
    counts = np.array([1, 2, 3, 1, 4, 2, 1, 3, 2, 1, 1, 2])
    kd, vd = np.repeat(k, counts, axis=0), np.repeat(v, counts, axis=0)
    keep = list(np.cumsum(counts) - counts)  # the first copy of each key
    got = _native.fit_head(q, kd, vd, keep, fit="am", ridge=0.0, beta_bounds=None)
    assert got["nnls_converged"]
    np.testing.assert_allclose(np.exp(got["bias"]), counts, rtol=1e-3)
    np.testing.assert_allclose(got["values"], v, atol=2e-3)
    assert got["mass_rel_err"] < 1e-5 and got["out_rel_err"] < 1e-4


@pytest.mark.parametrize("bounds", [None, (-3.0, 3.0), (-0.2, 0.2)])
def test_nnls_and_least_squares_match_the_numpy_reference(bounds):
    q, k, v = problem(200, 64, 16, 1)
    keep = sorted(np.random.default_rng(2).choice(64, 24, replace=False).tolist())
    scale = 0.6
    got = _native.fit_head(q, k, v, keep, scale=scale, fit="am", ridge=0.0, beta_bounds=bounds)
    ref = reference_fit(q, k, v, keep, scale=scale, fit="am", beta_bounds=bounds)
    assert got["nnls_converged"]
    np.testing.assert_allclose(np.exp(got["bias"]), np.exp(ref["bias"]), rtol=2e-3, atol=1e-4)
    np.testing.assert_allclose(got["values"], ref["values"], rtol=5e-3, atol=5e-3)
    assert got["mass_rel_err"] == pytest.approx(ref["mass_rel_err"], rel=1e-3, abs=1e-7)
    assert got["out_rel_err"] == pytest.approx(ref["out_rel_err"], rel=1e-3)
    if bounds == (-0.2, 0.2):  # the bounds bind: some weight sits on a bound
        w = np.exp(got["bias"])
        assert (
            np.isclose(w, np.exp(0.2), rtol=1e-5).any()
            or np.isclose(w, np.exp(-0.2), rtol=1e-5).any()
        )


@pytest.mark.parametrize("ridge", [1e-3, 0.1, 10.0])
def test_value_ridge_pulls_towards_the_kept_values(ridge):
    q, k, v = problem(150, 48, 8, 3)
    keep = list(range(0, 48, 3))
    got = _native.fit_head(q, k, v, keep, fit="values", ridge=ridge)
    ref = reference_fit(q, k, v, keep, scale=1 / np.sqrt(8), fit="values", ridge=ridge)
    np.testing.assert_allclose(got["bias"], 0.0, atol=1e-7)
    np.testing.assert_allclose(got["values"], ref["values"], rtol=2e-3, atol=2e-3)


def test_held_out_ridge_is_never_worse_than_no_fit_on_held_out_queries():
    # ridge=None picks the ridge on held-out queries (the anchor, i.e. no fit, is a candidate),
    # so on fresh queries from the same distribution it should beat the raw subset.
    q, k, v = problem(400, 64, 16, 4)
    keep = list(range(0, 64, 4))
    fitted = _native.fit_head(q, k, v, keep, fit="values", ridge=None)
    fresh = problem(400, 64, 16, 5)[0]
    scale = 1 / 4.0

    def err(values: np.ndarray) -> float:
        logits = fresh.astype(np.float64) @ k.T.astype(np.float64) * scale
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        target = e @ v / e.sum(axis=1, keepdims=True)
        p = e[:, keep] / e[:, keep].sum(axis=1, keepdims=True)
        return float(np.linalg.norm(p @ values - target) / np.linalg.norm(target))

    assert err(fitted["values"]) < err(v[keep])


def test_a_budget_keeps_the_top_rms_attention_keys_and_fits_them():
    # Planted: a few keys aligned with the queries draw most of the attention; the native
    # selection must pick the top-t keys by root-mean-square softmax weight (computed here in
    # f64) and fit them exactly as when those indices are given.
    q, k, v = problem(120, 80, 16, 7)
    u = np.random.default_rng(8).normal(size=16).astype(np.float32)
    q += u
    k[[5, 33, 61]] = u
    logits = q.astype(np.float64) @ k.T.astype(np.float64) / np.sqrt(16)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    want = np.sort(np.argsort(-np.sqrt((p**2).mean(axis=0)), kind="stable")[:20])
    got = _native.fit_head(q, k, v, budget=20)
    assert got["keep"] == want.tolist() and {5, 33, 61} <= set(got["keep"])
    given = _native.fit_head(q, k, v, want.tolist())
    np.testing.assert_allclose(got["bias"], given["bias"], atol=1e-5)
    np.testing.assert_allclose(got["values"], given["values"], atol=1e-5)


def test_bad_inputs_raise_value_errors():
    q, k, v = problem(10, 6, 4, 6)
    with pytest.raises(ValueError, match="out of range"):
        _native.fit_head(q, k, v, [0, 6])
    with pytest.raises(ValueError, match="shape"):
        _native.fit_head(q, k, v[:, :3], [0])
    with pytest.raises(ValueError, match="fit must be"):
        _native.fit_head(q, k, v, [0], fit="bogus")
    with pytest.raises(ValueError, match="either keep"):
        _native.fit_head(q, k, v, [0], budget=1)
    with pytest.raises(ValueError, match="either keep"):
        _native.fit_head(q, k, v)
    with pytest.raises(ValueError, match="budget 7 not in"):
        _native.fit_head(q, k, v, budget=7)
