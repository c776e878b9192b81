"""`kvfast eval fidelity`: how well a compacted block stands in for the full one.

Per window, `--context` tokens are prefilled; the queries of the next `--heldout` tokens (after
QK-norm and RoPE, computed on the full cache, never seen by any method) are the held-out queries.
For every layer and KV head, with all query heads of the group:
- output error: ||softmax(q C_k^T/sqrt(d) + beta) C_v - softmax(q K^T/sqrt(d)) V|| / ||full||;
- mass error: |sum exp(q C_k^T/sqrt(d) + beta) - sum exp(q K^T/sqrt(d))| / sum exp(full),
  both over the block of context keys (and their compacted stand-ins) only;
- cosine similarity of the outputs, reported beside (a known-unreliable proxy);
and the KL divergence of the next-token distributions over the held-out tokens, full vs
compacted. With `--haystack`, each window is instead a needle case of `--context` tokens (as
`kvfast eval needle` builds them, depths spread over the windows) and the held-out tokens are
its question, asked after compaction: the queries a compacted cache is kept for.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from kvfast import Session
from kvfast.eval import common, needle

DEFAULT_METHODS = "full,am,kvzip,snapkv,h2o,streaming,tova,random"


def add_args(p: argparse.ArgumentParser) -> None:
    common.add_common(p, DEFAULT_METHODS, "2,4,8,16,32,64")
    p.add_argument("--text", type=Path, default=common.DEFAULT_TEXT)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--heldout", type=int, default=64, help="held-out query tokens per window")
    p.add_argument("--windows", type=int, default=2)
    p.add_argument(
        "--haystack",
        type=Path,
        default=None,
        help="held-out queries from questions instead: each window a needle case from this "
        "haystack (text or PaulGrahamEssays.json), its question the held-out tokens",
    )


Block = tuple[np.ndarray, np.ndarray, np.ndarray]  # keys, values, biases (f64)


def _heads(s: Session) -> list[list[Block]]:
    info = s.cache_info()
    out: list[list[Block]] = []
    for layer in range(info["layers"]):
        heads: list[Block] = []
        for h in range(info["kv_heads"]):
            k, v, b = s.engine.head_cache(layer, h)
            heads.append((k.astype(np.float64), v.astype(np.float64), b.astype(np.float64)))
        out.append(heads)
    return out


def _block(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, b: np.ndarray, shift: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Attention output and mass (scaled by exp(-shift) per query) of one block."""
    logits = q @ k.T / np.sqrt(q.shape[1]) + b
    w = np.exp(logits - shift[:, None])
    mass = w.sum(1)
    return (w @ v) / mass[:, None], mass


def head_errors(q: np.ndarray, full: Block, comp: Block) -> tuple[float, float, float]:
    """(output rel. error, mass rel. error, mean cosine) of one head for queries `q`."""
    kf, vf, bf = full
    kc, vc, bc = comp
    shift = (q @ kf.T / np.sqrt(q.shape[1]) + bf).max(1)
    of, mf = _block(q, kf, vf, bf, shift)
    oc, mc = _block(q, kc, vc, bc, shift)
    out = float(np.linalg.norm(oc - of)) / max(float(np.linalg.norm(of)), 1e-30)
    mass = float(np.mean(np.abs(mc - mf) / mf))
    norms = np.linalg.norm(oc, axis=1) * np.linalg.norm(of, axis=1)
    cos = float(np.mean((oc * of).sum(1) / np.maximum(norms, 1e-30)))
    return out, mass, cos


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    def logp(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        m = x.max(-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))

    lp, lq = logp(p_logits), logp(q_logits)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def _windows(args: argparse.Namespace, s: Session) -> list[tuple[list[int], list[int]]]:
    """(context, held-out tokens) per window: running text, or needle cases and questions."""
    if args.haystack is not None:
        n = min(args.windows, args.limit or args.windows)
        depths = [float(f"{(i + 0.5) / n:.4f}") for i in range(n)]
        cases = needle.build_cases(
            s, args.haystack, [args.context], depths, ["single"], 1, args.seed
        )
        return [(c["context"], c["question"]) for c in cases]
    ids = s.encode(common.load_text(args.text))
    span = args.context + args.heldout
    n = min(len(ids) // span, args.windows, args.limit or args.windows)
    if n < 1:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {span}")
    return [
        (ids[i * span : i * span + args.context], ids[i * span + args.context : (i + 1) * span])
        for i in range(n)
    ]


def run(args: argparse.Namespace, s: Session, results: common.Results) -> None:
    wins = _windows(args, s)
    # The full cache's blocks, held-out queries and logits, once per window.
    refs = []
    s.kv_dtype = None
    for ctx, held in wins:
        s.reset()
        s.prefill(ctx, logits=None)
        qs = [np.asarray(q, np.float64) for q in s.engine.reference_queries(held)]
        blocks = _heads(s)
        logits = s.prefill(held, logits="all")
        assert logits is not None
        refs.append((qs, blocks, logits))
    todo = [c for c in common.cells(args) if not results.done(c.key)]
    for cell in common.progress(todo, len(todo), "fidelity"):
        out_e, mass_e, cos, kls, kv = [], [], [], [], []
        for (ctx, held), (qs, blocks, full_logits) in zip(wins, refs, strict=True):
            cell.prefill(s, ctx)
            cell.compact(s, seed=args.seed)
            kv.append(s.cache_info()["bytes"])
            comp = _heads(s)
            per_layer = []
            for layer, q in enumerate(qs):
                n_kv = len(blocks[layer])
                g = q.shape[0] // n_kv
                errs = [
                    head_errors(
                        q[h * g : (h + 1) * g].reshape(-1, q.shape[2]),
                        blocks[layer][h],
                        comp[layer][h],
                    )
                    for h in range(n_kv)
                ]
                per_layer.append(errs)
            out_e.append([[e[0] for e in layer] for layer in per_layer])
            mass_e.append([[e[1] for e in layer] for layer in per_layer])
            cos.append([[e[2] for e in layer] for layer in per_layer])
            comp_logits = s.prefill(held, logits="all")
            assert comp_logits is not None
            kls.append(_kl(full_logits, comp_logits))
        o, m, c = (np.mean(np.array(x), axis=0) for x in (out_e, mass_e, cos))
        results.add(
            common.cell_row(
                cell,
                out_rel_err=float(o.mean()),
                mass_rel_err=float(m.mean()),
                cosine=float(c.mean()),
                kl=float(np.mean(kls)),
                out_rel_err_per_head=o,
                mass_rel_err_per_head=m,
                kv_bytes=float(np.mean(kv)),
            )
        )
    s.reset()


def report(args: argparse.Namespace, results: common.Results) -> Path:
    rows: list[list[Any]] = []
    out_s: common.Series = {}
    kl_s: common.Series = {}
    for r in results.rows:
        o = np.array(r["out_rel_err_per_head"])
        worst = np.unravel_index(int(o.argmax()), o.shape) if o.size else None
        rows.append(
            [
                r["method"],
                f"{r['ratio']:g}x" if r["ratio"] else (r["budget"] or ""),
                r["out_rel_err"],
                r["mass_rel_err"],
                r["kl"],
                r["cosine"],
                "" if worst is None else f"L{worst[0]}H{worst[1]} {o.max():.3f}",
                common.mib(r["kv_bytes"]),
            ]
        )
        if r["ratio"]:
            out_s.setdefault(r["method"], []).append((r["ratio"], r["out_rel_err"]))
            kl_s.setdefault(r["method"], []).append((r["ratio"], r["kl"]))
    header = [
        "method",
        "ratio / budget",
        "output rel. err",
        "mass rel. err",
        "next-token KL",
        "cosine (proxy)",
        "worst head",
        "KV MiB held",
    ]
    body = common.markdown_table(header, rows)
    held = (
        f"the question of a needle case hidden in each {args.context}-token haystack window "
        f"({Path(args.haystack).name}), asked after compaction"
        if getattr(args, "haystack", None)
        else f"the {args.heldout} tokens after each {args.context}-token context"
    )
    body += (
        f"\n\nHeld-out queries: {held}, computed on the full cache; errors are means over "
        "windows, layers and KV heads (per-head arrays in results.json)."
    )
    plots = [
        common.plot_lines(
            args.out / "fidelity-output.png",
            "attention output error (held-out)",
            "relative error",
            out_s,
        ),
        common.plot_lines(args.out / "fidelity-kl.png", "next-token KL vs full", "KL", kl_s),
    ]
    return common.write_markdown(
        args.out, "Attention fidelity", results, body, [p for p in plots if p]
    )
