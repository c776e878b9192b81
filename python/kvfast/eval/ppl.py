"""`kvfast eval ppl`: perplexity of a continuation after the context before it was compacted.

Each window prefills `--context` tokens, compacts them (method x ratio), then scores the next
`--continuation` tokens; PPL = exp(mean NLL) over all windows, with the delta to the full cache.
Also the standard sliding-window perplexity (no compaction, window `--context`, stride
`--continuation`) over the same tokens, to check the model itself.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np

from kvfast import Session
from kvfast.eval import common, peers

DEFAULT_METHODS = "full,am,kvzip,snapkv,h2o,streaming,tova,random"


def add_args(p: argparse.ArgumentParser) -> None:
    common.add_common(p, DEFAULT_METHODS, "2,4,8,16,32,64")
    p.add_argument(
        "--text", type=Path, default=common.DEFAULT_TEXT, help="text file (WikiText-2 test)"
    )
    p.add_argument("--context", type=int, default=1024, help="tokens prefilled and compacted")
    p.add_argument("--continuation", type=int, default=256, help="tokens scored after them")
    p.add_argument("--windows", type=int, default=4, help="windows (capped by --limit)")
    peers.add_args(p)


def windows(ids: list[int], args: argparse.Namespace) -> list[tuple[list[int], list[int]]]:
    span = args.context + args.continuation
    n = len(ids) // span
    if args.context < 1 or args.continuation < 1:
        raise ValueError("--context and --continuation must be >= 1")
    if n == 0:
        raise ValueError(
            f"the text has {len(ids)} tokens, fewer than one window of {span} "
            f"(--context {args.context} + --continuation {args.continuation})"
        )
    n = min(n, args.windows, args.limit or n)
    return [
        (ids[i * span : i * span + args.context], ids[i * span + args.context : (i + 1) * span])
        for i in range(n)
    ]


def sliding_window_nll(s: Session, ids: list[int], window: int, stride: int) -> list[float]:
    """NLL of ids[1:], each token seen with up to `window` tokens before it (the usual HF
    recipe: windows advance by `stride`, only their last `stride` tokens are scored)."""
    nll: list[float] = []
    done = 1  # ids[0] has no context: it is never scored
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        if end <= done:
            continue
        s.reset()
        s.prefill(ids[begin : begin + 1], logits=None)
        scores = s.score(ids[begin + 1 : end])  # NLL of ids[begin+1 .. end-1]
        # (with stride == window, ids[begin] opens a window and is not scored, as in HF)
        nll += scores[max(done - begin - 1, 0) :].tolist()
        done = end
        if end == len(ids):
            break
    return nll


def run(
    args: argparse.Namespace, s: Session, results: common.Results, peer: peers.Peer | None = None
) -> None:
    ids = s.encode(common.load_text(args.text))
    wins = windows(ids, args)
    todo = [c for c in common.cells(args) if not results.done(c.key)]
    for cell in common.progress(todo, len(todo), "ppl"):
        nll: list[float] = []
        per_window, kv, secs = [], [], []
        for ctx, cont in wins:
            cell.prefill(s, ctx)
            rep = cell.compact(s, seed=args.seed)
            secs.append(rep.seconds if rep else 0.0)
            kv.append(s.cache_info()["bytes"])
            scores = s.score(cont)
            per_window.append(float(np.mean(scores)))
            nll += scores.tolist()
        mean = float(np.mean(nll))
        results.add(
            common.cell_row(
                cell,
                ppl=math.exp(mean),
                nll=mean,
                window_nll=per_window,
                tokens=len(nll),
                kv_bytes=float(np.mean(kv)),
                seconds_compact=float(np.mean(secs)),
            )
        )
    if not results.done("sliding-window"):
        span = [t for ctx, cont in wins for t in ctx + cont]
        nll = sliding_window_nll(s, span, args.context, args.continuation)
        results.add(
            {
                "key": "sliding-window",
                "method": "full (sliding window)",
                "ratio": None,
                "budget": None,
                "ppl": math.exp(float(np.mean(nll))),
                "nll": float(np.mean(nll)),
                "tokens": len(nll),
            }
        )
    s.reset()
    if peer is not None:
        ratios = common.floats(args.ratios)
        jobs = [("full", 1.0)] + [(n, r) for n in peers.presses(args) for r in ratios]
        keys = {(n, r): f"{peer.name}:{n}" + ("" if n == "full" else f"@{r:g}x") for n, r in jobs}
        peer_todo = [j for j in jobs if not results.done(keys[j])]
        for name, ratio in common.progress(peer_todo, len(peer_todo), f"ppl {peer.name}"):
            error = None
            try:
                nll = [x for ctx, cont in wins for x in peer.nll(name, ratio, ctx, cont)]
            except Exception as e:  # a peer's failure is a result, not the end of the run
                error, nll = f"{type(e).__name__}: {e}", [math.nan]
            results.add(
                {
                    "key": keys[(name, ratio)],
                    "method": f"{peer.name} {name}",
                    "ratio": None if name == "full" else ratio,
                    "budget": None,
                    "ppl": math.exp(float(np.mean(nll))),
                    "nll": float(np.mean(nll)),
                    "error": error,
                    "tokens": 0 if error else len(nll),
                    # kvpress masks dropped keys: it holds the full cache.
                    "kv_bytes": float(peer.kv_bytes(args.context)),
                    "seconds_compact": None,
                }
            )


def report(args: argparse.Namespace, results: common.Results) -> Path:
    full = results.row("full")
    base = full["ppl"] if full else None
    rows: list[list[Any]] = []
    series: common.Series = {}
    for r in results.rows:
        delta = (r["ppl"] / base - 1) if base and r["key"] != "full" else None
        rows.append(
            [
                r["method"],
                f"{r['ratio']:g}x" if r["ratio"] else (r["budget"] or ""),
                r["ppl"],
                "" if delta is None else f"{100 * delta:+.1f}%",
                common.mib(r.get("kv_bytes")),
                r.get("seconds_compact"),
            ]
        )
        if r["ratio"]:
            series.setdefault(r["method"], []).append((r["ratio"], r["ppl"]))
    body = common.markdown_table(
        ["method", "ratio / budget", "PPL", "vs full", "KV MiB held", "compact s"], rows
    )
    failed = [r for r in results.rows if r.get("error")]
    body += "".join(f"\n\n{r['method']} at {r['ratio']:g}x failed: {r['error']}" for r in failed)
    body += (
        f"\n\n{args.text.name}: windows of {args.context} context + {args.continuation} scored "
        "tokens; KV MiB is what the compacted cache really holds (mean over windows; kvpress "
        "rows mask dropped keys and hold the full cache)."
    )
    plot = common.plot_lines(
        args.out / "ppl.png", "perplexity after compaction", "PPL", series, base
    )
    return common.write_markdown(args.out, "Perplexity", results, body, [plot] if plot else [])
