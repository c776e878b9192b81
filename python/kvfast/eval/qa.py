"""`kvfast eval qa`: SQuAD-style extractive QA with distractor paragraphs (RULER's `qa_1`).

Each case is one answerable question: its paragraph among distractor paragraphs from the file,
shuffled, up to `--length` tokens of documents. The documents are prefilled and compacted
either before the question is seen (`--mode agnostic`) or with it as the task
(`--mode task`: `session.compact(task=question)`, the task-guided variant, for am and am-omp;
other methods are measured query-agnostic only); then the question
is asked and the greedy answer scored by SQuAD's exact match and token F1 (best over the gold
answers, SQuAD's normalisation).
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import re
import string
from pathlib import Path
from typing import Any

import numpy as np

from kvfast import Session
from kvfast.eval import common, peers

DEFAULT_METHODS = "full,am,kvzip,snapkv,h2o,streaming,tova,random"
HEADER = (
    "Answer the question based on the given documents. Only give me the answer and do not "
    "output any other words.\n\nThe following are given documents.\n\n"
)
QUESTION = (
    "\n\nAnswer the question based on the given documents. Only give me the answer and do not "
    "output any other words.\n\nQuestion: {q}\nAnswer:"
)


def add_args(p: argparse.ArgumentParser) -> None:
    common.add_common(p, DEFAULT_METHODS, "2,4,8,16,32,64")
    p.add_argument(
        "--data", type=Path, default=common.DATA / "squad-sample.json", help="SQuAD-format JSON"
    )
    p.add_argument("--length", type=int, default=1024, help="tokens of documents per case")
    p.add_argument("--mode", choices=("agnostic", "task", "both"), default="agnostic")
    p.add_argument("--cases", type=int, default=8)
    peers.add_args(p)


def load_squad(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """(paragraphs, questions) of a SQuAD JSON; unanswerable questions are left out."""
    if not path.is_file():
        raise FileNotFoundError(f"QA file not found: {path}")
    try:
        articles = json.loads(path.read_text(encoding="utf-8"))["data"]
        paragraphs, questions = [], []
        for a in articles:
            for p in a["paragraphs"]:
                paragraphs.append(p["context"])
                for q in p["qas"]:
                    answers = [x["text"] for x in q["answers"]]
                    if answers and not q.get("is_impossible", False):
                        questions.append(
                            {
                                "question": q["question"],
                                "answers": answers,
                                "paragraph": len(paragraphs) - 1,
                            }
                        )
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a SQuAD-format JSON ({e})") from e
    if not questions:
        raise ValueError(f"{path}: no answerable questions")
    return paragraphs, questions


def make_cases(s: Session, args: argparse.Namespace) -> list[dict[str, Any]]:
    paragraphs, questions = load_squad(args.data)
    rng = random.Random(args.seed)
    picked = rng.sample(questions, min(args.cases, len(questions)))
    cases = []
    for q in picked[: args.limit] if args.limit else picked:
        gold = q["paragraph"]
        others = [i for i in range(len(paragraphs)) if i != gold]
        rng.shuffle(others)
        docs, used = [gold], len(s.encode(paragraphs[gold]))
        for i in others:
            n = len(s.encode(paragraphs[i]))
            if used + n > args.length:
                break
            docs.append(i)
            used += n
        rng.shuffle(docs)
        text = HEADER + "\n\n".join(
            f"Document {j + 1}:\n{paragraphs[i]}" for j, i in enumerate(docs)
        )
        cases.append(
            {
                "context": s.encode(text),
                "question": q["question"],
                "answers": q["answers"],
                "documents": len(docs),
            }
        )
    return cases


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, articles or extra spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(pred: str, answers: list[str]) -> float:
    return float(any(normalize(pred) == normalize(a) for a in answers))


def f1(pred: str, answers: list[str]) -> float:
    def one(a: str) -> float:
        p, g = normalize(pred).split(), normalize(a).split()
        common = sum((collections.Counter(p) & collections.Counter(g)).values())
        if common == 0:
            return 0.0
        prec, rec = common / len(p), common / len(g)
        return 2 * prec * rec / (prec + rec)

    return max(one(a) for a in answers)


def run(
    args: argparse.Namespace, s: Session, results: common.Results, peer: peers.Peer | None = None
) -> None:
    cases = make_cases(s, args)
    modes = ["agnostic", "task"] if args.mode == "both" else [args.mode]
    # Task guidance exists for Attention Matching only; the other methods are query-agnostic.
    jobs = [
        (c, m)
        for c in common.cells(args)
        for m in modes
        if m == "agnostic" or c.spec.method in ("am", "am-omp")
    ]
    todo = [(c, m) for c, m in jobs if not results.done(_key(c.key, m, c.spec.is_full))]
    for cell, mode in common.progress(todo, len(todo), "qa"):
        em, f, kv, secs, outs = [], [], [], [], []
        for c in cases:
            cell.prefill(s, c["context"])
            extra = {"task": c["question"]} if mode == "task" else {}
            rep = cell.compact(s, seed=args.seed, **extra)
            secs.append(rep.seconds if rep else 0.0)
            kv.append(s.cache_info()["bytes"])
            s.prefill(s.encode(QUESTION.format(q=c["question"])), logits=None)
            out = s.generate(max_new_tokens=24, stop=["\n"]).strip()
            em.append(exact_match(out, c["answers"]))
            f.append(f1(out, c["answers"]))
            outs.append({"question": c["question"], "answers": c["answers"], "output": out})
        row = common.cell_row(
            cell,
            mode=mode,
            exact_match=float(np.mean(em)),
            f1=float(np.mean(f)),
            cases=outs,
            kv_bytes=float(np.mean(kv)),
            seconds_compact=float(np.mean(secs)),
        )
        row["key"] = _key(cell.key, mode, cell.spec.is_full)
        results.add(row)
    s.reset()
    if peer is not None:
        _run_peer(args, s, cases, results, peer)


def _run_peer(
    args: argparse.Namespace,
    s: Session,
    cases: list[dict[str, Any]],
    results: common.Results,
    peer: peers.Peer,
) -> None:
    """The presses compress the documents before the question (query-agnostic, as kvfast's
    agnostic mode)."""
    ratios = common.floats(args.ratios)
    jobs = [(n, r) for n in peers.presses(args) for r in ratios]
    todo = [(n, r) for n, r in jobs if not results.done(f"{peer.name}:{n}@{r:g}x [agnostic]")]
    for name, ratio in common.progress(todo, len(todo), f"qa {peer.name}"):
        em, f, outs = [], [], []
        for c in cases:
            q = s.encode(QUESTION.format(q=c["question"]))
            out = peer.generate(name, ratio, c["context"], q, 24).strip().split("\n")[0].strip()
            em.append(exact_match(out, c["answers"]))
            f.append(f1(out, c["answers"]))
            outs.append({"question": c["question"], "answers": c["answers"], "output": out})
        results.add(
            {
                "key": f"{peer.name}:{name}@{ratio:g}x [agnostic]",
                "method": f"{peer.name} {name}",
                "ratio": ratio,
                "budget": None,
                "mode": "agnostic",
                "exact_match": float(np.mean(em)),
                "f1": float(np.mean(f)),
                "cases": outs,
                "kv_bytes": float(np.mean([peer.kv_bytes(len(c["context"])) for c in cases])),
                "seconds_compact": None,
            }
        )


def _key(cell_key: str, mode: str, full: bool) -> str:
    return cell_key if full else f"{cell_key} [{mode}]"


def report(args: argparse.Namespace, results: common.Results) -> Path:
    full = results.row("full")
    rows: list[list[Any]] = []
    series: common.Series = {}
    for r in results.rows:
        at = f"{r['ratio']:g}x" if r["ratio"] else (r["budget"] or "")
        mode = "" if r["key"] == "full" else r["mode"]
        rows.append(
            [
                r["method"],
                at,
                mode,
                r["exact_match"],
                r["f1"],
                common.mib(r["kv_bytes"]),
                r["seconds_compact"],
            ]
        )
        if r["ratio"]:
            series.setdefault(f"{r['method']} [{mode}]", []).append((r["ratio"], r["f1"]))
    header = ["method", "ratio / budget", "mode", "exact match", "F1", "KV MiB held", "compact s"]
    body = common.markdown_table(header, rows)
    body += (
        f"\n\n{args.data.name}: {args.cases} questions, each with its paragraph among "
        f"distractors up to {args.length} tokens; agnostic = compacted before the question, "
        "task = compacted with the question as the task."
    )
    plot = common.plot_lines(
        args.out / "qa.png", "QA F1 after compaction", "F1", series, full["f1"] if full else None
    )
    return common.write_markdown(
        args.out, "Question answering", results, body, [plot] if plot else []
    )
