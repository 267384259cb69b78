"""Answers from a model, the way it trained: its chat template, greedy by default, stopped at the end of turn.

One implementation for every verb that generates: the task metric before and after training,
``generate`` over a file (batched) and ``chat`` (streamed). Prompts are the chat template's own
tokens (``add_generation_prompt=True``); a batch is padded on the left so every answer starts right
after its prompt, and rows go in order of length so little compute goes to padding. Generation
stops at the template's end of turn (the tokenizer's EOS, which fasttune set to it) and at the other
stop tokens of the format that are single tokens of the vocabulary; none of them is in the text.
"""
from __future__ import annotations

import threading
import typing
from contextlib import contextmanager
from dataclasses import dataclass

BATCH_SIZE = 64
"""Rows answered together by ``answer_all`` at most."""
BATCH_TOKENS = 8192
"""Tokens a batch may hold at most (rows x (longest prompt + max_new_tokens)): the KV cache of 8,192
tokens of a 7B model is 4 GiB in 16 bits. A batch generates until its longest answer ends, so on a
CPU fewer, larger batches are faster: the demo's 40 held-out rows (about 110 prompt tokens, 64 new)
answered by its base model took 55 s in batches of 16 and 37 s in one batch of 40 (2-core AMD EPYC,
AVX-512, idle; one process, one after the other)."""


@dataclass(frozen=True)
class Sampling:
    """How to pick each next token: greedy at temperature 0 (the default: the same answer every time)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def generate_kwargs(self) -> dict:
        if self.temperature <= 0:
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": None}


@dataclass(frozen=True)
class Prompt:
    """What to answer: a conversation (rendered with the chat template), or raw ``text`` to continue."""

    messages: tuple[dict, ...] | None = None
    text: str | None = None


def stop_token_ids(tokenizer, stops: typing.Iterable[str] = ()) -> list[int]:
    """The EOS id and every ``stops`` string that is one token of the vocabulary (``ChatTemplate.stop``)."""
    vocab = tokenizer.get_vocab()
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids += [vocab[s] for s in stops if s in vocab and vocab[s] not in ids]
    return ids


def prompt_ids(tokenizer, prompt: Prompt) -> list[int]:
    """The prompt's tokens: the chat template (which writes the special tokens itself), or the raw text."""
    if prompt.messages is not None:
        rendered = tokenizer.apply_chat_template(list(prompt.messages), tokenize=False, add_generation_prompt=True)
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt.text)["input_ids"]


def _answer_text(tokenizer, tokens, stops: list[int]) -> str:
    """The text of ``tokens`` up to the first stop token, special tokens and the whitespace at its edges left out."""
    tokens = list(tokens)
    end = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
    return tokenizer.decode(tokens[:end], skip_special_tokens=True).strip()


def pad_id(tokenizer) -> int:
    """The id that fills a batch's left edge (masked out, so any id serves: EOS where there is no pad)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def batches(lengths: typing.Sequence[int], max_new_tokens: int, batch_size: int = BATCH_SIZE,
            batch_tokens: int = BATCH_TOKENS) -> list[list[int]]:
    """Row indices in order of prompt length, cut into batches of at most ``batch_size`` rows and
    ``batch_tokens`` tokens (a row that alone is longer makes a batch of its own)."""
    out: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        batch = out[-1] if out else None
        if batch and len(batch) < batch_size and (len(batch) + 1) * (lengths[i] + max_new_tokens) <= batch_tokens:
            batch.append(i)
        else:
            out.append([i])
    return out


def answer_all(model, tokenizer, prompts: typing.Sequence[Prompt], sampling: Sampling = Sampling(), stops: typing.Iterable[str] = (),
               batch_size: int = BATCH_SIZE, on_batch: typing.Callable[[int], None] | None = None,
               adapter: bool = True) -> list[str]:
    """The answer to each prompt, in order, generated in batches (``batches``); ``on_batch(n)`` after
    each batch. ``adapter=False``: a PEFT model's base answers (see ``generating``)."""
    import torch

    pad = pad_id(tokenizer)
    stop_ids = stop_token_ids(tokenizer, stops)
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    answers = [""] * len(prompts)
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    with generating(model, adapter):
        for batch in batches([len(ids) for ids in encoded], sampling.max_new_tokens, batch_size):
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):  # left padding: every prompt ends at the last column
                ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[row, width - len(encoded[i]):] = 1
            out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                 max_new_tokens=sampling.max_new_tokens, eos_token_id=stop_ids,
                                 pad_token_id=pad, **sampling.generate_kwargs())
            for row, i in enumerate(batch):
                answers[i] = _answer_text(tokenizer, out[row, width:].tolist(), stop_ids)
            if on_batch is not None:
                on_batch(len(batch))
    return answers


def stream_answer(model, tokenizer, prompt: Prompt, sampling: Sampling = Sampling(), stops: typing.Iterable[str] = (),
                  stop: threading.Event | None = None, adapter: bool = True) -> typing.Iterator[str]:
    """The answer to ``prompt`` as it is generated, piece by piece; setting ``stop`` ends it at the next token.
    ``adapter=False``: a PEFT model's base answers (see ``generating``).

    ``model.generate`` runs in a thread and hands decoded text over through transformers'
    ``TextIteratorStreamer``; the caller's thread (which gets Ctrl-C) only reads it.
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    stop, done = stop or threading.Event(), threading.Event()  # done: the reader left (the caller's event is left alone)

    class Stopped(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            ended = stop.is_set() or done.is_set()
            return torch.full((input_ids.shape[0],), ended, dtype=torch.bool, device=input_ids.device)

    stop_ids = stop_token_ids(tokenizer, stops)
    ids = torch.tensor([prompt_ids(tokenizer, prompt)], device=model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    failure: list[BaseException] = []

    def work():
        try:
            with generating(model, adapter):
                if sampling.seed is not None:
                    torch.manual_seed(sampling.seed)
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=sampling.max_new_tokens,
                               eos_token_id=stop_ids, pad_token_id=pad_id(tokenizer), streamer=streamer,
                               stopping_criteria=StoppingCriteriaList([Stopped()]), **sampling.generate_kwargs())
        except BaseException as err:  # said in the caller's thread, after the text so far
            failure.append(err)
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        yield from streamer
    finally:
        done.set()
        thread.join()
    if failure:
        raise failure[0]


@contextmanager
def generating(model, adapter: bool = True):
    """Eval mode and no gradients for the block; a PEFT model's adapter merged into its base meanwhile,
    or switched off (``adapter=False``: the base model's answer, the same weights in memory). As before after.

    Merging: measured on 2 CPU cores with SmolLM2-135M and LoRA on all 7 projections, 40 rows take
    160 s through the unmerged adapters (two extra small matmuls per projection per token) and 28 s
    merged. Merge/unmerge are PEFT's public, reversible API (``merge_adapter``/``unmerge_adapter``);
    the float32 round trip changes base weights by float rounding only. Quantized bases (QLoRA) are
    left unmerged: merging into 4-bit weights requantizes them, which unmerging cannot undo.
    """
    import contextlib

    import torch

    peft = hasattr(model, "get_base_model") and hasattr(model, "disable_adapter")
    quantized = peft and getattr(model.get_base_model().config, "quantization_config", None) is not None
    was_training, merged = model.training, False
    model.eval()
    try:
        if peft and adapter and not quantized:
            merged = True  # a merge stopped halfway (Ctrl-C) is unmerged too: PEFT unmerges the layers that merged
            model.merge_adapter()
        with torch.no_grad(), (model.disable_adapter() if peft and not adapter else contextlib.nullcontext()):
            yield
    finally:
        if merged:
            model.unmerge_adapter()
        model.train(was_training)
