"""Head-budget calibration (`kvfast calibrate-budgets`): how much each (layer, KV head) needs.

For every head and a few budget levels around the average budget, the context is compacted
with only that head cut to the level (all others exact), and the reference log-likelihood is
measured: the mean negative log-likelihood of the repeat prompt (the instruction, then the
context), i.e. how well the cache can still reproduce the context. A greedy allocation then
spends the model-wide pool (the average budget times the number of heads) where each extra key
buys the largest drop in that NLL. The profile is written as JSON and loaded with
`session.compact(head_budgets="profile.json")`; its `shares` scale it to any later budget.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm  # type: ignore[import-untyped]

from kvfast.compaction import resolve_budget
from kvfast.session import Session

LEVELS = (0.25, 0.5, 1.0, 2.0, 4.0)


def greedy_allocation(curves: list[list[tuple[int, float]]], pool: int) -> list[int]:
    """Keys per head from per-head curves `[(budget, nll), ...]` (ascending budgets): every
    head starts at its smallest budget, then the jump (to any higher level) with the largest
    NLL drop per added key that still fits the pool is taken, until none fits or none helps.
    Curves are made non-increasing first (more keys never hurt in the allocation's model)."""
    mono = []
    for c in curves:
        best, out = np.inf, []
        for b, nll in c:
            best = min(best, nll)
            out.append((b, best))
        mono.append(out)
    level = [0] * len(mono)
    left = pool - sum(c[0][0] for c in mono)
    while True:
        # Any jump to a higher level counts (not just the next one), so a head whose curve
        # only drops after a plateau still gets its keys.
        pick, to, rate = -1, -1, 0.0
        for h, c in enumerate(mono):
            b0, n0 = c[level[h]]
            for j in range(level[h] + 1, len(c)):
                b1, n1 = c[j]
                if 0 < b1 - b0 <= left and (n0 - n1) / (b1 - b0) > rate:
                    pick, to, rate = h, j, (n0 - n1) / (b1 - b0)
        if pick < 0:
            break
        left -= mono[pick][to][0] - mono[pick][level[pick]][0]
        level[pick] = to
    return [c[lv][0] for c, lv in zip(mono, level, strict=True)]


def calibrate_budgets(
    session: Session,
    context: Sequence[int],
    *,
    ratio: float = 8.0,
    method: str = "am",
    levels: Sequence[float] = LEVELS,
    sink: int = 4,
    recent: int = 64,
    progress: bool = True,
    **compact_kw: Any,
) -> dict[str, Any]:
    """Measure every head's NLL curve on `context` and allocate the pool of `ratio`; returns
    the profile (see the module docstring). The session's cache is reset."""
    if not context:
        raise ValueError("calibration needs a non-empty context")
    session.reset()
    session.prefill(list(context), logits=None)
    rows: list[list[int]] = session.cache_info()["tokens_per_head"]
    heads = [(la, h) for la in range(len(rows)) for h in range(len(rows[la]))]
    mean = sum(rows[la][h] for la, h in heads) / len(heads)
    budget = resolve_budget(mean, ratio, None, sink, recent)
    reference = session._repeat_ids()
    nll_full = float(np.mean(session.score(reference)))

    def probe(la: int, h: int, keys: int) -> float:
        table = [list(r) for r in rows]
        table[la][h] = keys
        session.reset()
        session.prefill(list(context), logits=None)
        session.compact(
            budget=budget,
            method=method,
            head_budgets=table,
            sink=sink,
            recent=recent,
            **compact_kw,
        )
        return float(np.mean(session.score(reference)))

    curves: list[list[tuple[int, float]]] = []
    bar = tqdm(total=len(heads) * len(levels), desc="calibrating", disable=not progress)
    for la, h in heads:
        n = rows[la][h]
        steps = sorted({min(n, max(sink + recent, round(f * budget))) for f in levels})
        curve = []
        for keys in steps:
            curve.append((keys, nll_full if keys >= n else probe(la, h, keys)))
            bar.update()
        bar.update(len(levels) - len(steps))
        curves.append(curve)
    bar.close()
    session.reset()
    pool = budget * len(heads)
    flat = greedy_allocation(curves, pool)
    table = [[0] * len(r) for r in rows]
    for (la, h), keys in zip(heads, flat, strict=True):
        table[la][h] = keys
    return {
        "budgets": table,
        "shares": [[keys / pool for keys in r] for r in table],
        "budget": budget,
        "ratio": ratio,
        "method": method,
        "context_tokens": len(context),
        "nll_full": nll_full,
        "curves": {f"{la}.{h}": c for (la, h), c in zip(heads, curves, strict=True)},
    }


def write_profile(profile: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    p.write_text(json.dumps(profile, indent=1) + "\n", encoding="utf-8")
    return p
