#!/usr/bin/env bash
# `make demo`: the main job end to end on the bundled sample, with tiny local models built here.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${BFT_DEMO_ROOT:-runs/demo}
BIN=.venv/bin
export TOKENIZERS_PARALLELISM=false
SAMPLE='samples/dolma/documents/*/*.json.gz'

echo "== tiny models (trained here on the sample; nothing is downloaded)"
[ -f "$ROOT/models/tokenizer/tokenizer.json" ] || \
  $BIN/python -m training.tiny --texts "$SAMPLE" --output "$ROOT/models/tokenizer" --vocab-size 2000

echo "== bft prepare: Dolma head split -> length filter -> dedup -> balanced candidate shards"
$BIN/bft prepare --input "$SAMPLE" --output "$ROOT/candidates" \
  --tokenizer "$ROOT/models/tokenizer" --max-tokens 1024 --num-shards 4
echo "candidates: $ROOT/candidates (stats.json, rejects/)"
