"""What a row of training data asks and what it answered, for generating over it (torch-free).

The prompt is the conversation up to its last assistant turn, the reference that turn's text (a
conversation that ends with a user turn is a prompt with no reference). Rows
come in TRL's shapes (fasttune.data.rows): ``messages``; ``prompt``/``completion``, conversational
or plain text (plain text is answered without the chat template, as TRL trains it); ``text`` rows
are continued as they are, with no reference.
"""
from __future__ import annotations

from fasttune.inference.generation import Prompt


def prompt_and_reference(row: dict) -> tuple[Prompt, str | None]:
    if "messages" in row:
        messages = row["messages"]
        if messages[-1]["role"] != "assistant":  # it ends with a question: that is what to answer
            return Prompt(messages=tuple(messages)), None
        return Prompt(messages=tuple(messages[:-1])), messages[-1]["content"]
    if "prompt" in row:
        completion = row.get("completion")
        if isinstance(row["prompt"], list):
            answer = next((m["content"] for m in completion or () if m["role"] == "assistant"), None)
            return Prompt(messages=tuple(row["prompt"])), answer
        return Prompt(text=row["prompt"]), completion
    return Prompt(text=row["text"]), None


def shown(prompt: Prompt) -> str:
    """The prompt as one line of a results file: the last user turn (the raw text for a text prompt)."""
    if prompt.messages is None:
        return prompt.text or ""
    return next((m["content"] for m in reversed(prompt.messages) if m["role"] == "user"), prompt.messages[-1]["content"])
