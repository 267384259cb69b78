'''Ollama ``Modelfile`` for an exported GGUF: the training chat template, as a Go template.

Why: Ollama does not run the Jinja chat template a model was fine-tuned with. It builds every
prompt from the ``TEMPLATE`` of the Modelfile (a Go ``text/template``) and stops generating at
its ``PARAMETER stop`` strings. If the template differs from the training one by a header, a
newline or a token, or a stop string is missing, the model sees prompts it was never trained on
or talks past its end of turn (answers for the user, repeats itself): the most common failure of
exported fine-tunes. So each training template in ``families/templates`` has a Go counterpart
here that renders the same text, and the tests (``tests/test_modelfile.py``) check this for every
template with a Go interpreter against transformers' own rendering of the Jinja.

What Ollama gives a template that ranges over ``.Messages`` (its ``template`` package and
``/api/chat`` handler), which the Go templates rely on:

* ``.Messages``: the chat, system messages included, each with ``.Role``, ``.Content`` and
  ``.Thinking`` (reasoning, for Qwen3); consecutive messages of one role are first merged into
  one, joined by a blank line. The Modelfile's ``SYSTEM`` is put in front as a system message
  when the request does not start with one.
* ``.System``: the contents of all system messages, joined by a blank line.
* ``.Think`` / ``.IsThinkSet``: the request's ``think`` option and whether it was given.
* When the last message is the assistant's, Ollama continues it (prefill): its end of turn must
  not be rendered. That is transformers' ``continue_final_message=True``; otherwise the prompt
  ends with the assistant header, as ``add_generation_prompt=True`` renders it.

BOS rule: llama.cpp, which runs the GGUF, puts the vocabulary's BOS token in front of the prompt
itself when the GGUF says ``add_bos_token`` (true for Llama 3, Mistral and Gemma). The training
templates of exactly those families start with ``bos_token``; their Go templates leave it out,
or the prompt would start with two. Every other template renders no BOS, and neither does its
Go template.

What a Go template cannot do (Ollama offers no string functions), so the two differ here:

* ``llama3`` and ``gemma`` trim every message (``| trim``); Ollama passes content as sent.
  Identical for content without leading or trailing whitespace.
* ``qwen3`` strips newlines around the reasoning and before the final reply, and splits reasoning
  written inline as ``<think>...</think>`` out of the content; the Go template takes the reasoning
  from ``.Thinking``, which is where Ollama keeps it (Ollama versions with thinking support).
* Tools: transformers renders tool definitions and calls with Python's ``json.dumps`` spacing,
  Ollama's ``json`` with Go's compact, HTML-escaping encoder, so no Go template matches them.
  The Go templates render plain conversations (system, user, assistant); tool messages and calls
  are left out.
* Templates that raise on a malformed chat (roles not alternating, a system message where none is
  allowed) cannot raise in Go: ``gemma`` drops system messages, since Gemma was never trained
  with one, and ``render_modelfile`` refuses a ``SYSTEM`` prompt for it.

Modelfile quoting (Ollama's parser): a value runs to the end of its line unless quoted;
``"""..."""`` may span lines and ends at the first line that ends with ``"""``, so a value holding
``"""`` cannot be written and is refused, as is any character that parser drops (control and
format characters other than newline and tab, and spaces other than the ASCII space).
'''
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from fasttune.atomic_io import atomic_file
from fasttune.export.refusals import NoOllamaTemplate, no_ollama_template
from fasttune.families.chat_templates import ChatTemplate

MODELFILE_NAME = "Modelfile"


@dataclass(frozen=True)
class OllamaTemplate:
    """The Go template for one training template, and how the two relate."""

    text: str
    """Go ``text/template`` source, for ``TEMPLATE``."""
    bos_from_runtime: bool = False
    """The Jinja starts with ``bos_token``, which llama.cpp adds itself; the Go text leaves it out."""
    system: bool = True
    """The Jinja accepts a system message."""
    trims_content: bool = False
    """The Jinja trims message content (``| trim``), which a Go template cannot."""


# `$last`: this is the final message. A final assistant message is continued (no end of turn);
# after any other final message comes the assistant header (the generation prompt).
_LAST = "{{- $last := eq (len (slice $.Messages $i)) 1 }}"

OLLAMA_TEMPLATES: dict[str, OllamaTemplate] = {
    "chatml": OllamaTemplate("""\
{{- range $i, $m := .Messages }}
""" + _LAST + """
{{- if and (eq $i 0) (ne .Role "system") }}<|im_start|>system
You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
{{ end }}<|im_start|>{{ .Role }}
{{ .Content }}
{{- if not (and $last (eq .Role "assistant")) }}<|im_end|>
{{ end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}"""),
    "llama3": OllamaTemplate("""\
{{- range $i, $m := .Messages }}
""" + _LAST + """<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}
{{- if not (and $last (eq .Role "assistant")) }}<|eot_id|>{{ end }}
{{- if and $last (ne .Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- end }}""", bos_from_runtime=True, trims_content=True),
    # The system prompt goes into the last user message (mistral-common's rule, which the Jinja
    # follows); the Jinja's generation prompt is empty: the prompt ends with [/INST].
    "mistral": OllamaTemplate("""\
{{- $lastUser := -1 }}
{{- range $i, $m := .Messages }}{{ if eq .Role "user" }}{{ $lastUser = $i }}{{ end }}{{ end }}
{{- range $i, $m := .Messages }}
""" + _LAST + """
{{- if eq .Role "user" }}[INST] {{ if and (eq $i $lastUser) $.System }}{{ $.System }}

{{ end }}{{ .Content }}[/INST]
{{- else if eq .Role "assistant" }} {{ .Content }}{{ if not $last }}</s>{{ end }}
{{- end }}
{{- end }}""", bos_from_runtime=True),
    "qwen2_5": OllamaTemplate("""\
{{- range $i, $m := .Messages }}
""" + _LAST + """
{{- if and (eq $i 0) (ne .Role "system") }}<|im_start|>system
You are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>
{{ end }}
{{- if or (eq .Role "user") (eq .Role "system") }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ .Content }}
{{- if not $last }}<|im_end|>
{{ end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}"""),
    # The reply after the last user message opens with its reasoning (an empty block if none);
    # earlier replies lose theirs. (The Jinja also keeps reasoning of replies between tool calls;
    # without tool messages, only the final message can follow the last user message.)
    # `think: false` (enable_thinking=False in the Jinja) prefills an empty block.
    "qwen3": OllamaTemplate("""\
{{- $lastUser := len .Messages }}
{{- range $i, $m := .Messages }}{{ if eq .Role "user" }}{{ $lastUser = $i }}{{ end }}{{ end }}
{{- range $i, $m := .Messages }}
""" + _LAST + """
{{- if or (eq .Role "user") (eq .Role "system") }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ if and $last (gt $i $lastUser) }}<think>
{{ .Thinking }}
</think>

{{ end }}{{ .Content }}
{{- if not $last }}<|im_end|>
{{ end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ if and $.IsThinkSet (not $.Think) }}<think>

</think>

{{ end }}
{{- end }}
{{- end }}"""),
    "gemma": OllamaTemplate("""\
{{- range $i, $m := .Messages }}
""" + _LAST + """
{{- if eq .Role "user" }}<start_of_turn>user
{{ .Content }}<end_of_turn>
{{ else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}
{{- if not $last }}<end_of_turn>
{{ end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<start_of_turn>model
{{ end }}
{{- end }}""", bos_from_runtime=True, system=False, trims_content=True),
    "phi3": OllamaTemplate("""\
{{- range $i, $m := .Messages }}
""" + _LAST + """
{{- if eq .Role "system" }}<|system|>
{{ .Content }}<|end|>
{{ else if eq .Role "user" }}<|user|>
{{ .Content }}<|end|>
{{ else if eq .Role "assistant" }}<|assistant|>
{{ .Content }}
{{- if not $last }}<|end|>
{{ end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<|assistant|>
{{ end }}
{{- end }}"""),
}


def ollama_template(template: ChatTemplate) -> OllamaTemplate:
    """The Go counterpart of ``template``; :class:`~fasttune.export.refusals.NoOllamaTemplate` (a
    UserError and a KeyError) if fasttune has none."""
    try:
        return OLLAMA_TEMPLATES[template.name]
    except KeyError:
        raise NoOllamaTemplate(no_ollama_template(template.name, OLLAMA_TEMPLATES), "cannot write the Modelfile") from None


def go_template(template: ChatTemplate) -> str:
    """Ollama Go-template text that renders what the Jinja training ``template`` renders."""
    return ollama_template(template).text


def render_modelfile(gguf_filename: str, template: ChatTemplate, system: str | None = None,
                     parameters: dict | None = None) -> str:
    """The Modelfile text for ``gguf_filename``, a file next to the Modelfile (``./`` optional).

    ``FROM``, ``TEMPLATE``, one ``PARAMETER stop`` per stop string of ``template``, further
    ``parameters`` (name -> number, bool or string; a list or tuple writes one line per item;
    ``stop`` comes from the template only), then ``SYSTEM`` if ``system`` is non-empty.
    ``ValueError`` for what the Modelfile cannot hold or the template does not accept.
    """
    spec = ollama_template(template)
    gguf_filename = gguf_filename.removeprefix("./")
    if template.end_of_turn not in template.stop:
        raise ValueError(f"chat template {template.name!r}: end of turn {template.end_of_turn!r} "
                         f"is not among its stop strings {template.stop}")
    if (os.sep in gguf_filename or "/" in gguf_filename or gguf_filename in ("", ".", "..")
            or gguf_filename != gguf_filename.strip()):
        raise ValueError(f"gguf_filename must be a file name in the Modelfile's folder, not {gguf_filename!r}")
    lines = [
        f"FROM {_line_value('FROM', './' + gguf_filename)}",
        f"TEMPLATE {_block_value('TEMPLATE', spec.text)}",
    ]
    lines += [f"PARAMETER stop {_quoted('stop', stop)}" for stop in template.stop]
    for name, value in (parameters or {}).items():
        if not re.fullmatch(r"[A-Za-z0-9_]+", str(name)):
            raise ValueError(f"parameter name {name!r}: letters, digits and _ only")
        if name == "stop":
            raise ValueError("stop strings come from the chat template; do not pass them as parameters")
        for item in value if isinstance(value, (list, tuple)) else (value,):
            lines.append(f"PARAMETER {name} {_parameter_value(name, item)}")
    if system:
        if not spec.system:
            raise ValueError(f"chat template {template.name!r} does not accept a system prompt "
                             "(the model was trained without one)")
        lines.append(f"SYSTEM {_block_value('SYSTEM', system)}")
    return "\n".join(lines) + "\n"


def write_modelfile(out_dir: Path, gguf_filename: str, template: ChatTemplate, system: str | None = None,
                    parameters: dict | None = None, name: str = MODELFILE_NAME) -> Path:
    """Write ``out_dir/<name>`` (``Modelfile``) for the GGUF ``out_dir/gguf_filename``, atomically.

    The text is rendered (and checked) before anything is written; it goes to a temporary file
    beside the Modelfile, which then replaces it, so a failure leaves any old one intact. Bytes
    are written as rendered (no newline translation: a Windows CRLF would change the template).
    """
    out_dir = Path(out_dir)
    if not (out_dir / gguf_filename).is_file():
        raise FileNotFoundError(f"no GGUF file {gguf_filename!r} in {out_dir}")
    data = render_modelfile(gguf_filename, template, system, parameters).encode("utf-8")
    path = out_dir / name
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return path


def _check_chars(what: str, value: str, newlines: bool) -> None:
    allowed = "\t\n" if newlines else "\t"
    bad = sorted({c for c in value if not (c.isprintable() or c in allowed)})
    if bad:
        raise ValueError(f"{what}: Ollama's Modelfile parser would drop or split on "
                         f"{', '.join(repr(c) for c in bad)}; remove {'them' if len(bad) > 1 else 'it'}")


def check_block_value(what: str, value: str) -> None:
    """``ValueError`` when ``value`` cannot be a triple-quoted Modelfile value (``TEMPLATE``, ``SYSTEM``)."""
    _check_chars(what, value, newlines=True)
    if '"""' in value:
        raise ValueError(f'{what} contains """, which ends a Modelfile triple-quoted value early')


def _block_value(what: str, value: str) -> str:
    """``value`` in triple quotes, spaces and newlines kept exactly."""
    check_block_value(what, value)
    return f'"""{value}"""'


def _quoted(what: str, value: str) -> str:
    """A one-line value in double quotes."""
    _check_chars(what, value, newlines=False)
    if '"' in value or not value:
        raise ValueError(f"{what} value {value!r}: must be non-empty and hold no double quote")
    return f'"{value}"'


def _line_value(what: str, value: str) -> str:
    """A one-line value written as is (FROM)."""
    _check_chars(what, value, newlines=False)
    if '"' in value:
        raise ValueError(f"{what} value {value!r}: must hold no double quote")
    return value


def _parameter_value(name: str, value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _quoted(f"PARAMETER {name}", value)
    raise ValueError(f"PARAMETER {name}: {type(value).__name__} value {value!r} (want a number, bool or string)")
