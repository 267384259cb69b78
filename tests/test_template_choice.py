"""`data.chat_template: auto` picks the training template that matches the tokenizer's own format."""
import pytest
from fixtures.real_tokenizers import load_tokenizer, original_templates

from fasttune import config
from fasttune.model.tokenizer import apply_policy, choose_template


def own_template(name: str) -> str:
    return next(iter(original_templates(name).values()))


@pytest.mark.parametrize("recipe, tokenizer_name, template, expected", [
    ("demo", "smollm2", "chatml", "chatml"),            # model_type llama, but ChatML: not the family's llama3
    ("llama3_qlora", "llama3", "llama3", "llama3"),
    ("mistral_qlora", "mistral", "mistral", "mistral"),
    ("qwen2_5_qlora", "qwen", "qwen2_5", "qwen2_5"),
    ("qwen3_qlora", "qwen", "qwen3", "qwen3"),          # the family's format first among the ChatML ones
    ("phi3_qlora", "phi3", "phi3", "phi3"),
])
def test_the_tokenizers_own_format_is_recognized(recipe, tokenizer_name, template, expected):
    tokenizer = load_tokenizer(tokenizer_name)
    choice = choose_template(own_template(template), config.resolve(recipe), tokenizer.get_vocab())
    assert choice.template.name == expected, choice.reason


def test_the_recipe_wins_and_unknown_formats_fall_back_to_the_family():
    vocab = load_tokenizer("smollm2").get_vocab()
    forced = choose_template(own_template("chatml"), config.resolve("demo", ["data.chat_template=llama3"]), vocab)
    assert forced.template.name == "llama3" and forced.reason == "set by the recipe"
    unknown = choose_template("{{ messages }}", config.resolve("qwen2_5_qlora"), vocab)
    assert unknown.template.name == "qwen2_5" and "not a known format" in unknown.reason
    bare = choose_template(None, config.resolve("qwen2_5_qlora"), vocab)
    assert bare.template.name == "qwen2_5" and "no template of its own" in bare.reason


def test_policy_sets_template_eos_and_a_distinct_pad():
    tokenizer = load_tokenizer("smollm2")
    tokenizer.chat_template = own_template("chatml")
    choice = apply_policy(tokenizer, config.resolve("demo"))
    assert choice.template.name == "chatml" and "{% generation %}" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token not in (None, "<|im_end|>")
