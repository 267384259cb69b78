"""Property: for any valid conversation, exactly the assistant replies and their end-of-turn tokens
are trained (fasttune.data.tokenize with assistant_only_loss, real tokenizers)."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fasttune.data.tokenize import IGNORE, MaskRules, tokenize
from fasttune.families.chat_templates import get_template
from fixtures.spans import decoded_runs
from fixtures.real_tokenizers import DEFAULT_TEMPLATE, load_tokenizer

FAMILIES = ("smollm2", "llama3", "phi3")
# Letters, digits, punctuation, accents and CJK; no "<", "|", "[" or "]", so no text spells a special
# token. Contents are stripped: the Llama 3 template trims every message.
ALPHABET = st.sampled_from(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789 .,;:!?'()-+=/éüñçøß中文字日本語"))
CONTENT = st.text(ALPHABET, min_size=1, max_size=40).map(str.strip).filter(bool)


@st.composite
def conversations(draw):
    messages = [{"role": "system", "content": draw(CONTENT)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 4))):
        messages += [{"role": "user", "content": draw(CONTENT)}, {"role": "assistant", "content": draw(CONTENT)}]
    return messages


TOKENIZERS = {name: load_tokenizer(name) for name in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=conversations())
def test_only_replies_and_their_end_of_turn_are_trained(family, messages):
    tokenizer = TOKENIZERS[family]
    eot = get_template(DEFAULT_TEMPLATE[family]).end_of_turn
    row = tokenize([{"messages": messages}], tokenizer, MaskRules(assistant_only_loss=True, max_length=None)).dataset[0]
    trained = [label != IGNORE for label in row["labels"]]
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    # Every reply is trained whole, each followed by its end-of-turn token, and nothing else is.
    assert decoded_runs(row["input_ids"], trained, tokenizer) == [reply + eot for reply in replies]
    eot_id = tokenizer.convert_tokens_to_ids(eot)
    ends = [i for i, t in enumerate(row["input_ids"]) if t == eot_id]
    assert sum(trained[i] for i in ends) == len(replies)
