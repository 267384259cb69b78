"""The GGUF types fasttune writes, each with its size on disk: the one list (torch-free, stdlib only).

Recipes (``export.gguf``), ``export --gguf`` and its help, the disk estimates before training and
before an export, and the export station's quantizer (``fasttune/export/quantize.py``, whose
presets are keyed by exactly these names, a test checks) all read this table. It lives in the core
because the core validates recipes and may not import the export station.

Bits per weight include each block's scales (Q8_0: 32 int8 values and one float16 scale per
block, 8.5 bits; Q4_0: 4.5). The K-quant mixes keep a few tensors at higher precision
(llama.cpp's Q4_K_M and Q5_K_M give attn_v and ffn_down Q6_K in some layers, the output tensor Q6_K),
so their figures are rounded up from the plain type's.
"""
from __future__ import annotations

BITS_PER_WEIGHT: dict[str, float] = {
    "f32": 32.0,
    "f16": 16.0,
    "bf16": 16.0,
    "q8_0": 8.5,
    "q4_0": 4.5,
    "q4_k_m": 5.0,
    "q5_k_m": 5.8,
    "q6_k": 6.6,
}
"""GGUF type name (llama.cpp's preset name, lower case) -> bits per weight, for disk estimates."""

GGUF_TYPES: tuple[str, ...] = tuple(BITS_PER_WEIGHT)
"""The names, in the order they are listed to the user."""
