#!/usr/bin/env bash
# `make demo`: the whole method end to end on the bundled sample, with tiny local models built here:
# seed -> train backward/forward -> plan --pilot -> rebuild (prepare -> generate -> assemble -> validate -> publish),
# twice (the second run reuses everything) -> train sft -> eval.
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

echo "== bft seed: first-turn English rank-0 pairs from the bundled OpenAssistant fixture -> ROOT/seed/"
$BIN/bft seed --oasst samples/oasst/oasst1-sample.jsonl --root "$ROOT"

echo "== bft train: backward (response -> instruction) and forward (instruction -> response) models"
$BIN/bft train --role backward --base-model "$MODELS/base" --root "$ROOT" "${TRAIN[@]}"
$BIN/bft train --role forward --base-model "$MODELS/base" --root "$ROOT" "${TRAIN[@]}"

RUN_FILE=samples/runs/demo.yaml
if [ "$ROOT" != runs/demo ]; then  # the run file names runs/demo; point it at this root
  RUN_FILE="$ROOT/demo.yaml"
  sed "s|runs/demo|$ROOT|g" samples/runs/demo.yaml > "$RUN_FILE"
fi
echo "== bft plan --pilot 40: prepare, then 40 random candidates through the stages (the night reuses their"
echo "   answers): rates, expected examples and cost with 95% intervals, measured before the night promises them"
$BIN/bft plan --config "$RUN_FILE" --target-examples 51200 --pilot 40
echo "== bft rebuild: prepare -> generate backtranslate, score -> assemble -> validate -> publish"
$BIN/bft rebuild --config "$RUN_FILE"
echo "== bft rebuild again: nothing changed, so every stage is reused and nothing new is published"
$BIN/bft rebuild --config "$RUN_FILE"

echo "== bft train sft: the base model on the published corpus (tags included)"
$BIN/bft train --role sft --base-model "$MODELS/base" --root "$ROOT" "${TRAIN[@]}"

echo "== bft eval: answer the sample questions with the SFT and the base model, judge them pairwise"
$BIN/bft eval generate --model "$MODELS/sft" --questions samples/eval/questions.json \
  --output "$ROOT/eval/sft.json" --max-new-tokens 48
$BIN/bft eval generate --model "$MODELS/base" --questions samples/eval/questions.json \
  --output "$ROOT/eval/base.json" --max-new-tokens 48
$BIN/bft eval judge --a "$ROOT/eval/sft.json" --b "$ROOT/eval/base.json" --judge-model "$MODELS/chat" \
  --max-new-tokens 32 --output "$ROOT/eval/judge.json"

echo "== bft validate: what a training team runs before it trains"
$BIN/bft validate --root "$ROOT"
LATEST=$(cat "$ROOT/sft/LATEST")
echo
echo "published release: $ROOT/sft/$LATEST  (manifest.json, README.md card, train/validation Parquet)"
echo "report: $ROOT/sft/$LATEST/report.html"
echo "data for loaders (bft latest): $($BIN/bft latest "$ROOT" --verify)"
echo "tiny random models write nonsense: the point is that every stage runs and accounts for every row."
