"""``python -m fasttune chat`` and ``python -m fasttune generate`` on a finished run.

One tiny real-architecture run (a random llama with SmolLM2's ChatML tokenizer, 3 LoRA steps,
merged/ exported) is talked to in a real terminal (a pty: streaming, Ctrl-C, the /commands,
Ctrl-D), answers one ``--prompt`` exactly as transformers' own greedy ``generate`` does, and
answers its held-out rows (and files of prompts) in batches exactly as one by one. The user's
mistakes are said, by name, before any model loads. Four subprocesses in all (training, the
terminal, ``--prompt --merged``, ``generate``); the last two start together with the terminal's.
"""
from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import torch
from fixtures.real_tokenizers import load_tokenizer
from fixtures.tiny_models import build_tiny_model, write_chat_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from fasttune import cli
from fasttune.config import DataSection
from fasttune.data.rows import read_data, read_rows
from fasttune.inference import loading
from fasttune.inference.generation import Prompt, Sampling, answer_all, prompt_ids
from fasttune.inference.prompts import prompt_and_reference
from fasttune.prepare import resolve_finished_run

pytestmark = pytest.mark.slow

SYSTEM = "Answer briefly."  # the run's data.system_prompt
EVAL_MAX_NEW = 24  # the run's eval.max_new_tokens: generate's default answer length
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished demo-recipe run on a tiny llama: adapter/ and merged/ (bfloat16), 3 rows held out."""
    root = tmp_path_factory.mktemp("chat")
    model = build_tiny_model("llama", load_tokenizer("smollm2"), root / "model")
    data = root / "chat.jsonl"
    write_chat_jsonl(data, 12)
    run_dir = root / "run"
    overrides = [f"model.name={model}", f"data.path={data}", "data.eval_fraction=0.25", f"data.system_prompt={SYSTEM}",
                 "eval.task=null", f"eval.max_new_tokens={EVAL_MAX_NEW}", "export.merged=true", "export.gguf=[]",
                 "train.max_steps=3", f"train.output_dir={run_dir}"]
    result = subprocess.run([sys.executable, "-m", "fasttune", "recipe", "demo", *overrides],
                            capture_output=True, text=True, timeout=300, cwd=root, env=ENV)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file() and (run_dir / "merged" / "config.json").is_file()
    return run_dir


class Background:
    """Verbs started together in subprocesses, their output in files (so no pipe can fill up)."""

    def __init__(self, folder: Path, commands: dict[str, list[str]]):
        self.folder, self.started = folder, {}
        for name, args in commands.items():
            with open(folder / f"{name}.out", "wb") as out, open(folder / f"{name}.err", "wb") as err:
                self.started[name] = subprocess.Popen([sys.executable, "-m", "fasttune", *args], stdout=out, stderr=err, env=ENV)

    def result(self, name: str, timeout: int = 300) -> subprocess.CompletedProcess:
        """Its exit code, stdout and stderr (decoded as they are: an answer may hold a \\r, so no newline translation)."""
        code = self.started[name].wait(timeout)
        out, err = ((self.folder / f"{name}.{kind}").read_bytes() for kind in ("out", "err"))
        return subprocess.CompletedProcess(self.started[name].args, code, out.decode("utf-8"),
                                           err.decode("utf-8", errors="replace"))

    def stop(self) -> None:
        for process in self.started.values():
            if process.poll() is None:
                process.kill()
                process.wait()


TEXT = "What is two plus two?"


@pytest.fixture(scope="module")
def background(run, tmp_path_factory):
    """The subprocesses of the one-prompt and generate tests, started at once: on 2 cores their ~15 s of
    imports each overlap the terminal session's (the terminal test asks for this fixture for that alone)."""
    folder = tmp_path_factory.mktemp("background")
    started = Background(folder, {"merged": ["chat", str(run), "--prompt", TEXT, "--merged", "--max-new-tokens", "16"],
                                  "generate": ["generate", str(run), "--out", str(folder / "answers.jsonl")]})
    yield started
    started.stop()


@pytest.fixture(scope="module")
def adapter(run):
    """fasttune's own loading of the run (its base + adapter, float32, CPU), in this process."""
    return loading.load(loading.locate(str(run)), force_cpu=True)


def _greedy(model, tokenizer, messages: list[dict], max_new_tokens: int) -> str:
    """transformers alone: the chat template, greedy, one prompt (no padding), cut at EOS."""
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**encoded, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    new = out[0, encoded["input_ids"].shape[1]:].tolist()
    if tokenizer.eos_token_id in new:
        new = new[:new.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------------------------
# A real terminal
# ---------------------------------------------------------------------------------------------


class Terminal:
    """A child process on a pseudo-terminal, driven like ``expect``: what it shows is read as bytes."""

    def __init__(self, argv: list[str], env: dict):
        pid, fd = pty.fork()
        if pid == 0:  # the child: its stdin/stdout/stderr are the terminal
            try:
                attrs = termios.tcgetattr(0)
                attrs[3] |= termios.NOFLSH  # Ctrl-C must not throw away answer text not yet read
                termios.tcsetattr(0, termios.TCSANOW, attrs)
                # wide enough that readline echoes a typed line whole rather than scrolling it sideways
                fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 1000, 0, 0))
                os.execvpe(argv[0], argv, env)
            finally:
                os._exit(127)
        self.pid, self.fd, self.pending, self.status = pid, fd, b"", None

    def _read(self, deadline: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return False
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            chunk = b""
        if not chunk:
            raise EOFError(f"the terminal closed; it showed last: {self.pending[-800:]!r}")
        self.pending += chunk
        return True

    def expect(self, marker: bytes, timeout: float = 60) -> bytes:
        """Everything shown up to and including ``marker`` (consumed)."""
        deadline = time.monotonic() + timeout
        while marker not in self.pending:
            if not self._read(deadline):
                raise TimeoutError(f"no {marker!r} within {timeout} s; the terminal showed last: {self.pending[-800:]!r}")
        end = self.pending.index(marker) + len(marker)
        shown, self.pending = self.pending[:end], self.pending[end:]
        return shown

    def at_least(self, count: int, timeout: float = 60) -> bytes:
        """The first ``count`` or more bytes shown (not consumed)."""
        deadline = time.monotonic() + timeout
        while len(self.pending) < count:
            if not self._read(deadline):
                raise TimeoutError(f"under {count} bytes within {timeout} s: {self.pending!r}")
        return self.pending

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def line(self, text: str) -> bytes:
        """Type ``text`` and Enter; the terminal's echo of it is consumed."""
        self.send(text.encode() + b"\n")
        return self.expect(text.encode() + b"\r\n", timeout=10)

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = status
                return os.waitstatus_to_exitcode(status)
            try:
                self._read(min(deadline, time.monotonic() + 0.1))
            except EOFError:
                pass
        raise TimeoutError(f"still running after {timeout} s; it showed last: {self.pending[-800:]!r}")

    def close(self) -> None:
        if self.status is None:
            try:
                os.kill(self.pid, 9)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        os.close(self.fd)


def _shown_text(shown: bytes) -> str:
    """Terminal bytes as the program wrote them: the echo of Ctrl-C out, \\r\\n back to \\n."""
    return shown.replace(b"^C", b"").decode("utf-8", errors="replace").replace("\r\n", "\n")


PROMPT = b"\r\n> "  # a new input prompt, after a line
CHAT_MAX_NEW = 120  # ~80 tokens/s on 2 cores: time enough to see an answer being written and to stop it


@pytest.mark.usefixtures("background")
def test_chat_in_a_terminal_streams_stops_saves_resets_and_leaves(run, adapter, tmp_path):
    saved, nothing = tmp_path / "chats.jsonl", tmp_path / "nothing.jsonl"
    question, other = "What is the capital of France?", "Say hello in Spanish."
    term = Terminal([sys.executable, "-m", "fasttune", "chat", str(run), "--max-new-tokens", str(CHAT_MAX_NEW)],
                    {**ENV, "TERM": "dumb"})  # dumb: no escape sequences, should readline ever be loaded
    try:
        startup = term.expect(b"> ", timeout=180)
        assert b"fasttune chat: adapter " in startup and b"template chatml" in startup, startup
        assert b"/help for commands" in startup

        # 1. The answer streams: text is on screen while it is still being written; Ctrl-C stops it.
        term.line(question)
        early = term.at_least(24)  # the first pieces (CHAT_MAX_NEW tokens take a second or more)
        assert b"\n> " not in early and b"[stopped]" not in early, early
        term.send(b"\x03")
        partial = term.expect(b" [stopped]", timeout=30)
        assert term.expect(b"> ", timeout=10) == PROMPT  # the chat goes on, at once
        streamed = _shown_text(partial[:-len(b" [stopped]")]).strip()
        assert streamed

        # 2. /save: one `messages` row, training data for fasttune's own reader.
        term.line(f"/save {saved}")
        assert b"(saved the conversation, 3 messages, to " in term.expect(PROMPT)
        first = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question},
                              {"role": "assistant", "content": streamed}]}
        assert _rows(saved) == [first]
        rows, report = read_rows([str(saved)], DataSection(path=str(saved)), key="--data")
        assert rows == [first] and report.format == "messages" and report.rows_kept == 1

        # 3. /reset forgets the conversation: nothing left to save.
        term.line("/reset")
        assert b"(conversation forgotten)" in term.expect(PROMPT)
        term.line(f"/save {nothing}")
        assert b"nothing to save yet" in term.expect(PROMPT)
        assert not nothing.exists()

        # 4. Unknown commands are said and the chat goes on; Ctrl-C at the prompt does not leave.
        term.line("/bogus")
        said = term.expect(PROMPT)
        assert b"unknown command /bogus" in said and b"/help lists them" in said, said
        term.line("/sytem Be terse.")
        assert b"did you mean `/system`?" in term.expect(PROMPT)
        time.sleep(0.5)  # in the read of the line: a SIGINT just before it blocks is only seen after the next line (CPython)
        term.send(b"\x03")
        assert b"Ctrl-D leaves" in term.expect(PROMPT, timeout=20)

        # 5. /system replaces the system prompt; a whole answer ends with a new prompt; /save appends.
        term.line("/system Be terse.")
        assert b"(system prompt set; conversation forgotten)" in term.expect(PROMPT)
        term.line(other)
        whole = term.expect(PROMPT, timeout=120)
        assert b"[stopped]" not in whole
        answer = _shown_text(whole[:-len(PROMPT)]).strip()
        term.line(f"/save {saved}")
        term.expect(PROMPT)
        second = {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": other},
                               {"role": "assistant", "content": answer}]}
        assert _rows(saved) == [first, second]
        expected = answer_all(adapter.model, adapter.tokenizer, [Prompt(messages=tuple(second["messages"][:2]))],
                              Sampling(max_new_tokens=CHAT_MAX_NEW), adapter.stops)[0]
        assert answer == expected.strip()  # the streamed answer is the greedy one of that conversation

        # 6. Ctrl-D leaves, exit code 0.
        term.send(b"\x04")
        assert term.wait() == 0
    finally:
        term.close()


# ---------------------------------------------------------------------------------------------
# One prompt
# ---------------------------------------------------------------------------------------------

def test_one_prompt_prints_only_the_greedy_answer(run, background, capsys):
    merged = background.result("merged")  # chat RUN --prompt TEXT --merged --max-new-tokens 16
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert "fasttune chat: merged model " in merged.stderr

    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TEXT}]
    tokenizer = AutoTokenizer.from_pretrained(run / "merged")
    model = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32).eval()
    expected = _greedy(model, tokenizer, messages, 16)
    assert expected.strip()
    assert merged.stdout == expected.strip() + "\n", (merged.stdout, expected)  # the answer alone, its edges trimmed

    # Without --merged: the adapter on its float32 base, as peft alone answers.
    assert cli.main(["chat", str(run), "--prompt", TEXT, "--max-new-tokens", "16", "--cpu"]) == 0
    out = capsys.readouterr().out
    from peft import PeftModel

    recipe = resolve_finished_run(run)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(recipe.model.name, dtype=torch.float32),
                                     run / "adapter").eval()
    assert out == _greedy(peft, tokenizer, messages, 16).strip() + "\n"

    # The two may differ (they do here, after a few tokens) only by merged/'s bfloat16 rounding: merged/
    # holds exactly the float32 merge rounded to bfloat16, and that rounding alone gives --merged's answer.
    full = peft.merge_and_unload().state_dict()
    saved = model.state_dict()
    assert saved.keys() == full.keys()
    assert all(torch.equal(saved[k], full[k].to(torch.bfloat16).float()) for k in saved)


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------


def test_generate_answers_held_out_rows_batched_as_one_by_one(run, background, adapter):
    result = background.result("generate")  # generate RUN --out OUT: the held-out rows, the run's eval.max_new_tokens
    out = background.folder / "answers.jsonl"
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 answers to the run's held-out rows" in " ".join(result.stdout.split())

    recipe = resolve_finished_run(run)
    assert recipe.eval.max_new_tokens == EVAL_MAX_NEW
    held = read_data(recipe).eval
    assert len(held) == 3  # 12 rows, eval_fraction 0.25
    pairs = [prompt_and_reference(row) for row in held]
    records = _rows(out)
    assert [r["prompt"] for r in records] == [list(p.messages) for p, _ in pairs]
    assert [r["reference"] for r in records] == [ref for _, ref in pairs]
    assert all(set(r) == {"prompt", "reference", "answer"} for r in records)
    originals = [row["messages"] for row in map(json.loads, Path(recipe.data.path).read_text().splitlines())]
    for r in records:  # each is a row of the data file (with the run's system prompt where it had none)
        whole = r["prompt"] + [{"role": "assistant", "content": r["reference"]}]
        assert whole[0]["role"] == "system"
        assert whole in originals or whole[1:] in originals and whole[0]["content"] == SYSTEM

    prompts = [p for p, _ in pairs]
    assert len({len(prompt_ids(adapter.tokenizer, p)) for p in prompts}) > 1  # so the batch was padded on the left
    one_by_one = answer_all(adapter.model, adapter.tokenizer, prompts, Sampling(max_new_tokens=recipe.eval.max_new_tokens),
                            adapter.stops, batch_size=1)
    assert [r["answer"] for r in records] == one_by_one
    assert any(a.strip() for a in one_by_one)


def test_generate_over_prompt_only_files_and_never_overwrites(run, adapter, tmp_path, capsys):
    asks = tmp_path / "asks.jsonl"
    questions = ["Name a primary colour.", "Which animal barks, and why does it do that so loudly at night?"]
    asks.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n" for q in questions))
    out = tmp_path / "asks-answers.jsonl"
    assert cli.main(["generate", str(run), "--data", str(asks), "--out", str(out), "--max-new-tokens", "16", "--cpu"]) == 0
    assert "2 answers to " in " ".join(capsys.readouterr().out.split())
    records = _rows(out)
    conversations = [({"role": "system", "content": SYSTEM}, {"role": "user", "content": q}) for q in questions]
    assert [r["prompt"] for r in records] == [list(c) for c in conversations]  # the run's system prompt, as it trained
    assert all(set(r) == {"prompt", "answer"} for r in records)  # no reference: the rows had no answer
    expected = answer_all(adapter.model, adapter.tokenizer, [Prompt(messages=c) for c in conversations],
                          Sampling(max_new_tokens=16), adapter.stops, batch_size=1)
    assert [r["answer"] for r in records] == expected

    texts = tmp_path / "texts.jsonl"
    starts = ["Once upon a time", "The capital of France is"]
    texts.write_text("".join(json.dumps({"prompt": s}) + "\n" for s in starts))
    text_out = tmp_path / "texts-answers.jsonl"
    assert cli.main(["generate", str(run), "--data", str(texts), "--out", str(text_out), "--max-new-tokens", "8", "--cpu"]) == 0
    capsys.readouterr()
    records = _rows(text_out)
    assert [r["prompt"] for r in records] == starts  # plain text: continued as it is
    assert [r["answer"] for r in records] == answer_all(adapter.model, adapter.tokenizer, [Prompt(text=s) for s in starts],
                                                        Sampling(max_new_tokens=8), adapter.stops, batch_size=1)

    before = out.read_bytes()
    assert cli.main(["generate", str(run), "--data", str(asks), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out = '{out}': already exists" in err and "--force" in err
    assert out.read_bytes() == before


# ---------------------------------------------------------------------------------------------
# The user's mistakes, said before any model loads
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broken(run, tmp_path_factory) -> dict[str, Path]:
    """Copies of the run: one without merged/, one whose training did not finish (no adapter/); an empty folder."""
    root = tmp_path_factory.mktemp("broken")
    no_merged, unfinished, empty = root / "no-merged", root / "unfinished", root / "empty"
    for folder in (no_merged, unfinished, empty):
        folder.mkdir()
    for folder in (no_merged, unfinished):
        for name in ("config.yaml", "summary.json"):
            shutil.copy(run / name, folder / name)
    shutil.copytree(run / "adapter", no_merged / "adapter")
    return {"no_merged": no_merged, "unfinished": unfinished, "empty": empty}


MISTAKES = {
    "typo": (lambda run, b: ["chat", str(run.parent / "rnu")],
             lambda run, b: ["RUN_DIR|MODEL", "no such run folder", f"did you mean `{run}`?"]),
    "gguf": (lambda run, b: ["chat", str(run / "gguf" / "demo-q8_0.gguf")],
             lambda run, b: ["RUN_DIR|MODEL", "is a GGUF file", "ollama create"]),
    "neither": (lambda run, b: ["chat", str(b["empty"])],
                lambda run, b: [f"RUN_DIR|MODEL = '{b['empty']}'", "neither config.yaml (a run) nor config.json (a model)"]),
    "compare_merged": (lambda run, b: ["chat", str(run), "--compare", "--merged"],
                       lambda run, b: ["--compare = ", "needs a run with an adapter (this is a merged model)"]),
    "temperature": (lambda run, b: ["chat", str(run), "--temperature", "-1"],
                    lambda run, b: ["--temperature = -1.0: must be 0 (greedy) or more"]),
    "top_p": (lambda run, b: ["chat", str(run), "--top-p", "0"], lambda run, b: ["--top-p = 0.0: must be more than 0"]),
    "max_new_tokens": (lambda run, b: ["chat", str(run), "--max-new-tokens", "0"],
                       lambda run, b: ["--max-new-tokens = 0: must be a whole number >= 1"]),
    "batch_size": (lambda run, b: ["generate", str(run), "--batch-size", "0"],
                   lambda run, b: ["--batch-size = 0: must be 1 or more"]),
    "no_merged": (lambda run, b: ["chat", str(b["no_merged"]), "--merged"],
                  lambda run, b: ["--merged = ", "has no merged/ model", f"python -m fasttune export {b['no_merged']} --merged"]),
    "unfinished": (lambda run, b: ["chat", str(b["unfinished"])],
                   lambda run, b: ["has no adapter/: its training did not finish",
                                   f"python -m fasttune recipe {b['unfinished'] / 'config.yaml'} --resume {b['unfinished']}"]),
    "merged_on_a_model": (lambda run, b: ["chat", str(run.parent / "model"), "--merged"],
                          lambda run, b: ["--merged = ", "only applies to a run folder"]),
    "generate_model_without_data": (lambda run, b: ["generate", str(run.parent / "model")],
                                    lambda run, b: ["--data = (missing): is needed for a model that is not a run folder"]),
    "out_is_a_folder": (lambda run, b: ["generate", str(run), "--out", str(b["empty"]), "--force"],
                        lambda run, b: [f"--out = '{b['empty']}': is a folder"]),
    "out_below_a_file": (lambda run, b: ["generate", str(run), "--out", str(run / "config.yaml" / "answers.jsonl")],
                         lambda run, b: ["--out = ", "cannot be created", "is a file, not a folder"]),
}


@pytest.mark.parametrize("case", list(MISTAKES))
def test_mistakes_are_said_by_name_before_loading(case, run, broken, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the mistake was said")

    monkeypatch.setattr(loading, "load", no_loading)
    argv, said = MISTAKES[case]
    assert cli.main(argv(run, broken)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("fasttune: cannot run this: 1 problem\n"), captured.err
    for words in said(run, broken):
        assert words in captured.err, captured.err


def test_a_mistyped_bare_run_name_is_not_taken_for_a_hub_id(run, capsys, monkeypatch):
    monkeypatch.chdir(run.parent)
    monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    assert cli.main(["chat", run.name[:-1] + "x" + run.name[-1]]) == 2
    err = capsys.readouterr().err
    assert "no such run folder or model folder" in err and f"did you mean `{run.name}`?" in err, err


def test_an_answer_longer_than_the_context_and_an_empty_stdin_are_refused(run, capsys, monkeypatch):
    context = loading.load(loading.locate(str(run)), force_cpu=True).context
    assert cli.main(["chat", str(run), "--prompt", "Hi", "--max-new-tokens", str(context), "--cpu"]) == 2
    assert f"--max-new-tokens = {context}: leaves no room for the prompt" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert cli.main(["chat", str(run)]) == 2
    err = capsys.readouterr().err
    assert "stdin = '': is not a terminal and held no message" in err and "--prompt TEXT" in err, err
