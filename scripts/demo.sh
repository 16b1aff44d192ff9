#!/usr/bin/env bash
# `make demo`: the main job end to end on the bundled sample, with tiny local models built here.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${BFT_DEMO_ROOT:-runs/demo}
BIN=.venv/bin
SAMPLE='samples/dolma/documents/*/*.json.gz'
MODELS="$ROOT/models"

echo "== tiny models: a tokenizer trained on the sample, random-weight Llama models (nothing downloaded)"
[ -f "$MODELS/chat/config.json" ] || \
  $BIN/python -m training.tiny --texts "$SAMPLE" --output "$MODELS" --vocab-size 2000 \
    --model backward:plain --model forward --model chat

echo "== bft prepare: Dolma head split -> exact length filter -> dedup -> token-balanced shards"
$BIN/bft prepare --input "$SAMPLE" --output "$ROOT/candidates" \
  --tokenizer "$MODELS/tokenizer" --max-tokens 1024 --num-shards 4

GEN=(--root "$ROOT" --engine hf --max-new-tokens 64 --batch-size 16 --seed 0)
echo "== bft generate backtranslate (backward model)"
$BIN/bft generate backtranslate "${GEN[@]}" --model "$MODELS/backward"
echo "== bft generate score (forward model, Humpback rubric)"
$BIN/bft generate score "${GEN[@]}" --model "$MODELS/forward"
echo "== bft generate rewrite (chat model)"
$BIN/bft generate rewrite "${GEN[@]}" --model "$MODELS/chat"

echo
echo "run root: $ROOT  (candidates/, generations/<stage>/ with a metrics JSON per shard)"
echo "tiny random models write nonsense: the point is that every stage runs and accounts for every row."
