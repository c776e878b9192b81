"""A straightforward numpy reference of one head's Attention-Matching fit (the math of
`rust/src/compact/fit.rs` and `solve.rs`, written for clarity, in f64). The tests compare the
engine's fit against it; nothing here is used at run time.
"""

from __future__ import annotations

import numpy as np


def nnls(a: np.ndarray, b: np.ndarray, iters: int = 500) -> np.ndarray:
    """min ||a w - b|| subject to w >= 0, by Lawson-Hanson's active-set method."""
    m, t = a.shape
    w = np.zeros(t)
    passive = np.zeros(t, dtype=bool)
    for _ in range(iters):
        grad = a.T @ (b - a @ w)
        if passive.all() or grad[~passive].max() <= 1e-10 * max(np.abs(a.T @ b).max(), 1e-300):
            break
        passive[np.argmax(np.where(passive, -np.inf, grad))] = True
        while True:
            z = np.zeros(t)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                w = z
                break
            neg = passive & (z <= 0)
            alpha = np.min(w[neg] / (w[neg] - z[neg]))
            w = w + alpha * (z - w)
            passive &= w > 1e-15
            w[~passive] = 0.0
    return w


def box_lstsq(a: np.ndarray, b: np.ndarray, lo: float, hi: float, iters: int = 20000) -> np.ndarray:
    """min ||a w - b|| subject to lo <= w <= hi, by projected gradient with step 1/L."""
    g, h = a.T @ a, a.T @ b
    step = 1.0 / np.linalg.eigvalsh(g).max()
    w = np.clip(np.ones(a.shape[1]), lo, hi)
    for _ in range(iters):
        w = np.clip(w - step * (g @ w - h), lo, hi)
    return w


def fit_head(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    keep: list[int],
    *,
    scale: float,
    fit: str = "am",
    ridge: float = 0.0,
    beta_bounds: tuple[float, float] | None = None,
) -> dict:
    """Biases (NNLS on the mass, optionally bounded) and values (ridge least squares towards
    the kept values) of the kept keys; the relative mass and output errors on the queries."""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    logits = q @ k.T * scale
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    mass = e.sum(axis=1)
    target = e @ v / mass[:, None]
    a = e[:, keep]
    w = np.ones(len(keep))
    if fit in ("am", "beta"):
        w = nnls(a, mass)
        if beta_bounds is not None:
            w = box_lstsq(a, mass, np.exp(beta_bounds[0]), np.exp(beta_bounds[1]))
    w = np.maximum(w, 1e-12)
    p = a * w / (a @ w)[:, None]
    values = v[keep]
    if fit in ("am", "values"):
        gram = p.T @ p
        lam = ridge * np.trace(gram) / len(keep)
        values = np.linalg.solve(gram + lam * np.eye(len(keep)), p.T @ target + lam * v[keep])
    return {
        "bias": np.log(w),
        "values": values,
        "mass_rel_err": np.linalg.norm(a @ w - mass) / np.linalg.norm(mass),
        "out_rel_err": np.linalg.norm(p @ values - target) / np.linalg.norm(target),
    }
