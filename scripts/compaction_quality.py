"""Quality of compaction on a checkpoint: needle retrieval (RULER-style, Paul Graham haystack),
next-token KL over the question, and WikiText-2 continuation perplexity, per method and ratio,
all judged against the full cache of the same model. Prints Markdown tables and writes JSON.

    python scripts/compaction_quality.py --model ../shared/models/qwen3-small \
        --data ../shared/data --cases 20 --out docs/results/compaction-qwen3-small.json

Compaction always happens before the question is seen. This is the measurement script of
issue 4; the full evaluation suite (issue 5) will supersede it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
from kvfast import Session, __version__
from two_step import haystack

WORDS = "apple river castle window garden silver forest candle bridge marble".split()
FACT = " One of the special magic numbers for {k} is: {v}. "
QUESTION = (
    "\nWhat is the special magic number for {k} mentioned in the provided text? "
    "The special magic number for {k} mentioned in the provided text is"
)

# The AM settings most variants were measured with: the defaults before 2026-11-26 (the
# paper's root-mean-square scores and on-policy order, a held-out ridge, values only;
# self-study queries where a variant names none). Biases, where fitted, in the reference
# code's [-3, 3].
BEFORE: dict[str, Any] = {"score": "rms", "on_policy": True, "ridge": None, "fit": "values"}
STUDY: dict[str, Any] = {"queries": "self-study", **BEFORE}
PAPER_FIT: dict[str, Any] = {"fit": "am", "beta_bounds": (-3.0, 3.0)}
# The default of 2026-11-26: repeat queries, max scores, off-policy, values with ridge 10.
PREVIOUS: dict[str, Any] = {"method": "am", "fit": "values", "ridge": 10.0}


def _biases(bounds: tuple[float, float], ridge: float = 1.0, on_policy: bool = True) -> dict:
    """The bias fit on the default's max-scored keys (docs/compaction.md, 2026-11-26)."""
    return {
        "method": "am",
        "fit": "am",
        "on_policy": on_policy,
        "ridge": ridge,
        "beta_bounds": bounds,
    }


# name -> Session.compact keyword arguments (None: the full cache)
VARIANTS: dict[str, dict[str, Any] | None] = {
    "full": None,
    # The default: repeat queries, max scores, off-policy; from 4x to 16x biases (w >= 1) and values
    # with ridge 1, values only outside.
    "am": {"method": "am"},
    "am fit=values ridge=10 (default of 2026-11-26)": PREVIOUS,
    # The default with each head's biases checked on the context's last 64 queries (an option).
    "am tail_check=64": {"method": "am", "tail_check": 64},
    "am queries=self-study": {"method": "am", **STUDY},
    "am queries=repeat": {"method": "am", **BEFORE, "queries": "repeat"},
    "am queries=repeat+self-study": {"method": "am", **BEFORE, "queries": "repeat+self-study"},
    "am-omp": {"method": "am-omp", **STUDY},
    "am-omp fit=am": {"method": "am-omp", **STUDY, **PAPER_FIT},
    "am score=max": {"method": "am", **STUDY, "score": "max"},
    "am fit=am": {"method": "am", **STUDY, **PAPER_FIT},
    # The bias-fit study of 2026-11-26 (max scores, repeat queries; bounds and ridge varied).
    "am fit=am on-policy ridge=1": _biases((-3.0, 3.0)),
    "am fit=am on-policy ridge=1 beta>=0": _biases((0.0, 3.0)),
    "am fit=am on-policy ridge=1 beta>=-1": _biases((-1.0, 3.0)),
    "am fit=am on-policy ridge=1 0<=beta<=1": _biases((0.0, 1.0)),
    "am fit=am on-policy ridge=3 beta>=0": _biases((0.0, 3.0), ridge=3.0),
    "am fit=am on-policy ridge=10 beta>=0": _biases((0.0, 3.0), ridge=10.0),
    "am fit=am off-policy ridge=1 beta>=0": _biases((0.0, 3.0), on_policy=False),
    "am fit=values ridge=1": {"method": "am", "fit": "values", "ridge": 1.0},
    # A floor under the global budgets (2026-11-27): every head keeps this share of the average.
    "am head_floor=0.25": {"method": "am", "head_floor": 0.25},
    "am head_floor=0.5": {"method": "am", "head_floor": 0.5},
    "kvzip": {"method": "kvzip"},
    "snapkv": {"method": "snapkv"},
    "h2o": {"method": "h2o"},
    "tova": {"method": "tova"},
    "streaming": {"method": "streaming"},
    "random": {"method": "random"},
}
# Ablations of AM with the paper's repeat queries (each changes one thing).
REPEAT_ABLATIONS: dict[str, dict[str, Any]] = {
    "score=max": {"score": "max"},
    "queries=context": {"queries": "context"},
    "head_budgets=uniform": {"head_budgets": "uniform"},
    "head_budgets=entropy": {"head_budgets": "entropy"},
    "off-policy": {"on_policy": False},
    "fit=am (paper: beta + values)": PAPER_FIT,
    "fit=am exact NNLS": {"fit": "am", "beta_bounds": None},
    "fit=beta": {"fit": "beta", "beta_bounds": (-3.0, 3.0)},
    "fit=none": {"fit": "none"},
    "ridge=1e-6 (no held-out choice)": {"ridge": 1e-6},
}
for _name, _kw in REPEAT_ABLATIONS.items():
    VARIANTS[f"am repeat {_name}"] = {"method": "am", **BEFORE, "queries": "repeat", **_kw}
VARIANTS["am-omp repeat fit=am"] = {"method": "am-omp", **BEFORE, "queries": "repeat", **PAPER_FIT}


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def needle_cases(s: Session, hay: list[int], n: int, length: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        k, v = rng.choice(WORDS), str(rng.randint(1_000_000, 9_999_999))
        fact, q = s.encode(FACT.format(k=k, v=v)), s.encode(QUESTION.format(k=k))
        start = rng.randint(0, len(hay) - length)
        body = hay[start : start + length - len(fact) - len(q)]
        cut = int(len(body) * rng.uniform(0.1, 0.9))
        cases.append({"context": body[:cut] + fact + body[cut:], "question": q, "answer": v})
    return cases


def recent_for(budget: float) -> int:
    """The exact recent window: 64 tokens, or a quarter of the budget when that is smaller."""
    return int(min(64, budget // 4))


def run_needles(s: Session, cases: list[dict], kw: dict | None, ratio: float) -> dict:
    hits, kls, secs, byts = 0, [], [], []
    for c in cases:
        s.reset()
        s.prefill(c["context"], logits=None)
        if kw is not None:
            r = s.compact(ratio=ratio, recent=recent_for(s.cache_len / ratio), **kw)
            secs.append(r.seconds)
        byts.append(s.cache_info()["bytes"])
        logits = s.prefill(c["question"], logits="all")
        c.setdefault("_full_logp", None)
        lp = log_softmax(np.asarray(logits, dtype=np.float64))
        if kw is None:
            c["_full_logp"] = lp
        else:
            p = c["_full_logp"]
            kls.append(float((np.exp(p) * (p - lp)).sum(axis=-1).mean()))
        out = s.generate(max_new_tokens=8)
        hits += out.strip().startswith(c["answer"])
    return {
        "needle": hits / len(cases),
        "kl": float(np.mean(kls)) if kls else 0.0,
        "seconds": float(np.mean(secs)) if secs else 0.0,
        "kv_bytes": float(np.mean(byts)),
    }


def run_ppl(
    s: Session, ids: list[int], kw: dict | None, ratio: float, windows: int, context: int, cont: int
) -> dict:
    nll = []
    for w in range(windows):
        start = w * (context + cont)
        s.reset()
        s.prefill(ids[start : start + context], logits=None)
        if kw is not None:
            s.compact(ratio=ratio, recent=recent_for(s.cache_len / ratio), **kw)
        nll.extend(s.score(ids[start + context : start + context + cont]).tolist())
    return {"ppl": math.exp(float(np.mean(nll)))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", type=Path, required=True, help="folder with ruler/ and wikitext-2/")
    p.add_argument("--cases", type=int, default=20)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--ratios", default="4,8,16,32")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument(
        "--ablation-ratio",
        type=float,
        default=8.0,
        help="ratio at which the am ablations run (the main methods run at all)",
    )
    p.add_argument("--ppl-windows", type=int, default=4)
    p.add_argument("--skip", default="", help="variant@ratio pairs already measured, e.g. am@4")
    p.add_argument(
        "--main",
        default="am,kvzip,snapkv,h2o,streaming",
        help="variants run at every ratio (the others at --ablation-ratio only)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="a head-budget profile (kvfast calibrate-budgets): adds the variant "
        "'am repeat head_budgets=calibrated'",
    )
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    if a.profile is not None:
        VARIANTS["am repeat head_budgets=calibrated"] = {
            "method": "am",
            **BEFORE,
            "queries": "repeat",
            "head_budgets": str(a.profile),
        }

    s = Session.from_pretrained(a.model)
    hay = haystack(s, a.data)
    wiki = s.encode((a.data / "wikitext-2/wiki.test.raw").read_text(encoding="utf-8"))
    cases = needle_cases(s, hay, a.cases, a.length, a.seed)
    ratios = [float(r) for r in a.ratios.split(",")]
    names = [n.strip() for n in a.variants.split(",")]
    if "full" not in names:
        names.insert(0, "full")  # the reference of every KL and PPL delta
    main_methods = set(a.main.split(","))
    skip = set(a.skip.split(","))
    results: list[dict] = []
    t0 = time.time()
    for name in names:
        kw = VARIANTS[name]
        for ratio in [1.0] if kw is None else ratios:
            if kw is not None and name not in main_methods and ratio != a.ablation_ratio:
                continue
            if f"{name}@{ratio:g}" in skip:
                continue
            row = {"variant": name, "ratio": ratio}
            row.update(run_needles(s, cases, kw, ratio))
            row.update(run_ppl(s, wiki, kw, ratio, a.ppl_windows, a.length - 256, 256))
            results.append(row)
            print(
                f"{name:<26} {ratio:>4g}x needle {row['needle']:.2f} KL {row['kl']:.4f} "
                f"ppl {row['ppl']:.2f} KV {row['kv_bytes'] / 2**20:.2f} MiB "
                f"compact {row['seconds']:.2f}s  [{time.time() - t0:.0f}s]",
                flush=True,
            )
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(
            json.dumps(
                {
                    "model": a.model,
                    "cases": a.cases,
                    "length": a.length,
                    "seed": a.seed,
                    "ppl_windows": a.ppl_windows,
                    "kvfast": __version__,
                    "results": results,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
