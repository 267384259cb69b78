"""Every bad input a user can give gets one clean refusal: exit code 2, one message naming the
thing (key, file or flag) with a fix, no traceback, nothing loaded, and nothing the user had changed.

One table of real mistakes is walked through the real entry point ``fasttune.cli.main(argv)`` in
one process (torch and the libraries import once), from a folder that holds a user's files: a tiny
local model, chat data, broken data and recipe files, run folders, output folders that already
hold files of their own. Each case asserts exit code 2, no "Traceback", the offending thing named,
a non-empty ``fix:``, and that every file and folder there is as it was (names, sizes, hashes).
A few cases run again as real processes (``python -m fasttune``), end to end.

``show`` checks fasttune's own rules without importing the libraries, so a library key's *type*
(``lora.r=many``) is refused by ``--dry-run`` (binding to LoraConfig), not by ``show``; its
*range* (``lora.r=0``) is refused by both.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from fasttune.cli import main
from fixtures.bad_inputs import BASE, CASES, CHAT, MODEL, UNWRITABLE, Case, case

# ---------------------------------------------------------------------------------------------
# The user's folder.
# ---------------------------------------------------------------------------------------------

CHAT_ROW = {"messages": [{"role": "user", "content": "Capital of Italy?"}, {"role": "assistant", "content": "Rome."}]}


def _write(root: Path, rel: str, content: str | bytes) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")


def _jsonl(*rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _run_config(model: str, **changes) -> str:
    from fasttune import config

    document = {**config.resolve("demo", [f"model.name={model}", f"data.path={CHAT}"]).to_dict(), "machine": {"dtype": "float32"}}
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        document[section][key] = value
    return yaml.safe_dump(document, sort_keys=False)


def build_world(root: Path) -> None:
    """The files of a user who has made every mistake in the table (and some good files)."""
    import shutil

    import pyarrow
    import pyarrow.parquet

    from fixtures.tiny_models import build_tiny_model, write_chat_jsonl
    from fixtures.real_tokenizers import load_tokenizer

    model = build_tiny_model("llama", load_tokenizer("smollm2"), root / MODEL)
    write_chat_jsonl(root / CHAT, 8)
    _write(root, "mine.yaml", "# my own recipe, not to be overwritten\nextends: demo\n")
    tokenizer_files = [p for p in model.iterdir() if p.name.startswith("tokenizer") or p.suffix == ".jinja"]
    # data
    _write(root, "bad/binary.jsonl", b"\x1f\x8b\x08\x00\x00\x00\x00\x00\xff\x00binary")
    _write(root, "bad/latin1.jsonl", _jsonl(CHAT_ROW).encode() + b'{"text": "caf\xe9"}\n')
    _write(root, "bad/latin1.csv", b"prompt,completion\ncaf\xe9,ok\n")
    _write(root, "bad/binary.json", b"\x00\x01\x02\xff\xfe")
    _write(root, "bad/deep.json", "[" * 5000 + "]" * 5000)
    _write(root, "bad/deep.jsonl", _jsonl(CHAT_ROW) + '{"messages": ' + "[" * 5000 + "]" * 5000 + "}\n")
    _write(root, "bad/invalid.jsonl", _jsonl(CHAT_ROW) + '{"messages": [\n')
    _write(root, "bad/not-objects.jsonl", "[1, 2]\n")
    _write(root, "bad/scalar.json", "42\n")
    _write(root, "bad/empty.jsonl", "")
    _write(root, "bad/nul.csv", b"prompt,completion\nhi\x00,there\n")
    _write(root, "bad/extra-cells.csv", "prompt,completion\nhi,there\nhello,there,again\n")
    _write(root, "bad/broken.parquet", b"PAR1 this is not a parquet body PAR1")
    _write(root, "bad/rows.txt", "one row per line\n")
    (root / "bad" / "emptydir").mkdir(parents=True)
    _write(root, "bad/no-assistant.jsonl", _jsonl({"messages": [{"role": "user", "content": "hi"}]}))
    _write(root, "bad/text.jsonl", _jsonl({"text": "The sky is blue."}, {"text": "Grass is green."}))
    _write(root, "bad/latin1.yaml", b"family: llama\nmodel:\n  name: caf\xe9\n")
    # models
    _write(root, "bad/broken-config/config.json", '{"model_type": "llama",')
    for path in tokenizer_files:
        shutil.copy(path, root / "bad" / "broken-config" / path.name)
    _write(root, "bad/no-tokenizer/config.json", (model / "config.json").read_text())
    _write(root, "bad/no-tokenizer/model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    _write(root, "bad/no-weights/config.json", (model / "config.json").read_text())
    _write(root, "bad/pickled/config.json", (model / "config.json").read_text())
    _write(root, "bad/pickled/pytorch_model.bin", b"PK\x03\x04 a pickle")
    for folder in ("no-weights", "pickled"):
        for path in tokenizer_files:
            shutil.copy(path, root / "bad" / folder / path.name)
    _write(root, "bad/fake.gguf", "not a GGUF file\n")
    # recipe files
    _write(root, "recipes/binary.yaml", b"\x7fELF\x02\x01\x01\x00\x00\x00")
    _write(root, "recipes/latin1.yaml", b"family: llama\nmodel:\n  name: caf\xe9\n")
    _write(root, "recipes/bad-indent.yaml", "family: llama\nmodel:\n  name: x\n   bad: indent\n")
    _write(root, "recipes/list.yaml", "- family: llama\n- method: lora\n")
    _write(root, "recipes/empty.yaml", "")
    _write(root, "recipes/deep.yaml", "a: " + "[" * 5000 + "]" * 5000 + "\n")
    (root / "recipes" / "folder.yaml").mkdir(parents=True)
    _write(root, "recipes/cycle-a.yaml", "extends: recipes/cycle-b.yaml\n")
    _write(root, "recipes/cycle-b.yaml", "extends: recipes/cycle-a.yaml\n")
    _write(root, "recipes/extends-unknown.yaml", "extends: nope_recipe\n")
    _write(root, "recipes/extends-list.yaml", "extends: [demo, mistral_qlora]\n")
    _write(root, "recipes/bad-values.yaml", "extends: demo\nlora:\n  r: 0\n")
    # run folders
    adapter = json.dumps({"peft_type": "LORA", "r": 16, "base_model_name_or_path": MODEL})
    _write(root, "runs/finished/config.yaml", _run_config(MODEL))
    _write(root, "runs/finished/adapter/adapter_config.json", adapter)
    _write(root, "runs/other-finished/config.yaml", _run_config(MODEL))
    _write(root, "runs/other-finished/adapter/adapter_config.json", adapter)
    _write(root, "runs/unfinished/config.yaml", _run_config(MODEL))
    _write(root, "runs/broken-config/config.yaml", "name: demo\nlora: [unclosed\n")
    _write(root, "runs/binary-config/config.yaml", b"\x00\xff\xfe binary")
    _write(root, "runs/list-config/config.yaml", "- demo\n")
    _write(root, "runs/invalid-recipe/config.yaml", _run_config(MODEL, lora__r=0))
    other = yaml.safe_load(_run_config(MODEL))
    other.update(name="mistral_lora", description="another recipe's run")
    _write(root, "runs/other-recipe/config.yaml", yaml.safe_dump(other, sort_keys=False))
    # output folders holding the user's own files
    _write(root, "outs/notes/notes.txt", "mine")
    _write(root, "outs/adapter/adapter/adapter_config.json", '{"mine": true}')
    _write(root, "outs/merged/merged/config.json", '{"model_type": "llama", "mine": true}')
    _write(root, "outs/gguf/gguf/demo-q8_0.gguf", b"GGUF my own quantization")
    _write(root, "outs/modelfile/gguf/Modelfile", "FROM ./mine.gguf\n")
    _write(root, "outs/other-export/fasttune-export.json", json.dumps({"run": "/elsewhere/run", "outputs": ["adapter"]}))
    _write(root, "outs/other-export/adapter/adapter_config.json", '{"from": "another run"}')
    _write(root, "outs/garbage-manifest/fasttune-export.json", "my notes, not JSON")
    _write(root, "outs/bench-results/results.json", '{"measured": "last week"}')
    _write(root, "outs/bench-report/report.md", "# my bench\n")
    _write(root, "outs/bench-report/bench.png", b"\x89PNG mine")
    _write(root, "outs/bench-log/vanilla.log", "my log\n")
    _write(root, "outs/bench-work/work/keep.txt", "mine")
    if UNWRITABLE == "locked/out":
        (root / "locked").mkdir()
        (root / "locked").chmod(0o555)
    pyarrow.parquet.write_table(pyarrow.table({"prompt": ["a"], "completion": ["b"]}), root / "good.parquet")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    build_world(root)
    yield root
    if (root / "locked").exists():
        (root / "locked").chmod(0o755)


_digests: dict[tuple, str] = {}


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under ``root``: name -> (size, content hash) for files, "dir" for folders.
    A hash is recomputed only when the file's size, mtime or inode changed (as git's index does)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            found[os.path.relpath(os.path.join(dirpath, name), root)] = ("dir",)
        for name in filenames:
            path = os.path.join(dirpath, name)
            stat = os.stat(path)
            key = (path, stat.st_size, stat.st_mtime_ns, stat.st_ino)
            if key not in _digests:
                with open(path, "rb") as handle:
                    _digests[key] = hashlib.blake2b(handle.read(), digest_size=16).hexdigest()
            found[os.path.relpath(path, root)] = (stat.st_size, _digests[key])
    return found


def changes(before: dict, after: dict) -> list[str]:
    return sorted([f"+ {k}" for k in after.keys() - before.keys()] + [f"- {k}" for k in before.keys() - after.keys()]
                  + [f"~ {k}" for k in before.keys() & after.keys() if before[k] != after[k]])


def check_refusal(c: Case, code, out: str, err: str) -> None:
    text = out + err
    assert code == 2, f"exit {code}\n{text[-3000:]}"
    assert "Traceback" not in text, text[-3000:]
    for needle in c.needles:
        assert needle in err, f"{needle!r} not in:\n{err}"
    if c.usage:
        assert "error:" in err
    else:
        assert len(re.findall(r"^fasttune: ", err, flags=re.M)) == 1, f"one message, not several:\n{err}"
        fixes = re.findall(r"^\s+fix: (.*)$", err, flags=re.M)
        assert fixes and all(f.strip() for f in fixes), f"every problem needs a fix:\n{err}"


@pytest.mark.parametrize("c", [pytest.param(c, id=c.id) for c in CASES])
def test_bad_input_is_refused_cleanly(c: Case, world: Path, monkeypatch, capsys):
    monkeypatch.chdir(world)
    before = snapshot(world)
    try:
        code = main(list(c.argv))
    except SystemExit as stop:  # argparse refuses by exiting
        code = stop.code
    captured = capsys.readouterr()
    check_refusal(c, code, captured.out, captured.err)
    assert changes(before, snapshot(world)) == [], "the user's folder changed"


def test_the_sweep_covers_every_verb_with_enough_cases():
    verbs = {}
    for c in CASES:
        verbs[c.verb] = verbs.get(c.verb, 0) + 1
    assert len(CASES) >= 150, len(CASES)
    assert set(verbs) == {"recipes", "show", "cp", "recipe --dry-run", "recipe", "data inspect", "export", "bench", "doctor"}, verbs
    assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"


SUBPROCESS_CASES = [
    case("show", ["show", "demo", "lora.r=0"], "lora.r = 0"),
    case("recipe --dry-run", ["recipe", "demo", f"model.name={MODEL}", "data.path=bad/latin1.jsonl", "--dry-run"], "latin1.jsonl:2"),
    case("export", ["export", "runs/finished", "--adapter", "--out", "outs/adapter"], "--out = 'outs/adapter'"),
    case("bench", ["bench", "demo", *BASE, "--out", "outs/bench-results"], "results.json"),
    case("cp", ["cp", "demo", "chat.jsonl/x.yaml"], "chat.jsonl/x.yaml"),
]


@pytest.mark.parametrize("c", [pytest.param(c, id=c.id) for c in SUBPROCESS_CASES])
def test_bad_input_is_refused_by_the_real_command(c: Case, world: Path):
    before = snapshot(world)
    result = subprocess.run([sys.executable, "-m", "fasttune", *c.argv], capture_output=True, text=True, cwd=world, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    check_refusal(c, result.returncode, result.stdout, result.stderr)
    assert changes(before, snapshot(world)) == []


# ---------------------------------------------------------------------------------------------
# What the refusals must not become: over-refusal, silence, and internal errors in disguise.
# ---------------------------------------------------------------------------------------------

def test_an_internal_error_is_one_line_and_a_file(monkeypatch, capsys, tmp_path):
    from fasttune import cli

    def broken(args):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(cli, "cmd_recipes", broken)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert main(["recipes"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    match = re.fullmatch(r"fasttune: internal error: RuntimeError: boom; the full traceback is in (\S+)\n", err)
    assert match, err
    saved = Path(match.group(1)).read_text()
    assert Path(match.group(1)).parent == tmp_path / "fasttune-errors"
    assert "Traceback" in saved and "second line" in saved and "python -m fasttune recipes" in saved


def test_a_user_mistake_is_never_an_internal_error(world, monkeypatch, capsys):
    monkeypatch.chdir(world)
    assert main(["show", "demo", "lora.r=0"]) == 2
    assert "internal error" not in capsys.readouterr().err


def test_max_rows_says_it_left_rows_out(world, monkeypatch, capsys):
    monkeypatch.chdir(world)
    assert main(["recipe", "demo", *BASE, "data.max_rows=3", "--dry-run"]) == 0
    assert "data.max_rows=3: using 3 of 8 rows" in capsys.readouterr().out
    assert main(["data", "inspect", CHAT, f"model.name={MODEL}", "data.max_rows=3"]) == 0
    assert "data.max_rows=3: using 3 of 8 rows" in capsys.readouterr().out


def test_good_inputs_next_to_the_bad_ones_still_pass(world, monkeypatch, capsys):
    """The rules refuse mistakes only: valid edge values and an --out of the user's own are accepted."""
    monkeypatch.chdir(world)
    for override in ("lora.lora_dropout=0", "train.warmup_steps=0", "train.max_steps=-1", "train.max_length=null",
                     "train.eval_strategy=steps", "data.eval_fraction=0.25"):
        assert main(["show", "demo", *BASE, "data.eval_fraction=0.25", override]) == 0, capsys.readouterr().err
    assert main(["recipe", "demo", *BASE, "train.output_dir=outs/new-run", "--dry-run"]) == 0, capsys.readouterr().err
    assert main(["recipe", "demo", "data.path=good.parquet", f"model.name={MODEL}", "train.assistant_only_loss=false",
                 "--dry-run"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert not (world / "outs" / "new-run").exists()


def test_export_may_replace_what_an_export_of_the_same_run_wrote(world, tmp_path):
    from fasttune import config
    from fasttune.errors import UserError
    from fasttune.export.exporter import MANIFEST, ExportRequest, claim_outputs

    run = world / "runs" / "finished"
    recipe = config.resolve(str(run / "config.yaml"))
    out = tmp_path / "exported"
    request = ExportRequest(adapter=True, gguf=["q8_0"], out=out)
    fresh = claim_outputs(out, run, recipe, request)
    assert fresh == {"run": str(run.resolve()), "outputs": ["adapter", "gguf/Modelfile", "gguf/demo-q8_0.gguf", "merged"]}
    (out / "adapter").mkdir(parents=True)
    (out / MANIFEST).write_text(json.dumps(fresh))
    again = claim_outputs(out, run, recipe, ExportRequest(adapter=True, gguf=["q4_k_m"], out=out))
    assert set(again["outputs"]) == {*fresh["outputs"], "gguf/demo-q4_k_m.gguf"}
    with pytest.raises(UserError, match="already holds adapter"):
        claim_outputs(out, world / "runs" / "other-finished", recipe, request)


def test_a_failed_bench_side_gives_its_last_error_not_its_traceback():
    from fasttune.side_by_side.harness import last_error

    crash = ("loading...\nTraceback (most recent call last):\n  File \"x.py\", line 3, in <module>\n    run()\n"
             "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n")
    assert last_error(crash) == "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    refused = "note\nfasttune: cannot run this: 1 problem\n  - data.path = 'x.jsonl': no such file\n    fix: check the path\n"
    assert last_error(refused) == "cannot run this: 1 problem - data.path = 'x.jsonl': no such file fix: check the path"
    assert last_error("") == "it wrote nothing to its log"
