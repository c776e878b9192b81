"""What `Session.compact` returns, and its text-level pieces (the repeat prompt, budgets).

The compaction itself (scoring, budgets, fits, rewriting the cache) is native; see
`rust/src/compact/`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvfast import _native

METHODS = ("am", "am-omp", "kvzip", "h2o", "snapkv", "tova", "streaming", "uniform", "random")
QUERY_SOURCES = ("repeat", "context", "self-study", "repeat+self-study")
FITS = ("auto", "am", "values", "beta", "none")
#: `fit="auto"` fits biases (w >= 1) and values from 4x to 16x, values only outside: on
#: qwen3-small the biases win on needles, KL and perplexity at 4-16x; at 32x the kept keys
#: must stand in for so much dropped mass that raising them misleads new queries, and at 2x
#: the mass equations of ~1000 kept keys per head are too loosely determined (needles lost,
#: and the solve is slow) (docs/compaction.md).
AUTO_BIAS_RATIOS = (4.0, 16.0)
#: `ridge="auto"`: the value ridge for each fit (the native constants say why). With biases, a
#: light pull (1): they restore the mass and the values must follow them. Values alone, a firm
#: pull (10): on 24 paired WikiText-2 windows at 32x ridge 1 cost +0.64% perplexity against
#: KVzip (3 standard errors), ridge 10 -0.03% (docs/results/am-vs-kvzip). "beta" and "none"
#: fit no values.
AUTO_RIDGE = {
    "am": _native.DEFAULT_RIDGE,
    "beta": _native.DEFAULT_RIDGE,
    "values": _native.VALUES_RIDGE,
    "none": _native.DEFAULT_RIDGE,
}
#: The instruction of the "repeat" reference queries (the paper's context-reconstruction task).
REPEAT_INSTRUCTION = "Repeat the previous context verbatim."
# Self-study (queries="self-study"): the model answers these about the context on a scratch
# continuation, and the queries of those turns are the references.
SELF_STUDY_PROMPTS = (
    "Summarize the text above.",
    "Ask a question about one specific detail of the text above, then answer it.",
    "List the names, numbers and facts stated in the text above.",
)


@dataclass(frozen=True)
class Fidelity:
    """Relative errors of a compacted block on the reference queries (0 = exact)."""

    mass_rel_err: float
    out_rel_err: float


@dataclass(frozen=True)
class CompactionReport:
    """What one `Session.compact` call did."""

    method: str
    budget: int
    #: The fit that ran (`fit="auto"` resolved; ignored by the baselines).
    fit: str
    #: The value fit's ridge (`ridge="auto"` resolved; None: chosen per head on held-out
    #: queries).
    ridge: float | None
    tokens_per_head_before: list[list[int]]
    tokens_per_head_after: list[list[int]]
    bytes_before: int
    bytes_after: int
    seconds_queries: float
    seconds_fit: float
    query_tokens: int
    #: `[layer][kv_head]`; None where no reference queries were used (query-free baselines).
    head_fidelity: list[list[Fidelity | None]] = field(repr=False)
    #: `[layer][kv_head]`: whether the bias NNLS met its KKT test (AM only).
    nnls_converged: list[list[bool]] = field(repr=False)
    #: `[layer][kv_head]`: whether the tail check (`tail_check=`) gave the head the values-only
    #: fit instead of the biases (all False without the check).
    tail_values_only: list[list[bool]] = field(repr=False)

    @property
    def tokens_before(self) -> float:
        """Keys per (layer, KV head) before, averaged."""
        return _mean([n for layer in self.tokens_per_head_before for n in layer])

    @property
    def tokens_after(self) -> float:
        """Keys per (layer, KV head) after, averaged."""
        return _mean([n for layer in self.tokens_per_head_after for n in layer])

    @property
    def ratio(self) -> float:
        """KV bytes before / after."""
        return self.bytes_before / max(self.bytes_after, 1)

    @property
    def seconds(self) -> float:
        return self.seconds_queries + self.seconds_fit

    @property
    def layer_fidelity(self) -> list[Fidelity | None]:
        """Per layer, the mean over its KV heads (None where no queries were used)."""
        out: list[Fidelity | None] = []
        for heads in self.head_fidelity:
            got = [f for f in heads if f is not None]
            out.append(
                Fidelity(_mean([f.mass_rel_err for f in got]), _mean([f.out_rel_err for f in got]))
                if got
                else None
            )
        return out

    def __str__(self) -> str:
        fids = [f.out_rel_err for f in self.layer_fidelity if f is not None]
        fid = f", attention-output error {_mean(fids):.3f}" if fids else ""
        return (
            f"{self.method}: {self.tokens_before:.0f} -> {self.tokens_after:.0f} keys per head, "
            f"KV {self.bytes_before / 2**20:.2f} -> {self.bytes_after / 2**20:.2f} MiB "
            f"({self.ratio:.1f}x) in {self.seconds:.2f}s "
            f"(queries {self.seconds_queries:.2f}s, fit {self.seconds_fit:.2f}s){fid}"
        )

    @classmethod
    def from_native(
        cls, method: str, budget: int, fit: str, ridge: float | None, d: dict[str, Any]
    ) -> CompactionReport:
        return cls(
            method=method,
            budget=budget,
            fit=fit,
            ridge=ridge,
            tokens_per_head_before=d["tokens_before"],
            tokens_per_head_after=d["tokens_after"],
            bytes_before=d["bytes_before"],
            bytes_after=d["bytes_after"],
            seconds_queries=d["seconds_queries"],
            seconds_fit=d["seconds_fit"],
            query_tokens=d["query_tokens"],
            head_fidelity=[
                [None if f is None else Fidelity(*f) for f in layer] for layer in d["fidelity"]
            ],
            nnls_converged=d["nnls_converged"],
            tail_values_only=d["tail_values_only"],
        )


def _mean(xs: list[float] | list[int]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def resolve_budget(
    cache_tokens: float, ratio: float | None, budget: int | None, sink: int, recent: int
) -> int:
    """Keys per head from exactly one of `ratio` (>= 1) or `budget`; ValueError otherwise."""
    if (ratio is None) == (budget is None):
        raise ValueError("give exactly one of ratio= or budget=")
    if cache_tokens <= 0:
        raise ValueError("cannot compact an empty cache: prefill a context first")
    if ratio is not None:
        if not isinstance(ratio, int | float) or not math.isfinite(ratio) or ratio < 1:
            raise ValueError(f"ratio must be a number >= 1, got {ratio!r}")
        budget = max(1, round(cache_tokens / ratio))
        if budget >= cache_tokens:
            raise ValueError(
                f"ratio {ratio} leaves nothing to compact in a cache of {cache_tokens:.0f} tokens"
            )
    assert budget is not None
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive int, got {budget!r}")
    if budget >= cache_tokens:
        raise ValueError(
            f"budget {budget} must be below the cache length ({cache_tokens:.0f} tokens per head)"
        )
    if budget < sink + recent:
        raise ValueError(
            f"budget {budget} is smaller than sink + recent = {sink + recent} tokens kept exact; "
            "lower recent= or raise the budget"
        )
    return budget


@dataclass(frozen=True)
class BudgetProfile:
    """Head budgets from a JSON file: an absolute `[layer][kv_head]` table of keys, or the
    `shares` of the model-wide pool each head gets (a calibrated profile, which scales to any
    budget)."""

    table: list[list[int]] | None = None
    shares: list[list[float]] | None = None

    def keys_for(self, budget: int, rows: list[list[int]]) -> list[list[int]]:
        """Keys per head from the shares, for an average `budget` on a cache with `rows`
        tokens per head."""
        assert self.shares is not None, "an absolute table is used as it is"
        pool = budget * sum(map(len, rows))
        if [len(r) for r in self.shares] != [len(r) for r in rows]:
            raise ValueError(
                f"the budget profile has {[len(r) for r in self.shares]} heads per layer, "
                f"the cache {[len(r) for r in rows]}"
            )
        return [
            [min(n, round(s * pool)) for s, n in zip(sr, nr, strict=True)]
            for sr, nr in zip(self.shares, rows, strict=True)
        ]


def _is_table(t: object, kind: type | tuple[type, ...]) -> bool:
    return (
        isinstance(t, list)
        and bool(t)
        and all(
            isinstance(r, list)
            and r
            and all(isinstance(x, kind) and not isinstance(x, bool) and float(x) >= 0 for x in r)  # type: ignore[arg-type]
            for r in t
        )
    )


def load_head_budgets(path: str | os.PathLike[str]) -> BudgetProfile:
    """Head budgets from a JSON file: `{"shares": [[...]]}` (a calibrated profile, see
    `kvfast calibrate-budgets`), `{"budgets": [[...]]}` or the bare table of keys."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(
            f'head_budgets={str(path)!r} is not "global", "uniform", "entropy" or a JSON file'
        )
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"head budget file {p} is not valid JSON: {e}") from None
    if isinstance(data, dict) and "shares" in data:
        if not _is_table(data["shares"], (int, float)):
            raise ValueError(f"head budget file {p}: shares must be a table of numbers >= 0")
        return BudgetProfile(shares=[[float(x) for x in r] for r in data["shares"]])
    table = data.get("budgets") if isinstance(data, dict) else data
    if not _is_table(table, int):
        raise ValueError(
            f"head budget file {p} must hold a [layer][kv_head] table of non-negative ints"
        )
    return BudgetProfile(table=table)  # type: ignore[arg-type]
