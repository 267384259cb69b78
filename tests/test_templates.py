"""fasttune's training chat templates, checked on real tokenizers against the publishers' originals.

For every template: the text equals what the original renders; the assistant mask covers exactly
each reply plus its end-of-turn token (golden strings below); the end-of-turn token is one special
token; the pad token is another one.
"""
from __future__ import annotations

import functools
import importlib.resources

import pytest
from jinja2.exceptions import TemplateError

from fasttune.families import FAMILIES
from fasttune.families.chat_templates import TEMPLATES, ChatTemplate, get_template
from fixtures.spans import decoded_runs
from fixtures.real_tokenizers import TOKENIZER_FOR, load_tokenizer, original_templates, phi3_reference_tokenizations


SYSTEM = {"role": "system", "content": "Answer in one word."}
Q1 = {"role": "user", "content": "What is the capital of France?"}
A1 = {"role": "assistant", "content": "Paris."}
Q2 = {"role": "user", "content": "And of Italy?"}
A2 = {"role": "assistant", "content": "Rome."}
CONVERSATIONS = {
    "single_turn": [Q1, A1],
    "system": [SYSTEM, Q1, A1],
    "multi_turn": [SYSTEM, Q1, A1, Q2, A2],
    "first_prompt": [Q1],
    "next_prompt": [SYSTEM, Q1, A1, Q2],
    # Llama 3 and Gemma trim every message, the others keep whitespace as written.
    "untrimmed": [{"role": "user", "content": "  Hi!\n"}, {"role": "assistant", "content": "\nHello.  "}],
}

# Each reply plus its end-of-turn token, as the assistant mask must select them in "multi_turn".
GOLDEN_SPANS = {
    "llama3": ["Paris.<|eot_id|>", "Rome.<|eot_id|>"],
    "chatml": ["Paris.<|im_end|>", "Rome.<|im_end|>"],
    "mistral": ["Paris.</s>", "Rome.</s>"],
    "qwen2_5": ["Paris.<|im_end|>", "Rome.<|im_end|>"],
    # Qwen3's template gives the reply after the last user message an (empty) reasoning block;
    # the model writes that block itself when thinking is on, so it is trained with the reply.
    "qwen3": ["Paris.<|im_end|>", "<think>\n\n</think>\n\nRome.<|im_end|>"],
    "gemma": ["Paris.<end_of_turn>", "Rome.<end_of_turn>"],
    "phi3": ["Paris.<|end|>", "Rome.<|end|>"],
}

# Mistral's ground truth: ids from mistral-common 1.13.1's MistralTokenizer for
# mistral_instruct_tokenizer_240323.model.v3 (encode_chat_completion; ValidationMode.finetuning for
# finished conversations, ValidationMode.test for the prompt). The system message goes before the
# last user message, and each reply starts with "▁" (the space after [/INST]) fused to its first word.
MISTRAL_COMMON_IDS = {
    # <s>[INST]▁What▁is▁the▁capital▁of▁France?[/INST]▁Paris.</s>
    "single_turn": [1, 3, 2592, 1117, 1040, 6333, 1070, 5611, 29572, 4, 6233, 29491, 2],
    # <s>[INST]▁Answer▁in▁one▁word.<0x0A><0x0A>What▁is▁the▁capital▁of▁France?[/INST]▁Paris.</s>
    "system": [1, 3, 27075, 1065, 1392, 2475, 29491, 781, 781, 3963, 1117, 1040, 6333, 1070, 5611, 29572, 4, 6233,
               29491, 2],
    # <s>[INST]▁What▁…France?[/INST]▁Paris.</s>
    # [INST]▁Answer▁in▁one▁word.<0x0A><0x0A>And▁of▁Italy?[/INST]▁Rome.</s>
    "multi_turn": [1, 3, 2592, 1117, 1040, 6333, 1070, 5611, 29572, 4, 6233, 29491, 2, 3, 27075, 1065, 1392, 2475,
                   29491, 781, 781, 3235, 1070, 11596, 29572, 4, 11595, 29491, 2],
    "next_prompt": [1, 3, 2592, 1117, 1040, 6333, 1070, 5611, 29572, 4, 6233, 29491, 2, 3, 27075, 1065, 1392, 2475,
                    29491, 781, 781, 3235, 1070, 11596, 29572, 4],
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOL_CONVERSATION = [
    SYSTEM,
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {
        "role": "assistant",
        "content": "Checking both.",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}},
        ],
    },
    {"role": "tool", "content": "18 C, sunny"},
    {"role": "tool", "content": "24 C, clear"},
    {"role": "assistant", "content": "Paris: 18 C and sunny. Rome: 24 C and clear."},
]


@functools.cache
def tokenizer_for(template: str):
    # Shared within this module, which only reads the tokenizers.
    return load_tokenizer(TOKENIZER_FOR[template], template)


def conversation(template: str, key: str) -> list[dict]:
    # Gemma 2's template rejects system messages (test_gemma_rejects_system_like_the_original).
    return [m for m in CONVERSATIONS[key] if not (template == "gemma" and m["role"] == "system")]


def render(template: str, messages: list[dict], chat_template: str | None = None, **kwargs) -> str:
    return tokenizer_for(template).apply_chat_template(messages, chat_template=chat_template, tokenize=False, **kwargs)


def assistant_spans(template: str, messages: list[dict]) -> list[str]:
    """Decoded runs of consecutive tokens that the assistant mask selects."""
    tokenizer = tokenizer_for(template)
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return decoded_runs(out["input_ids"], out["assistant_masks"], tokenizer)


ORIGINALS = [(template, source) for template in TEMPLATES for source in original_templates(template)]


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("key", list(CONVERSATIONS))
@pytest.mark.parametrize(("template", "source"), ORIGINALS, ids=[f"{t}-{s}" for t, s in ORIGINALS])
def test_renders_like_the_original(template, source, key, add_generation_prompt):
    messages = conversation(template, key)
    original = original_templates(template)[source]
    assert render(template, messages, add_generation_prompt=add_generation_prompt) == render(
        template, messages, original, add_generation_prompt=add_generation_prompt
    )


@pytest.mark.parametrize("template", ["qwen2_5", "qwen3"])
def test_tool_calls_render_like_the_original(template):
    for source, original in original_templates(template).items():
        for messages in (TOOL_CONVERSATION, TOOL_CONVERSATION[:-1], TOOL_CONVERSATION[:2]):
            kwargs = {"tools": [WEATHER_TOOL], "add_generation_prompt": True}
            assert render(template, messages, **kwargs) == render(template, messages, original, **kwargs), source


def test_qwen3_reasoning_renders_like_the_original():
    reasoned = {"role": "assistant", "content": "<think>\nFrance's capital.\n</think>\n\nParis."}
    for source, original in original_templates("qwen3").items():
        for messages in ([Q1, reasoned], [Q1, reasoned, Q2, A2], [Q1, {**A1, "reasoning_content": "Easy."}]):
            assert render("qwen3", messages) == render("qwen3", messages, original), source


def test_gemma_rejects_system_like_the_original():
    (original,) = original_templates("gemma").values()
    for chat_template in (None, original):
        with pytest.raises(TemplateError, match="System role not supported"):
            render("gemma", CONVERSATIONS["system"], chat_template)


@pytest.mark.parametrize("template", ["gemma", "mistral"])
def test_rejects_non_alternating_roles(template):
    with pytest.raises(TemplateError, match="alternate"):
        render(template, [Q1, Q2, A1])


@pytest.mark.parametrize("key", list(MISTRAL_COMMON_IDS))
def test_mistral_ids_equal_mistral_common(key):
    tokenizer = tokenizer_for("mistral")
    ids = tokenizer(render("mistral", CONVERSATIONS[key]), add_special_tokens=False)["input_ids"]
    assert ids == MISTRAL_COMMON_IDS[key]


def test_mistral_system_message_is_kept_when_a_reply_follows():
    # The Hugging Face template of Mistral-7B-Instruct-v0.3 (as public copies show it) attaches the
    # system message only when the last message is a user message (`loop.last`), which drops it
    # from every training conversation; mistral-common, and this template, put it before the last
    # user message whatever follows.
    assert render("mistral", CONVERSATIONS["system"]) == (
        "<s>[INST] Answer in one word.\n\nWhat is the capital of France?[/INST] Paris.</s>"
    )


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_assistant_mask_is_each_reply_and_its_end_of_turn(template):
    assert assistant_spans(template, conversation(template, "multi_turn")) == GOLDEN_SPANS[template]
    # In a single turn the only reply is the last one, which Qwen3 renders with its reasoning block.
    single = ["<think>\n\n</think>\n\nParis.<|im_end|>"] if template == "qwen3" else GOLDEN_SPANS[template][:1]
    assert assistant_spans(template, conversation(template, "single_turn")) == single


@pytest.mark.parametrize("template", ["qwen2_5", "qwen3"])
def test_tool_call_replies_are_masked_whole(template):
    spans = assistant_spans(template, TOOL_CONVERSATION)
    assert len(spans) == 2
    assert spans[0].startswith("Checking both.\n<tool_call>\n") and spans[0].endswith("</tool_call><|im_end|>")
    assert spans[1].endswith("Paris: 18 C and sunny. Rome: 24 C and clear.<|im_end|>")


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_end_of_turn_is_one_special_token(template):
    tokenizer, chat = tokenizer_for(template), get_template(template)
    ids = tokenizer.encode(chat.end_of_turn, add_special_tokens=False)
    assert len(ids) == 1
    assert tokenizer.added_tokens_decoder[ids[0]].special
    for stop in chat.stop:
        assert len(tokenizer.encode(stop, add_special_tokens=False)) == 1, stop


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_pad_is_not_end_of_turn(template):
    tokenizer = tokenizer_for(template)
    assert tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.convert_tokens_to_ids(get_template(template).end_of_turn)


def test_phi3_fixture_tokenizes_like_the_original():
    # llama.cpp recorded these ids with microsoft/Phi-3-mini-4k-instruct's own tokenizer.
    tokenizer = tokenizer_for("phi3")
    for text, ids in phi3_reference_tokenizations():
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids, text


def test_registry_matches_the_template_files():
    files = importlib.resources.files("fasttune.families") / "templates"
    assert {p.name[: -len(".jinja")] for p in files.iterdir() if p.name.endswith(".jinja")} == set(TEMPLATES)
    for chat in TEMPLATES.values():
        assert "{%- generation %}" in chat.source()
    assert {family.chat_template for family in FAMILIES.values()} <= set(TEMPLATES)


def test_unknown_template_names_the_known_ones():
    with pytest.raises(KeyError, match="llama3"):
        get_template("llama2")
    assert isinstance(get_template("phi3"), ChatTemplate)
