#!/usr/bin/env bash
# Downloads into DIR the wheels of bench/gpu_wheels.txt, for a Linux x86_64 GPU machine that has
# torch and transformers but no package index; there, `python bench/gpu_check.py --wheels DIR`
# installs them. Run this where PyPI is reachable; no dependencies are resolved (the list is complete).
#
#   bench/gpu_wheels.sh DIR
#   PYTHON_VERSION=3.12 bench/gpu_wheels.sh DIR      # the GPU machine's Python (default 3.11)
#   PLATFORMS="manylinux_2_17_x86_64 manylinux2014_x86_64" bench/gpu_wheels.sh DIR
set -euo pipefail
dir=${1:?usage: bench/gpu_wheels.sh DIR}
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
# pip does not widen a manylinux_2_X tag to older glibc versions by itself: list them all.
platforms=${PLATFORMS:-manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64}
platform_args=()
for platform in $platforms; do
    platform_args+=(--platform "$platform")
done
mkdir -p "$dir"
"$python" -m pip download --disable-pip-version-check --no-deps --only-binary :all: \
    --python-version "${PYTHON_VERSION:-3.11}" --implementation cp "${platform_args[@]}" \
    -d "$dir" -r "$here/gpu_wheels.txt"
echo "$(find "$dir" -name '*.whl' | wc -l) wheels, $(du -sh "$dir" | cut -f1) in $dir"
