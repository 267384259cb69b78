"""The export station's refusals: each Problem it can raise about a user's recipe, model or
tokenizer, built here once, and the exception that carries them.

fasttune.export.checks finds them before training; the writers (gguf_writer, gguf_vocab,
quantize, modelfile, exporter) raise the same ones, as :class:`ExportRefused`, where a caller
reaches them without those checks (the Python API, or a run folder written by an older fasttune),
so an export never fails on a user's input with a traceback.
"""
from __future__ import annotations

import typing

from fasttune.errors import Problem, UserError, suggest
from fasttune.families import FAMILIES
from fasttune.gguf_types import GGUF_TYPES

NO_GGUF = "export without GGUF (export.gguf: []): merged/ loads in transformers and vLLM"


class ExportRefused(UserError, ValueError):
    """A user's recipe, model or tokenizer that the export station cannot serve: a UserError (exit 2,
    no traceback). Also a ValueError, which these functions raised before, for callers catching that."""


class NoOllamaTemplate(ExportRefused, KeyError):
    """A training chat template without an Ollama counterpart. Also a KeyError, as the lookup it
    replaces (``modelfile.ollama_template``) raised before."""

    def __str__(self) -> str:  # KeyError would show the message as a quoted repr
        return self.render()


def unknown_gguf_type(name: str, where: str = "export.gguf") -> Problem:
    return Problem(where, name, f"unknown GGUF preset {name!r}; known: {', '.join(GGUF_TYPES)}",
                   suggest(name, GGUF_TYPES) or "use e.g. q8_0 or q4_k_m")


def no_gguf_export(where: str, model_type: object) -> Problem:
    with_gguf = sorted(name for name, family in FAMILIES.items() if family.gguf_arch)
    return Problem(where, model_type, f"model_type {model_type!r} has no GGUF export; the families with one: {', '.join(with_gguf)}",
                   f"{NO_GGUF}, and convert it with llama.cpp's convert_hf_to_gguf.py")


def no_ollama_template(name: str, known: typing.Iterable[str], value: object = None) -> Problem:
    """``known``: the templates that have one; ``value``: what ``data.chat_template`` says (``auto``,
    or ``name`` itself, the default)."""
    chosen = f"can choose the template {name!r}, which" if value not in (None, name) else "the template"
    return Problem("data.chat_template", name if value is None else value,
                   f"{chosen} has no Ollama template for the GGUF's Modelfile; templates with one: {', '.join(sorted(known))}",
                   f"set data.chat_template to one of those, or {NO_GGUF} (a new template needs its Go counterpart "
                   "in fasttune/export/modelfile.py)")


def system_prompt_problem(system: str, why: Exception) -> Problem:
    return Problem("data.system_prompt", system, f"cannot go into an Ollama Modelfile: {why}",
                   "remove the characters named, or export without a system prompt")


def unknown_pre_tokenizer(where: str, digest: str) -> Problem:
    return Problem("export.gguf_pre_tokenizer", None,
                   f"the tokenizer of {where} is a byte-level BPE whose pre-tokenizer llama.cpp does not know by name "
                   f"(probe digest {digest}): llama.cpp would split text differently from it",
                   "set export.gguf_pre_tokenizer=<llama.cpp name> if you know which one it is (for example 'llama-bpe', "
                   f"'qwen2', 'smollm'), or {NO_GGUF}")


def unreadable_tokenizer(where: str, model: object) -> Problem:
    return Problem("tokenizer", where, f"its model is {model!r}; a GGUF export needs a BPE tokenizer (byte-level like "
                   "Llama 3 and Qwen, or SentencePiece-style like Mistral and Gemma)", NO_GGUF)
