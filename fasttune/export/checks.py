"""What the export station will refuse, said before training: the recipe's export, checked up front.

An export runs after training, so a recipe it cannot serve would otherwise fail hours later, as an
internal error with a traceback. ``export_problems(recipe)`` needs no tokenizer and no weights
(torch-free; fasttune.prepare runs it with the recipe's other checks): for a recipe that asks for
GGUF files, its family has a GGUF architecture, every training chat template the run could use has
an Ollama template for the Modelfile, and ``data.system_prompt`` fits in a Modelfile.
``tokenizer_export_problems(tokenizer, recipe)`` adds what only the tokenizer tells (for the dry
run): llama.cpp can read its model, and a byte-level BPE has a pre-tokenizer llama.cpp knows.
Unknown ``export.gguf`` types are fasttune.config's rule, reported by ``resolve`` already; the
station checks them against the same table (fasttune.gguf_types) in ``quantize.check_preset``.

Each refusal's Problem is built once, in fasttune.export.refusals; the station's writers raise
the same ones.
"""
from __future__ import annotations

from fasttune.config import Recipe
from fasttune.errors import Problem
from fasttune.export.gguf_vocab import check_tokenizer
from fasttune.export import modelfile
from fasttune.export.refusals import ExportRefused, no_gguf_export, no_ollama_template, system_prompt_problem
from fasttune.families import FAMILIES
from fasttune.families.chat_templates import TEMPLATES


def candidate_templates(recipe: Recipe) -> list[str]:
    """Every training template a run of ``recipe`` can end up with: the one the recipe sets, or for
    ``auto`` the family's and any other the tokenizer's own template can match
    (fasttune.model.tokenizer.choose_template)."""
    if recipe.data.chat_template != "auto":
        return [recipe.data.chat_template]
    family = FAMILIES.get(recipe.family)
    return list(dict.fromkeys([*([family.chat_template] if family else []), *TEMPLATES]))


def export_problems(recipe: Recipe) -> list[Problem]:
    """What the export of ``recipe`` would refuse, known from the recipe alone (empty without GGUF)."""
    if not recipe.export.gguf:
        return []
    problems = []
    family = FAMILIES.get(recipe.family)
    if family is not None and family.gguf_arch is None:
        problems.append(no_gguf_export("family", recipe.family))
    value = recipe.data.chat_template
    problems += [no_ollama_template(name, modelfile.OLLAMA_TEMPLATES, value) for name in candidate_templates(recipe) if name in TEMPLATES
                 and name not in modelfile.OLLAMA_TEMPLATES]
    if recipe.data.system_prompt:
        try:
            modelfile.check_block_value("SYSTEM", recipe.data.system_prompt)
        except ValueError as err:
            problems.append(system_prompt_problem(recipe.data.system_prompt, err))
    return problems


def tokenizer_export_problems(tokenizer, recipe: Recipe) -> list[Problem]:
    """What the GGUF export would refuse in ``tokenizer`` (the run's, as loaded for training): a
    model llama.cpp cannot read, or a byte-level pre-tokenizer it does not know while
    ``export.gguf_pre_tokenizer`` is unset. Empty for a recipe without GGUF."""
    if not recipe.export.gguf:
        return []
    try:
        check_tokenizer(tokenizer, recipe.export.gguf_pre_tokenizer, recipe.model.name)
    except ExportRefused as err:
        return list(err.problems)
    return []
