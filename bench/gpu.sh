#!/usr/bin/env bash
# fasttune against vanilla PEFT on a CUDA GPU: Mistral-7B QLoRA at sequence length 2048, with the
# architecture's random weights (--random-init: nothing is downloaded), on chat data with varied
# lengths. Each side is sized to finish within 8 minutes on one H100; the short table prints last.
# Needs the GPU install (README "GPU machines"). Writes into $OUT (default bench-results/gpu-<time>).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench-results/gpu-$(date +%Y%m%d-%H%M%S)}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "bench/gpu.sh needs a CUDA GPU (bench/cpu.sh runs on the CPU)")'
"$PY" bench/chat_data.py "$OUT/chat.jsonl" --rows 600
"$PY" -m fasttune bench mistral_qlora --random-init --examples 64 --warmup 2 --out "$OUT" \
    data.path="$OUT/chat.jsonl" data.eval_fraction=0.05 data.eval_rows=16 train.max_length=2048
