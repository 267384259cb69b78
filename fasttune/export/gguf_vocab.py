"""The tokenizer half of a GGUF file: a Hugging Face tokenizer rewritten as llama.cpp reads it.

llama.cpp knows two tokenizer models that matter here, chosen by ``tokenizer.ggml.model``:

* ``"gpt2"``, byte-level BPE (Llama 3, Qwen 2/2.5/3, SmolLM2): the token strings as the
  byte-to-unicode table spells them, the merge list, and ``tokenizer.ggml.pre``, the name of the
  regex llama.cpp splits text with before merging. llama.cpp has no regex engine for arbitrary
  patterns: it recognizes a fixed set of pre-tokenizers by name, and its converter names them by
  hashing the ids a tokenizer gives one fixed probe text (``convert_hf_to_gguf_update.py``).
* ``"llama"``, SentencePiece-style BPE (Mistral, Llama 2, Phi-3, Gemma): pieces spelled with
  "▁" for spaces, byte-fallback pieces ``<0xNN>``, and a score per piece. llama.cpp merges the
  adjacent pair whose concatenation has the highest score, so the scores carry the merge order.

Everything is read from the tokenizer's own ``tokenizer.json`` (its backend), never from
``tokenizer.model``: that is the tokenizer the model was trained with, and transformers 5 does
not save ``tokenizer.model`` next to a merged model anyway. A SentencePiece-style vocabulary gets
its scores from the merge list (a piece scores minus the rank of the first merge that makes it),
which orders the pieces exactly as SentencePiece's own scores do for a vocabulary converted from
SentencePiece. The merge list is written for both models: llama.cpp reads it only for ``gpt2``,
while readers that rebuild a Hugging Face tokenizer (transformers) take it instead of deriving
merges from the scores, which is both slower and lossy.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from fasttune.export.refusals import ExportRefused, unknown_pre_tokenizer, unreadable_tokenizer
from fasttune.families.chat_templates import TEMPLATES

# llama.cpp's token types (gguf.TokenType), spelled out so that this module imports without gguf.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The probe text llama.cpp's converter encodes to identify a byte-level BPE pre-tokenizer: the
# SHA-256 of ``str(tokenizer.encode(text))`` names it (convert_hf_to_gguf.py, get_vocab_base_pre).
PRE_TOKENIZER_PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# Digests of the probe's ids for the tokenizers of the families fasttune trains, with the name
# llama.cpp gives their pre-tokenizer (the same digests its converter lists).
KNOWN_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3.x
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen 1.5 - 3
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3 embedding
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # GPT-2
}

# When the digest is unknown (a vocabulary extended by a fine-tune changes some ids), the split
# itself still identifies the pre-tokenizer: the regex of a Split step, or the Digits + ByteLevel
# pair SmolLM uses. These are the patterns of the tokenizers above, as their tokenizer.json has them.
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
REGEX_PRE_TOKENIZERS = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class GGUFVocab:
    """Everything the ``tokenizer.*`` keys of a GGUF file hold."""

    model: str
    """``"gpt2"`` (byte-level BPE) or ``"llama"`` (SentencePiece-style BPE)."""
    pre: str
    """llama.cpp's pre-tokenizer name (``"default"`` for SentencePiece-style vocabularies)."""
    tokens: list[str]
    types: list[int]
    merges: list[str]
    scores: list[float] | None = None
    special_ids: dict[str, int] = field(default_factory=dict)
    """``bos``, ``eos``, ``unk``, ``pad``, ``eot`` -> id, for those the tokenizer has."""
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    """SentencePiece-style only: whether a "▁" is put in front of the text."""
    chat_template: str | list[dict[str, str]] | None = None

    def write_to(self, writer) -> None:
        """Add the ``tokenizer.*`` keys to a ``gguf.GGUFWriter``."""
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)

    def metadata_bytes(self) -> int:
        """A generous estimate of the bytes these keys take in the file (for the disk check)."""
        strings = sum(len(t.encode("utf-8")) + 8 for t in self.tokens)
        strings += sum(len(m.encode("utf-8")) + 8 for m in self.merges)
        template = self.chat_template if isinstance(self.chat_template, str) else json.dumps(self.chat_template or "")
        return strings + 8 * len(self.tokens) + len(template.encode("utf-8")) + 4096


def read_vocab(model_dir: Path, n_vocab: int, *, tokenizer=None, pre_tokenizer: str | None = None,
               chat_template: str | None = None) -> GGUFVocab:
    """The vocabulary of the tokenizer in ``model_dir`` (or ``tokenizer``), padded to ``n_vocab``.

    ``n_vocab`` is the number of embedding rows: llama.cpp wants one token per row, so ids the
    tokenizer does not use become ``[PAD<id>]`` entries of type UNUSED, as its converter writes.
    ``pre_tokenizer`` overrides the detected llama.cpp pre-tokenizer name; ``chat_template``
    overrides the tokenizer's own template.
    """
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    backend, byte_level, pre = check_tokenizer(tokenizer, pre_tokenizer, model_dir)
    bpe = backend["model"]
    pieces: dict[str, int] = dict(bpe["vocab"])
    added = {entry["id"]: entry for entry in backend.get("added_tokens", [])}
    highest = max([*pieces.values(), *added])
    if highest >= n_vocab:
        raise ValueError(f"{model_dir}: the tokenizer has id {highest} but the model has only {n_vocab} embedding rows")

    merges = [_merge_text(merge) for merge in bpe.get("merges", [])]
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [UNUSED] * n_vocab
    for piece, token_id in pieces.items():
        tokens[token_id] = piece
        types[token_id] = NORMAL if byte_level or not _BYTE_PIECE.fullmatch(piece) else BYTE
    unk_id = tokenizer.unk_token_id
    if not byte_level and unk_id is not None:
        types[unk_id] = UNKNOWN
    for token_id, entry in added.items():
        content = entry["content"]
        # Added tokens override the piece types, as in llama.cpp's converter: one flagged special
        # (<unk> and <s> usually are) becomes CONTROL, any other USER_DEFINED.
        if entry.get("special") or _looks_special(content):
            types[token_id] = CONTROL
        else:
            # llama.cpp matches user-defined tokens against the raw text, before "▁" replaces
            # spaces, so its converter stores them with real spaces.
            content = content if byte_level else content.replace("\u2581", " ")
            types[token_id] = USER_DEFINED
        tokens[token_id] = content

    vocab = GGUFVocab(model="gpt2" if byte_level else "llama", pre=pre, tokens=tokens, types=types, merges=merges)
    if not byte_level:
        vocab.scores = _scores_from_merges(bpe.get("merges", []), tokens)
        vocab.add_space_prefix = _adds_space_prefix(backend)

    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            vocab.special_ids[kind] = token_id
    vocab.add_bos, vocab.add_eos = _added_special_tokens(tokenizer)
    template = chat_template or tokenizer.chat_template or None
    if isinstance(template, dict):  # several named templates: GGUF keeps them as a list of name/template
        template = [{"name": name, "template": text} for name, text in template.items()]
    vocab.chat_template = template
    eot = _end_of_turn_id(tokenizer, vocab.chat_template)
    if eot is not None:
        vocab.special_ids["eot"] = eot
    return vocab


def check_tokenizer(tokenizer, pre_tokenizer: str | None = None, where: Path | str = "tokenizer") -> tuple[dict, bool, str]:
    """``(backend, byte_level, pre)``: the tokenizer's ``tokenizer.json`` as a dict, whether it is a
    byte-level BPE, and llama.cpp's pre-tokenizer name for it (``pre_tokenizer`` when given,
    ``"default"`` for a SentencePiece-style vocabulary). :class:`ExportRefused` when llama.cpp could
    not read it: not a BPE, or a byte-level pre-tokenizer it does not know by name."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = (backend.get("model") or {}).get("type")
    if model != "BPE":
        raise ExportRefused(unreadable_tokenizer(str(where), model), "cannot export to GGUF")
    byte_level = _uses_byte_level(backend)
    if pre_tokenizer:
        return backend, byte_level, pre_tokenizer
    return backend, byte_level, detect_pre_tokenizer(tokenizer, backend, where) if byte_level else "default"


def detect_pre_tokenizer(tokenizer, backend: dict, where: Path | str = "tokenizer") -> str:
    """llama.cpp's name for the byte-level pre-tokenizer of ``tokenizer``; :class:`ExportRefused`
    (a ValueError) when it is none llama.cpp knows."""
    digest = hashlib.sha256(str(tokenizer.encode(PRE_TOKENIZER_PROBE)).encode()).hexdigest()
    if digest in KNOWN_PRE_TOKENIZERS:
        return KNOWN_PRE_TOKENIZERS[digest]
    steps = _steps(backend.get("pre_tokenizer"))
    for step in steps:
        if step.get("type") == "Split":
            regex = (step.get("pattern") or {}).get("Regex")
            if regex in REGEX_PRE_TOKENIZERS:
                return REGEX_PRE_TOKENIZERS[regex]
    kinds = [step.get("type") for step in steps]
    digits = any(step.get("type") == "Digits" and step.get("individual_digits") for step in steps)
    if digits and kinds[-1:] == ["ByteLevel"] and steps[-1].get("use_regex", True):
        return "smollm"
    raise ExportRefused(unknown_pre_tokenizer(str(where), digest), "cannot export to GGUF")


def _steps(node: dict | None) -> list[dict]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        inner = node.get("pretokenizers") or node.get("normalizers") or node.get("decoders") or []
        return [step for child in inner for step in _steps(child)]
    return [node]


def _uses_byte_level(backend: dict) -> bool:
    # A byte-level BPE maps every byte to a printable character before merging; its
    # pre-tokenizer (or, for a few, only its decoder) says ByteLevel. This test comes before
    # byte_fallback: a tokenizer.json rebuilt by transformers' GGUF reader (SmolLM2's) carries
    # byte_fallback=True on a byte-level vocabulary, and reading that as SentencePiece breaks it.
    for part in ("pre_tokenizer", "decoder"):
        if any(step.get("type") == "ByteLevel" for step in _steps(backend.get(part))):
            return True
    return False


def _merge_text(merge) -> str:
    if isinstance(merge, str):
        return merge
    left, right = merge
    # The list form exists because a piece may contain a space; the "a b" form llama.cpp reads
    # cannot hold one, so a space inside a piece is written as U+0120, as gguf.SpecialVocab does.
    return " ".join(part.replace(" ", "\u0120") for part in (left, right))


def _scores_from_merges(merges: list, tokens: list[str]) -> list[float]:
    index = {token: i for i, token in enumerate(tokens)}
    scores = [0.0] * len(tokens)
    made = set()
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        piece = left + right
        if piece in made or piece not in index:
            continue
        made.add(piece)
        scores[index[piece]] = -float(rank + 1)
    return scores


def _adds_space_prefix(backend: dict) -> bool:
    for step in _steps(backend.get("normalizer")):
        if step.get("type") == "Prepend" and step.get("prepend") == "\u2581":
            return True
    for step in _steps(backend.get("pre_tokenizer")):
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") != "never" and step.get("add_prefix_space", True)
    return False


def _looks_special(text: str) -> bool:
    # llama.cpp's converter treats added tokens shaped like <|...|> as control tokens even when a
    # tokenizer forgets to flag them special (does_token_look_special).
    return text.startswith("<|") and text.endswith("|>")


def _added_special_tokens(tokenizer) -> tuple[bool, bool]:
    """Whether encoding adds BOS at the start / EOS at the end, observed rather than configured."""
    probe = "a"
    plain = tokenizer.encode(probe, add_special_tokens=False)
    full = tokenizer.encode(probe)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and full[:1] == [bos] and plain[:1] != [bos]
    add_eos = eos is not None and full[-1:] == [eos] and plain[-1:] != [eos]
    return add_bos, add_eos


def _end_of_turn_id(tokenizer, chat_template) -> int | None:
    """The token that closes a chat turn, when it is not already the EOS token.

    llama.cpp stops generating at EOS and at EOT; chat models of several families end a turn
    with a token of their own (<|eot_id|>, <end_of_turn>, <|end|>) while their EOS is the end of
    the document. The candidates are the turn ends of fasttune's chat templates that this
    template renders.
    """
    if not isinstance(chat_template, str):
        return None
    vocab = tokenizer.get_vocab()
    for template in TEMPLATES.values():
        token = template.end_of_turn
        if token in chat_template and token in vocab and vocab[token] != tokenizer.eos_token_id:
            return vocab[token]
    return None
