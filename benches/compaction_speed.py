"""Speed of Attention-Matching compaction on CPU vs context length.

    python benches/compaction_speed.py [--models small,0.6b] [--lengths 1024,2048,4096]

For each model and context length: the reference-query pass (the repeat prompt through the
model, once, or layer by layer on-policy) and the fits (scores, selection, NNLS, least
squares, cache rewrite) in seconds, per (layer, KV head) and for the whole cache, with the
fit's GFLOP/s beside a plain f32 matmul (numpy/OpenBLAS, same threads, same run): over the
products it runs, and over those the reference algorithm runs for the same fit (off policy
the pass already gave most of them, so the first understates the speed). The 0.6B
row uses random weights of the real Qwen3-0.6B shape (speed does not depend on weight
values). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--models", default="small,0.6b")
p.add_argument("--lengths", default="1024,2048,4096")
p.add_argument("--ratio", type=float, default=8.0)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--max-queries", type=int, default=4096)
p.add_argument(
    "--queries",
    default="repeat",
    help="reference queries: repeat (the default) or self-study (needs a tokenizer, so "
    "qwen3-small only)",
)
p.add_argument(
    "--settings",
    default="default",
    help="comma list: default (off-policy max-score selection; biases w >= 1 and values "
    "with ridge 1 from 4x to 16x: see docs/compaction.md), "
    "tail (the same with tail_check=64), values (the same selection, values "
    "only with ridge 10: the default of 2026-11-26), on-policy (root-mean-square "
    "scores, on-policy fits, held-out ridge, values only: the default before that) "
    "and/or default-on-policy (the default's selection and fit in the paper's on-policy "
    "order)",
)
p.add_argument("--repeats", type=int, default=1, help="compactions per row (median reported)")
p.add_argument("--small", type=Path, default=SHARED / "models" / "qwen3-small")
p.add_argument("--config", type=Path, default=SHARED / "configs" / "qwen3-0.6b.json")
ARGS = p.parse_args()
os.environ.setdefault("OMP_NUM_THREADS", str(ARGS.threads))
os.environ.setdefault("OPENBLAS_NUM_THREADS", str(ARGS.threads))
os.environ["RAYON_NUM_THREADS"] = str(ARGS.threads)

import numpy as np  # noqa: E402
from kvfast import Session, _native  # noqa: E402


def matmul_gflops(n: int = 2048, d: int = 128, m: int = 4096) -> float:
    """A plain f32 product of the fit's main shape ([n, d] x [d, m]), best of 5."""
    a = np.random.rand(n, d).astype(np.float32)
    b = np.random.rand(d, m).astype(np.float32)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n * d * m / best / 1e9


def fit_flops(n: int, d: int, g: int, suffix: int, kept: float, mq: int, passes: int) -> float:
    """FLOPs of the products one head's fit runs. On policy (`passes` = 1) it scores every
    repeat query against the n context keys (the suffix keys' part of each softmax comes from
    the pass's own attention on the CPU), then computes the fit queries' target outputs over
    the n keys. Off policy (0) the reference pass already gave each fit query's mass and output
    over the context (see `ScoringPass::with_fit_targets`), so only the kept keys are scored.
    Both then form the Gram matrices and solve for the values, and check the fit."""
    m_all = g * suffix
    m = min(mq, m_all)
    t = kept
    solve = 2 * m * t * (2 * t + d) + 2 * d * t * m
    if passes:
        return 2 * n * d * m_all + 2 * n * d * m + solve
    return 2 * t * d * m + solve


def reference_flops(n: int, d: int, g: int, suffix: int, kept: float, mq: int) -> float:
    """FLOPs of one head's fit as the reference algorithm runs it from the fit queries alone:
    every fit query scored against the n keys, its target output over them, then the solve."""
    m = min(mq, g * suffix)
    return 2 * n * d * m * 2 + 2 * m * kept * (2 * kept + d)


SETTINGS: dict[str, dict[str, Any]] = {
    "default": {},
    # The default plus the tail check (each head's biases weighed on the context's last 64
    # queries against a values-only fit; an option, docs/results/tail-check).
    "tail": {"tail_check": 64},
    # The default of 2026-11-26: the same selection, values only (no bias NNLS), ridge 10.
    "values": {"fit": "values", "ridge": 10.0},
    "on-policy": {"score": "rms", "on_policy": True, "ridge": None, "fit": "values"},
    # The default's selection and fit in the paper's on-policy order.
    "default-on-policy": {"on_policy": True},
}


def main() -> None:
    rows = []
    ref = matmul_gflops()
    for name in ARGS.models.split(","):
        if name == "small":
            session = Session.from_pretrained(ARGS.small)
        else:
            engine = _native.Engine.random(str(ARGS.config))
            session = Session(engine, ARGS.config.parent, None)
        c = session.config
        layers, kv, d = c["num_hidden_layers"], c["num_key_value_heads"], c["head_dim"]
        g = c["num_attention_heads"] // kv
        for n, setting in (
            (int(x), st) for x in ARGS.lengths.split(",") for st in ARGS.settings.split(",")
        ):
            ids = [(i * 7919) % 5000 + 10 for i in range(n)]
            session.reset()
            session.prefill(ids, logits=None)
            t0 = time.perf_counter()
            session.reset()
            session.prefill(ids, logits=None)
            prefill = time.perf_counter() - t0
            runs = []
            for _ in range(ARGS.repeats):
                session.reset()
                session.prefill(ids, logits=None)
                runs.append(
                    session.compact(
                        ratio=ARGS.ratio,
                        max_queries=ARGS.max_queries,
                        queries=ARGS.queries,
                        **SETTINGS[setting],
                    )
                )
            r = sorted(runs, key=lambda x: x.seconds_fit)[len(runs) // 2]
            heads = layers * kv
            passes = 1 if SETTINGS[setting].get("on_policy", False) else 0
            shape = (n, d, g, r.query_tokens, r.tokens_after - 68, ARGS.max_queries)
            flops = heads * fit_flops(*shape, passes)
            ref_flops = heads * reference_flops(*shape)
            rows.append(
                (
                    name,
                    setting,
                    n,
                    prefill,
                    r.seconds_queries,
                    r.seconds_fit,
                    r.seconds_fit / heads * 1e3,
                    flops / r.seconds_fit / 1e9,
                    ref_flops / r.seconds_fit / 1e9,
                )
            )
            print(rows[-1], flush=True)
    print(f"\nplain f32 matmul [2048x128]x[128x4096]: {ref:.1f} GFLOP/s ({ARGS.threads} threads)\n")
    print(
        "| model | setting | context | prefill s | reference queries s | fits s (whole cache) "
        "| fit ms per (layer, head) | fit GFLOP/s | reference's FLOPs / fit s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, st, n, pf, q, f, per, gf, rf in rows:
        print(
            f"| {name} | {st} | {n} | {pf:.2f} | {q:.2f} | {f:.2f} | {per:.0f} | {gf:.1f} "
            f"| {rf:.1f} |"
        )


if __name__ == "__main__":
    main()
