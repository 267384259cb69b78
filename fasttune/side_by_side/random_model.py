"""A recipe's base model rebuilt from its architecture with random weights, for ``bench --random-init``.

Speed and memory depend on the architecture, not on the weights' values, so a 7B-class benchmark
needs no download. The few config values each recipe's base model needs ship with fasttune
(fasttune.architectures, from the publishers' config.json files). The tokenizer is the real one where it can be found without a
network (a local folder, a package, the hub cache); otherwise one is built in code: byte-level,
with the chat template's special tokens, so every byte of text is one token (sequences are then
longer than with the real vocabulary: state the lengths, which the bench reports as tokens).
"""
from __future__ import annotations

from pathlib import Path

from fasttune.architectures import BASE_CONFIGS, config_values
from fasttune.errors import Problem, UserError
from fasttune.families import get_family
from fasttune.families.chat_templates import get_template
from fasttune.model.source import resolve_model_source


def architecture(recipe) -> dict:
    found = config_values(recipe.model.name, recipe.model.revision)
    if found is not None:
        return found[0]
    raise UserError(Problem("model.name", recipe.model.name, "has no architecture config shipped with fasttune for --random-init",
                            f"use one of {', '.join(sorted(BASE_CONFIGS))}, or a local folder with config.json"))


SIGNATURE = "random_model.json"
"""Written beside the weights: what they were built from, so a folder is reused only for the same model."""


def build_random_model(recipe, out_dir: Path, force_cpu: bool = False, shapes: dict | None = None) -> Path:
    """Write ``out_dir`` (config, random safetensors in bfloat16 on CUDA, float32 on the CPU, tokenizer).

    ``shapes`` overrides architecture values (a tiny model of the same family for rehearsals). A
    folder this function built from the same architecture, shapes and dtype is reused as it is;
    one it built from anything else is rebuilt; a non-empty folder it did not write is refused.
    The model is built on the GPU where there is one (seconds for 7B) and written once.
    """
    import json
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out_dir = Path(out_dir)
    values = {**architecture(recipe), **(shapes or {})}
    cuda = torch.cuda.is_available() and not force_cpu
    dtype = torch.bfloat16 if cuda else torch.float32
    signature = {"architecture": dict(values), "dtype": str(dtype).removeprefix("torch.")}
    marker = out_dir / SIGNATURE
    if marker.is_file():
        if json.loads(marker.read_text(encoding="utf-8")) == signature:
            return out_dir
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(Problem("random model folder", str(out_dir), "exists and was not written by fasttune's random-model builder",
                                "pick an empty or new folder; fasttune never deletes files it did not write"))
    model_type = values.pop("model_type")
    tokenizer = _tokenizer(recipe)
    values["vocab_size"] = max(values.get("vocab_size", 0), len(tokenizer))
    config = AutoConfig.for_model(model_type, **values)
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)  # transformers' own init (normal, std 0.02)
    partial = out_dir.with_name(out_dir.name + ".partial")  # renamed into place when complete
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True, max_shard_size="5GB")
    tokenizer.save_pretrained(partial)
    (partial / SIGNATURE).write_text(json.dumps(signature), encoding="utf-8")
    del model
    if cuda:
        torch.cuda.empty_cache()
    shutil.rmtree(out_dir, ignore_errors=True)  # empty, or an older build of ours (its marker said so)
    partial.rename(out_dir)
    return out_dir


def _tokenizer(recipe):
    """The real tokenizer when it is reachable offline, else a byte-level one built here."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve_model_source(recipe.model.name), revision=recipe.model.revision)
    except Exception:  # not local, not cached, or no network: build one
        return byte_level_tokenizer(recipe)


def byte_level_tokenizer(recipe):
    """256 byte tokens plus the family template's special tokens, with that chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    family = get_family(recipe.family)
    template = get_template(family.chat_template)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = list(dict.fromkeys(["<s>", "</s>", "<unk>", *template.stop, template.end_of_turn, template.opens_turn,
                                   *family.pad_candidates]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token=template.end_of_turn,
                                        unk_token="<unk>", additional_special_tokens=[t for t in specials if t not in ("<s>", "<unk>")])
    tokenizer.chat_template = template.source()
    tokenizer.pad_token = next((t for t in family.pad_candidates if t in specials), "<unk>")
    return tokenizer
