#!/usr/bin/env bash
# The GPU kit: bench/gpu_wheels.txt's wheels for a CUDA machine without a package index, the two
# large ones trimmed, at most 40 MiB (bench/gpu_kit.py says what and why). Run where PyPI is reachable.
#
#   bench/gpu_kit.sh DIR                                   # Python 3.12, CUDA 13.0 (the defaults)
#   bench/gpu_kit.sh DIR --python-version 3.11 --cuda 128  # another machine
set -euo pipefail
dir=${1:?usage: bench/gpu_kit.sh DIR [--python-version X.Y] [--cuda NNN]}
shift
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_kit.py" build "$dir" "$@"
