"""Peer run: NVIDIA kvpress's presses on the same needle cases as scripts/compaction_quality.py,
through transformers, so kvfast's baselines can be checked against an independent
implementation. Two steps, because kvpress needs torch + transformers and kvfast does not:

    # 1. with kvfast: the exact token ids of the cases (same generator and seed)
    python scripts/kvpress_peer.py dump --model ../shared/models/qwen3-small \\
        --data ../shared/data --cases 10 --out /tmp/cases.json
    # 2. with torch, transformers and kvpress (pip install kvpress)
    python scripts/kvpress_peer.py run --model ../shared/models/qwen3-small \\
        --cases /tmp/cases.json --ratios 4,8,16,32 --presses full,kvzip,snapkv,streaming

The context is compressed before the question is seen (kvpress's pipeline `_forward`, fed the
same token ids: no chat template, as in kvfast's script). kvpress's presses mask dropped keys
rather than free them, so their KV bytes are the full cache's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from two_step import dump_parser, haystack


def dump(a: argparse.Namespace) -> None:
    import compaction_quality as cq
    from kvfast import Session

    s = Session.from_pretrained(a.model)
    cases = cq.needle_cases(s, haystack(s, a.data), a.cases, a.length, a.seed)
    keys = ("context", "question", "answer")
    a.out.write_text(json.dumps([{k: c[k] for k in keys} for c in cases]))
    print(f"wrote {len(cases)} cases to {a.out}")


def run(a: argparse.Namespace) -> None:
    import torch
    from kvpress import KVzipPress, SnapKVPress, StreamingLLMPress, TOVAPress
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok, device="cpu")
    presses = {
        "kvzip": lambda r: KVzipPress(compression_ratio=r),
        "snapkv": lambda r: SnapKVPress(compression_ratio=r),
        "streaming": lambda r: StreamingLLMPress(compression_ratio=r),
        "tova": lambda r: TOVAPress(compression_ratio=r),
    }
    cases = json.loads(a.cases.read_text())
    print("| press | ratio | needle EM |")
    print("|---|---|---|")
    for name in a.presses.split(","):
        for ratio in [1.0] if name == "full" else [float(x) for x in a.ratios.split(",")]:
            hits = 0
            for c in cases:
                press = None if name == "full" else presses[name](1 - 1 / ratio)
                inputs = {
                    "context_ids": torch.tensor([c["context"]]),
                    "questions_ids": [torch.tensor([c["question"]])],
                }
                with torch.inference_mode():
                    out = pipe._forward(inputs, max_new_tokens=8, press=press)
                hits += out[0].strip().startswith(c["answer"])
            print(f"| kvpress {name} | {ratio:g}x | {hits / len(cases):.2f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    dump_parser(sub, cases=10, seed=0)
    r = sub.add_parser("run")
    r.add_argument("--model", required=True)
    r.add_argument("--cases", type=Path, required=True)
    r.add_argument("--ratios", default="4,8,16,32")
    r.add_argument("--presses", default="full,kvzip,snapkv,streaming")
    r.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    dump(a) if a.cmd == "dump" else run(a)


if __name__ == "__main__":
    main()
