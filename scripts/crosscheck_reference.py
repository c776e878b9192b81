"""Cross-check kvfast's one-head Attention-Matching fit against the reference implementation
(adamzweiger/compaction, torch; its code is not part of kvfast).

Two steps, because the reference needs torch and kvfast does not:

    # 1. with kvfast: real K/V/Q of qwen3-small heads (repeat queries over a 2048-token context)
    python scripts/crosscheck_reference.py dump --model ../shared/models/qwen3-small \\
        --data ../shared/data --out /tmp/heads.npz
    # 2. with torch and a checkout of github.com/adamzweiger/compaction (when kvfast imports
    #    there too, e.g. PYTHONPATH=python, it also times both fits side by side)
    python scripts/crosscheck_reference.py compare --heads /tmp/heads.npz --reference ./compaction

Both fits see the same block (the head's keys and values without the sink and recent window),
the same reference queries (every query head of the group stacked, subsampled to 4096), the
same budget, and no causal mask. Step 1 stores kvfast's selection (root-mean-square attention,
top-t) and fit (bounded NNLS beta in [-3, 3], least-squares values); step 2 runs the reference's
`HighestAttentionKeysCompaction` with the matching settings and prints how close the two are.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
from two_step import dump_parser, haystack


def errors(q, k, v, keep, beta, values) -> tuple[float, float]:
    """Relative mass and output errors of (keep, beta, values) on queries q (f64, no mask)."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    logits = q @ k.T / math.sqrt(k.shape[1])
    mx = logits.max(axis=1, keepdims=True)
    e = np.exp(logits - mx)
    mass, target = e.sum(axis=1), e @ v / e.sum(axis=1, keepdims=True)
    a = e[:, keep] * np.exp(np.asarray(beta, dtype=np.float64))
    fitted = a.sum(axis=1)
    out = a @ np.asarray(values, dtype=np.float64) / fitted[:, None]
    return (
        float(np.linalg.norm(fitted - mass) / np.linalg.norm(mass)),
        float(np.linalg.norm(out - target) / np.linalg.norm(target)),
    )


def dump(a: argparse.Namespace) -> None:
    from kvfast import Session, _native

    s = Session.from_pretrained(a.model)
    ids = haystack(s, a.data)[: a.length]
    s.prefill(ids, logits=None)
    qs = s.engine.reference_queries(s._repeat_ids())
    info = s.cache_info()
    n_kv, sink, recent = info["kv_heads"], 4, 64
    rng = np.random.default_rng(0)
    out: dict[str, np.ndarray] = {}
    heads = [(la, h) for la in range(info["layers"]) for h in range(n_kv)]
    for i, (la, h) in enumerate(heads[:: max(1, len(heads) // a.heads)][: a.heads]):
        k, v, _ = s.engine.head_cache(la, h)
        k, v = k[sink:-recent], v[sink:-recent]
        g = qs[la].shape[0] // n_kv
        q = qs[la][h * g : (h + 1) * g].reshape(-1, k.shape[1])
        q = q[np.sort(rng.choice(len(q), min(len(q), 4096), replace=False))]
        t = len(k) // a.ratio
        logits = q.astype(np.float64) @ k.T.astype(np.float64) / math.sqrt(k.shape[1])
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        keep = np.sort(np.argsort(-np.sqrt((p**2).mean(axis=0)), kind="stable")[:t])
        f = _native.fit_head(q, k, v, keep.tolist(), fit="am", beta_bounds=(-3.0, 3.0))
        ls = _native.fit_head(q, k, v, keep.tolist(), fit="am", ridge=0.0, beta_bounds=(-3.0, 3.0))
        arrays = dict(q=q, k=k, v=v, keep=keep, beta=f["bias"], values=f["values"])
        arrays.update(beta_ls=ls["bias"], values_ls=ls["values"])
        for name, x in arrays.items():
            out[f"{i}/{name}"] = np.asarray(x)
        out[f"{i}/where"] = np.array([la, h, t])
    np.savez_compressed(a.out, **out)
    print(f"wrote {len(out) // 9} heads to {a.out}")


def best_of(f, reps: int = 3) -> float:
    """Fastest of `reps` timed calls (seconds)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def compare(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(a.threads)
    os.environ["RAYON_NUM_THREADS"] = str(a.threads)
    try:  # speed side by side in this process when kvfast is importable here too
        from kvfast import _native
    except ImportError:
        _native = None

    sys.path.insert(0, str(a.reference))
    from compaction.algorithms.highest_attention_keys import HighestAttentionKeysCompaction

    ref = HighestAttentionKeysCompaction(
        score_method="rms",
        nnls_iters=2,
        nnls_lower_bound=math.exp(-3),
        nnls_upper_bound=math.exp(3),
    )
    z = np.load(a.heads)
    n = len({key.split("/")[0] for key in z.files})
    print(
        "| layer | head | keys | kept | same keys | mass err kvfast / ref "
        "| out err kvfast (ridge 0) / ref | out err kvfast default (held-out ridge) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    ours_out, ls_out, ref_out, overlap, speed = [], [], [], [], []
    for i in range(n):
        names = ("q", "k", "v", "keep", "beta", "values", "beta_ls", "values_ls", "where")
        g = {name: z[f"{i}/{name}"] for name in names}
        la, h, t = (int(x) for x in g["where"])
        _, beta, c2, idx = ref.compute_compacted_cache(
            torch.from_numpy(g["k"]),
            torch.from_numpy(g["v"]),
            torch.from_numpy(g["q"]),
            t,
        )
        if _native is not None:
            tk, tv, tq = (torch.from_numpy(g[x]) for x in ("k", "v", "q"))
            speed.append(
                (
                    best_of(partial(ref.compute_compacted_cache, tk, tv, tq, t)),
                    best_of(
                        partial(
                            _native.fit_head,
                            g["q"],
                            g["k"],
                            g["v"],
                            budget=t,
                            fit="am",
                            beta_bounds=(-3.0, 3.0),
                        )
                    ),
                )
            )
        order = np.argsort(idx)
        idx = np.asarray(idx)[order]
        rbeta, rc2 = beta.float().numpy()[order], c2.float().numpy()[order]
        mine = errors(g["q"], g["k"], g["v"], g["keep"], g["beta"], g["values"])
        lsq = errors(g["q"], g["k"], g["v"], g["keep"], g["beta_ls"], g["values_ls"])
        theirs = errors(g["q"], g["k"], g["v"], idx, rbeta, rc2)
        same = len(set(idx.tolist()) & set(g["keep"].tolist())) / t
        ours_out.append(mine[1])
        ls_out.append(lsq[1])
        ref_out.append(theirs[1])
        overlap.append(same)
        print(
            f"| {la} | {h} | {len(g['k'])} | {t} | {same:.3f} | {lsq[0]:.4f} / {theirs[0]:.4f} "
            f"| {lsq[1]:.4f} / {theirs[1]:.4f} | {mine[1]:.4f} |"
        )
    print(
        f"\nmean: same keys {np.mean(overlap):.3f}; output error kvfast ridge 0 "
        f"{np.mean(ls_out):.4f}, reference {np.mean(ref_out):.4f}, kvfast default "
        f"{np.mean(ours_out):.4f}"
    )
    if speed:
        ref_s, ours_s = (sum(x) for x in zip(*speed, strict=True))
        print(
            f"\nspeed ({a.threads} threads, same process, best of 3 per head): selection + fit "
            f"of the {n} heads take {ref_s:.3f} s in the reference (torch {torch.__version__}) "
            f'and {ours_s:.3f} s in kvfast (`fit_head(budget=t, fit="am")`): '
            f"{ref_s / ours_s:.2f}x"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    dump_parser(sub, ratio=8, heads=8)
    c = sub.add_parser("compare")
    c.add_argument("--heads", type=Path, required=True)
    c.add_argument("--reference", type=Path, required=True)
    c.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    dump(a) if a.cmd == "dump" else compare(a)


if __name__ == "__main__":
    main()
