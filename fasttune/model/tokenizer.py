"""The tokenizer with the family's policy applied: training chat template, end-of-turn, pad.

The chat template is the single source of truth for formatting: fasttune sets the training
template (with ``{% generation %}`` markers) on the tokenizer, and every later station (masks,
evaluation, merged model, exports) reads it from there.
"""
from __future__ import annotations

from dataclasses import dataclass

from fasttune.config import Recipe
from fasttune.errors import Problem, UserError
from fasttune.families import get_family
from fasttune.families.chat_templates import TEMPLATES, ChatTemplate, get_template, recognize


@dataclass(frozen=True)
class TemplateChoice:
    template: ChatTemplate
    reason: str

    def describe(self) -> str:
        return f"{self.template.name} ({self.reason}); end of turn {self.template.end_of_turn!r} is trained"


def choose_template(own: str | None, recipe: Recipe, vocab: dict) -> TemplateChoice:
    """The training template for a tokenizer whose own template is ``own``.

    ``data.chat_template`` set by the recipe wins. Otherwise the tokenizer's own template is
    recognized by the token that opens its turns (SmolLM2 is ``model_type: llama`` but speaks
    ChatML); the family's format is preferred when it fits, and used when nothing known fits.
    """
    if recipe.data.chat_template != "auto":
        return TemplateChoice(get_template(recipe.data.chat_template), "set by the recipe")
    family = get_family(recipe.family)
    default = get_template(family.chat_template)
    if not own:
        return TemplateChoice(default, f"the {family.model_type} family's; the tokenizer has no template of its own")
    candidate = recognize(own, vocab, prefer=default)
    if candidate is not None:
        whose = "the family's, " if candidate is default else ""
        return TemplateChoice(candidate, f"{whose}matches the tokenizer's own template ({candidate.opens_turn} turns)")
    return TemplateChoice(default, f"the {family.model_type} family's; the tokenizer's own template is not a known format")


def apply_policy(tokenizer, recipe: Recipe) -> TemplateChoice:
    """Set chat template, EOS (the end-of-turn token, trained) and a pad token distinct from it."""
    vocab = tokenizer.get_vocab()
    choice = choose_template(tokenizer.chat_template, recipe, vocab)
    template, family = choice.template, get_family(recipe.family)
    if template.end_of_turn not in vocab:
        raise UserError(Problem("data.chat_template", template.name,
                                f"ends turns with {template.end_of_turn!r}, which this tokenizer does not have",
                                f"use the template that matches {recipe.model.name}, or data.chat_template=auto"))
    tokenizer.chat_template = template.source()
    tokenizer.eos_token = template.end_of_turn
    pad = next((t for t in family.pad_candidates if t in vocab and t != template.end_of_turn), None)
    if pad is None and tokenizer.pad_token not in (None, template.end_of_turn):
        pad = tokenizer.pad_token
    if pad is None:
        raise UserError(Problem("tokenizer", recipe.model.name,
                                f"has no pad token other than the end-of-turn {template.end_of_turn!r} (tried {', '.join(family.pad_candidates)})",
                                "padding with the end-of-turn token would hide it from the loss; use a tokenizer with a spare token"))
    tokenizer.pad_token = pad
    return choice


def training_template(tokenizer, recipe: Recipe) -> ChatTemplate:
    """The ChatTemplate the adapter's tokenizer carries (fasttune saved the training template there)."""
    for template in TEMPLATES.values():
        if template.source() == tokenizer.chat_template:
            return template
    return choose_template(tokenizer.chat_template, recipe, tokenizer.get_vocab()).template


def load_tokenizer(source: str, recipe: Recipe):
    """``(tokenizer, TemplateChoice)``: the tokenizer from ``source`` with the policy applied.

    For a hub id, the hub is first asked once whether it answers (:mod:`fasttune.hub`); offline and
    not cached is a :class:`~fasttune.errors.SourceUnavailable` that says how to get the files.
    """
    from pathlib import Path

    from transformers import AutoTokenizer

    from fasttune import hub

    from_hub = not Path(source).is_dir()
    if from_hub:
        hub.use_cache_if_unreachable()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=recipe.model.revision,
                                                  trust_remote_code=recipe.model.trust_remote_code)
    except OSError as err:
        if from_hub and hub.offline_reason():
            raise hub.not_cached("model", source, "model.name", err) from None
        raise
    return tokenizer, apply_policy(tokenizer, recipe)
