"""Every registered family reaches every station, or a test names the station it is missing.

The families come from the registry itself (fasttune.families.FAMILIES, which finds every module of
the package that defines ``FAMILY``), never from a list kept here. For each one: a shipped qlora
recipe (trained in test_families_train.py), a tiny model of its architecture and a real test
tokenizer for its template (tests/fixtures), a training chat template, an Ollama template for its
Modelfile (checked against the Jinja in test_modelfile.py), and a GGUF export (its architecture
known to gguf, its metadata keys known to the writer, its recipe with GGUF files accepted; written
and read back in test_gguf_export.py). Fast: nothing here loads a model.
"""
from __future__ import annotations

import sys

import gguf
import pytest
from fixtures.family_recipes import family_recipes
from fixtures.real_tokenizers import TOKENIZER_FOR
from fixtures.tiny_models import ARCHITECTURES

import fasttune.families
from fasttune import config
from fasttune.export import gguf_writer
from fasttune.export.checks import export_problems
from fasttune.export.modelfile import OLLAMA_TEMPLATES
from fasttune.families import FAMILIES
from fasttune.families.chat_templates import TEMPLATES


def test_the_registry_finds_the_shipped_families():
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3"} <= set(FAMILIES)
    assert all(key == family.model_type for key, family in FAMILIES.items())


def test_a_new_family_is_its_module(tmp_path, monkeypatch):
    """A module that defines FAMILY, put where the package looks, is a family: no list to edit."""
    (tmp_path / "tinyllama_like.py").write_text(
        "from fasttune.families.base import LLAMA_STYLE_TARGETS, Family\n"
        "FAMILY = Family(model_type='tinyllama_like', chat_template='chatml', target_modules=LLAMA_STYLE_TARGETS,\n"
        "                pad_candidates=('<unk>',), unsloth=True, gguf_arch='llama', gguf_interleave_qk_rows=True)\n",
        encoding="utf-8")
    monkeypatch.setattr(fasttune.families, "__path__", [*fasttune.families.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "fasttune.families.tinyllama_like", raising=False)
    try:
        found = fasttune.families._discover()
    finally:
        sys.modules.pop("fasttune.families.tinyllama_like", None)
    assert found["tinyllama_like"].gguf_arch == "llama"
    assert set(found) == set(FAMILIES) | {"tinyllama_like"}


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_every_family_reaches_every_station(model_type):
    family = FAMILIES[model_type]
    missing = []
    recipe = family_recipes("qlora").get(model_type)
    if recipe is None:
        missing.append("a qlora recipe in recipes/ (family: " + model_type + ")")
    if model_type not in ARCHITECTURES:
        missing.append("a tiny model: an entry in tests/fixtures/tiny_models.py ARCHITECTURES")
    if family.chat_template not in TEMPLATES:
        missing.append(f"its chat template {family.chat_template!r} in fasttune/families/chat_templates.py")
    if family.chat_template not in TOKENIZER_FOR:
        missing.append(f"a test tokenizer for {family.chat_template!r} in tests/fixtures/real_tokenizers.py TOKENIZER_FOR")
    if family.chat_template not in OLLAMA_TEMPLATES:
        missing.append(f"an Ollama template for {family.chat_template!r} in fasttune/export/modelfile.py")
    if family.gguf_arch is None:
        missing.append("a GGUF export (Family.gguf_arch)")
    elif family.gguf_arch not in gguf.MODEL_ARCH_NAMES.values():
        missing.append(f"a GGUF architecture gguf knows (gguf_arch={family.gguf_arch!r})")
    unknown = [name for name in family.gguf_metadata if name not in gguf_writer._EXTRA_METADATA]
    if unknown:
        missing.append(f"the writer's way to compute GGUF metadata {unknown} (gguf_writer._EXTRA_METADATA)")
    if recipe is not None:
        problems = export_problems(config.resolve(recipe, ["export.gguf=q8_0"]))
        if problems:
            missing.append("an export its recipe can ask for: " + "; ".join(p.render() for p in problems))
    assert not missing, f"family {model_type!r} lacks: " + "\n  - ".join(["", *missing])
