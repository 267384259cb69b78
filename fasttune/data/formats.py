"""Row shapes: detect which one a dataset has and convert each row to one of TRL's four.

TRL's SFTTrainer takes ``{"text"}``, ``{"messages"}``, ``{"prompt", "completion"}`` (strings) and
conversational prompt-completion (both lists of messages); see
https://huggingface.co/docs/trl/en/dataset_formats (TRL 0.2x). Those pass through unchanged.
Alpaca (``instruction``, ``input``, ``output``) and ShareGPT (``conversations`` of ``from``/``value``
turns) rows are converted to ``messages``; a default system prompt is added to conversations
without one. A bad row raises :class:`BadRow`, whose ``kind`` groups it with rows wrong the same way.
"""
from __future__ import annotations

import typing

from fasttune.config import DATA_FORMATS
from fasttune.errors import Problem, UserError

ROLES = ("system", "user", "assistant")
# ShareGPT role names (https://huggingface.co/datasets/mlabonne/FineTome-100k uses human/gpt/system).
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
SHAPES = ("messages | conversations (ShareGPT) | instruction+output (Alpaca) | prompt+completion | text")
SKIP_HINT = "or set data.on_bad_row=skip to drop them"


class BadRow(ValueError):
    """What is wrong with one row: ``kind`` is the same text for every row wrong the same way."""

    def __init__(self, kind: str, fix: str):
        super().__init__(kind)
        self.kind = kind
        self.fix = f"{fix}, {SKIP_HINT}"


def detect_shape(columns: typing.Iterable[str], needs_answer: bool = True) -> typing.Optional[str]:
    """The format name for a row's keys, or ``None`` when no known shape fits. ``needs_answer=False``
    (rows to answer, not to train on): ``prompt`` alone and ``instruction`` alone fit too."""
    columns = set(columns)
    if "messages" in columns:
        return "messages"
    if "conversations" in columns:
        return "sharegpt"
    if {"instruction", "output"} <= columns:
        return "alpaca"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if "text" in columns:
        return "text"
    if not needs_answer:
        return "prompt_completion" if "prompt" in columns else "alpaca" if "instruction" in columns else None
    return None


def detect(columns: typing.Iterable[str], source: str = "data", needs_answer: bool = True) -> str:
    """The format name for a row's keys; ``UserError`` when no known shape fits."""
    fmt = detect_shape(columns, needs_answer)
    if fmt is None:
        raise UserError(Problem(source, sorted(columns), f"rows need the columns of one of: {SHAPES}",
                                "rename the columns, describe them with data.mapping, or set data.format"))
    return fmt


def _text(row: dict, key: str, allow_empty: bool = False) -> str:
    value = row.get(key)
    if value is None:
        raise BadRow(f"field `{key}` is missing", f"add `{key}` to those rows")
    if not isinstance(value, str):
        raise BadRow(f"field `{key}` is not text", f"make `{key}` a string in those rows")
    if not allow_empty and not value.strip():
        raise BadRow(f"field `{key}` is empty", f"fill in `{key}` in those rows")
    return value


def _from_sharegpt(row: dict) -> list[dict]:
    turns = row.get("conversations")
    if not isinstance(turns, list):
        raise BadRow("`conversations` is not a list of {from, value} turns", "make `conversations` a list of turns")
    out = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise BadRow("a ShareGPT turn is not a {from, value} object", "write each turn as {\"from\": ..., \"value\": ...}")
        name = turn.get("from", turn.get("role"))
        role = SHAREGPT_ROLES.get(str(name).lower())
        if role is None:
            raise BadRow(f"unknown ShareGPT role {name!r} (known: {', '.join(SHAREGPT_ROLES)})",
                         "use human, gpt or system in `from`")
        out.append({"role": role, "content": turn.get("value", turn.get("content"))})
    return out


def _from_alpaca(row: dict, needs_answer: bool = True) -> list[dict]:
    instruction = _text(row, "instruction")
    output = _text(row, "output") if needs_answer or row.get("output") is not None else None
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise BadRow("field `input` is not text", "make `input` a string (or leave it out) in those rows")
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return [{"role": "user", "content": prompt}, *([{"role": "assistant", "content": output}] if output is not None else [])]


def _check_messages(messages: object, key: str = "messages", needs_assistant: bool = True) -> list[dict]:
    if not isinstance(messages, list):
        raise BadRow(f"`{key}` is not a list of {{role, content}} messages", f"make `{key}` a list of messages")
    if not messages:
        raise BadRow(f"`{key}` is an empty conversation", "add the conversation's turns")
    clean = []
    for message in messages:
        if not isinstance(message, dict) or "role" not in message:
            raise BadRow("a message has no `role`", "give every message a role and a content")
        role = message["role"]
        if role not in ROLES:
            raise BadRow(f"unknown role {role!r} (known: {', '.join(ROLES)})", "use system, user or assistant as the role")
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            raise BadRow(f"a {role} message is empty or not text", f"fill in the {role} message's content")
        clean.append(dict(message))
    if needs_assistant and not any(m["role"] == "assistant" for m in clean):
        raise BadRow("conversation has no assistant turn", "add the assistant's reply to those rows")
    return clean


def _with_system(messages: list[dict], system_prompt: typing.Optional[str]) -> list[dict]:
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def convert(row: dict, fmt: str, system_prompt: typing.Optional[str] = None, needs_answer: bool = True) -> dict:
    """One row in TRL's shape; :class:`BadRow` says what is wrong with it. ``needs_answer=False``: rows
    to answer (``generate``), whose assistant turn or completion may be missing."""
    if fmt in ("messages", "sharegpt", "alpaca"):
        raw = (row.get("messages") if fmt == "messages" else _from_sharegpt(row) if fmt == "sharegpt"
               else _from_alpaca(row, needs_answer))
        if fmt == "messages" and "messages" not in row:
            raise BadRow("field `messages` is missing", "add `messages` to those rows")
        return {"messages": _with_system(_check_messages(raw, needs_assistant=needs_answer), system_prompt)}
    if fmt == "prompt_completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if completion is None and not needs_answer:
            if isinstance(prompt, list):
                return {"prompt": _with_system(_check_messages(prompt, "prompt", needs_assistant=False), system_prompt)}
            return {"prompt": _text(row, "prompt")}
        if isinstance(prompt, list) or isinstance(completion, list):
            if not (isinstance(prompt, list) and isinstance(completion, list)):
                raise BadRow("`prompt` and `completion` are not both lists of messages",
                             "write both as lists of messages (conversational) or both as text")
            prompt = _check_messages(prompt, "prompt", needs_assistant=False)
            completion = _check_messages(completion, "completion")
            return {"prompt": _with_system(prompt, system_prompt), "completion": completion}
        return {"prompt": _text(row, "prompt"), "completion": _text(row, "completion")}
    if fmt == "text":
        return {"text": _text(row, "text")}
    raise ValueError(f"unknown format {fmt!r} (known: {', '.join(DATA_FORMATS)})")

