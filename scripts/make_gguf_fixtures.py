"""Golden fixture for GGUF loading, from transformers (the oracle) reading the same GGUF file.

    python scripts/make_gguf_fixtures.py [--gguf PATH]   # default: ../shared's SmolLM2 Q4_1

Needs torch, transformers and gguf (`pip install torch transformers gguf`). transformers
dequantizes every tensor to f32 (and un-permutes llama.cpp's q/k rows), so its logits are the
exact reference for kvfast with dequantized weights (`CANDLE_DEQUANTIZE_ALL=1`), and an
approximate one for kvfast's default quantized matmuls (which quantize activations to 8 bits,
as llama.cpp does).

Writes tests/fixtures/golden/smollm2-135m-q4_1.npz:
  texts / text_ids     the tokenizer cases: strings and transformers' GGUF tokenizer's ids
                       (object array of int lists)
  input_ids  int64 [48]  the first 48 ids of PROMPT
  positions  int64 [3]   [0, 20, 47]
  logits_f32 float32 [3, V]  transformers f32 logits at `positions`
  greedy_f32 int64 [16]  greedy continuation (full uncached forward each step)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT.parent / "shared/models/smollm2-135m-instruct-gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = (
    "The old lighthouse keeper climbed the stairs every evening, counting each step aloud, "
    "because his father had told him that a keeper who forgets the count forgets the sea. "
    "Far below, the harbour lights came on one by one, and the fishing boats turned for home "
    "before the storm reached the cliffs."
)
TEXTS = [
    "The capital of France is",
    "Numbers: 12345 and 3.14159, dates 2026-11-26!",
    "  leading spaces,\ttabs\nand newlines\n\n",
    "Ünïcödé, emoji 🚀 and CJK 漢字",
    "<|im_start|>user\nHi<|im_end|>",
]
POSITIONS = [0, 20, 47]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gguf", type=Path, default=DEFAULT)
    p.add_argument("--out", type=Path, default=ROOT / "tests/fixtures/golden/smollm2-135m-q4_1.npz")
    a = p.parse_args()
    torch.set_num_threads(2)
    transformers.utils.logging.disable_progress_bar()
    kw = {"gguf_file": a.gguf.name}
    tok = transformers.AutoTokenizer.from_pretrained(a.gguf.parent, **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        a.gguf.parent, dtype=torch.float32, **kw
    ).eval()
    text_ids = [tok.encode(t, add_special_tokens=False) for t in TEXTS]
    ids = tok.encode(PROMPT, add_special_tokens=False)[:48]
    assert len(ids) == 48
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0]
        seq = list(ids)
        for _ in range(16):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        a.out,
        texts=np.array(TEXTS, dtype=object),
        text_ids=np.array([np.array(x) for x in text_ids], dtype=object),
        input_ids=np.array(ids, dtype=np.int64),
        positions=np.array(POSITIONS, dtype=np.int64),
        logits_f32=logits[POSITIONS].numpy().astype(np.float32),
        greedy_f32=np.array(seq[48:], dtype=np.int64),
        transformers_version=np.array(transformers.__version__),
    )
    print(f"wrote {a.out} ({a.out.stat().st_size / 1024:.0f} KB); greedy {tok.decode(seq[48:])!r}")


if __name__ == "__main__":
    main()
