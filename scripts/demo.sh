#!/usr/bin/env bash
# The first stages of `rlhfkit quickstart`, one CLI command each, as you would run them on your own data:
# built-in task → tiny model → SFT → held-out gold reward → reward model → its held-out accuracy and
# agreement with the gold reward.
# Usage: bash scripts/demo.sh [OUT_DIR]     (about 70 seconds on a 2-core CPU)
set -euo pipefail
OUT="${1:-runs/demo}"
rlhfkit make-data --out "$OUT/data"
rlhfkit tiny-model --arch llama --out "$OUT/tiny"
# run again into the same OUT: the earlier run's models are replaced (a training run refuses that unless told)
rlhfkit sft --model "$OUT/tiny" --data "$OUT/data/sft.jsonl" --out "$OUT/sft" \
    --optim.lr 3e-3 --train.epochs 10 --train.batch_size 32 --train.overwrite_output_dir true
rlhfkit eval --model "$OUT/sft" --prompts "$OUT/data/prompts_test.jsonl" --out "$OUT/sft/eval.json"
rlhfkit rm --model "$OUT/sft" --data "$OUT/data/preference.jsonl" --out "$OUT/rm" \
    --optim.lr 1e-3 --train.epochs 2 --train.batch_size 32 --train.overwrite_output_dir true
rlhfkit eval-rm --model "$OUT/rm" --data "$OUT/data/preference_test.jsonl" --out "$OUT/rm/eval.json"
