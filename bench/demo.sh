#!/usr/bin/env bash
# Times the CPU demo end to end (after install) and prints its task metric before and after
# training, from the run's own report. Usage: bench/demo.sh [key=value overrides...]
set -euo pipefail
cd "$(dirname "$0")/.."
make -s install
run_dir="runs/bench-demo-$(date +%Y%m%d-%H%M%S)"
SECONDS=0
.venv/bin/python -m fasttune recipe demo "train.output_dir=$run_dir" "$@"
elapsed=$SECONDS
echo
echo "machine: $(nproc) CPU cores, $(awk '/MemTotal/ {printf "%.0f GB", $2/1048576}' /proc/meminfo), $(uname -m)"
echo "demo wall time: ${elapsed} s (the one-time model import from GGUF counts only on the first run)"
echo "task metric (from $run_dir/report.md):"
awk '/^## Task/{show=1; next} /^## /{show=0} show && /\|/' "$run_dir/report.md"
