"""`kvfast eval needle`: RULER-style needle in a haystack, generated on the fly.

A haystack slice of each `--lengths` size gets "needles" ("One of the special magic numbers for
<key> is: <7 digits>.") at each `--depths` fraction; the context is prefilled and compacted
before the question is seen, then the greedy answer is checked by exact match. Tasks:
- `single`: one needle;
- `multikey`: the needle plus three distractor needles with other keys;
- `multivalue`: the same key with several values, all of which must be answered.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any

import numpy as np

from kvfast import Session
from kvfast.eval import common, peers

DEFAULT_METHODS = "full,am,kvzip,snapkv,h2o,streaming,tova,random"
TASKS = ("single", "multikey", "multivalue")
KEYS = "apple river castle window garden silver forest candle bridge marble".split()
FACT = " One of the special magic numbers for {k} is: {v}. "
QUESTION = (
    "\nWhat is the special magic number for {k} mentioned in the provided text? "
    "The special magic number for {k} mentioned in the provided text is"
)
QUESTION_ALL = (
    "\nWhat are all the special magic numbers for {k} mentioned in the provided text? "
    "The special magic numbers for {k} mentioned in the provided text are"
)


def add_args(p: argparse.ArgumentParser) -> None:
    common.add_common(p, DEFAULT_METHODS, "2,4,8,16,32,64")
    p.add_argument(
        "--haystack",
        type=Path,
        default=common.DEFAULT_TEXT,
        help="text file or PaulGrahamEssays.json",
    )
    p.add_argument("--lengths", default="2048", help="context lengths in tokens")
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9", help="needle depths (0..1)")
    p.add_argument("--tasks", default="single", help=f"comma list of {', '.join(TASKS)}")
    p.add_argument("--cases", type=int, default=2, help="cases per task x length x depth")
    peers.add_args(p)


def make_cases(s: Session, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The cases of `--haystack`, `--lengths`, `--depths`, `--tasks`, `--cases`, `--seed`."""
    cases = build_cases(
        s,
        args.haystack,
        [int(x) for x in args.lengths.split(",") if x.strip()],
        [float(x) for x in args.depths.split(",") if x.strip()],
        [t.strip() for t in args.tasks.split(",") if t.strip()],
        args.cases,
        args.seed,
    )
    return cases[: args.limit] if args.limit else cases


def build_cases(
    s: Session,
    haystack: Path,
    lengths: list[int],
    depths: list[float],
    tasks: list[str],
    n: int,
    seed: int,
) -> list[dict[str, Any]]:
    """`n` cases per task x length x depth: a needle in `haystack`'s text, and its question."""
    hay = s.encode(common.load_text(haystack))
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ValueError(f"--tasks: unknown {bad}; expected some of {', '.join(TASKS)}")
    if any(not 0 <= d <= 1 for d in depths) or not depths:
        raise ValueError("--depths must be fractions in [0, 1]")
    if not lengths or max(lengths) > len(hay):
        raise ValueError(f"--lengths must be >= 1 and at most the haystack's {len(hay)} tokens")
    rng = random.Random(seed)
    return [
        _case(s, rng, hay, task, length, depth, i)
        for task in tasks
        for length in lengths
        for depth in depths
        for i in range(n)
    ]


def _case(
    s: Session, rng: random.Random, hay: list[int], task: str, length: int, depth: float, i: int
) -> dict[str, Any]:
    key, *others = rng.sample(KEYS, 4)
    values = [
        str(rng.randint(1_000_000, 9_999_999)) for _ in range(3 if task == "multivalue" else 1)
    ]
    needles = [(key, v) for v in values]
    if task == "multikey":
        needles += [(k, str(rng.randint(1_000_000, 9_999_999))) for k in others]
    question = (QUESTION_ALL if task == "multivalue" else QUESTION).format(k=key)
    q_ids = s.encode(question)
    facts = [s.encode(FACT.format(k=k, v=v)) for k, v in needles]
    room = length - len(q_ids) - sum(map(len, facts))
    if room < 1:
        raise ValueError(f"--lengths {length} is too short for the needles and the question")
    start = rng.randint(0, len(hay) - room)
    body = hay[start : start + room]
    # The target needle at `depth`; distractors and further values at random depths.
    at = [int(depth * room)] + [rng.randint(0, room) for _ in facts[1:]]
    order = sorted(range(len(facts)), key=lambda j: at[j])
    ctx: list[int] = []
    prev = 0
    for j in order:
        ctx += body[prev : at[j]] + facts[j]
        prev = at[j]
    ctx += body[prev:]
    return {
        "task": task,
        "length": length,
        "depth": depth,
        "case": i,
        "context": ctx,
        "question": q_ids,
        "answers": values,
    }


def _hit(text: str, answers: list[str]) -> bool:
    """Exact match: the single answer opens the reply; for several, all appear in it."""
    text = text.strip()
    if len(answers) == 1:
        return text.startswith(answers[0])
    return all(a in text for a in answers)


def run(
    args: argparse.Namespace, s: Session, results: common.Results, peer: peers.Peer | None = None
) -> None:
    cases = make_cases(s, args)
    todo = [c for c in common.cells(args) if not results.done(c.key)]
    for cell in common.progress(todo, len(todo), "needle"):
        hits, kv, secs = [], [], []
        for c in cases:
            cell.prefill(s, c["context"])
            rep = cell.compact(s, seed=args.seed)
            secs.append(rep.seconds if rep else 0.0)
            kv.append(s.cache_info()["bytes"])
            s.prefill(c["question"], logits=None)
            out = s.generate(max_new_tokens=8 * len(c["answers"]) + 4)
            hits.append(
                {k: c[k] for k in ("task", "length", "depth", "case")}
                | {"hit": _hit(out, c["answers"]), "output": out}
            )
        results.add(
            common.cell_row(
                cell,
                accuracy=float(np.mean([h["hit"] for h in hits])),
                by_task={
                    t: float(np.mean([h["hit"] for h in hits if h["task"] == t]))
                    for t in sorted({h["task"] for h in hits})
                },
                cases=hits,
                kv_bytes=float(np.mean(kv)),
                seconds_compact=float(np.mean(secs)),
            )
        )
    s.reset()
    if peer is not None:
        _run_peer(args, cases, results, peer)


def _run_peer(
    args: argparse.Namespace, cases: list[dict[str, Any]], results: common.Results, peer: peers.Peer
) -> None:
    jobs = [(n, r) for n in peers.presses(args) for r in common.floats(args.ratios)]
    todo = [(n, r) for n, r in jobs if not results.done(f"{peer.name}:{n}@{r:g}x")]
    for name, ratio in common.progress(todo, len(todo), f"needle {peer.name}"):
        hits = []
        for c in cases:
            out = peer.generate(name, ratio, c["context"], c["question"], 8 * len(c["answers"]) + 4)
            hits.append(
                {k: c[k] for k in ("task", "length", "depth", "case")}
                | {"hit": _hit(out, c["answers"]), "output": out}
            )
        results.add(
            {
                "key": f"{peer.name}:{name}@{ratio:g}x",
                "method": f"{peer.name} {name}",
                "ratio": ratio,
                "budget": None,
                "accuracy": float(np.mean([h["hit"] for h in hits])),
                "by_task": {
                    t: float(np.mean([h["hit"] for h in hits if h["task"] == t]))
                    for t in sorted({h["task"] for h in hits})
                },
                "cases": hits,
                # kvpress masks dropped keys: it holds the full cache.
                "kv_bytes": float(np.mean([peer.kv_bytes(len(c["context"])) for c in cases])),
                "seconds_compact": None,
            }
        )


def report(args: argparse.Namespace, results: common.Results) -> Path:
    full = results.row("full")
    tasks = sorted({t for r in results.rows for t in r["by_task"]})
    rows: list[list[Any]] = []
    series: common.Series = {}
    plots: list[str] = []
    for r in results.rows:
        at = f"{r['ratio']:g}x" if r["ratio"] else (r["budget"] or "")
        rows.append(
            [r["method"], at, r["accuracy"], *[r["by_task"].get(t) for t in tasks]]
            + [common.mib(r["kv_bytes"]), r["seconds_compact"]]
        )
        if r["ratio"]:
            series.setdefault(r["method"], []).append((r["ratio"], r["accuracy"]))
        depths = sorted({h["depth"] for h in r["cases"]})
        lengths = sorted({h["length"] for h in r["cases"]})
        grid = [
            [
                float(
                    np.mean([h["hit"] for h in r["cases"] if (h["depth"], h["length"]) == (d, n)])
                )
                for n in lengths
            ]
            for d in depths
        ]
        name = "needle-" + "".join(ch if ch.isalnum() else "_" for ch in r["key"]) + ".png"
        p = common.plot_heatmap(
            args.out / name,
            f"{r['key']}: exact match",
            grid,
            [f"{d:g}" for d in depths],
            [str(n) for n in lengths],
        )
        if p:
            plots.append(p)
    header = ["method", "ratio / budget", "exact match", *tasks, "KV MiB held", "compact s"]
    body = common.markdown_table(header, rows)
    body += (
        f"\n\nHaystack {args.haystack.name}; lengths {args.lengths}, depths {args.depths}, "
        f"{args.cases} case(s) per cell; compaction before the question is seen. kvpress rows "
        "(--peer kvpress) mask dropped keys, so they hold the full cache's bytes."
    )
    line = common.plot_lines(
        args.out / "needle.png",
        "needle retrieval after compaction",
        "exact match",
        series,
        full["accuracy"] if full else None,
    )
    return common.write_markdown(
        args.out, "Needle in a haystack", results, body, [line, *plots] if line else plots
    )
