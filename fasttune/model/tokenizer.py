"""The tokenizer with the family's policy applied: training chat template, end-of-turn, pad.

The chat template is the single source of truth for formatting: fasttune sets the training
template (with ``{% generation %}`` markers) on the tokenizer, and every later station (masks,
evaluation, merged model, exports) reads it from there.
"""
from __future__ import annotations

from fasttune.config import Recipe
from fasttune.errors import Problem, UserError
from fasttune.families import get_family
from fasttune.families.chat_templates import get_template


def apply_policy(tokenizer, recipe: Recipe) -> None:
    """Set chat template, EOS (the end-of-turn token, trained) and a pad token distinct from it."""
    template = get_template(recipe.data.chat_template)
    family = get_family(recipe.family)
    vocab = tokenizer.get_vocab()
    if template.end_of_turn not in vocab:
        raise UserError(Problem("data.chat_template", template.name,
                                f"ends turns with {template.end_of_turn!r}, which this tokenizer does not have",
                                f"use the template that matches {recipe.model.name} (the family default is {family.chat_template})"))
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


def load_tokenizer(source: str, recipe: Recipe):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, revision=recipe.model.revision,
                                              trust_remote_code=recipe.model.trust_remote_code)
    apply_policy(tokenizer, recipe)
    return tokenizer
