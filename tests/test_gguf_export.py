"""GGUF export: every family's file reads back, through readers that are not ours, as the model it came from.

The independent readers are transformers' GGUF loader (``from_pretrained(dir, gguf_file=...)``:
its own name table, its own undoing of llama.cpp's q/k row order and Gemma's norm offset, its own
dequantization), ``gguf.GGUFReader`` for the raw tensor table, llama.cpp's own GGUF of Phi-3's
vocabulary (``ggml-vocab-phi-3.gguf``, written by llama.cpp's converter) and its reference
tokenizations, and a re-statement of llama.cpp's SentencePiece merge loop (``_llama_cpp_spm``).

Models are tiny and random (``fixtures/tiny_models.py``), with two changes that make the checks
bite. Their q/k projections are scaled up (``QK_GAIN``): with the fixture's 0.02 init every
attention is almost uniform, and a model exported without the q/k row reordering then differs from
the original by less than the F16 tolerance (measured: 0.009). The K-quant models (hidden 256,
so that rows are whole 256-value super-blocks) are trained for a few dozen steps: a random model's
next-token scores are nearly tied, and 4-bit noise flips a fifth of them even when the export is
right.

Cost: transformers parses a GGUF's metadata each time it reads config, tokenizer or weights, and
a 150k-token vocabulary with its merges takes seconds to parse; each file is parsed once here
(``_read_each_gguf_once``), and the quantized variants use the small Gemma-style vocabulary.
"""
from __future__ import annotations

import heapq
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from fixtures.gguf_reads import each_gguf_read_once
from fixtures.tiny_models import chat_rows, tiny_config
from fixtures.real_tokenizers import GEMMA_CORPUS, assets_dir, load_tokenizer, phi3_reference_tokenizations
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from fasttune.errors import UserError
from fasttune.export import gguf_writer, quantize
from fasttune.export.gguf_vocab import CONTROL, detect_pre_tokenizer, read_vocab
from fasttune.export.gguf_writer import write_gguf
from fasttune.families import FAMILIES as REGISTRY

T = gguf.GGMLQuantizationType

# Scale of the q/k projections over the fixture's init: makes attention depend on positions, so a
# wrong rotary layout shows in the logits (without it the permutation test below cannot fail).
QK_GAIN = 5.0

# Per-family config changes on top of tiny_config. Gemma 2: transformers' GGUF reader leaves
# query_pre_attn_scalar at Gemma2Config's default (256) and llama.cpp scales queries by
# 1/sqrt(head_dim), so both agree only with head_dim = 256 (as in the real 2B and 9B models).
OVERRIDES = {"gemma2": {"head_dim": 256, "query_pre_attn_scalar": 256}}
# Families whose head_dim follows the hidden size (Qwen3 keeps 128, Gemma 2 256).
HEAD_DIM_FROM_HIDDEN = ("llama", "mistral", "qwen2", "phi3")

FAMILIES = tuple(REGISTRY)  # every registered family is exported (q8_0 below) and read back
# The real tokenizer each family is exported with in the round-trip tests. Qwen3 shares Qwen 2's
# vocabulary (tested there); its 151k tokens would add ~15 s, so Qwen3 runs with the small one.
REAL_TOKENIZER = {"llama": "smollm2", "mistral": "mistral", "qwen2": "qwen", "phi3": "phi3", "gemma2": "gemma"}
# transformers 5.17 cannot rebuild these vocabularies from any GGUF, llama.cpp's own included: its
# Phi-3 reader sets no normalizer (spaces vanish) and its Gemma reader builds a Unigram model from
# BPE scores. They are checked against llama.cpp's algorithm and llama.cpp's own Phi-3 file instead.
TRANSFORMERS_MISREADS_VOCAB = ("phi3", "gemma2")

SAMPLE = "Hello world! The quick brown fox jumps over the lazy dog. Don't panic: it's only a test, isn't it? naïve café"
HELD_OUT = ("Hello! Could you answer in one short sentence, please? The capital of Italy is Rome, and the "
            "quick brown fox is friendly. Which animal barks? A dog. Start with a clean dataset and a "
            "small model, then be patient.")
CHAT = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}]

# Block tensors each family must have, as llama.cpp names them (gguf-py's tensor table).
LLAMA_BLOCK = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
BLOCK_TENSORS = {
    "llama": LLAMA_BLOCK,
    "mistral": LLAMA_BLOCK,
    "qwen2": LLAMA_BLOCK + ("attn_q.bias", "attn_k.bias", "attn_v.bias"),
    "qwen3": LLAMA_BLOCK + ("attn_q_norm", "attn_k_norm"),
    "gemma2": LLAMA_BLOCK + ("post_attention_norm", "post_ffw_norm"),
    "phi3": ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down"),
}
TIED = ("gemma2",)  # Gemma 2 ties its lm_head to the embedding; the fixtures' other configs do not

# Per-tensor relative RMS error allowed after a round trip, by the type the tensor was written in
# (quantize.py's measured errors on Gaussian rows are about 0.5 %, 1.8 % and 7 % for Q8_0, Q6_K, Q4_K).
REL_ERROR = {T.F32: 1e-5, T.F16: 1e-3, T.Q8_0: 0.01, T.Q6_K: 0.03, T.Q5_0: 0.06, T.Q5_K: 0.05, T.Q4_K: 0.1}


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module", autouse=True)
def _read_each_gguf_once():
    """transformers builds a gguf.GGUFReader for every read of a file (config, tokenizer, weights):
    hand it the same reader for the same file, unchanged, instead of parsing again."""
    with each_gguf_read_once():
        yield


def build_model(folder: Path, family: str, tokenizer_name: str, *, hidden: int = 64, intermediate: int = 128,
                train_steps: int = 0, qk_gain: float = QK_GAIN, **overrides):
    """A tiny random ``family`` model saved with tokenizer ``tokenizer_name``; returns (model, tokenizer)."""
    tokenizer = load_tokenizer(tokenizer_name)
    config = tiny_config(family, tokenizer)
    config.hidden_size, config.intermediate_size = hidden, intermediate
    if family in HEAD_DIM_FROM_HIDDEN:
        config.head_dim = hidden // config.num_attention_heads
    for key, value in {**OVERRIDES.get(family, {}), **overrides}.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight")):
                param.mul_(qk_gain)
    if train_steps:
        _train(model, tokenizer, train_steps)
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def _train(model, tokenizer, steps: int) -> None:
    texts = [*GEMMA_CORPUS, *(tokenizer.apply_chat_template(row["messages"], tokenize=False) for row in chat_rows(8, system=False))]
    batches = [torch.tensor([tokenizer(text, add_special_tokens=False).input_ids]) for text in texts]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        ids = batches[step % len(batches)]
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


class Exports:
    """Models and their GGUF files, built once per module and shared by the tests."""

    def __init__(self, root: Path):
        self.root = root
        self.models: dict[tuple, tuple] = {}
        self.files: dict[tuple, object] = {}
        self.loaded: dict[Path, object] = {}

    def model(self, family: str, tokenizer: str, kquant: bool = False):
        key = (family, tokenizer, kquant)
        if key not in self.models:
            folder = self.root / "-".join(map(str, key))
            # The K-quant models keep the fixture's q/k scale: sharpened attention turns Q4_K's
            # ~7 % error on attn_q/attn_k into flipped next tokens, and the row order is checked in F16.
            sizes = dict(hidden=256, intermediate=512, train_steps=60, qk_gain=1.0) if kquant else {}
            model, tok = build_model(folder, family, tokenizer, **sizes)
            self.models[key] = (folder, model, tok)
        return self.models[key]

    def export(self, family: str, tokenizer: str, preset: str, kquant: bool = False):
        key = (family, tokenizer, kquant, preset)
        if key not in self.files:
            folder, _, _ = self.model(family, tokenizer, kquant)
            # Into a folder of its own: transformers would otherwise also read the original
            # tokenizer files lying next to the GGUF, and the check would no longer be independent.
            out = folder.with_name(folder.name + "-gguf") / f"model-{preset}.gguf"
            self.files[key] = write_gguf(folder, out, preset)
        return self.files[key]

    def gguf_model(self, path: Path):
        if path not in self.loaded:
            self.loaded[path] = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        return self.loaded[path]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> Exports:
    return Exports(tmp_path_factory.mktemp("gguf"))


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]), use_cache=False).logits[0]


def _field(reader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _check_tensor_table(reader, family: str, preset: str, result) -> None:
    n_layers = 2
    tied = family in TIED
    expected = {"token_embd.weight", "output_norm.weight", *(() if tied else ("output.weight",))}
    for block in range(n_layers):
        expected |= {f"blk.{block}.{name}" if name.endswith(".bias") else f"blk.{block}.{name}.weight"
                     for name in BLOCK_TENSORS[family]}
    found = {t.name: t for t in reader.tensors}
    assert set(found) == expected
    shapes = [(name, tuple(reversed(t.shape.tolist()))) for name, t in found.items()]
    planned = quantize.plan_types(preset, shapes, n_layers)
    assert {name: T(t.tensor_type) for name, t in found.items()} == {name: qtype for name, (qtype, _) in planned.items()}
    assert result.tensor_types == {name: T(t.tensor_type).name for name, t in found.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_has_its_expected_tensor_table(family):
    assert family in BLOCK_TENSORS, f"family {family!r}: add the GGUF block tensors it must have to BLOCK_TENSORS here"


# --------------------------------------------------------------------------------------------
# Real tokenizers, F16: the whole file round-trips


@pytest.mark.parametrize("family", list(REAL_TOKENIZER))
def test_real_tokenizer_f16_reads_back_as_the_same_model(exports, family):
    tok_name = REAL_TOKENIZER[family]
    folder, model, tokenizer = exports.model(family, tok_name)
    result = exports.export(family, tok_name, "f16")
    reader = gguf.GGUFReader(result.path)
    _check_tensor_table(reader, family, "f16", result)
    assert _field(reader, "general.architecture") == {"mistral": "llama"}.get(family, family)
    assert _field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    assert _field(reader, "tokenizer.chat_template") == tokenizer.chat_template
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id

    ids = tokenizer(SAMPLE, add_special_tokens=False).input_ids
    if family not in TRANSFORMERS_MISREADS_VOCAB:
        read_back = AutoTokenizer.from_pretrained(result.path.parent, gguf_file=result.path.name)
        assert read_back(SAMPLE, add_special_tokens=False).input_ids == ids
        assert read_back.chat_template == tokenizer.chat_template
        # transformers 5.17's llama-type GGUF converter takes EOS from bos_token_id (and BOS from
        # eos_token_id); the file's own ids are asserted above, so render with those.
        tokens = _field(reader, "tokenizer.ggml.tokens")
        for kind in ("bos", "eos"):
            if (token_id := _field(reader, f"tokenizer.ggml.{kind}_token_id")) is not None:
                setattr(read_back, f"{kind}_token", tokens[token_id])
        assert read_back.apply_chat_template(CHAT, tokenize=False) == tokenizer.apply_chat_template(CHAT, tokenize=False)
    if _field(reader, "tokenizer.ggml.model") == "llama":
        assert _llama_cpp_spm(reader, SAMPLE) == ids

    original = _logits(model, ids)
    exported = _logits(exports.gguf_model(result.path), ids)
    diff = (original - exported).abs().max().item()
    print(f"\n{family}/{tok_name} f16: max |logit diff| {diff:.2e}, logit std {original.std().item():.3f}, "
          f"relative {diff / original.std().item():.2e}")
    assert diff < 1e-2


def test_byte_level_vocabularies_get_gpt2_with_merges_and_llama_cpp_pre_tokenizer_names(exports, tmp_path):
    """SmolLM2's tokenizer.json says byte_fallback=True yet is byte-level: it must be gpt2 + merges + smollm."""
    for name, pre, eot in (("smollm2", "smollm", None), ("llama3", "llama-bpe", "<|eot_id|>"), ("qwen", "qwen2", None)):
        tokenizer = load_tokenizer(name)
        vocab = read_vocab(tmp_path, len(tokenizer), tokenizer=tokenizer)
        backend = json.loads(tokenizer.backend_tokenizer.to_str())
        assert (vocab.model, vocab.pre) == ("gpt2", pre)
        assert vocab.scores is None and len(vocab.merges) == len(backend["model"]["merges"])
        for piece, token_id in backend["model"]["vocab"].items():
            assert vocab.tokens[token_id] == piece
        for added in backend["added_tokens"]:
            assert vocab.tokens[added["id"]] == added["content"]
            if added["special"]:
                assert vocab.types[added["id"]] == CONTROL
        assert vocab.special_ids.get("eot") == (tokenizer.convert_tokens_to_ids(eot) if eot else None)
        assert vocab.add_bos == (tokenizer("a").input_ids[0] == tokenizer.bos_token_id)
        assert vocab.chat_template == tokenizer.chat_template


def test_pre_tokenizer_falls_back_to_the_split_regex_and_otherwise_asks_for_an_override():
    class Unknown:  # a tokenizer whose probe digest matches no known tokenizer
        def encode(self, text):
            return [1, 2, 3]

    llama3 = json.loads(load_tokenizer("llama3").backend_tokenizer.to_str())
    assert detect_pre_tokenizer(Unknown(), llama3) == "llama-bpe"
    with pytest.raises(ValueError, match="pre_tokenizer="):
        detect_pre_tokenizer(Unknown(), {"pre_tokenizer": {"type": "ByteLevel", "use_regex": False}})


def test_phi3_vocabulary_matches_llama_cpp_own_gguf_and_its_reference_tokenizations(exports):
    result = exports.export("phi3", "phi3", "f16")
    ours = gguf.GGUFReader(result.path)
    theirs = gguf.GGUFReader(assets_dir() / "llama-cpp-python-0.3.36" / "ggml-vocab-phi-3.gguf")
    n = len(_field(ours, "tokenizer.ggml.tokens"))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
        assert _field(ours, key) == _field(theirs, key)[:n]
    for key in ("model", "pre", "bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"):
        assert _field(ours, f"tokenizer.ggml.{key}") == _field(theirs, f"tokenizer.ggml.{key}")
    # Scores: ours come from the merge ranks, llama.cpp's from SentencePiece; the order of the
    # pieces a merge can produce is what the merge loop uses, and it must be the same.
    our_scores, their_scores = _field(ours, "tokenizer.ggml.scores"), _field(theirs, "tokenizer.ggml.scores")
    merged = [i for i, score in enumerate(our_scores) if score != 0.0]
    assert sorted(merged, key=lambda i: -our_scores[i]) == sorted(merged, key=lambda i: -their_scores[i])
    for text, ids in phi3_reference_tokenizations():
        if text:  # llama.cpp returns no tokens for empty text before any merge happens
            assert _llama_cpp_spm(ours, text) == ids, text


# --------------------------------------------------------------------------------------------
# Quantized types on the small vocabulary


@pytest.mark.parametrize(("family", "preset"), [(f, "q8_0") for f in FAMILIES] + [("qwen3", "f16")])
def test_small_vocabulary_types_read_back_close(exports, family, preset):
    _, model, tokenizer = exports.model(family, "gemma")
    result = exports.export(family, "gemma", preset)
    _check_tensor_table(gguf.GGUFReader(result.path), family, preset, result)
    ids = tokenizer(SAMPLE, add_special_tokens=False).input_ids
    original = _logits(model, ids)
    diff = (original - _logits(exports.gguf_model(result.path), ids)).abs().max().item()
    print(f"\n{family} {preset}: max |logit diff| {diff:.2e}, logit std {original.std().item():.3f}, "
          f"relative {diff / original.std().item():.2e}")
    assert diff < {"f16": 1e-2, "q8_0": 5e-2}[preset]


@pytest.mark.parametrize("preset", ["q4_k_m", "q6_k"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma2", "phi3"])
def test_kquants_keep_the_greedy_tokens_and_each_tensor_close(exports, family, preset):
    _, model, tokenizer = exports.model(family, "gemma", kquant=True)
    result = exports.export(family, "gemma", preset, kquant=True)
    reader = gguf.GGUFReader(result.path)
    _check_tensor_table(reader, family, preset, result)
    types = {T[name] for name in result.tensor_types.values()}
    assert {T.Q4_K, T.Q6_K} <= types if preset == "q4_k_m" else T.Q6_K in types
    assert not [note for note in result.notes if "not a multiple" in note]

    exported = exports.gguf_model(result.path)
    worst = _worst_tensor_error(model, exported, reader, family)
    ids = tokenizer(HELD_OUT, add_special_tokens=False).input_ids
    agree = (_logits(model, ids).argmax(-1) == _logits(exported, ids).argmax(-1)).float().mean().item()
    print(f"\n{family} {preset}: greedy agreement {agree:.2f} over {len(ids)} positions; worst tensor {worst}")
    assert agree >= 0.9


def _worst_tensor_error(model, exported, reader, family: str) -> str:
    """Compare every weight transformers dequantized from the file with the original one."""
    name_map = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items()
                                             if n == {"mistral": "llama"}.get(family, family)), 2)
    types = {t.name: T(t.tensor_type) for t in reader.tensors}
    theirs = exported.state_dict()
    worst = (0.0, "")
    for name, ours in model.state_dict().items():
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:  # lm_head of a tied model
            continue
        error = ((theirs[name] - ours).norm() / ours.norm().clamp_min(1e-12)).item()
        assert error <= REL_ERROR[types[gguf_name]], (name, types[gguf_name].name, error)
        worst = max(worst, (error, f"{gguf_name} ({types[gguf_name].name}) {error:.3f}"))
    return worst[1]


# --------------------------------------------------------------------------------------------
# Negative control, failures, RoPE factors


def test_skipping_the_llama_qk_row_order_breaks_the_logit_check(exports, monkeypatch):
    folder, model, tokenizer = exports.model("llama", "gemma")
    good = exports.export("llama", "gemma", "f16")
    monkeypatch.setattr(gguf_writer, "_interleave_rope_rows", lambda weights, heads: weights)
    bad = write_gguf(folder, good.path.with_name("unpermuted-f16.gguf"), "f16")
    ids = tokenizer(SAMPLE, add_special_tokens=False).input_ids
    original = _logits(model, ids)
    good_diff = (original - _logits(exports.gguf_model(good.path), ids)).abs().max().item()
    bad_diff = (original - _logits(exports.gguf_model(bad.path), ids)).abs().max().item()
    print(f"\nllama f16 with q/k reordering: {good_diff:.2e}; without: {bad_diff:.2e}")
    assert good_diff < 1e-2 < bad_diff and bad_diff > 20 * good_diff
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(exports.gguf_model(bad.path).state_dict()[q_proj], model.state_dict()[q_proj], atol=1e-2)


def test_an_export_that_fails_midway_leaves_no_file(exports, monkeypatch):
    folder, _, _ = exports.model("llama", "gemma")
    before = set(folder.iterdir())
    real, calls = quantize.quantize, []

    def failing(array, qtype):
        calls.append(qtype)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real(array, qtype)

    monkeypatch.setattr(quantize, "quantize", failing)
    out = folder / "interrupted-q8_0.gguf"
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_gguf(folder, out, "q8_0")
    assert len(calls) == 3
    assert not out.exists()
    assert set(folder.iterdir()) == before  # no temporary left behind either


def test_too_little_disk_space_is_refused_before_writing(exports, monkeypatch):
    folder, _, _ = exports.model("llama", "gemma")
    before = set(folder.iterdir())
    monkeypatch.setattr(shutil, "disk_usage", lambda path: type("Usage", (), {"free": 10_000})())
    with pytest.raises(UserError, match=r"needs about .* MiB free for the GGUF file big-f32.gguf; 9.8 KiB are free") as raised:
        write_gguf(folder, folder / "big-f32.gguf", "f32")
    assert "write the GGUF to another folder" in str(raised.value)
    assert set(folder.iterdir()) == before


def test_a_sharded_checkpoint_gives_the_same_tensors_and_progress_is_reported(exports):
    folder, model, tokenizer = exports.model("qwen2", "gemma")
    single = exports.export("qwen2", "gemma", "q8_0")
    sharded = folder.with_name(folder.name + "-sharded")
    model.save_pretrained(sharded, max_shard_size="100KB")
    tokenizer.save_pretrained(sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    calls = []
    result = write_gguf(sharded, single.path.with_name("sharded-q8_0.gguf"), "q8_0",
                        progress=lambda done, total, name: calls.append((done, total, name)))
    assert [done for done, _, _ in calls] == list(range(1, len(result.tensor_types) + 1))
    assert {name for _, _, name in calls} == set(result.tensor_types)
    one, many = gguf.GGUFReader(single.path), gguf.GGUFReader(result.path)
    assert [t.name for t in one.tensors] == [t.name for t in many.tensors]
    for a, b in zip(one.tensors, many.tensors):
        assert a.tensor_type == b.tensor_type and np.array_equal(np.asarray(a.data), np.asarray(b.data)), a.name


def test_llama3_rope_scaling_travels_as_llama_cpp_frequency_factors(tmp_path):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    folder = tmp_path / "llama32"
    build_model(folder, "llama", "gemma", max_position_embeddings=131072, rope_parameters=rope)
    result = write_gguf(folder, tmp_path / "gguf" / "m-f16.gguf", "f16")
    reader = gguf.GGUFReader(result.path)
    factors = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    assert T(factors.tensor_type) == T.F32
    config = AutoConfig.from_pretrained(folder)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (rope["rope_theta"] ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    # llama.cpp divides each base frequency by its factor; transformers stores the divided ones.
    np.testing.assert_allclose(np.asarray(factors.data), (plain / scaled).numpy(), rtol=1e-5)


# --------------------------------------------------------------------------------------------
# llama.cpp's SentencePiece merge loop


def _llama_cpp_spm(reader, text: str) -> list[int]:
    """Tokenize plain text (no special tokens) the way llama.cpp's SPM tokenizer does with the
    vocabulary in ``reader``: spaces become "▁" (and one is put in front when the file says so),
    the text is cut into characters, and the adjacent pair whose concatenation is a piece with the
    highest score is merged first (leftmost on ties) until no pair is a piece; a symbol that is
    not a piece is split back along the merges that made it, or written as <0xNN> byte pieces."""
    tokens = _field(reader, "tokenizer.ggml.tokens")
    scores = _field(reader, "tokenizer.ggml.scores")
    prefix = _field(reader, "tokenizer.ggml.add_space_prefix")
    ids = {token: i for i, token in enumerate(tokens)}
    symbols = list(("\u2581" if prefix in (None, True) else "") + text.replace(" ", "\u2581"))
    after = list(range(1, len(symbols))) + [-1]
    before = list(range(-1, len(symbols) - 1))
    queue, made_from = [], {}

    def offer(left: int, right: int) -> None:
        if left >= 0 and right >= 0 and (piece := symbols[left] + symbols[right]) in ids:
            heapq.heappush(queue, (-scores[ids[piece]], left, right, piece))
            made_from[piece] = (symbols[left], symbols[right])

    for i in range(1, len(symbols)):
        offer(i - 1, i)
    while queue:
        _, left, right, piece = heapq.heappop(queue)
        if after[left] != right or symbols[left] + symbols[right] != piece:
            continue  # stale: one side was merged since
        symbols[left], symbols[right] = piece, ""
        after[left] = after[right]
        if after[right] >= 0:
            before[after[right]] = left
        offer(before[left], left)
        offer(left, after[left])

    out: list[int] = []

    def emit(piece: str) -> None:
        if piece in ids:
            out.append(ids[piece])
        elif piece in made_from:
            emit(made_from[piece][0])
            emit(made_from[piece][1])
        else:
            out.extend(ids[f"<0x{byte:02X}>"] for byte in piece.encode("utf-8"))

    i = 0
    while i >= 0 and symbols:
        emit(symbols[i])
        i = after[i]
    return out
