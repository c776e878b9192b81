#!/usr/bin/env bash
# The parts of docs/results/eval-qwen3-small/ that need torch: kvpress's presses beside kvfast's
# methods (--peer kvpress) and transformers in the speed table. Run with a Python that has torch,
# transformers and kvpress besides kvfast (PYTHON=...). About 25 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
PY=${PYTHON:-python}
RUNS=${1:-docs/results/eval-qwen3-small}/runs
M=(--model "$SHARED/models/qwen3-small")
E="$PY -m kvfast.eval"
$E needle "${M[@]}" --methods full --ratios 2,4,8,16,32,64 --haystack "$SHARED/data/ruler/PaulGrahamEssays.json" \
  --lengths 2048 --depths 0.25,0.75 --cases 3 --peer kvpress --out "$RUNS/needle-kvpress"
# kvzip:recent=0:sink=0: ours without the exact sink and recent windows, as kvpress's KVzip.
$E ppl "${M[@]}" --methods full,kvzip:recent=0:sink=0 --ratios 2,4,8,16,32,64 --text "$SHARED/data/wikitext-2/wiki.test.raw" \
  --context 2048 --continuation 256 --windows 2 --peer kvpress --out "$RUNS/ppl-kvpress"
$E qa "${M[@]}" --methods full --ratios 4,16 --data "$SHARED/data/ruler/squad.json" --length 1024 \
  --cases 8 --peer kvpress --out "$RUNS/qa-kvpress"
$E speed "${M[@]}" --methods full --ratios 8 --text "$SHARED/data/wikitext-2/wiki.test.raw" \
  --lengths 512,1024,2048 --decode 32 --transformers --out "$RUNS/speed-transformers"
