"""The names Unsloth's saving calls take, and which of them fasttune writes: one table, torch-free.

``save_method`` (``save_pretrained_merged``, ``push_to_hub_merged``) and ``quantization_method``
(``save_pretrained_gguf``, ``push_to_hub_gguf``) are checked here before any work: a name fasttune
writes is mapped to fasttune's own, a name Unsloth has and fasttune does not is refused by name with
the reason and what to use instead, anything else is refused as unknown with the list.

The names come from unsloth 2026.10.9, ``unsloth/save.py``: ``ALLOWED_QUANTS`` and ``IMATRIX_QUANTS``
(GGUF), ``COMPRESSED_EXPORT_SCHEMES`` and ``TORCHAO_EXPORT_SCHEMES`` (the FP8/FP4/INT8 save methods),
the ``merged_4bit`` branch of ``unsloth_save_model``, and ``save_to_gguf``'s aliases.
"""
from __future__ import annotations

from fasttune.errors import Problem, UserError, suggest
from fasttune.gguf_types import GGUF_TYPES

SAVE_METHODS = ("merged_16bit", "lora")
"""What ``save_method`` may be (Unsloth's default is the first)."""

FOUR_BIT_MERGES = ("merged_4bit", "merged_4bit_forced")
COMPRESSED_METHODS = (
    # COMPRESSED_EXPORT_SCHEMES (llm-compressor, for vLLM)
    "fp8", "fp8_dynamic", "dynamic_fp8", "w8a8_fp8", "fp8_static", "static_fp8", "fp8_block", "block_fp8",
    "int8", "w8a8", "w8a8_int8", "w8a16", "int8_weight", "w4a16", "int4", "int4_weight", "w4a16_asym", "w4a8",
    "w4afp8", "mxfp8", "w8a8_mxfp8", "mxfp4", "w4a4_mxfp4", "mxfp4a16", "w4a16_mxfp4", "nvfp4", "w4a4_nvfp4",
    "nvfp4a16", "w4a16_nvfp4",
    # TORCHAO_EXPORT_SCHEMES
    "torchao_fp8", "torchao_int8", "portable_fp8", "portable_int8",
)

GGUF_ALIASES = {"fast_quantized": "q8_0", "quantized": "q4_k_m", "q4_k": "q4_k_m", "q5_k": "q5_k_m"}
"""Unsloth's names for presets fasttune writes (``save_to_gguf``; q4_k and q5_k: ALLOWED_QUANTS says
"alias for q4_k_m / q5_k_m"). ``not_quantized`` is the merged dtype's own: f16 or bf16; None is q8_0."""

LLAMA_CPP_ONLY_QUANTS = (
    # ALLOWED_QUANTS that fasttune's writer has no preset for: Unsloth runs llama.cpp's llama-quantize
    "q2_k", "q2_k_l", "q3_k_l", "q3_k_m", "q3_k_s", "q3_k_xs", "q4_1", "q4_k_s", "q5_0", "q5_1", "q5_k_s",
    # IMATRIX_QUANTS: llama-quantize with an importance matrix
    "iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_s", "iq3_m", "iq4_nl", "iq4_xs",
)


def save_method(value, where: str = "save_method") -> str:
    """``value`` as one of :data:`SAVE_METHODS` (Unsloth's spelling rules: case, spaces and dashes
    do not matter), or a UserError naming it."""
    key = str(value).lower().strip().replace("-", "_").replace(" ", "_")
    if key in SAVE_METHODS:
        return key
    if key in FOUR_BIT_MERGES:
        raise UserError(Problem(where, value, "a LoRA merged into 4-bit weights is re-quantized to NF4, which rounds away most of "
                                "what training changed (and GGUF or a later merge would start from that loss)",
                                "save_method='merged_16bit' (the merge into the 16-bit base), and load that with "
                                "load_in_4bit=True where it must run in 4 bits"), "cannot save the model")
    if key in COMPRESSED_METHODS:
        raise UserError(Problem(where, value, "is one of Unsloth's compressed exports for vLLM (llm-compressor or torchao), "
                                "which fasttune does not write", "save_method='merged_16bit', then compress that folder "
                                "with llm-compressor or torchao"), "cannot save the model")
    raise UserError(Problem(where, value, f"must be one of {', '.join(SAVE_METHODS)}",
                            suggest(key, SAVE_METHODS) or "use save_method='merged_16bit' or 'lora'"), "cannot save the model")


def gguf_methods(quantization_method, merged_dtype: str, where: str = "quantization_method") -> list[str]:
    """fasttune's GGUF preset for each of Unsloth's ``quantization_method`` (a name, None or a list of
    them), in order, once each; a UserError naming every one fasttune cannot write."""
    values = list(quantization_method) if isinstance(quantization_method, (list, tuple)) else [quantization_method]
    presets, problems = [], []
    for value in values:
        key = "q8_0" if value is None else str(value).lower().strip()
        key = ("f16" if merged_dtype == "float16" else "bf16") if key == "not_quantized" else GGUF_ALIASES.get(key, key)
        if key in GGUF_TYPES:
            presets.append(key)
        elif key in LLAMA_CPP_ONLY_QUANTS:
            problems.append(Problem(where, value, f"is a llama.cpp quantization fasttune's GGUF writer does not make; it writes "
                                    f"{', '.join(GGUF_TYPES)}", "use one of those (q4_k_m is the smallest K-quant), or write 'f16' "
                                    "and quantize that file with llama.cpp's llama-quantize"))
        else:
            problems.append(Problem(where, value, f"is not a GGUF type; fasttune writes {', '.join(GGUF_TYPES)} "
                                    "(and Unsloth's names not_quantized, fast_quantized, quantized)",
                                    suggest(key, [*GGUF_TYPES, *GGUF_ALIASES, "not_quantized"]) or "use q8_0 or q4_k_m"))
    if problems:
        raise UserError(problems, "cannot write the GGUF")
    if not presets:
        raise UserError(Problem(where, quantization_method, "names no GGUF type", "give one, e.g. 'q8_0', or a list"),
                        "cannot write the GGUF")
    return list(dict.fromkeys(presets))
