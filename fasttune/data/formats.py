"""Row shapes: detect which one a dataset has and convert it to one of TRL's four.

TRL's SFTTrainer takes ``{"text"}``, ``{"messages"}``, ``{"prompt", "completion"}`` (strings) and
conversational prompt-completion (lists of messages). Alpaca and ShareGPT rows are converted to
``messages``; a default system prompt is added to conversations without one.
"""
from __future__ import annotations

from fasttune.errors import Problem, UserError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
MAX_REPORTED = 5


def detect(columns: set[str]) -> str:
    """The format name for a row's keys; ``UserError`` when no known shape fits."""
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
    raise UserError(Problem("data", sorted(columns), "rows need one of: messages | conversations (ShareGPT) | "
                            "instruction+output (Alpaca) | prompt+completion | text",
                            "rename the columns, or set data.format"))


def _from_sharegpt(row: dict) -> list[dict]:
    turns = row["conversations"]
    if not isinstance(turns, list):
        raise ValueError("`conversations` must be a list of {from, value} turns")
    out = []
    for turn in turns:
        role = SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise ValueError(f"unknown ShareGPT role {turn.get('from')!r} (known: {', '.join(SHAREGPT_ROLES)})")
        out.append({"role": role, "content": turn.get("value")})
    return out


def _from_alpaca(row: dict) -> list[dict]:
    prompt = row["instruction"] if not row.get("input") else f"{row['instruction']}\n\n{row['input']}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]


def _check_messages(messages: object) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("`messages` must be a non-empty list of {role, content}")
    clean = []
    for message in messages:
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError("each message needs a `role` and a `content`")
        if message["role"] not in ROLES:
            raise ValueError(f"unknown role {message['role']!r} (known: {', '.join(ROLES)})")
        if not isinstance(message.get("content"), str) or not message["content"].strip():
            raise ValueError(f"a {message['role']} message has empty or non-text content")
        clean.append({"role": message["role"], "content": message["content"]})
    if not any(m["role"] == "assistant" for m in clean):
        raise ValueError("the conversation has no assistant turn (nothing to learn)")
    return clean


def convert(row: dict, fmt: str, system_prompt: str | None) -> dict:
    """One row in TRL's shape; ``ValueError`` says what is wrong with it."""
    if fmt in ("messages", "sharegpt", "alpaca"):
        raw = row["messages"] if fmt == "messages" else _from_sharegpt(row) if fmt == "sharegpt" else _from_alpaca(row)
        messages = _check_messages(raw)
        if system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
        return {"messages": messages}
    if fmt == "prompt_completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, list):
            return {"prompt": _check_messages([*prompt, *completion])[: len(prompt)], "completion": completion}
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion.strip():
            raise ValueError("`prompt` and `completion` must be non-empty text")
        return {"prompt": prompt, "completion": completion}
    text = row.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("`text` must be non-empty text")
    return {"text": text}


def to_trl(rows: list[dict], fmt: str, system_prompt: str | None, source: str) -> tuple[list[dict], str]:
    """All rows converted; bad rows are reported together (row numbers are 1-based)."""
    if not rows:
        raise UserError(Problem("data.path", source, "holds no rows", "point data.path at a file with examples"))
    if fmt == "auto":
        fmt = detect(set(rows[0]))
    out, problems = [], []
    for number, row in enumerate(rows, start=1):
        try:
            out.append(convert(row, fmt, system_prompt))
        except (KeyError, ValueError, TypeError) as err:
            problems.append(Problem(f"{source} row {number}", None, f"{fmt} row: {err}", "fix or remove that row"))
    if problems:
        shown = problems[:MAX_REPORTED]
        if len(problems) > MAX_REPORTED:
            shown.append(Problem(source, f"{len(problems) - MAX_REPORTED} more rows", "have the same kind of problems", "fix them too"))
        raise UserError(shown, f"{len(problems)} of {len(rows)} rows in {source} are malformed")
    return out, fmt
