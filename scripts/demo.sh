#!/usr/bin/env bash
# `make demo`: the whole method end to end on the bundled sample, with tiny local models built here:
# seed -> train backward/forward -> prepare -> generate -> assemble (release) -> validate -> train sft -> eval.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${BFT_DEMO_ROOT:-runs/demo}
BIN=.venv/bin
SAMPLE='samples/dolma/documents/*/*.json.gz'
MODELS="$ROOT/models"
# tiny models learn something in a few steps at this rate; the paper's 1e-5 is for 7B models
TRAIN=(--max-steps 30 --lr 2e-3 --batch-size 8 --per-device-batch-size 4 --logging-steps 10)

echo "== tiny models: a tokenizer trained on the sample, random-weight Llama models (nothing downloaded)"
[ -f "$MODELS/chat/config.json" ] || \
  $BIN/python -m training.tiny --texts "$SAMPLE" --output "$MODELS" --vocab-size 2000 \
    --model base:plain --model chat

echo "== bft seed: first-turn English rank-0 pairs from the bundled OpenAssistant fixture"
$BIN/bft seed --oasst samples/oasst/oasst1-sample.jsonl --output "$ROOT/seed/seed.parquet"

echo "== bft train: backward (response -> instruction) and forward (instruction -> response) models"
$BIN/bft train --role backward --base-model "$MODELS/base" --data "$ROOT/seed/seed.parquet" \
  --output "$MODELS/backward" "${TRAIN[@]}"
$BIN/bft train --role forward --base-model "$MODELS/base" --data "$ROOT/seed/seed.parquet" \
  --output "$MODELS/forward" "${TRAIN[@]}"

echo "== bft prepare: Dolma head split -> exact length filter -> dedup -> token-balanced shards"
$BIN/bft prepare --input "$SAMPLE" --root "$ROOT" \
  --tokenizer "$MODELS/tokenizer" --max-tokens 1024 --num-shards 4

GEN=(--root "$ROOT" --engine hf --max-new-tokens 64 --batch-size 16 --seed 0)
echo "== bft generate backtranslate (backward model)"
$BIN/bft generate backtranslate "${GEN[@]}" --model "$MODELS/backward"
echo "== bft generate score (forward model; expected score from the digit probabilities)"
$BIN/bft generate score "${GEN[@]}" --model "$MODELS/forward" --score-mode logprob
echo "== bft generate rewrite (chat model; only pairs past the score gate are sent)"
# The default gate is the paper's score 5; the tiny models' logprob scores sit near 2, so the demo
# gates at the threshold its assemble step uses.
$BIN/bft generate rewrite "${GEN[@]}" --model "$MODELS/chat" --min-score 2

# Tiny models never write a parsable [RES]...[/RES] rewrite, so the demo publishes the `filter` recipe
# with a threshold on the logprob scores (expected values; a tiny model's sit near 2); the default recipe
# is filter+rewrite with score 5.
echo "== bft assemble: recipe, curation, seed mixing, stats, report, card, versioned release"
$BIN/bft assemble --root "$ROOT" --recipe filter --min-score 2 --seed-data "$ROOT/seed/seed.parquet" \
  --max-instruction-chars 2000
echo "== bft validate: what a training team runs before it trains"
$BIN/bft validate "$ROOT"

echo "== bft train sft: the base model on the published corpus (tags included)"
$BIN/bft train --role sft --base-model "$MODELS/base" --data "$ROOT" --output "$MODELS/sft" "${TRAIN[@]}"

echo "== bft eval: answer the sample questions with the SFT and the base model, judge them pairwise"
$BIN/bft eval generate --model "$MODELS/sft" --questions samples/eval/questions.json \
  --output "$ROOT/eval/sft.json" --max-new-tokens 48
$BIN/bft eval generate --model "$MODELS/base" --questions samples/eval/questions.json \
  --output "$ROOT/eval/base.json" --max-new-tokens 48
$BIN/bft eval judge --a "$ROOT/eval/sft.json" --b "$ROOT/eval/base.json" --judge-model "$MODELS/chat" \
  --max-new-tokens 32 --output "$ROOT/eval/judge.json"

LATEST=$(cat "$ROOT/sft/LATEST")
echo
echo "published release: $ROOT/sft/$LATEST  (manifest.json, README.md card, train/validation Parquet)"
echo "report: $ROOT/sft/$LATEST/report.html"
echo "tiny random models write nonsense: the point is that every stage runs and accounts for every row."
