"""Choosing and producing GGUF tensor types: one function to quantize, one to plan a whole model.

``quantize(array, qtype)`` returns exactly what ``gguf.GGUFWriter.add_tensor(name, data,
raw_dtype=qtype)`` expects. The K-quants (Q4_K, Q5_K, Q6_K) come from :mod:`fasttune.export.kquants`;
everything else from ``gguf.quants.quantize``.

``plan_types(preset, tensors, n_layers)`` reproduces, for the presets fasttune offers, the per-tensor
choices llama.cpp's ``llama-quantize`` makes (``llama_tensor_get_type`` and its shape fallback in
``src/llama-quant.cpp``), so a file written here is laid out like one produced by the reference tool:

* Only tensors with at least two dimensions whose name ends in ``weight`` are quantized; norms
  (``*_norm.weight``), the MoE router (``ffn_gate_inp.weight``), learned position embeddings and
  token-type embeddings are kept as they are, which for us means F32. All 1-D tensors (norms,
  biases) are F32 in every preset.
* ``output.weight`` -- and ``token_embd.weight`` when the model ties its embeddings, i.e. has no
  ``output.weight`` -- gets Q6_K in every quantized preset except q8_0, where it stays Q8_0. When its
  row length is not a multiple of the preset's block size llama.cpp writes Q8_0 instead.
  An untied ``token_embd.weight`` keeps the preset's default type.
* q4_k_m / q5_k_m: ``attn_v.weight`` (and the fused ``attn_qkv.weight`` of phi3-style models, which
  current llama.cpp classifies with attn_v) and ``ffn_down.weight`` get Q6_K in the "use more bits"
  layers, otherwise the preset's Q4_K / Q5_K. A layer ``i`` of ``n`` uses more bits when
  ``i < n/8`` or ``i >= 7n/8`` or ``(i - n/8) % 3 == 2`` (integer division): the first and last
  eighth of the layers and every third layer in between. Every other 2-D weight (attn_q, attn_k,
  attn_output, ffn_gate, ffn_up including phi3's fused gate_up, token_embd) gets the default type.
  (Older llama.cpp releases gave attn_qkv a flat Q5_K in Q4_K_M and Q6_K in Q5_K_M; that branch is
  still in the source but no longer reached.)
* q4_0, q6_k, q8_0: the default type everywhere except the output rule above.
* f32 / f16 / bf16: every quantizable 2-D weight in that type, nothing else changes.
* Shape fallback: a block type needs the row length (the contiguous dimension) to be a multiple of
  its block size (256 for K-quants, 32 for Q8_0/Q4_0/Q5_0/Q5_1). Otherwise llama.cpp falls back
  Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and to F16 when even that block size does not divide
  the row. (For a Q8_0 or Q4_0 target llama.cpp has no fallback and refuses; we write F16.)

Not modelled (they need facts about the architecture that a name and a shape do not carry):
llama.cpp's extra bits for Falcon, for 70B-class models (attn_v Q4_K -> Q5_K) and for 8-expert
mixtures. For the standard dense decoders fasttune trains the plan matches llama.cpp.
"""
from __future__ import annotations

import re

import gguf
import numpy as np

from fasttune.export import kquants
from fasttune.export.refusals import ExportRefused, unknown_gguf_type

T = gguf.GGMLQuantizationType
F = gguf.LlamaFileType

# Each GGUF type fasttune offers (the names are fasttune.gguf_types.GGUF_TYPES, a test checks that
# they agree) -> (the type of its ordinary 2-D weights, its ``general.file_type``).
PRESETS: dict[str, tuple[T, F]] = {
    "f32": (T.F32, F.ALL_F32),
    "f16": (T.F16, F.MOSTLY_F16),
    "bf16": (T.BF16, F.MOSTLY_BF16),
    "q8_0": (T.Q8_0, F.MOSTLY_Q8_0),
    "q4_0": (T.Q4_0, F.MOSTLY_Q4_0),
    "q4_k_m": (T.Q4_K, F.MOSTLY_Q4_K_M),
    "q5_k_m": (T.Q5_K, F.MOSTLY_Q5_K_M),
    "q6_k": (T.Q6_K, F.MOSTLY_Q6_K),
}

_KQUANTS = {T.Q4_K: "Q4_K", T.Q5_K: "Q5_K", T.Q6_K: "Q6_K"}

# llama.cpp's fallback when the row length is not a multiple of a K-quant's 256-value super-block.
_KQUANT_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}

# 2-D weights llama.cpp never quantizes (a subset of its list that matters for text decoders).
_NEVER_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "position_embd.weight", "token_types.weight",
                    "ssm_conv1d", "attn_rel_b.weight")

_LAYER = re.compile(r"^blk\.(\d+)\.")


def check_preset(preset: str) -> None:
    """:class:`~fasttune.export.refusals.ExportRefused` (a UserError and a ValueError) for a name that is no preset."""
    if preset not in PRESETS:
        raise ExportRefused(unknown_gguf_type(preset), "cannot export to GGUF")


def file_type(preset: str) -> gguf.LlamaFileType:
    """The ``general.file_type`` value for a preset (e.g. ``MOSTLY_Q4_K_M`` for "q4_k_m")."""
    check_preset(preset)
    return PRESETS[preset][1]


def quantize(array: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """2-D float32 array [rows, cols] -> the data ``GGUFWriter.add_tensor(name, data, raw_dtype=qtype)`` expects.

    F32 gives float32, F16 float16, and BF16 and every block type uint8 raw bytes shaped
    [rows, cols_bytes], exactly as ``gguf.quants.quantize`` returns them. The row length must be a
    multiple of the type's block size (:func:`plan_types` picks a type for which it is).
    """
    qtype = T(qtype)
    data = np.asarray(array, dtype=np.float32)
    if qtype in _KQUANTS:
        return kquants.quantize_kquant(data, _KQUANTS[qtype])
    return gguf.quants.quantize(data, qtype)


# ----------------------------------------------------------------------------------------------
# plan_types
# ----------------------------------------------------------------------------------------------

def _is_quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """llama.cpp's test: at least 2-D, name ends in "weight", and not one of the excluded kinds."""
    return len(shape) >= 2 and name.endswith("weight") and not any(part in name for part in _NEVER_QUANTIZED)


def _category(name: str) -> str:
    """Broad tensor role, matched on substrings in llama.cpp's order."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    if "attn_qkv.weight" in name or "attn_kv_b.weight" in name or "attn_v.weight" in name:
        return "attn_v"        # fused qkv and MLA's kv_b are treated like attn_v
    for part in ("attn_k.weight", "attn_q.weight", "attn_output.weight", "ffn_up", "ffn_gate", "ffn_down"):
        if part in name:
            return part.split(".")[0]
    return "other"


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's rule for the layers that get Q6_K in Q4_K_M/Q5_K_M: first and last eighth, and
    every third layer in between (integer arithmetic as in C; the modulo is only reached for
    ``i_layer >= n_layers // 8``, so Python's and C's remainders agree)."""
    lo = n_layers // 8
    return i_layer < lo or i_layer >= 7 * n_layers // 8 or (i_layer - lo) % 3 == 2


def _layer_of(name: str) -> int:
    m = _LAYER.match(name)
    if m is None:
        raise ValueError(f"cannot tell the layer of {name!r} (expected a name like 'blk.N....')")
    return int(m.group(1))


def _choose(preset: str, name: str, cols: int, n_layers: int, tied: bool) -> tuple[T, str | None]:
    """The type llama.cpp's mixture gives a quantizable tensor, before the generic shape fallback."""
    default = PRESETS[preset][0]
    cat = _category(name)
    if cat == "output" or (tied and cat == "token_embd"):
        if cols % gguf.GGML_QUANT_SIZES[default][0] != 0:
            # llama.cpp tests the row against the preset's block size and goes straight to Q8_0
            wanted = default if default == T.Q8_0 else T.Q6_K
            note = None if wanted == T.Q8_0 else (
                f"{name}: row length {cols} is not a multiple of {gguf.GGML_QUANT_SIZES[default][0]}; "
                f"{wanted.name} -> Q8_0 (as llama.cpp does for the output tensor)")
            return T.Q8_0, note
        return (T.Q8_0 if default == T.Q8_0 else T.Q6_K), None
    if preset in ("q4_k_m", "q5_k_m") and cat in ("attn_v", "ffn_down"):
        if use_more_bits(_layer_of(name), n_layers):
            return T.Q6_K, None
    return default, None


def _fallback(name: str, qtype: T, cols: int) -> tuple[T, str | None]:
    """llama.cpp's shape fallback: a block type whose block size does not divide the row length."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if cols % block == 0:
        return qtype, None
    why = f"{name}: row length {cols} is not a multiple of {block}; "
    if qtype in _KQUANT_FALLBACK:
        alt = _KQUANT_FALLBACK[qtype]
        alt_block = gguf.GGML_QUANT_SIZES[alt][0]
        if cols % alt_block == 0:
            return alt, why + f"{qtype.name} -> {alt.name} (as llama.cpp does)"
        return T.F16, why + (f"{qtype.name} -> F16 ({alt.name}, llama.cpp's first fallback, needs a multiple "
                             f"of {alt_block}; F16 as llama.cpp does)")
    return T.F16, why + f"{qtype.name} -> F16 (llama.cpp has no fallback for {qtype.name} and refuses such a tensor)"


def plan_types(preset: str, tensors: list[tuple[str, tuple[int, ...]]], n_layers: int
               ) -> dict[str, tuple[gguf.GGMLQuantizationType, str | None]]:
    """For each GGUF tensor name, the type to write and, when a fallback happened, a note why.

    ``tensors`` holds ``(name, shape)`` with llama.cpp tensor names and **numpy** shapes: the last
    dimension is the contiguous one (the row length, GGUF's ``ne[0]``), e.g. ``(n_vocab, n_embd)``
    for ``token_embd.weight`` and ``(n_embd, n_ff)`` for ``blk.N.ffn_down.weight``. ``n_layers`` is
    the number of transformer blocks.

    llama.cpp counts attn_v / ffn_down tensors in layer order and uses the count as the layer
    index; for a model with one such tensor per layer that is the N of ``blk.N.``, which is used
    here directly (so a partial list gets the same answer as the full one).

    Notes are only set when the rules wanted one type and the shape forced another, e.g.
    ``"blk.0.attn_k.weight: row length 64 is not a multiple of 256; Q4_K -> Q5_0 (as llama.cpp does)"``.
    """
    check_preset(preset)
    names = [name for name, _ in tensors]
    tied = "output.weight" not in names
    default = PRESETS[preset][0]
    plan: dict[str, tuple[T, str | None]] = {}
    for name, shape in tensors:
        shape = tuple(int(s) for s in shape)
        if not _is_quantizable(name, shape) or preset == "f32":
            plan[name] = (T.F32, None)
            continue
        cols = shape[-1]
        if default in (T.F16, T.BF16):
            plan[name] = (default, None)
            continue
        qtype, note = _choose(preset, name, cols, n_layers, tied)
        qtype, fb_note = _fallback(name, qtype, cols)
        if note and fb_note:
            fb_note = fb_note.removeprefix(f"{name}: ")
        plan[name] = (qtype, "; then ".join(n for n in (note, fb_note) if n) or None)
    return plan
