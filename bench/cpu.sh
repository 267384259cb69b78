#!/usr/bin/env bash
# fasttune against vanilla PEFT on this machine's CPU: the demo's real model (SmolLM2-135M-Instruct)
# on chat data with realistic, varied lengths (bench/chat_data.py). About 10 minutes on 2 cores.
# Writes results.json, report.md and bench.png into $OUT (default bench-results/cpu-<time>).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench-results/cpu-$(date +%Y%m%d-%H%M%S)}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
"$PY" bench/chat_data.py "$OUT/chat.jsonl" --rows 600
"$PY" -m fasttune bench demo --examples 96 --warmup 2 --out "$OUT" \
    data.path="$OUT/chat.jsonl" data.eval_fraction=0.05 data.eval_rows=24 train.max_length=512 train.packing=true
