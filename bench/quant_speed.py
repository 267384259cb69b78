"""Benchmark: GGUF quantization speed and error, per tensor type, on one CPU core.

Quantizes a random-normal float32 matrix (default 4096 x 4096, 64 MiB) with
``fasttune.export.quantize.quantize`` -- the numpy K-quants for Q4_K/Q5_K/Q6_K, the ``gguf``
package for the others -- decodes it with ``gguf.quants.dequantize`` and prints MB/s of float32
input (best of ``--repeat`` runs; from wall-clock time and, in brackets, from this process's CPU
time, which is the number to trust on a busy machine) and the RMSE relative to the data's
standard deviation.
Target: Q4_K at 20 MB/s or more, so a 7B model's ~28 GB of float32 takes minutes.

    .venv/bin/python bench/quant_speed.py [--rows 4096] [--cols 4096] [--repeat 1] [--types Q4_K,Q8_0]
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys
import time
from pathlib import Path

# numpy's BLAS calls (used for a few row sums) must not borrow other cores: this is a one-core number
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import gguf  # noqa: E402
import numpy as np  # noqa: E402

from fasttune.export.quantize import quantize  # noqa: E402

TYPES = ("F16", "Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=1, help="runs per type; the fastest is reported")
    ap.add_argument("--types", default=",".join(TYPES), help="comma-separated GGML type names")
    args = ap.parse_args()

    x = np.random.default_rng(0).standard_normal((args.rows, args.cols)).astype(np.float32)
    mb = x.nbytes / 1e6
    print(f"input {args.rows}x{args.cols} float32 = {mb:.0f} MB; python {platform.python_version()}, numpy {np.__version__}, "
          f"gguf {importlib.metadata.version('gguf')}, {os.cpu_count()} cpu(s)")
    print(f"{'type':6s} {'MB/s':>8s} {'(cpu)':>8s} {'seconds':>8s} {'bits/value':>10s} {'rel. RMSE':>10s}  via")
    for name in args.types.split(","):
        qtype = gguf.GGMLQuantizationType[name.strip()]
        best = best_cpu = float("inf")
        for _ in range(max(1, args.repeat)):
            start, start_cpu = time.perf_counter(), time.process_time()
            raw = quantize(x, qtype)
            best = min(best, time.perf_counter() - start)
            best_cpu = min(best_cpu, time.process_time() - start_cpu)
        x_hat = gguf.quants.dequantize(raw, qtype)
        rel = float(np.sqrt(np.mean((x - x_hat) ** 2)) / x.std())
        bits = raw.nbytes * 8 / x.size
        via = "fasttune.export.kquants" if name.endswith("_K") else "gguf.quants"
        cpu = f"({mb / best_cpu:.1f})" if best_cpu > 0 else "(-)"
        print(f"{name:6s} {mb / best:8.1f} {cpu:>8s} {best:8.2f} {bits:10.4f} {rel:10.5f}  {via}")
        del raw, x_hat
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
