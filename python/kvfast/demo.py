"""`kvfast demo`: hide a fact deep in a ~2k-token public-domain text, then answer a question
about it from the full cache and from caches compacted 8x by Attention Matching and by SnapKV,
side by side with the KV bytes and seconds each needed.

The text is the opening of Moby-Dick, chapter 1 (Herman Melville, 1851; public domain), shipped
in `kvfast/data/`. The fact and the question use the needle templates the test models were
trained on, so the embedded model can answer from a full cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources

from kvfast.session import Session

KEY, VALUE = "harpoon", "4729315"
FACT = f" One of the special magic numbers for {KEY} is: {VALUE}. "
QUESTION = (
    f"\nWhat is the special magic number for {KEY} mentioned in the provided text? "
    f"The special magic number for {KEY} mentioned in the provided text is"
)


@dataclass(frozen=True)
class Row:
    method: str
    answer: str
    correct: bool
    kv_bytes: int
    seconds_compact: float
    seconds_answer: float


def demo_text() -> str:
    return (resources.files("kvfast") / "data" / "moby_dick_ch1.txt").read_text(encoding="utf-8")


def build_context(session: Session, max_tokens: int = 2000, depth: float = 0.4) -> list[int]:
    """The text cut to `max_tokens` (question included) with the fact after the paragraph
    nearest `depth` of the way in."""
    paragraphs = demo_text().split("\n\n")
    budget = max_tokens - len(session.encode(FACT)) - len(session.encode(QUESTION))
    kept: list[str] = []
    for p in paragraphs:
        if len(session.encode("\n\n".join([*kept, p]))) > budget:
            break
        kept.append(p)
    cut = max(1, round(len(kept) * depth))
    text = "\n\n".join(kept[:cut]) + FACT + "\n\n".join(kept[cut:])
    return session.encode(text)


def run(
    model: str | None = None,
    *,
    ratio: float = 8.0,
    methods: tuple[str, ...] = ("am", "snapkv"),
    device: str = "cpu",
    dtype: str | None = None,
) -> list[Row]:
    session = Session.from_pretrained(model, device=device, dtype=dtype)
    context = build_context(session)
    question = session.encode(QUESTION)
    rows = []
    for method in ("full", *methods):
        session.reset()
        session.prefill(context, logits=None)
        t0 = time.perf_counter()
        if method != "full":
            session.compact(ratio=ratio, method=method)
        t1 = time.perf_counter()
        # The KV bytes the answer is read from (before the question is appended).
        kv = int(session.cache_info()["bytes"])
        answer = session.generate(question, max_new_tokens=8).strip()
        t2 = time.perf_counter()
        rows.append(Row(method, answer, answer.startswith(VALUE), kv, t1 - t0, t2 - t1))
    return rows


def format_table(rows: list[Row], ratio: float) -> str:
    out = [
        f"Fact hidden in the context: {FACT.strip()!r}",
        f"Question: {QUESTION.strip()!r}",
        "",
        f"{'cache':<16} {'answer':<14} {'right':<6} {'KV bytes':>12} "
        f"{'compact s':>10} {'answer s':>9}",
    ]
    for r in rows:
        name = "full" if r.method == "full" else f"{r.method} {ratio:g}x"
        out.append(
            f"{name:<16} {r.answer[:14]!s:<14} {'yes' if r.correct else 'no':<6} "
            f"{r.kv_bytes:>12,} {r.seconds_compact:>10.2f} {r.seconds_answer:>9.2f}"
        )
    return "\n".join(out)
