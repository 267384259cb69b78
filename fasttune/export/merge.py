"""Merge a LoRA adapter into a 16-bit copy of its base model, one checkpoint shard at a time.

For QLoRA the adapter is merged into the base as published (16-bit), not into the 4-bit weights
it trained against: merging into NF4 would re-quantize the sum and lose most of what was learned.

Streaming: each shard of the base checkpoint is read, every adapted weight in it gets
``W + scaling * B @ A`` (computed in float32, one tensor at a time), and the shard is written in
the output dtype before the next is read. Peak memory is about one shard, so a 7B merge fits in
24 GB of RAM, where loading the whole model in float32 (28 GB) would not. The arithmetic is PEFT's
(``LoraLayer.get_delta_weight``: scaling ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA); the
tests check that the merged model's logits equal PEFT's adapter model's.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from fasttune.atomic_io import atomic_replace_dir, temp_dir_beside
from fasttune.errors import Problem, UserError

ADAPTER_PREFIX = "base_model.model."
# Small files of a model folder that travel with the merged weights (tokenizer files are written
# from the training tokenizer instead, so the merged model carries the training chat template).
COPIED_FILES = ("generation_config.json",)


@dataclass
class MergeResult:
    path: Path
    merged_modules: int
    replaced_tensors: int
    shards: int
    dtype: str
    notes: list[str] = field(default_factory=list)


def local_model_dir(source: str, revision: str | None = None) -> Path:
    """The folder holding ``source``'s files: itself if local, else the hub snapshot (cached)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    from fasttune import hub

    hub.use_cache_if_unreachable()
    try:
        return Path(snapshot_download(source, revision=revision, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as err:  # offline and not cached, private, or no such repository
        raise UserError(Problem("model.name", source, f"cannot fetch the base weights to merge into ({type(err).__name__})",
                                "run where the hub is reachable, or point model.name at a local folder")) from None


def read_adapter(adapter_dir: Path) -> tuple[dict, dict]:
    """``(adapter_config, tensors)``; refuses adapter kinds this merge does not handle."""
    from safetensors.torch import load_file

    config_path, weights_path = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise UserError(Problem("adapter", str(adapter_dir), "holds no adapter_config.json + adapter_model.safetensors",
                                "point at a run's adapter/ folder"))
    config = json.loads(config_path.read_text(encoding="utf-8"))
    unsupported = [key for key in ("use_dora", "alpha_pattern") if config.get(key)]
    if config.get("peft_type", "LORA") != "LORA" or unsupported:
        raise UserError(Problem("adapter", str(adapter_dir), f"is not a plain LoRA adapter ({', '.join(unsupported) or config.get('peft_type')})",
                                "merge it with PEFT's merge_and_unload() in Python"))
    return config, load_file(str(weights_path))


def plan_merge(config: dict, tensors: dict) -> tuple[dict[str, tuple], dict[str, object]]:
    """Base weight name -> (A, B, scaling) for each adapted module, and base name -> replacement
    tensor for modules trained in full (``modules_to_save``)."""
    deltas, replacements = {}, {}
    for name, tensor in tensors.items():
        if not name.startswith(ADAPTER_PREFIX):
            raise UserError(Problem("adapter", name, "is not a PEFT causal-LM adapter tensor", "merge it with PEFT in Python"))
        inner = name[len(ADAPTER_PREFIX):]
        if ".lora_A." in inner:
            module = inner.split(".lora_A.")[0]
            a, b = tensor, tensors[f"{ADAPTER_PREFIX}{module}.lora_B.{inner.split('.lora_A.')[1]}"]
            rank = a.shape[0]  # per module: honours rank_pattern
            alpha = config.get("lora_alpha", 8)
            scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
            deltas[f"{module}.weight"] = (a, b, scaling)
        elif ".lora_B." in inner:
            continue
        elif "lora_embedding" in inner or "trainable_tokens" in inner:
            raise UserError(Problem("adapter", name, "adapts embeddings in a way this merge does not handle",
                                    "merge it with PEFT's merge_and_unload() in Python"))
        else:
            replacements[inner.replace(".modules_to_save", "")] = tensor
    return deltas, replacements


def merge_adapter(source: str, adapter_dir: Path, out_dir: Path, tokenizer, save_dtype: str = "bfloat16",
                  revision: str | None = None, fan_in_fan_out: bool | None = None, card: str | None = None,
                  finish=None) -> MergeResult:
    """Write base + adapter merged, as ``save_dtype`` safetensors, to ``out_dir`` (atomically),
    with the training tokenizer and, if given, ``card`` as the model card (README.md); ``finish``
    (a function of the folder) adds the caller's last files before the folder is renamed into place."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    base = local_model_dir(source, revision)
    config, tensors = read_adapter(Path(adapter_dir))
    deltas, replacements = plan_merge(config, tensors)
    transpose = config.get("fan_in_fan_out", False) if fan_in_fan_out is None else fan_in_fan_out
    shards = sorted(base.glob("*.safetensors"))
    if not shards:
        raise UserError(Problem("model.name", str(base), "holds no *.safetensors weights to merge into", "use a safetensors base"))
    _refuse_prequantized(base)
    dtype = getattr(torch, save_dtype)
    tmp = temp_dir_beside(Path(out_dir))
    done, replaced, total_size = set(), 0, 0
    try:
        for shard in shards:
            merged = {}
            with safe_open(str(shard), framework="pt") as reader:
                metadata = reader.metadata() or {}
                for key in reader.keys():
                    weight = reader.get_tensor(key)
                    if key in deltas:
                        a, b, scaling = deltas[key]
                        delta = (b.float() @ a.float()) * scaling
                        weight = weight.float() + (delta.T if transpose else delta)
                        done.add(key)
                    elif key in replacements:
                        weight, replaced = replacements[key], replaced + 1
                    merged[key] = weight.to(dtype) if weight.is_floating_point() else weight
                    total_size += merged[key].numel() * merged[key].element_size()
            save_file(merged, str(tmp / shard.name), metadata={**metadata, "format": "pt"})
            del merged
        missing = sorted(set(deltas) - done)
        if missing:
            raise UserError(Problem("adapter", str(adapter_dir), f"adapts weights the base does not have: {', '.join(missing[:3])}"
                                    + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""),
                                    "merge it into the base model it was trained on"))
        _write_side_files(base, tmp, save_dtype, total_size)
        tokenizer.save_pretrained(tmp)
        if card:
            (tmp / "README.md").write_text(card, encoding="utf-8")
        if finish is not None:
            finish(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    path = atomic_replace_dir(tmp, Path(out_dir))
    return MergeResult(path, len(done), replaced, len(shards), save_dtype)


def _refuse_prequantized(base: Path) -> None:
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "quantized")
        raise UserError(Problem("model.name", str(base), f"is a pre-quantized checkpoint ({method}); its weights cannot take a 16-bit merge",
                                "train and merge on the 16-bit base model this checkpoint was made from"))


def _write_side_files(base: Path, out: Path, save_dtype: str, total_size: int) -> None:
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    config["dtype"] = save_dtype
    config.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    index = base / "model.safetensors.index.json"
    if index.is_file():
        document = json.loads(index.read_text(encoding="utf-8"))
        document.setdefault("metadata", {})["total_size"] = total_size
        (out / index.name).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    for name in COPIED_FILES:
        if (base / name).is_file():
            shutil.copy2(base / name, out / name)
