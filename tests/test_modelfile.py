"""Ollama Modelfile: its Go template renders exactly what the Jinja training template renders.

The Go side runs in ``fixtures/go_template.py`` (Go's ``text/template`` semantics) on the values
Ollama builds for ``/api/chat`` (``ollama_values``); the Jinja side is transformers'
``apply_chat_template`` with the training template, as training renders it. A prompt is what the
model sees before it writes: after a final user (or system) message, the chat plus the generation
prompt (``add_generation_prompt=True``); after a final assistant message, the chat with that
message left open, which Ollama continues (``continue_final_message=True``). Where llama.cpp adds
the BOS token itself, the Jinja text's leading BOS is removed before comparing; where the Jinja
trims message content (a Go template cannot), Ollama is given the content already trimmed.
Both rules are checked against the Jinja below rather than assumed.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re

import pytest
from jinja2.exceptions import TemplateError

import fasttune.atomic_io
from fasttune.export.modelfile import (
    MODELFILE_NAME,
    OLLAMA_TEMPLATES,
    go_template,
    ollama_template,
    render_modelfile,
    write_modelfile,
)
from fasttune.families.chat_templates import TEMPLATES, ChatTemplate
from fixtures.go_template import GoTemplateError, render
from fixtures.real_tokenizers import TOKENIZER_FOR, load_tokenizer

GGUF = "model-q4_k_m.gguf"

SYSTEM = {"role": "system", "content": "Answer in one word."}
Q1 = {"role": "user", "content": "What is the capital of France?"}
A1 = {"role": "assistant", "content": "Paris."}
Q2 = {"role": "user", "content": "And of Italy?"}
A2 = {"role": "assistant", "content": "Rome."}
TRICKY_SYSTEM = {"role": "system", "content": 'Be "precise".\nBraces {{ .System }} and {% raw %} are text.'}
TRICKY_Q = {"role": "user", "content": 'He said "hi" {{- end }} }}{{\nLine two: Tōkyō 東京 🙂 \\n'}
TRICKY_A = {"role": "assistant", "content": "Answer:\n  indented\t'single' \"\"\" {# not a comment #}"}
CONVERSATIONS = {
    "first_prompt": [Q1],
    "reply_continued": [Q1, A1],
    "system_prompt": [SYSTEM, Q1],
    "system_reply_continued": [SYSTEM, Q1, A1],
    "multi_turn": [SYSTEM, Q1, A1, Q2],
    "multi_turn_continued": [SYSTEM, Q1, A1, Q2, A2],
    "multi_turn_no_system": [Q1, A1, Q2],
    "tricky_content": [TRICKY_SYSTEM, TRICKY_Q, TRICKY_A, Q2],
    "tricky_no_system": [TRICKY_Q, TRICKY_A, Q2],
    # Leading and trailing whitespace, kept by most templates and trimmed by Llama 3 and Gemma.
    "whitespace": [{"role": "user", "content": "  Hi!\n"}, {"role": "assistant", "content": "\nHello.  "},
                   {"role": "user", "content": "Bye. "}],
    "whitespace_continued": [{"role": "user", "content": " Hi! "}, {"role": "assistant", "content": "Sure, "}],
    "system_midway": [Q1, A1, SYSTEM, Q2],
}
# Chats a training template rejects (it raises), so there is no training prompt to match.
REJECTED = {"mistral": {"system_midway"}}


def _has_system(messages) -> bool:
    return any(m["role"] == "system" for m in messages)


CASES = [
    pytest.param(name, conversation, id=f"{name}-{conversation}")
    for name in TEMPLATES
    for conversation, messages in CONVERSATIONS.items()
    if (ollama_template(TEMPLATES[name]).system or not _has_system(messages))
    and conversation not in REJECTED.get(name, ())
]
WITH_SYSTEM = [name for name in TEMPLATES if ollama_template(TEMPLATES[name]).system]


def _tokenizer(template_name: str):
    """The test tokenizer for a template: only its special tokens matter, the template is passed."""
    return _load_tokenizer(TOKENIZER_FOR[template_name])


@functools.cache
def _load_tokenizer(name: str):
    return load_tokenizer(name)


def jinja_prompt(template: ChatTemplate, messages, **kwargs) -> str:
    """The training template's prompt for ``messages``, without a BOS that llama.cpp adds itself."""
    tokenizer = _tokenizer(template.name)
    continued = messages[-1]["role"] == "assistant"
    text = tokenizer.apply_chat_template(list(messages), chat_template=template.source(), tokenize=False,
                                         add_generation_prompt=not continued, continue_final_message=continued,
                                         **kwargs)
    if ollama_template(template).bos_from_runtime:
        assert text.startswith(tokenizer.bos_token), text
        text = text[len(tokenizer.bos_token):]
    return text


def ollama_values(messages, think: bool | None = None) -> dict:
    """What Ollama passes a ``.Messages`` template for a ``/api/chat`` request (its ``template``
    package): consecutive messages of one role merged with a blank line (tool messages excepted),
    system messages kept in ``.Messages`` and also joined into ``.System``, reasoning in
    ``.Thinking``, the request's ``think`` option in ``.Think`` / ``.IsThinkSet``."""
    merged: list[dict] = []
    for message in messages:
        item = {"Role": message["role"], "Content": message["content"],
                "Thinking": message.get("reasoning_content", ""), "ToolCalls": [], "Images": []}
        if merged and merged[-1]["Role"] == item["Role"] and item["Role"] != "tool":
            merged[-1]["Content"] += "\n\n" + item["Content"]
        else:
            merged.append(item)
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return {"System": system, "Messages": merged, "Tools": [], "Response": "",
            "Think": bool(think), "IsThinkSet": think is not None}


def ollama_prompt(template: ChatTemplate, messages, go_text: str | None = None, think: bool | None = None) -> str:
    """The prompt Ollama renders from the Go template for the same chat."""
    if ollama_template(template).trims_content:
        # A Go template cannot trim; clients send content as they mean it (see test_trimming_rule).
        messages = [{**m, "content": m["content"].strip()} for m in messages]
    return render(go_text if go_text is not None else go_template(template), ollama_values(messages, think))


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    '''(command, value) pairs, read by the rules of Ollama's Modelfile parser.

    A command is a word (``PARAMETER`` takes a name too) and a value. The value ends at the first
    newline (or the end) where the text so far, stripped of surrounding whitespace, is complete:
    unquoted, ``"..."`` or ``"""..."""``; the quotes are removed. ``#`` lines are comments.
    ``FROM`` is reported as ``model``, parameters by their name.
    '''
    commands: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        if text[pos] in " \t\r\n":
            pos += 1
            continue
        if text[pos] == "#":
            pos = text.find("\n", pos) + 1 or len(text)
            continue
        match = re.compile(r"([A-Za-z]+)[ \t]").match(text, pos)
        assert match, f"not a command at {text[pos:pos + 40]!r}"
        name, pos = match.group(1).lower(), match.end()
        assert name in ("from", "template", "system", "parameter", "license", "adapter", "message"), name
        if name == "parameter":
            match = re.compile(r"([A-Za-z0-9_]+)[ \t]").match(text, pos)
            assert match, f"bad parameter at {text[pos:pos + 40]!r}"
            name, pos = match.group(1), match.end()
        start = pos
        while True:
            end = text.find("\n", pos)
            end = len(text) if end < 0 else end
            value = _unquote(text[start:end].strip())
            if value is not None:
                break
            assert end < len(text), f"unterminated {name} value"
            pos = end + 1
        commands.append(("model" if name == "from" else name, value))
        pos = end + 1
    return commands


def _unquote(text: str) -> str | None:
    if text.startswith('"""'):
        return text[3:-3] if len(text) >= 6 and text.endswith('"""') else None
    if text.startswith('"'):
        return text[1:-1] if len(text) >= 2 and text.endswith('"') else None
    return text


def turn_end_problems(template: ChatTemplate, stops) -> list[str]:
    """Replies in a finished Jinja conversation that are not followed by one of ``stops``."""
    messages = [Q1, A1, Q2, A2]
    text = _tokenizer(template.name).apply_chat_template(messages, chat_template=template.source(), tokenize=False)
    problems = []
    for reply in (A1, A2):
        after = text[text.index(reply["content"]) + len(reply["content"]):]
        if not any(after.startswith(stop) for stop in stops):
            problems.append(f"{reply['content']!r} is followed by {after[:20]!r}, not by one of {list(stops)}")
    return problems


# --- the Go interpreter itself, on text/template's documented behaviour ---------------------

@pytest.mark.parametrize(("source", "data", "expected"), [
    ("{{23 -}} < {{- 45}}", {}, "23<45"),              # the package documentation's trim example
    ("{{-3}}", {}, "-3"),                              # a number, not a trim marker
    ("a \t\r\n{{- 1 -}}\n\t b", {}, "a1b"),             # all ASCII space, newlines included
    ("a\u00a0{{- 1 }}", {}, "a\u00a01"),                # other spaces are text
    ("<{{- .X -}}>", {"X": " x\n"}, "< x\n>"),          # markers trim template text, never values
    ("{{ if eq .N 1 }}one{{ else if eq .N 2 }}two{{ else }}many{{ end }}", {"N": 2}, "two"),
    ("{{ range $i, $m := .L }}{{ $i }}={{ . }}{{ $.Sep }}{{ end }}", {"L": ["a", "b"], "Sep": ";"}, "0=a;1=b;"),
    ("{{ range .L }}x{{ else }}empty{{ end }}", {"L": []}, "empty"),
    ("{{ $n := 0 }}{{ range $i, $_ := .L }}{{ if eq . \"b\" }}{{ $n = $i }}{{ end }}{{ end }}{{ $n }}",
     {"L": ["a", "b", "c"]}, "1"),                    # = assigns the outer variable from a block
    ("{{ or \"\" \"b\" }}|{{ and \"a\" \"\" }}|{{ and 1 2 }}|{{ not 0 }}", {}, "b||2|true"),
    ("{{ if or true (index .L 9) }}short-circuit{{ end }}", {"L": []}, "short-circuit"),
    ("{{ len (slice .L 1) }} {{ (index .L 2).K }} {{ .L | len }}", {"L": [0, 1, {"K": "v"}]}, "2 v 3"),
    ('{{ "a\\n\\"b\\"" }}{{ `raw\\n` }}', {}, 'a\n"b"raw\\n'),
    ("{{ eq .S \"x\" \"y\" }}{{ ne 1 2 }}{{ gt 2 1 }}{{ le 2 1 }}", {"S": "y"}, "truetruetruefalse"),
])
def test_go_interpreter(source, data, expected):
    assert render(source, data) == expected


@pytest.mark.parametrize("source", [
    '{{ eq 1 "1" }}',            # different kinds
    "{{ index .L 1 }}",          # out of range
    "{{ slice .L 2 }}",
    "{{ .Missing }}",
    "{{ nosuchfunc 1 }}",
    "{{ if true }}unclosed",
    "{{ end }}",
    "{{ $undefined }}",
])
def test_go_interpreter_errors(source):
    with pytest.raises(GoTemplateError):
        render(source, {"L": [1]})


# --- Go template == Jinja template ----------------------------------------------------------

def test_every_training_template_has_a_go_template():
    assert set(OLLAMA_TEMPLATES) == set(TEMPLATES)


@pytest.mark.parametrize(("name", "conversation"), CASES)
def test_go_template_renders_the_training_prompt(name, conversation):
    template = TEMPLATES[name]
    messages = CONVERSATIONS[conversation]
    assert ollama_prompt(template, messages) == jinja_prompt(template, messages)


@pytest.mark.parametrize("think", [None, True, False])
@pytest.mark.parametrize("conversation", ["first_prompt", "multi_turn"])
def test_qwen3_think_option(conversation, think):
    template = TEMPLATES["qwen3"]
    messages = CONVERSATIONS[conversation]
    kwargs = {} if think is None else {"enable_thinking": think}
    assert ollama_prompt(template, messages, think=think) == jinja_prompt(template, messages, **kwargs)


@pytest.mark.parametrize("messages", [
    [Q1, {**A1, "reasoning_content": "France's capital.\nEasy."}],                  # continued: reasoning shown
    [Q1, {**A1, "reasoning_content": "France's capital."}, Q2],                      # history: reasoning dropped
    [Q1, {**A1, "reasoning_content": "First."}, Q2, {**A2, "reasoning_content": "Second."}],
], ids=["continued", "history", "both"])
def test_qwen3_reasoning(messages):
    template = TEMPLATES["qwen3"]
    assert ollama_prompt(template, messages) == jinja_prompt(template, messages)


@pytest.mark.parametrize("name", TEMPLATES)
def test_bos_rule_matches_the_jinja(name):
    """``bos_from_runtime`` exactly where the Jinja renders ``bos_token``, and then only at the start."""
    template = TEMPLATES[name]
    sentinel = "<BOS-SENTINEL>"
    text = _tokenizer(name).apply_chat_template([SYSTEM, Q1, A1, Q2, A2] if name != "gemma" else [Q1, A1, Q2, A2],
                                                chat_template=template.source(), tokenize=False, bos_token=sentinel)
    if ollama_template(template).bos_from_runtime:
        assert text.startswith(sentinel) and text.count(sentinel) == 1
        assert _tokenizer(name).bos_token not in go_template(template)
    else:
        assert sentinel not in text


@pytest.mark.parametrize("name", TEMPLATES)
def test_trimming_rule(name):
    """``trims_content`` exactly where the Jinja trims: elsewhere padded content matches as sent."""
    template = TEMPLATES[name]
    messages = CONVERSATIONS["whitespace"]
    as_sent = render(go_template(template), ollama_values(messages))
    assert (as_sent == jinja_prompt(template, messages)) != ollama_template(template).trims_content


def test_gemma_has_no_system_role():
    gemma = TEMPLATES["gemma"]
    with pytest.raises(TemplateError, match="System role not supported"):
        jinja_prompt(gemma, [SYSTEM, Q1])
    # Ollama cannot refuse: the Go template leaves system messages out, Gemma never saw one.
    assert render(go_template(gemma), ollama_values([SYSTEM, Q1])) == ollama_prompt(gemma, [Q1])
    with pytest.raises(ValueError, match="system prompt"):
        render_modelfile(GGUF, gemma, system="Answer in one word.")


@pytest.mark.parametrize(("name", "old", "new"), [
    ("chatml", "<|im_start|>assistant\n{{ end }}", "<|im_start|>assistant{{ end }}"),  # generation prompt newline
    ("chatml", "<|im_end|>\n{{ end }}", "<|im_end|>{{ end }}"),                       # newline after a turn
    ("llama3", "<|end_header_id|>\n\n{{ .Content }}", "<|end_header_id|>\n{{ .Content }}"),
    ("mistral", "{{ .Content }}[/INST]", "{{ .Content }} [/INST]"),
    ("phi3", "<|end|>\n{{ end }}", "<|eot_id|>\n{{ end }}"),                          # wrong end-of-turn token
])
def test_negative_control_a_broken_go_template_is_caught(name, old, new):
    template = TEMPLATES[name]
    broken = go_template(template).replace(old, new)
    assert broken != go_template(template)
    messages = CONVERSATIONS["multi_turn_no_system"]
    assert ollama_prompt(template, messages, go_text=broken) != jinja_prompt(template, messages)


@pytest.mark.parametrize("name", TEMPLATES)
def test_stop_strings_end_every_reply(name):
    template = TEMPLATES[name]
    stops = [value for command, value in parse_modelfile(render_modelfile(GGUF, template)) if command == "stop"]
    assert stops == list(template.stop)
    assert turn_end_problems(template, stops) == []


def test_negative_control_a_wrong_stop_string_is_caught():
    chatml = TEMPLATES["chatml"]
    assert turn_end_problems(chatml, ["<|eot_id|>", "<|im_start|>"]) != []
    assert turn_end_problems(chatml, ["<|im_end|>"]) == []


# --- the Modelfile ---------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "system"), [(name, None) for name in TEMPLATES]
                         + [(name, 'Be "brief".\n  Very brief.  "') for name in WITH_SYSTEM])
def test_modelfile_parses(name, system):
    template = TEMPLATES[name]
    text = render_modelfile(GGUF, template, system=system, parameters={"num_ctx": 4096, "temperature": 0.7})
    assert text.startswith(f"FROM ./{GGUF}\n")
    assert render_modelfile(f"./{GGUF}", template, system=system, parameters={"num_ctx": 4096, "temperature": 0.7}) == text
    commands = parse_modelfile(text)
    assert commands[0] == ("model", f"./{GGUF}")
    assert commands[1] == ("template", go_template(template))
    assert [v for c, v in commands if c == "stop"] == list(template.stop)
    assert template.end_of_turn in template.stop
    assert [(c, v) for c, v in commands if c in ("num_ctx", "temperature")] == [("num_ctx", "4096"), ("temperature", "0.7")]
    assert [v for c, v in commands if c == "system"] == ([system] if system else [])
    assert len(commands) == 4 + len(template.stop) + bool(system)


@pytest.mark.parametrize("name", WITH_SYSTEM)
def test_modelfile_system_reaches_the_prompt(name):
    """Ollama puts SYSTEM in front of a chat that has no system message; the prompt is then the
    training prompt of the chat with that system message."""
    template = TEMPLATES[name]
    commands = dict(parse_modelfile(render_modelfile(GGUF, template, system=TRICKY_SYSTEM["content"])))
    chat = [Q1, A1, Q2]
    sent = [{"role": "system", "content": commands["system"]}, *chat]
    assert ollama_prompt(template, sent, go_text=commands["template"]) == jinja_prompt(template, [TRICKY_SYSTEM, *chat])


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"system": 'Say """hi"""'}, '"""'),
    ({"system": "zero\u200bwidth"}, "drop"),
    ({"system": "bell\x07"}, "drop"),
    ({"gguf_filename": "sub/model.gguf"}, "file name"),
    ({"gguf_filename": " model.gguf"}, "file name"),
    ({"parameters": {"stop": "<|im_end|>"}}, "stop strings"),
    ({"parameters": {"temperature": None}}, "number"),
    ({"parameters": {"bad name": 1}}, "letters"),
])
def test_modelfile_refuses_what_it_cannot_write(kwargs, match):
    arguments = {"gguf_filename": GGUF, "template": TEMPLATES["chatml"], **kwargs}
    with pytest.raises(ValueError, match=match):
        render_modelfile(**arguments)


def test_modelfile_refuses_a_template_with_triple_quotes(monkeypatch):
    original = OLLAMA_TEMPLATES["chatml"]
    monkeypatch.setitem(OLLAMA_TEMPLATES, "chatml", dataclasses.replace(original, text=original.text + '"""'))
    with pytest.raises(ValueError, match='"""'):
        render_modelfile(GGUF, TEMPLATES["chatml"])


def test_unknown_template_is_refused():
    unknown = dataclasses.replace(TEMPLATES["chatml"], name="nosuch")
    with pytest.raises(KeyError, match="no Ollama template"):
        go_template(unknown)


# --- writing it ------------------------------------------------------------------------------

def _gguf_folder(tmp_path):
    (tmp_path / GGUF).write_bytes(b"GGUF")
    return tmp_path


def test_write_modelfile(tmp_path):
    folder = _gguf_folder(tmp_path)
    path = write_modelfile(folder, GGUF, TEMPLATES["llama3"], system="Be brief.", parameters={"num_ctx": 4096})
    assert path == folder / MODELFILE_NAME
    # Bytes as rendered: no newline translation anywhere.
    expected = render_modelfile(GGUF, TEMPLATES["llama3"], system="Be brief.", parameters={"num_ctx": 4096})
    assert path.read_bytes() == expected.encode("utf-8")
    assert sorted(os.listdir(folder)) == sorted([GGUF, MODELFILE_NAME])


def test_write_modelfile_replaces_an_old_one(tmp_path):
    folder = _gguf_folder(tmp_path)
    (folder / MODELFILE_NAME).write_text("FROM old\n")
    write_modelfile(folder, GGUF, TEMPLATES["chatml"])
    assert (folder / MODELFILE_NAME).read_text(encoding="utf-8") == render_modelfile(GGUF, TEMPLATES["chatml"])
    assert sorted(os.listdir(folder)) == sorted([GGUF, MODELFILE_NAME])


def test_write_modelfile_keeps_the_old_one_on_failure(tmp_path, monkeypatch):
    folder = _gguf_folder(tmp_path)
    (folder / MODELFILE_NAME).write_text("FROM old\n")
    with pytest.raises(ValueError):  # refused before anything is written
        write_modelfile(folder, GGUF, TEMPLATES["gemma"], system="Be brief.")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(fasttune.atomic_io.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):  # fails at the last step
        write_modelfile(folder, GGUF, TEMPLATES["chatml"])
    monkeypatch.undo()
    assert (folder / MODELFILE_NAME).read_text() == "FROM old\n"
    assert sorted(os.listdir(folder)) == sorted([GGUF, MODELFILE_NAME])


def test_write_modelfile_needs_the_gguf(tmp_path):
    with pytest.raises(FileNotFoundError, match=GGUF):
        write_modelfile(tmp_path, GGUF, TEMPLATES["chatml"])
    assert os.listdir(tmp_path) == []
