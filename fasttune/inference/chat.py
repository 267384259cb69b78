"""``python -m fasttune chat``: talk to a trained model in the terminal, formatted as it trained.

Answers stream as they are generated and end at the end-of-turn token (never shown). The history
is kept and sent whole each turn, cut from the oldest exchanges (with a note) when it would not fit
the model's context with room for the answer. Ctrl-C stops the answer being written (what was
written stays in the history) and the chat goes on; Ctrl-D or ``/exit`` leaves. ``--compare``
answers each message twice, the adapter switched off (the base model) and on, one model in memory;
both read the same history, which keeps the fine-tuned answers.
Answers go to stdout, everything else (the start-up line, notes) to stderr.
"""
from __future__ import annotations

import json
import sys
import threading
import typing
from dataclasses import dataclass, field
from pathlib import Path

from fasttune.inference.generation import Prompt, Sampling, prompt_ids, stream_answer
from fasttune.inference.loading import Loaded

COMMANDS = {
    "/reset": "forget the conversation (the system prompt stays)",
    "/system TEXT": "set the system prompt (and forget the conversation)",
    "/save FILE": "append the conversation to FILE as one `messages` JSONL row (training data)",
    "/exit": "leave (or Ctrl-D)",
    "/help": "this list",
}


@dataclass
class Conversation:
    system: str | None
    turns: list[dict] = field(default_factory=list)
    """user and assistant messages, alternating, oldest first."""

    def messages(self, turns: list[dict] | None = None) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + (self.turns if turns is None else turns)

    def fitted(self, tokenizer, room: int) -> tuple[list[dict], int, int]:
        """``(messages, exchanges left out, prompt tokens)``: the newest turns whose prompt fits in ``room`` tokens."""
        turns, dropped = list(self.turns), 0
        while True:
            length = len(prompt_ids(tokenizer, Prompt(messages=tuple(self.messages(turns)))))
            if length <= room or len(turns) <= 1:
                return self.messages(turns), dropped, length
            turns, dropped = turns[2:], dropped + 1  # one user message and its answer

    def as_row(self) -> dict:
        return {"messages": self.messages()}


class Chat:
    """One chat session over ``loaded``; ``say`` prints notes (stderr), ``write`` streams answers (stdout)."""

    def __init__(self, loaded: Loaded, sampling: Sampling, system: str | None, compare: bool = False,
                 say: typing.Callable[[str], None] | None = None, write: typing.Callable[[str], None] | None = None):
        self.loaded, self.sampling, self.compare = loaded, sampling, compare
        self.conversation = Conversation(system)
        self.say = say or (lambda text: print(text, file=sys.stderr, flush=True))
        self.write = write or (lambda text: (sys.stdout.write(text), sys.stdout.flush()))

    def command(self, line: str) -> bool:
        """Do a ``/command``; False for ``/exit``."""
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        if name == "/exit":
            return False
        if name == "/reset":
            self.conversation.turns.clear()
            self.say("(conversation forgotten)")
        elif name == "/system":
            self.conversation = Conversation(rest or None)
            self.say(f"(system prompt {'set' if rest else 'removed'}; conversation forgotten)")
        elif name == "/save":
            self.save(rest)
        elif name == "/help":
            self.say("\n".join(f"  {usage:<14} {what}" for usage, what in COMMANDS.items()))
        else:
            from fasttune.errors import suggest

            hint = suggest(name, [c.split()[0] for c in COMMANDS])
            self.say(f"unknown command {name}{'; ' + hint if hint else ''} (/help lists them)")
        return True

    def save(self, file: str) -> None:
        from fasttune.atomic_io import atomic_write_text

        if not file:
            self.say("/save needs a file: /save chats.jsonl")
            return
        if not any(t["role"] == "assistant" for t in self.conversation.turns):
            self.say("nothing to save yet: no answer in this conversation")
            return
        path = Path(file).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            before = path.read_text(encoding="utf-8") if path.is_file() else ""
            if before and not before.endswith("\n"):
                before += "\n"
            atomic_write_text(path, before + json.dumps(self.conversation.as_row(), ensure_ascii=False) + "\n")
        except OSError as err:
            self.say(f"could not save to {path}: {err.strerror or err}")
            return
        self.say(f"(saved the conversation, {len(self.conversation.messages())} messages, to {path})")

    def ask(self, text: str) -> None:
        """Answer ``text``, streamed (twice with ``compare``); the tuned answer joins the history."""
        self.conversation.turns.append({"role": "user", "content": text})
        room = self.loaded.context - self.sampling.max_new_tokens
        messages, dropped, length = self.conversation.fitted(self.loaded.tokenizer, room)
        if length > room:
            self.conversation.turns.pop()
            self.say("this message " + "; ".join(too_long(length, self.loaded.context, self.sampling.max_new_tokens)))
            return
        if dropped:
            self.say(f"(history: the oldest {dropped} exchange{'s' * (dropped > 1)} left out to fit {room} prompt tokens: the "
                     f"model's context of {self.loaded.context} less --max-new-tokens {self.sampling.max_new_tokens}; a lower "
                     "--max-new-tokens keeps more)")
        prompt = Prompt(messages=tuple(messages))
        if self.compare:
            self.write("base:  ")
            self._stream(prompt, adapter=False)
            self.write("tuned: ")
        answer = self._stream(prompt, adapter=True)
        self.conversation.turns.append({"role": "assistant", "content": answer})

    def _stream(self, prompt: Prompt, adapter: bool) -> str:
        stop, pieces = threading.Event(), []
        answer = stream_answer(self.loaded.model, self.loaded.tokenizer, prompt, self.sampling, self.loaded.stops, stop, adapter)
        try:
            for piece in answer:
                pieces.append(piece)
                self.write(piece)
        except KeyboardInterrupt:
            stop.set()
            self.write(" [stopped]")
        finally:
            answer.close()
        self.write("\n")
        return "".join(pieces).strip()


def too_long(length: int, context: int, max_new_tokens: int) -> tuple[str, str]:
    """``(rule, fix)``: why a prompt of ``length`` tokens cannot be answered, and what to change."""
    fix = ("shorten it" if length >= context else
           f"shorten it, or lower --max-new-tokens to {context - length} or less")
    return (f"is {length} tokens with the system prompt: more than the {context - max_new_tokens} the model's "
            f"context ({context}) leaves beside --max-new-tokens {max_new_tokens}", fix)


def interactive(chat: Chat, read: typing.Callable[[str], str] = input) -> int:
    """The read-answer loop of a terminal: until ``/exit`` or end of input (Ctrl-D)."""
    try:  # line editing and history for input(), and no 4 KiB limit on a pasted line (the tty's own)
        import readline  # noqa: F401
    except ImportError:  # not built into every Python
        pass
    chat.say("type a message; /help for commands, /exit or Ctrl-D to leave")
    while True:
        try:
            line = read("> ").strip()
        except EOFError:
            chat.write("\n")
            return 0
        except KeyboardInterrupt:
            chat.write("\n")
            chat.say("(Ctrl-C stops an answer; /exit or Ctrl-D leaves)")
            continue
        if not line:
            continue
        if line.startswith("/"):
            if not chat.command(line):
                return 0
            continue
        try:
            chat.ask(line)
        except KeyboardInterrupt:  # before the answer began, or after it stopped: the chat goes on
            turns = chat.conversation.turns
            if turns and turns[-1]["role"] == "user":
                turns.pop()
            chat.write("\n")
            chat.say("(stopped)")
