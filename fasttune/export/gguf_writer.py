"""Write a merged Hugging Face model folder as one GGUF file, in Python, one tensor at a time.

Input: a folder with ``config.json``, safetensors weights (one file or an index of shards) and
the tokenizer files. Output: a GGUF file that llama.cpp, Ollama and LM Studio load, with the
tokenizer and chat template inside (``gguf_vocab.py``). No llama.cpp checkout or compiler is
involved: the ``gguf`` package (llama.cpp's own Python library) supplies the names, the file
layout and the quantization tables; ``quantize.py`` picks and produces each tensor's type.

What a converter has to know per architecture (as llama.cpp's ``convert_hf_to_gguf.py`` knows it)
is declared by the model's family, ``fasttune.families.get_family(config.model_type)``: llama.cpp's
architecture name, whether the q/k rows are reordered for llama.cpp's RoPE
(``_interleave_rope_rows``), whether norms are written plus one, and which extra metadata keys
llama.cpp reads (``_EXTRA_METADATA`` computes each). How to convert is here; the rest follows from
the checkpoint itself: tensor names from gguf's table (Phi-3's fused ``qkv_proj``/``gate_up_proj``
and Qwen's biases and ``q_norm``/``k_norm`` included), RoPE scaling from its parameters, and tied
embeddings (no ``lm_head.weight``, or ``tie_word_embeddings``): no ``output.weight``, llama.cpp
then reuses ``token_embd``.

The file is written to a hidden temporary name beside ``out_path`` and renamed at the end, so an
interrupted export never leaves a file that looks finished. Tensor data is streamed: the tensor
table is written from the plan first, then each tensor is loaded, converted to float32,
quantized and appended, so memory holds the vocabulary and about one tensor at a time (measured on
SmolLM2-135M, 513 MiB of float32 weights: about 300 MiB above the imports, half of it the
tokenizer, whatever the preset).
"""
from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fasttune.atomic_io import atomic_file
from fasttune.disk import require_free
from fasttune.errors import Problem
from fasttune.export import quantize
from fasttune.export.gguf_vocab import GGUFVocab, read_vocab
from fasttune.export.refusals import NO_GGUF, ExportRefused, no_gguf_export
from fasttune.families import FAMILIES, Family

# Tensors a checkpoint may carry that are not weights (buffers some older exports saved).
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

# Where the tensor data of a GGUF file starts and each tensor is padded to (GGUF default).
_ALIGNMENT = 32


@dataclass
class GGUFResult:
    """What ``write_gguf`` produced."""

    path: Path
    preset: str
    tensor_types: dict[str, str]
    """GGUF tensor name -> ggml type name (``"Q8_0"``, ``"F32"``...)."""
    notes: list[str] = field(default_factory=list)
    """Things the user may want to know: K-quant fallbacks, tied embeddings, approximations."""
    size_bytes: int = 0
    seconds: float = 0.0


@dataclass
class _Planned:
    """One tensor of the output: where its data comes from and what it becomes."""

    name: str
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]
    qtype: object = None
    nbytes: int = 0


def write_gguf(model_dir: Path, out_path: Path, preset: str = "q8_0", *, pre_tokenizer: str | None = None,
               chat_template: str | None = None, add_bos: bool | None = None, progress=None) -> GGUFResult:
    """Write the model in ``model_dir`` to ``out_path`` as GGUF with quantization ``preset``.

    ``pre_tokenizer`` overrides llama.cpp's pre-tokenizer name for byte-level BPE vocabularies,
    ``chat_template`` the tokenizer's template, ``add_bos`` whether runtimes prepend BOS (default:
    what the tokenizer does when encoding; an export passes what the training template did, so
    llama.cpp and Ollama prompts start the way training rows did). ``progress(done, total, tensor_name)`` is called
    after each tensor is written. Raises ``UserError`` when the disk lacks room for the file, and
    :class:`~fasttune.export.refusals.ExportRefused` (a UserError) for a preset, model or tokenizer
    it cannot write.
    """
    import gguf

    started = time.monotonic()
    model_dir, out_path = Path(model_dir), Path(out_path)
    quantize.check_preset(preset)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    family = FAMILIES.get(config.get("model_type"))
    if family is None or family.gguf_arch is None:
        raise ExportRefused(no_gguf_export(str(model_dir / "config.json"), config.get("model_type")), "cannot export to GGUF")
    arch_name = family.gguf_arch
    arch = gguf_arch(arch_name)
    n_layers = config["num_hidden_layers"]
    notes: list[str] = []

    tensors = _plan_tensors(model_dir, config, family, arch, notes)
    plan = quantize.plan_types(preset, [(t.name, t.shape) for t in tensors], n_layers)
    for tensor in tensors:
        tensor.qtype, note = plan[tensor.name]
        if note:
            notes.append(note)
        block, size = gguf.GGML_QUANT_SIZES[tensor.qtype]
        tensor.nbytes = math.prod(tensor.shape) // block * size
    vocab = read_vocab(model_dir, _embedding_rows(tensors), pre_tokenizer=pre_tokenizer, chat_template=chat_template)
    if add_bos is not None:
        vocab.add_bos = add_bos
    _check_disk(out_path, tensors, vocab)

    writer = gguf.GGUFWriter(path=None, arch=arch_name)
    _write_metadata(writer, config, family, model_dir, quantize.file_type(preset), notes)
    vocab.write_to(writer)
    for tensor in tensors:
        # The info block is written before any data: shapes, types and byte sizes are known from
        # the plan, so the data can follow one tensor at a time (dtype float32 here only tells the
        # writer that the shape is in elements, not bytes).
        writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), tensor.nbytes, raw_dtype=tensor.qtype)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out_path) as tmp:
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for done, tensor in enumerate(tensors, 1):
                data = quantize.quantize(tensor.load(), tensor.qtype)
                writer.write_tensor_data(data)
                del data
                if progress is not None:
                    progress(done, len(tensors), tensor.name)
        finally:
            writer.close()
    return GGUFResult(
        path=out_path, preset=preset, tensor_types={t.name: t.qtype.name for t in tensors}, notes=notes,
        size_bytes=out_path.stat().st_size, seconds=time.monotonic() - started,
    )


def gguf_arch(arch_name: str):
    """gguf's ``MODEL_ARCH`` for llama.cpp's architecture name (a family declares the name)."""
    import gguf

    arch = next((key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == arch_name), None)
    if arch is None:  # fasttune's own mistake: a family in fasttune/families names one gguf does not have
        raise ValueError(f"the gguf package has no architecture {arch_name!r}")
    return arch


# ---------------------------------------------------------------------------------------------
# Tensors


def _plan_tensors(model_dir: Path, config: dict, family: Family, arch, notes: list[str]) -> list[_Planned]:
    """Every output tensor with its GGUF name, shape and a loader that applies the conversions."""
    import gguf
    from safetensors import safe_open

    name_map = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    sources = _safetensors_files(model_dir)
    tied = "lm_head.weight" not in sources or bool(config.get("tie_word_embeddings", False))
    if tied:
        notes.append("tied embeddings: no output.weight, llama.cpp reuses token_embd.weight")
    n_head = config["num_attention_heads"]
    n_kv_head = config.get("num_key_value_heads") or n_head

    planned = []
    for file in dict.fromkeys(sources.values()):
        with safe_open(str(file), framework="pt") as handle:  # reads the header only
            for hf_name in handle.keys():
                if _IGNORED.search(hf_name) or (tied and hf_name == "lm_head.weight"):
                    continue
                gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise ExportRefused(Problem(str(model_dir), hf_name, f"this tensor has no name in llama.cpp's {family.gguf_arch} "
                                                "architecture: the checkpoint is a variant llama.cpp does not run",
                                                NO_GGUF), "cannot export to GGUF")
                transform = _transform_for(family, hf_name, n_head, n_kv_head)
                shape = tuple(handle.get_slice(hf_name).get_shape())
                planned.append(_Planned(gguf_name, shape, _loader(file, hf_name, transform)))
    planned += _generated_tensors(config, model_dir)
    return sorted(planned, key=lambda t: _tensor_order(t.name))


def _safetensors_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (single file or sharded with an index)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as handle:
        return {name: single for name in handle.keys()}


def _loader(file: Path, hf_name: str, transform) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import torch
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as handle:
            data = handle.get_tensor(hf_name).to(torch.float32).numpy()
        return transform(data) if transform is not None else data

    return load


def _transform_for(family: Family, hf_name: str, n_head: int, n_kv_head: int):
    """The value/layout change llama.cpp expects for this tensor, or None."""
    if family.gguf_interleave_qk_rows:
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            return lambda w: _interleave_rope_rows(w, n_head)
        if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            return lambda w: _interleave_rope_rows(w, n_kv_head)
    if family.gguf_norm_plus_one and hf_name.endswith("norm.weight"):
        # The family's RMSNorm computes x * (1 + w); llama.cpp's computes x * w.
        return lambda w: w + np.float32(1.0)
    return None


def _interleave_rope_rows(weights: np.ndarray, heads: int) -> np.ndarray:
    """Reorder each head's rows from Hugging Face's rotary layout to llama.cpp's.

    Within a head of ``d`` rows, Hugging Face pairs row i with row i + d/2 for the rotation;
    llama.cpp pairs rows 2i and 2i + 1. Output row 2i is input row i, output row 2i + 1 is input
    row i + d/2.
    """
    rows = weights.shape[0]
    half = rows // heads // 2
    split = weights.reshape(heads, 2, half, *weights.shape[1:])
    return np.ascontiguousarray(split.swapaxes(1, 2).reshape(weights.shape))


def _generated_tensors(config: dict, model_dir: Path) -> list[_Planned]:
    """Tensors llama.cpp needs that the checkpoint does not store: RoPE frequency factors."""
    rope = _rope_parameters(config)
    rope_type = (rope.get("rope_type") or rope.get("type") or "default").lower()
    head_dim = _head_dim(config)
    if rope_type == "llama3":
        factors = _llama3_rope_factors(rope, head_dim, config)
        return [_Planned("rope_freqs.weight", factors.shape, lambda: factors)]
    if rope_type in ("longrope", "su") and rope.get("long_factor"):
        long_f = np.asarray(rope["long_factor"], dtype=np.float32)
        short_f = np.asarray(rope["short_factor"], dtype=np.float32)
        rope_dims = int(rope.get("partial_rotary_factor", 1.0) * config["hidden_size"]) // config["num_attention_heads"]
        if long_f.shape != (rope_dims // 2,) or short_f.shape != long_f.shape:
            raise ExportRefused(Problem(str(model_dir / "config.json"), f"{long_f.shape[0]} and {short_f.shape[0]} entries",
                                        f"longrope's long_factor and short_factor must have {rope_dims // 2} entries each",
                                        "fix the checkpoint's rope_scaling, or " + NO_GGUF), "cannot export to GGUF")
        return [_Planned("rope_factors_long.weight", long_f.shape, lambda: long_f),
                _Planned("rope_factors_short.weight", short_f.shape, lambda: short_f)]
    return []


def _llama3_rope_factors(rope: dict, head_dim: int, config: dict) -> np.ndarray:
    """Per-frequency divisors for Llama 3.1+'s RoPE scaling, as llama.cpp's rope_freqs tensor.

    Llama 3.1 keeps high frequencies (wavelength below old_context / high_freq_factor), divides
    low ones (wavelength above old_context / low_freq_factor) by ``factor`` and blends in between;
    llama.cpp divides each base frequency by the stored factor.
    """
    base = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    factors = np.where(wavelen < old_context / high, 1.0, np.where(wavelen > old_context / low, factor, blended))
    return factors.astype(np.float32)


def _tensor_order(name: str) -> tuple:
    # token_embd and rope factors first, then the blocks in order, then output_norm/output.
    match = re.match(r"blk\.(\d+)\.", name)
    if match:
        return (1, int(match.group(1)), name)
    return (0 if not name.startswith("output") else 2, 0, name)


def _embedding_rows(tensors: list[_Planned]) -> int:
    return next(t.shape[0] for t in tensors if t.name == "token_embd.weight")


# ---------------------------------------------------------------------------------------------
# Metadata


def _rope_parameters(config: dict) -> dict:
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope = dict(rope.get("full_attention", rope))
    if "rope_theta" not in rope and "rope_theta" in config:
        rope["rope_theta"] = config["rope_theta"]
    return rope


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _rope_dimension_count(writer, config: dict, rope: dict) -> None:
    # The rotated dimensions of a head: all of head_dim, or partial_rotary_factor of it (Phi-3 style).
    # Computed as llama.cpp's converter does for Phi-3, int(factor * n_head * head_dim) // n_head,
    # so that the rounding agrees.
    n_head = config["num_attention_heads"]
    writer.add_rope_dimension_count(int(rope.get("partial_rotary_factor", 1.0) * n_head * _head_dim(config)) // n_head)


def _softcapping(key: str):
    def add(writer, config: dict, rope: dict) -> None:
        if config.get(key) is not None:
            getattr(writer, f"add_{key}")(float(config[key]))

    return add


# Family.gguf_metadata name -> how that key's value comes from config.json (and its RoPE parameters).
_EXTRA_METADATA = {
    "vocab_size": lambda writer, config, rope: writer.add_vocab_size(config["vocab_size"]),
    "rope_dimension_count": _rope_dimension_count,
    "rope_scaling_orig_ctx_len": lambda writer, config, rope: writer.add_rope_scaling_orig_ctx_len(
        config.get("original_max_position_embeddings") or config["max_position_embeddings"]),
    # 0 when the checkpoint has none: llama.cpp tells Phi-4-style sliding-window checkpoints from
    # Phi-3 by a non-zero value (Gemma 2 checkpoints always have one).
    "sliding_window": lambda writer, config, rope: writer.add_sliding_window(config.get("sliding_window") or 0),
    "attn_logit_softcapping": _softcapping("attn_logit_softcapping"),
    "final_logit_softcapping": _softcapping("final_logit_softcapping"),
}


def _write_metadata(writer, config: dict, family: Family, model_dir: Path, file_type, notes: list[str]) -> None:
    """The ``general.*`` and ``<arch>.*`` keys: sizes, attention, RoPE, norms, the family's extras."""
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(model_dir.name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    n_head = config["num_attention_heads"]
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    head_dim = _head_dim(config)
    if "head_dim" in config:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)

    rope = _rope_parameters(config)
    if "rope_theta" in rope:
        writer.add_rope_freq_base(float(rope["rope_theta"]))
    _write_rope_scaling(writer, rope, config, model_dir)
    for name in family.gguf_metadata:
        _EXTRA_METADATA[name](writer, config, rope)

    # Gemma 2 scales queries by query_pre_attn_scalar ** -0.5; llama.cpp by head_dim's or hidden/heads'.
    scalar = config.get("query_pre_attn_scalar", head_dim)
    if scalar not in (head_dim, config["hidden_size"] // n_head):
        notes.append(f"{config['model_type']}: query_pre_attn_scalar={scalar} is neither head_dim nor hidden/heads; "
                     "llama.cpp scales queries by one of those, so its attention will differ")


def _write_rope_scaling(writer, rope: dict, config: dict, model_dir: Path) -> None:
    import gguf

    rope_type = (rope.get("rope_type") or rope.get("type") or "default").lower()
    if rope_type in ("default", "llama3"):
        return  # llama3 scaling travels as the rope_freqs tensor
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif rope_type in ("longrope", "su"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        original = config.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
        scale = config["max_position_embeddings"] / original
        # Phi-3's long-context attention factor, as transformers computes it for longrope.
        attn_factor = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0
        writer.add_rope_scaling_attn_factors(attn_factor)
    else:
        raise ExportRefused(Problem(str(model_dir / "config.json"), rope_type, "this RoPE scaling type has no GGUF equivalent "
                                    "in fasttune's exporter (it writes default, linear, llama3, yarn and longrope)",
                                    NO_GGUF), "cannot export to GGUF")


# ---------------------------------------------------------------------------------------------
# Disk


def _check_disk(out_path: Path, tensors: list[_Planned], vocab: GGUFVocab) -> None:
    """Refuse to start when the output folder's disk cannot hold the estimated file."""
    needed = sum(-(-t.nbytes // _ALIGNMENT) * _ALIGNMENT + len(t.name) + 64 for t in tensors)
    needed += vocab.metadata_bytes() + 64 * 1024
    require_free(out_path.parent, needed, f"the GGUF file {out_path.name}", str(out_path.parent),
                 "free that much on that disk, or write the GGUF to another folder", "not enough disk space for the GGUF export")


__all__ = ["GGUFResult", "write_gguf"]
