#!/usr/bin/env bash
# Issue 6 measurements on real pretrained weights (SmolLM2-135M-Instruct Q4_1 GGUF) and per
# weight format: AM needle retrieval on SmolLM2 (full vs AM (three query sources) vs SnapKV and
# KVzip at 4x and 8x), CPU decode speed per weight format, and kvfast vs llama.cpp on the same
# GGUF file (needs `pip install .[llama]`; see benches/llama_cpp_speed.py for CPUs with AMX).
# Needs ../shared. About 40 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
OUT=${1:-docs/results/smollm2}
SMOL="$SHARED/models/smollm2-135m-instruct-gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI="$SHARED/data/wikitext-2/wiki.test.raw"
E="python -m kvfast.eval"
# AM as it was before the defaults changed on 2026-11-26 (root-mean-square scores, on-policy,
# held-out ridge, values only), with each query source, and the default of 2026-11-26 (values
# only, ridge 10: $PREV), beside the current default `am`.
B=:score=rms:on_policy=true:ridge=none:fit=values
PREV=am:fit=values:ridge=10
BEFORE_AM=am:queries=self-study$B,am:queries=repeat$B,am:queries=repeat+self-study$B
$E needle --model "$SMOL" --methods full,am,$PREV,$BEFORE_AM,snapkv,kvzip --ratios 4,8 \
  --haystack "$SHARED/data/ruler/PaulGrahamEssays.json" --lengths 1024,2048 \
  --depths 0.25,0.75 --cases 1 --out "$OUT/needle"
$E speed --model "$SMOL" --methods full --ratios 8 --text "$WIKI" --lengths 512 --decode 64 \
  --out "$OUT/speed-smollm2-q4_1"
for fmt in f32 bf16 q8_0 q4_0; do
  $E speed --model "$SHARED/models/qwen3-small" --dtype "$fmt" --methods full --ratios 8 \
    --text "$WIKI" --lengths 512 --decode 64 --out "$OUT/speed-qwen3-small-$fmt"
done
$E report "$OUT"/needle "$OUT"/speed-* --out "$OUT" --title "SmolLM2 and weight formats (CPU)"
python benches/llama_cpp_speed.py "$SMOL" --requantize q4_0,q8_0 --out "$OUT"
