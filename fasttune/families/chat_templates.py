"""Training chat templates: one ``.jinja`` per name in ``families/templates`` (torch-free).

Each template renders exactly what its publisher's original renders and wraps every assistant
reply, end-of-turn token included, in ``{% generation %}`` so that transformers'
``apply_chat_template(..., return_assistant_tokens_mask=True)`` marks the tokens to train on.
Where each original came from and what changed: ``templates/README.md``.
"""
from __future__ import annotations

import importlib.resources
from dataclasses import dataclass


@dataclass(frozen=True)
class ChatTemplate:
    """A training chat template and the facts about turn ends that go with it."""

    name: str
    """File stem in ``families/templates`` (e.g. ``"llama3"``)."""
    end_of_turn: str
    """Token text closing every assistant reply; it is inside the trained span."""
    opens_turn: str
    """Token text that opens a turn in the publisher's original: how fasttune recognizes a
    tokenizer's own template as this format (model/tokenizer.py)."""
    stop: tuple[str, ...]
    """Strings that end generation (Ollama ``PARAMETER stop``): the end of turn, the text that
    opens the next turn, and the vocabulary's end of text where it differs."""
    origin: str
    """The publisher's template this one reproduces (model id and file)."""

    def source(self) -> str:
        """The Jinja source, read from the installed package."""
        path = importlib.resources.files("fasttune.families") / "templates" / f"{self.name}.jinja"
        return path.read_text(encoding="utf-8")


TEMPLATES: dict[str, ChatTemplate] = {
    template.name: template
    for template in (
        ChatTemplate(
            name="llama3",
            opens_turn="<|start_header_id|>",
            end_of_turn="<|eot_id|>",
            stop=("<|eot_id|>", "<|start_header_id|>", "<|end_of_text|>"),
            origin="meta-llama/Meta-Llama-3-8B-Instruct tokenizer_config.json",
        ),
        ChatTemplate(
            name="chatml",
            opens_turn="<|im_start|>",
            end_of_turn="<|im_end|>",
            stop=("<|im_end|>", "<|im_start|>", "<|endoftext|>"),
            origin="HuggingFaceTB/SmolLM2-135M-Instruct (chat template embedded in its GGUF)",
        ),
        ChatTemplate(
            name="mistral",
            opens_turn="[INST]",
            end_of_turn="</s>",
            stop=("</s>", "[INST]"),
            origin="mistralai/Mistral-7B-Instruct-v0.3 (tokenizer v3, as mistral-common 1.13.1 encodes it)",
        ),
        ChatTemplate(
            name="qwen2_5",
            opens_turn="<|im_start|>",
            end_of_turn="<|im_end|>",
            stop=("<|im_end|>", "<|im_start|>", "<|endoftext|>"),
            origin="Qwen/Qwen2.5-7B-Instruct tokenizer_config.json",
        ),
        ChatTemplate(
            name="qwen3",
            opens_turn="<|im_start|>",
            end_of_turn="<|im_end|>",
            stop=("<|im_end|>", "<|im_start|>", "<|endoftext|>"),
            origin="Qwen/Qwen3-8B tokenizer_config.json",
        ),
        ChatTemplate(
            name="gemma",
            opens_turn="<start_of_turn>",
            end_of_turn="<end_of_turn>",
            stop=("<end_of_turn>", "<start_of_turn>", "<eos>"),
            origin="google/gemma-2-9b-it tokenizer_config.json",
        ),
        ChatTemplate(
            name="phi3",
            opens_turn="<|user|>",
            end_of_turn="<|end|>",
            stop=("<|end|>", "<|user|>", "<|assistant|>", "<|endoftext|>"),
            origin="microsoft/Phi-3-mini-4k-instruct tokenizer_config.json",
        ),
    )
}


def get_template(name: str) -> ChatTemplate:
    """The template called ``name``; ``KeyError`` naming the known ones otherwise."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise KeyError(f"unknown chat template {name!r}; known: {', '.join(sorted(TEMPLATES))}") from None


def recognize(own: str | None, vocab: dict, prefer: ChatTemplate | None = None) -> ChatTemplate | None:
    """The known format a tokenizer's own template ``own`` speaks, recognized by the token that opens
    its turns (with its end-of-turn token in ``vocab``); ``prefer`` is tried first. None when none fits."""
    if not own:
        return None
    for candidate in (*((prefer,) if prefer else ()), *TEMPLATES.values()):
        if candidate.opens_turn in own and candidate.end_of_turn in vocab:
            return candidate
    return None
