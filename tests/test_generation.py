"""fasttune.inference.generation and prompts: answers from a model the way it trained.

Every answer is checked against transformers' own greedy ``generate`` on the prompt alone (no
padding, no batching, no streaming), so batching, left padding, stop tokens, streaming and the
PEFT merge can only pass if they change nothing but speed. The model is a tiny random llama
(``fixtures.tiny_models``) with SmolLM2's real ChatML tokenizer under fasttune's policy
(EOS = ``<|im_end|>``, pad = ``<|endoftext|>``).
"""
from __future__ import annotations

import copy
import subprocess
import sys
import threading
import time
import typing

import pytest
import torch
from fixtures.real_tokenizers import load_tokenizer
from fixtures.tiny_models import build_tiny_model, chat_rows
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from fasttune import config
from fasttune.families.chat_templates import TEMPLATES
from fasttune.inference.generation import Prompt, Sampling, answer_all, pad_id, prompt_ids, stream_answer
from fasttune.inference.prompts import prompt_and_reference, shown
from fasttune.model.tokenizer import apply_policy

MAX_NEW = 12
END_OF_TURN = "<|im_end|>"
CHATML_STOPS = TEMPLATES["chatml"].stop  # <|im_end|>, <|im_start|>, <|endoftext|>


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A model of hidden size 64 gains nothing from a second thread, and loses a lot when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(folder, tokenizer)``: a tiny random llama saved with SmolLM2's tokenizer, policy applied."""
    folder = tmp_path_factory.mktemp("tiny-chatml")
    tokenizer = load_tokenizer("smollm2")
    apply_policy(tokenizer, config.resolve("demo", [f"model.name={folder}"]))
    assert tokenizer.eos_token == END_OF_TURN and tokenizer.pad_token not in (None, END_OF_TURN)
    build_tiny_model("llama", tokenizer, folder)
    return folder, tokenizer


def _load(folder):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture
def model(tiny):
    return _load(tiny[0])


@pytest.fixture(scope="module")
def prompts():
    """Six conversations of different lengths (system or not, one or two user turns)."""
    return [prompt_and_reference(row)[0] for row in chat_rows(6)]


class Alone(typing.NamedTuple):
    text: str
    tokens: list[int]  # the answer's tokens, stop token excluded
    stopped: bool  # a stop token ended it (before max_new_tokens)


def alone(model, tokenizer, prompt: Prompt, stop_ids: list[int], max_new_tokens: int = MAX_NEW) -> Alone:
    """transformers directly: greedy on the prompt alone (batch of one, no padding), cut at the first stop."""
    if prompt.messages is not None:
        encoded = tokenizer.apply_chat_template(list(prompt.messages), add_generation_prompt=True, return_dict=True,
                                                return_tensors="pt")
    else:
        encoded = tokenizer(prompt.text, return_tensors="pt")
    ids = encoded["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=encoded["attention_mask"], do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    cut = next((i for i, t in enumerate(new) if t in stop_ids), len(new))
    return Alone(tokenizer.decode(new[:cut], skip_special_tokens=True).strip(), new[:cut], cut < len(new))  # edges trimmed, as answers are


def _ids(tokenizer, *tokens: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def _new_threads(before: list[threading.Thread]) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t not in before and t.is_alive()]


# --- answer_all: batched, left-padded, in order, stopped at the end of turn ---------------------------------


def test_batched_answers_equal_one_by_one_greedy_generation(tiny, model, prompts):
    _, tokenizer = tiny
    lengths = [len(prompt_ids(tokenizer, p)) for p in prompts]
    assert len(set(lengths)) >= 3  # both batches need left padding
    eos = _ids(tokenizer, END_OF_TURN)
    expected = [alone(model, tokenizer, p, eos).text for p in prompts]
    assert len(set(expected)) == len(expected)  # distinct answers: a row answered out of order would show
    batches = []
    got = answer_all(model, tokenizer, prompts, Sampling(max_new_tokens=MAX_NEW), batch_size=4, on_batch=batches.append)
    assert got == expected
    assert batches == [4, 2]
    # One batch of all six, and one row at a time: the same answers.
    assert answer_all(model, tokenizer, prompts, Sampling(max_new_tokens=MAX_NEW), batch_size=16) == expected
    assert answer_all(model, tokenizer, prompts[::-1], Sampling(max_new_tokens=MAX_NEW), batch_size=1) == expected[::-1]


def test_without_a_pad_token_batches_are_padded_with_eos(tiny, model, prompts):
    _, tokenizer = tiny
    expected = answer_all(model, tokenizer, prompts, Sampling(max_new_tokens=MAX_NEW), batch_size=4)
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None and pad_id(no_pad) == no_pad.eos_token_id
    assert answer_all(model, no_pad, prompts, Sampling(max_new_tokens=MAX_NEW), batch_size=4) == expected
    assert "".join(stream_answer(model, no_pad, prompts[0], Sampling(max_new_tokens=MAX_NEW))).strip() == expected[0]


def test_text_prompts_are_continued_without_the_chat_template(tiny, model):
    _, tokenizer = tiny
    text = Prompt(text="The capital of France is")
    as_chat = Prompt(messages=({"role": "user", "content": "The capital of France is"},))
    eos = _ids(tokenizer, END_OF_TURN)
    expected = alone(model, tokenizer, text, eos).text
    got = answer_all(model, tokenizer, [text, as_chat], Sampling(max_new_tokens=MAX_NEW))
    assert got[0] == expected
    assert got[1] == alone(model, tokenizer, as_chat, eos).text != expected


@pytest.mark.parametrize("stop_token, stops", [
    (END_OF_TURN, ()),  # the tokenizer's EOS: always a stop
    ("<|im_start|>", CHATML_STOPS),  # a stop of the format, one token of the vocabulary: only when asked for
])
def test_generation_stops_at_a_stop_token_which_is_not_in_the_answer(tiny, prompts, stop_token, stops):
    folder, tokenizer = tiny
    stop_ids = _ids(tokenizer, *CHATML_STOPS) if stops else _ids(tokenizer, END_OF_TURN)
    free = alone(_load(folder), tokenizer, prompts[0], stop_ids)
    assert not free.stopped  # a random model does not end its turn by itself
    # Bias the model: the stop token's output row is twice that of the token greedy picks third, so
    # the stop token wins there (or earlier). Nothing else changes, so the answer before it is the same.
    model = _load(folder)
    stop_id = tokenizer.convert_tokens_to_ids(stop_token)
    with torch.no_grad():
        model.lm_head.weight[stop_id] = 2 * model.lm_head.weight[free.tokens[2]]
    expected = [alone(model, tokenizer, p, stop_ids) for p in prompts]
    assert expected[0].stopped and 1 <= len(expected[0].tokens) <= 2
    assert free.text.startswith(expected[0].text) and len(expected[0].text) < len(free.text)

    got = answer_all(model, tokenizer, prompts, Sampling(max_new_tokens=MAX_NEW), stops=stops, batch_size=4)
    assert got == [e.text for e in expected]
    for answer in got:
        assert all(s not in answer for s in CHATML_STOPS)
    assert len(tokenizer(got[0], add_special_tokens=False)["input_ids"]) < MAX_NEW
    # Streamed: the same stop, the same text.
    assert "".join(stream_answer(model, tokenizer, prompts[0], Sampling(max_new_tokens=MAX_NEW), stops=stops)).strip() == got[0]
    if stops:  # without the format's stops, <|im_start|> is generated (and dropped as a special token): no stop there
        longer = answer_all(model, tokenizer, prompts[:1], Sampling(max_new_tokens=MAX_NEW))[0]
        assert longer.startswith(got[0]) and len(longer) > len(got[0])


# --- stream_answer ------------------------------------------------------------------------------------------


def test_streamed_pieces_add_up_to_the_batched_answer(tiny, model, prompts):
    _, tokenizer = tiny
    sampling = Sampling(max_new_tokens=16)
    before = threading.enumerate()
    for prompt in (prompts[0], prompts[3], Prompt(text="Once upon a time")):
        pieces = list(stream_answer(model, tokenizer, prompt, sampling))
        assert all(isinstance(p, str) for p in pieces)
        assert len([p for p in pieces if p]) > 1
        assert "".join(pieces).strip() == answer_all(model, tokenizer, [prompt], sampling)[0]
    assert _new_threads(before) == []


class Slow:
    """A forward pre-hook on lm_head: counts generated tokens (one lm_head call each) and pauses
    ``pause`` seconds before each (less once ``until`` is set), so that the reader has time to act
    between tokens; ``fail_at``: raises on that call instead."""

    def __init__(self, model, pause: float = 0.05, until: threading.Event | None = None, fail_at: int | None = None):
        self.calls, self.pause, self.until, self.fail_at = 0, pause, until, fail_at
        self.handle = model.lm_head.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("boom in the generation thread")
        if self.until is not None:
            self.until.wait(self.pause)
        else:
            time.sleep(self.pause)


def test_setting_stop_ends_the_stream_early_and_the_thread_is_gone(tiny, model, prompts):
    _, tokenizer = tiny
    sampling = Sampling(max_new_tokens=64)
    full = answer_all(model, tokenizer, prompts[:1], sampling)[0]
    stop = threading.Event()
    slow = Slow(model, pause=0.2, until=stop)  # without the stop: 64 tokens in 13 s
    before = threading.enumerate()
    pieces, calls_at_first, alive_during = [], None, None
    for piece in stream_answer(model, tokenizer, prompts[0], sampling, stop=stop):
        pieces.append(piece)
        if piece and calls_at_first is None:
            calls_at_first = slow.calls
            alive_during = _new_threads(before)
            stop.set()
    assert len(alive_during) == 1  # generation ran in a thread of its own ...
    assert _new_threads(before) == []  # ... which is gone once the stream ends
    assert slow.calls <= calls_at_first + 2 < sampling.max_new_tokens  # stopped at the next token
    text = "".join(pieces).strip()
    assert full.startswith(text) and len(text) < len(full)


def test_closing_the_stream_stops_generation_and_joins_the_thread(tiny, model, prompts):
    _, tokenizer = tiny
    sampling = Sampling(max_new_tokens=64)
    slow = Slow(model)  # without a stop: 64 tokens in 3 s
    before = threading.enumerate()
    stream = stream_answer(model, tokenizer, prompts[0], sampling)
    first = next(stream)
    calls = slow.calls
    stream.close()  # what breaking out of the loop, or Ctrl-C in the reader, does
    assert _new_threads(before) == []
    assert slow.calls <= calls + 3 < sampling.max_new_tokens
    assert isinstance(first, str)


def test_an_error_in_the_generation_thread_is_raised_in_the_reader(tiny, model, prompts):
    _, tokenizer = tiny
    Slow(model, pause=0, fail_at=4)
    model.train()
    before = threading.enumerate()
    with pytest.raises(RuntimeError, match="boom in the generation thread"):
        for _ in stream_answer(model, tokenizer, prompts[0], Sampling(max_new_tokens=32)):
            pass
    assert _new_threads(before) == []
    assert model.training  # generating() restored the mode on the way out


# --- PEFT adapters: merged while generating, or switched off ------------------------------------------------


def test_adapter_on_and_off_give_the_adapted_and_the_base_answers(tiny, prompts):
    folder, tokenizer = tiny
    eos = _ids(tokenizer, END_OF_TURN)
    chosen = prompts[:3]
    base_expected = [alone(_load(folder), tokenizer, p, eos).text for p in chosen]
    torch.manual_seed(1)
    peft_model = get_peft_model(_load(folder), LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    peft_model.eval()
    adapted_expected = [alone(peft_model, tokenizer, p, eos).text for p in chosen]  # PEFT's unmerged forward
    assert adapted_expected != base_expected and all(a != b for a, b in zip(adapted_expected, base_expected))

    base_params = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" not in n}
    q_proj = peft_model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    q_before = base_params[next(n for n, p in peft_model.named_parameters() if p is q_proj)]
    seen = []  # per generated token: (model in training mode anywhere, base weight holds the merged delta)
    lm_head = peft_model.get_base_model().lm_head
    lm_head.register_forward_pre_hook(lambda module, args: seen.append(
        (any(m.training for m in peft_model.modules()), (q_proj - q_before).abs().max().item() > 1e-4)))

    def assert_restored():
        for name, param in peft_model.named_parameters():
            if name in base_params:
                assert (param.detach() - base_params[name]).abs().max().item() <= 1e-6, name
        assert all(m.training for m in peft_model.modules())

    sampling = Sampling(max_new_tokens=MAX_NEW)
    # On, off (after an unmerge), on again (after disable_adapter): each as if alone; batched, then streamed.
    for adapter, expected, merged, stream in ((True, adapted_expected, True, True), (False, base_expected, False, True),
                                              (True, adapted_expected, True, False)):
        peft_model.train()
        seen.clear()
        assert answer_all(peft_model, tokenizer, chosen, sampling, batch_size=2, adapter=adapter) == expected, adapter
        assert seen and all(s == (False, merged) for s in seen), (adapter, seen[:3])
        assert_restored()
        if stream:
            seen.clear()
            assert "".join(stream_answer(peft_model, tokenizer, chosen[0], sampling, adapter=adapter)).strip() == expected[0], adapter
            assert seen and all(s == (False, merged) for s in seen), (adapter, seen[:3])
            assert_restored()
    peft_model.eval()
    answer_all(peft_model, tokenizer, chosen[:1], sampling)
    assert not any(m.training for m in peft_model.modules())  # eval stays eval


# --- Sampling ------------------------------------------------------------------------------------------------


def test_temperature_zero_is_greedy_and_a_seed_repeats_a_sample(tiny, model, prompts):
    _, tokenizer = tiny
    assert Sampling().generate_kwargs()["do_sample"] is False
    assert Sampling(temperature=0.0, top_p=0.5, seed=3).generate_kwargs()["do_sample"] is False
    assert Sampling(temperature=0.7, top_p=0.9).generate_kwargs() == {"do_sample": True, "temperature": 0.7, "top_p": 0.9,
                                                                      "top_k": None}
    chosen = prompts[:2]
    eos = _ids(tokenizer, END_OF_TURN)
    greedy = [alone(model, tokenizer, p, eos).text for p in chosen]
    assert answer_all(model, tokenizer, chosen, Sampling(max_new_tokens=MAX_NEW, temperature=0.0, top_p=0.5, seed=3)) == greedy

    hot = Sampling(max_new_tokens=MAX_NEW, temperature=1.5, seed=7)
    first = answer_all(model, tokenizer, chosen, hot)
    assert first != greedy
    assert answer_all(model, tokenizer, chosen, hot) == first
    assert answer_all(model, tokenizer, chosen, Sampling(max_new_tokens=MAX_NEW, temperature=1.5, seed=8)) != first
    assert "".join(stream_answer(model, tokenizer, chosen[0], hot)).strip() == answer_all(model, tokenizer, chosen[:1], hot)[0]
    # top_p is passed on (a tiny top_p keeps only the most likely token: greedy again) ...
    assert answer_all(model, tokenizer, chosen, Sampling(max_new_tokens=MAX_NEW, temperature=1.5, top_p=1e-9, seed=7)) == greedy


def test_sampling_is_not_cut_to_the_top_k_tokens(tiny, model, prompts):
    _, tokenizer = tiny
    # ... and no top-k cut (transformers' default is 50): at a very high temperature, sampled tokens
    # come from the whole vocabulary of 49152, not from the 50 most likely.
    ids = torch.tensor([prompt_ids(tokenizer, prompts[0])])
    answer = answer_all(model, tokenizer, prompts[:1], Sampling(max_new_tokens=8, temperature=1000.0, seed=0))[0]
    new = torch.tensor([tokenizer(answer, add_special_tokens=False)["input_ids"]])
    sequence = torch.cat([ids, new], dim=1)
    with torch.no_grad():
        logits = model(sequence).logits[0, ids.shape[1] - 1:-1]
    ranks = [(step > step[token]).sum().item() for step, token in zip(logits, new[0])]
    assert max(ranks) > 50, ranks


# --- prompts.prompt_and_reference ----------------------------------------------------------------------------


SYSTEM = {"role": "system", "content": "Answer in a few words."}
Q1, A1 = {"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}
Q2, A2 = {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome."}


def test_a_conversation_is_asked_up_to_its_last_assistant_turn(tiny):
    _, tokenizer = tiny
    prompt, reference = prompt_and_reference({"messages": [SYSTEM, Q1, A1, Q2, A2]})
    assert prompt == Prompt(messages=(SYSTEM, Q1, A1, Q2)) and reference == "Rome."
    assert shown(prompt) == "And of Italy?"
    rendered = tokenizer.decode(prompt_ids(tokenizer, prompt))
    assert rendered.endswith("<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n")
    assert "Paris." in rendered and "Rome." not in rendered
    assert prompt_and_reference({"messages": [Q1, A1]}) == (Prompt(messages=(Q1,)), "Paris.")


def test_a_conversation_without_an_assistant_turn_has_no_reference():
    prompt, reference = prompt_and_reference({"messages": [SYSTEM, Q1]})
    assert prompt == Prompt(messages=(SYSTEM, Q1)) and reference is None
    assert shown(prompt) == Q1["content"]
    # Ending with a question after an answered one: the question is what to answer, whole history included.
    follow_up = {"role": "user", "content": "And of Italy?"}
    assert prompt_and_reference({"messages": [SYSTEM, Q1, A1, follow_up]}) == (Prompt(messages=(SYSTEM, Q1, A1, follow_up)), None)


def test_conversational_and_plain_prompt_completion_rows():
    assert prompt_and_reference({"prompt": [SYSTEM, Q1], "completion": [A1]}) == (Prompt(messages=(SYSTEM, Q1)), "Paris.")
    assert prompt_and_reference({"prompt": [Q1]}) == (Prompt(messages=(Q1,)), None)
    plain, reference = prompt_and_reference({"prompt": "The capital of France is", "completion": " Paris."})
    assert plain == Prompt(text="The capital of France is") and plain.messages is None and reference == " Paris."
    assert shown(plain) == "The capital of France is"


def test_text_rows_are_continued_with_no_reference():
    prompt, reference = prompt_and_reference({"text": "Once upon a time"})
    assert prompt == Prompt(text="Once upon a time") and prompt.messages is None and reference is None


def test_prompts_module_imports_without_torch():
    code = ("import sys, fasttune.inference.prompts as p; p.prompt_and_reference({'text': 'x'}); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- moved from test_json_extract.py ------------------------------------------------------------------------


def test_lora_is_merged_during_generation_and_restored_after():
    torch = pytest.importorskip("torch")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from fasttune.inference.generation import generating

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    model.eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    base_weight = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    before = base_weight.detach().clone()
    with torch.no_grad():
        adapter_logits = model(input_ids=ids).logits
        with generating(model):
            assert not torch.equal(base_weight, before)  # the delta is in the base weight
            merged_logits = model(input_ids=ids).logits
        after_logits = model(input_ids=ids).logits
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(base_weight, before, atol=1e-6, rtol=0)
    torch.testing.assert_close(after_logits, adapter_logits, atol=1e-5, rtol=0)


def test_batches_go_by_prompt_length_within_the_row_and_token_limits():
    from fasttune.inference.generation import batches

    lengths = [30, 10, 20, 500, 40]
    # sorted by length; at most 2 rows; at most 200 tokens (rows x (longest prompt + 60 new))
    assert batches(lengths, 60, batch_size=2, batch_tokens=200) == [[1, 2], [0, 4], [3]]
    assert batches(lengths, 60, batch_size=2, batch_tokens=199) == [[1, 2], [0], [4], [3]]
    assert batches(lengths, 60, batch_size=64, batch_tokens=10_000) == [[1, 2, 0, 4, 3]]
    assert batches([], 60) == []
    # the demo's 40 held-out rows (about 110 prompt tokens, 64 new) are answered in one batch
    assert len(batches([110] * 40, 64)) == 1
