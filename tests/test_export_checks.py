"""What an export would refuse is said before training, as UserErrors naming the recipe key.

``export_problems(recipe)`` (no tokenizer, no weights) and ``tokenizer_export_problems(tokenizer,
recipe)`` find them up front; the export station raises the same Problems, as UserErrors, when it
is reached without those checks. And the GGUF types are one list: the recipes, the CLI, the disk
estimates and the quantizer read the same table.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
from fixtures.real_tokenizers import load_tokenizer

from fasttune import config, recipes
from fasttune.errors import UserError
from fasttune.export import gguf_vocab, modelfile, quantize
from fasttune.export.checks import ExportRefused, export_problems, tokenizer_export_problems
from fasttune.export.gguf_writer import write_gguf
from fasttune.families import FAMILIES
from fasttune.families.chat_templates import TEMPLATES
from fasttune.gguf_types import BITS_PER_WEIGHT, GGUF_TYPES


def _recipe(name: str, *overrides: str):
    return config.resolve(name, list(overrides))


@pytest.fixture
def no_gemma_modelfile(monkeypatch):
    """As if the gemma training template had no Go counterpart."""
    monkeypatch.setattr(modelfile, "OLLAMA_TEMPLATES", {k: v for k, v in modelfile.OLLAMA_TEMPLATES.items() if k != "gemma"})


# --- export_problems: from the recipe alone ----------------------------------------------------

@pytest.mark.parametrize("name", recipes.recipe_names())
def test_every_shipped_recipe_can_ask_for_every_gguf_type(name):
    assert export_problems(_recipe(name, f"export.gguf={','.join(GGUF_TYPES)}")) == []


def test_a_recipe_without_gguf_is_not_checked(no_gemma_modelfile, monkeypatch):
    monkeypatch.setitem(FAMILIES, "gemma2", dataclasses.replace(FAMILIES["gemma2"], gguf_arch=None))
    assert export_problems(_recipe("gemma_qlora", "export.gguf=[]")) == []


def test_a_template_without_an_ollama_template_is_refused_before_training(no_gemma_modelfile):
    (problem,) = export_problems(_recipe("gemma_qlora", "export.gguf=q8_0"))
    assert (problem.where, problem.value) == ("data.chat_template", "auto")
    assert "'gemma'" in problem.rule and "has no Ollama template" in problem.rule
    assert "export.gguf: []" in problem.fix and "fasttune/export/modelfile.py" in problem.fix

    # auto may pick any known template (the tokenizer's own decides), so every recipe on auto is refused ...
    assert [p.where for p in export_problems(_recipe("mistral_qlora", "export.gguf=q8_0"))] == ["data.chat_template"]
    # ... and one that names a template with a Go counterpart is not; one that names gemma is.
    assert export_problems(_recipe("mistral_qlora", "export.gguf=q8_0", "data.chat_template=mistral")) == []
    (named,) = export_problems(_recipe("mistral_qlora", "export.gguf=q8_0", "data.chat_template=gemma"))
    assert named.value == "gemma" and named.rule.startswith("the template has no Ollama template")


def test_resolve_raises_them_with_the_recipes_other_problems(no_gemma_modelfile):
    with pytest.raises(UserError) as raised:
        config.resolve("gemma_qlora", ["export.gguf=q8_0", "data.chat_template=gemma"], checks=(export_problems,))
    assert [p.where for p in raised.value.problems] == ["data.chat_template"]


def test_a_family_without_a_gguf_architecture_is_refused(monkeypatch):
    monkeypatch.setitem(FAMILIES, "phi3", dataclasses.replace(FAMILIES["phi3"], gguf_arch=None))
    (problem,) = export_problems(_recipe("phi3_qlora", "export.gguf=q4_k_m"))
    assert (problem.where, problem.value) == ("family", "phi3")
    assert "has no GGUF export" in problem.rule and "phi3" not in problem.rule.split("with one:")[1]


def test_a_system_prompt_a_modelfile_cannot_hold_is_refused():
    (problem,) = export_problems(_recipe("mistral_qlora", "export.gguf=q8_0", 'data.system_prompt=say """hi"""'))
    assert problem.where == "data.system_prompt" and '"""' in problem.rule
    assert export_problems(_recipe("mistral_qlora", "export.gguf=q8_0", "data.system_prompt=Be brief.")) == []


# --- tokenizer_export_problems: for the dry run ------------------------------------------------

def test_the_shipped_tokenizers_pass():
    for name in ("llama3", "smollm2", "qwen", "mistral", "phi3", "gemma"):
        assert tokenizer_export_problems(load_tokenizer(name), _recipe("mistral_qlora", "export.gguf=q8_0")) == [], name


def test_an_unknown_byte_level_pre_tokenizer_asks_for_export_gguf_pre_tokenizer(monkeypatch):
    monkeypatch.setattr(gguf_vocab, "KNOWN_PRE_TOKENIZERS", {})
    monkeypatch.setattr(gguf_vocab, "REGEX_PRE_TOKENIZERS", {})
    tokenizer = load_tokenizer("llama3")
    (problem,) = tokenizer_export_problems(tokenizer, _recipe("llama3_qlora", "export.gguf=q8_0"))
    assert problem.where == "export.gguf_pre_tokenizer" and "probe digest" in problem.rule
    assert "export.gguf_pre_tokenizer=" in problem.fix and "meta-llama/Llama-3.1-8B-Instruct" in problem.rule
    assert tokenizer_export_problems(tokenizer, _recipe("llama3_qlora", "export.gguf=q8_0",
                                                        "export.gguf_pre_tokenizer=llama-bpe")) == []
    assert tokenizer_export_problems(tokenizer, _recipe("llama3_qlora", "export.gguf=[]")) == []


def test_a_tokenizer_that_is_not_bpe_is_refused():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")))
    (problem,) = tokenizer_export_problems(tokenizer, _recipe("mistral_qlora", "export.gguf=q8_0"))
    assert problem.where == "tokenizer" and "'WordLevel'" in problem.rule and "BPE" in problem.rule


# --- the station raises the same, as UserErrors -------------------------------------------------

def test_the_station_refuses_an_unknown_preset_before_reading_anything(tmp_path):
    with pytest.raises(UserError, match="unknown GGUF preset 'q3_k_s'") as raised:
        write_gguf(tmp_path, tmp_path / "m.gguf", "q3_k_s")  # no config.json: nothing was read
    assert isinstance(raised.value, ValueError) and "did you mean" in str(raised.value)


def test_the_station_refuses_a_model_type_without_gguf_export(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}), encoding="utf-8")
    with pytest.raises(ExportRefused, match="model_type 'gpt2' has no GGUF export") as raised:
        write_gguf(tmp_path, tmp_path / "m.gguf", "q8_0")
    assert raised.value.problems[0].where.endswith("config.json")


def test_the_station_refuses_a_template_without_go_counterpart():
    with pytest.raises(UserError, match="has no Ollama template") as raised:
        modelfile.ollama_template(dataclasses.replace(TEMPLATES["chatml"], name="nosuch"))
    assert isinstance(raised.value, KeyError)


def test_the_station_refuses_an_unknown_pre_tokenizer():
    class Unknown:  # a tokenizer whose probe digest matches no known tokenizer
        def encode(self, text):
            return [1, 2, 3]

    with pytest.raises(UserError, match="export.gguf_pre_tokenizer"):
        gguf_vocab.detect_pre_tokenizer(Unknown(), {"pre_tokenizer": {"type": "ByteLevel", "use_regex": False}})


# --- one list of GGUF types ---------------------------------------------------------------------

def test_every_reader_of_the_gguf_types_has_the_same_list(capsys):
    from fasttune import cli
    from fasttune.export import exporter

    assert tuple(quantize.PRESETS) == GGUF_TYPES == tuple(BITS_PER_WEIGHT)
    assert config.GGUF_TYPES is GGUF_TYPES and exporter.BITS_PER_WEIGHT is BITS_PER_WEIGHT
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["export", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"comma-separated: {', '.join(GGUF_TYPES)} (alone: q8_0)" in help_text
