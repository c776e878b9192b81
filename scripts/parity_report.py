"""Print kvfast-vs-transformers parity numbers for golden fixtures (README table).

python scripts/parity_report.py NAME=MODEL_DIR:FIXTURE.npz ...
"""

from __future__ import annotations

import sys

import numpy as np
from kvfast import Session


def report(name: str, model: str, fixture: str) -> str:
    g = dict(np.load(fixture))
    ids = [int(i) for i in g["input_ids"]]
    cells = []
    for dtype, key in (("f32", "logits_f32"), ("bf16", "logits_bf16")):
        if key not in g:
            cells.append("-")
            continue
        s = Session.from_pretrained(model, dtype=dtype)
        got = s.prefill(ids, logits="all")[g["positions"]]
        cells.append(f"{np.abs(got - g[key]).max():.2e}")
    s = Session.from_pretrained(model, dtype="f32")
    s.prefill(ids, logits=None)
    want = [int(i) for i in g["greedy_f32"]]
    got = list(s.engine.generate(max_new_tokens=len(want), eos_ids=[]))
    same = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), len(want))
    s = Session.from_pretrained(model, dtype="f32")
    s.prefill(ids[:1], logits=None)
    nll = np.abs(s.score(ids[1:]) - g["nll_f32"]).max()
    return (
        f"| {name} | {cells[0]} | {cells[1]} | {same}/{len(want)} | {nll:.2e} "
        f"| {g['transformers_version']} |"
    )


if __name__ == "__main__":
    print(
        "| model | f32 max abs logit err | bf16 max abs logit err | greedy tokens equal "
        "| NLL max abs err | transformers |"
    )
    print("|---|---|---|---|---|---|")
    for arg in sys.argv[1:]:
        name, rest = arg.split("=", 1)
        model, fixture = rest.rsplit(":", 1)
        print(report(name, model, fixture))
