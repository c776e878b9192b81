#!/usr/bin/env bash
# Issue 6: the quantized KV cache on qwen3-small (CPU), alone and under Attention Matching:
# WikiText-2 perplexity and needle retrieval at 2048 tokens, int8/int4/int2 vs the full cache,
# AM at 4x/8x/16x with and without a quantized cache, and the bytes each configuration holds.
# Needs ../shared. About 40 minutes on 2 cores; every command resumes from its results.json.
#
# Usage: bash scripts/eval_kv_quant.sh [OUT]   (default OUT: docs/results/kv-quant)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
OUT=${1:-docs/results/kv-quant}
M=(--model "$SHARED/models/qwen3-small")
KV=full,full:kv=int8,full:kv=int4,full:kv=int2
# AM with the settings these pages were measured with: the defaults before 2026-11-26
# (self-study queries, root-mean-square scores, on-policy, held-out ridge, values only).
S=am:queries=self-study:score=rms:on_policy=true:ridge=none:fit=values
# ... and the current default (`am`: repeat queries, max scores, off-policy, biases + values
# at 4-16x), added on 2026-11-27.
AM="$S,$S:kv=int8,$S:kv=int4,$S:kv=int2,am,am:kv=int8,am:kv=int4,am:kv=int2"
E="python -m kvfast.eval"
$E ppl "${M[@]}" --methods $KV,$AM --ratios 4,8,16 --text "$SHARED/data/wikitext-2/wiki.test.raw" \
  --context 2048 --continuation 256 --windows 2 --out "$OUT/ppl"
$E needle "${M[@]}" --methods $KV,$AM --ratios 4,8,16 \
  --haystack "$SHARED/data/ruler/PaulGrahamEssays.json" --lengths 2048 --depths 0.25,0.75 \
  --cases 3 --out "$OUT/needle"
$E speed "${M[@]}" --methods $KV,$S,$S:kv=int4,am,am:kv=int4 --ratios 8 --text "$SHARED/data/wikitext-2/wiki.test.raw" \
  --lengths 2048 --decode 64 --out "$OUT/speed"
$E report "$OUT"/ppl "$OUT"/needle "$OUT"/speed --out "$OUT" \
  --title "Quantized KV cache (KIVI-style int8/int4/int2) with and without AM: qwen3-small on CPU"
