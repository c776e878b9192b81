#!/usr/bin/env bash
# WikiText-2 perplexity of each weight format (issue 6), full cache, through `kvfast eval ppl`:
# qwen3-small (safetensors, quantized on load) and SmolLM2-135M-Instruct (GGUF Q4_1, with
# candle's quantized matmuls vs the same weights dequantized to f32). Writes
# docs/results/weight-formats.md. Needs ../shared and llama-cpp-python (pip install
# ".[llama]") for the requantized SmolLM2 rows. About 8 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
OUT=${1:-docs/results/weight-formats}
WIKI="$SHARED/data/wikitext-2/wiki.test.raw"
SMOL="$SHARED/models/smollm2-135m-instruct-gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
ARGS=(--methods full --text "$WIKI" --context 1024 --continuation 256 --windows 4)
for fmt in f32 bf16 q8_0 q5_1 q5_0 q4_1 q4_0; do
  python -m kvfast.eval ppl --model "$SHARED/models/qwen3-small" --dtype "$fmt" "${ARGS[@]}" \
    --out "$OUT/qwen3-small-$fmt" > /dev/null
done
python -m kvfast.eval ppl --model "$SMOL" "${ARGS[@]}" --out "$OUT/smollm2-q4_1" > /dev/null
CANDLE_DEQUANTIZE_ALL=1 python -m kvfast.eval ppl --model "$SMOL" "${ARGS[@]}" \
  --out "$OUT/smollm2-q4_1-dequantized" > /dev/null
# SmolLM2 in the other GGUF formats, requantized from the Q4_1 file by llama.cpp's own
# quantizer (llama-cpp-python, the `llama` extra): the same weights rounded again, so each
# row's delta includes Q4_1's rounding (the reference stays the dequantized Q4_1). In Q4_K_M
# and Q6_K, SmolLM2's 576-wide rows are not whole 256-weight superblocks, so llama.cpp keeps
# most matrices in Q5_0 / Q8_0 and uses k-quants for ffn_down only.
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
for fmt in q8_0 q6_k q5_1 q5_0 q4_k_m q4_0; do
  python - "$SMOL" "$fmt" "$TMP/smollm2.$fmt.gguf" <<'PY'
import sys
import llama_cpp
src, fmt, dst = sys.argv[1:]
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{fmt.upper()}")
params.allow_requantize = True
if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params) != 0:
    sys.exit(f"llama.cpp could not requantize {src} to {fmt}")
PY
  python -m kvfast.eval ppl --model "$TMP/smollm2.$fmt.gguf" "${ARGS[@]}" \
    --out "$OUT/smollm2-$fmt" > /dev/null
done
# The same q5_0 weights dequantized to f32: what the requantization costs, without our kernel.
CANDLE_DEQUANTIZE_ALL=1 python -m kvfast.eval ppl --model "$TMP/smollm2.q5_0.gguf" "${ARGS[@]}" \
  --out "$OUT/smollm2-q5_0-dequantized" > /dev/null
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = []
for d in sorted(out.iterdir()):
    r = json.loads((d / "results.json").read_text())
    full = next(x for x in r["rows"] if x["key"] == "full")
    rows.append((d.name, r["model_hash"], full["ppl"], full["tokens"]))
lines = ["| model / weights | WikiText-2 PPL | vs reference | tokens |", "|---|---|---|---|"]
refs = {"qwen3-small": "qwen3-small-f32", "smollm2": "smollm2-q4_1-dequantized"}
ppl = {n: p for n, _, p, _ in rows}
for name, _, p, n in rows:
    ref = ppl[refs[name.split("-q")[0].split("-f")[0].split("-b")[0]]]
    lines.append(f"| {name} | {p:.3f} | {100 * (p / ref - 1):+.2f}% | {n} |")
page = Path("docs/results/weight-formats.md")
page.write_text(
    "# Weight formats: perplexity (issue 6)\n\n"
    "`bash scripts/weight_formats.sh`: WikiText-2 test, 4 windows of 1024 context + 256 scored "
    "tokens, full cache, CPU. qwen3-small is quantized on load from its safetensors "
    "(`dtype=...`), referenced to f32; its hidden size 384 is not a multiple of 256, so the "
    "k-quants do not apply to it. SmolLM2-135M-Instruct is the Q4_1 GGUF, referenced to the "
    "same weights dequantized to f32 (`CANDLE_DEQUANTIZE_ALL=1`): the gap is what quantizing "
    "the activations to 8 bits inside the products costs (llama.cpp does the same). The other "
    "SmolLM2 rows are that file requantized by llama.cpp (q8_0 ... q4_0, q4_k_m, q6_k), so "
    "they include Q4_1's rounding; in q4_k_m / q6_k most of SmolLM2's 576-wide matrices fall "
    "back to Q5_0 / Q8_0 (only ffn_down is a k-quant).\n\n"
    + "\n".join(lines) + "\n"
)
print(page.read_text())
PY
