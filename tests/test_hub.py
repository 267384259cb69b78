"""An unreachable hub is found once, said in one line, and the local cache is used.

No network is needed: the hub endpoint is a closed local port (connection refused), or a local
server that answers, or one that accepts and never answers.
"""
from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from fasttune import hub

HUB_LINE = "is not reachable from this machine"
RETRY_TEXTS = ("Retrying in", "thrown while requesting")  # huggingface_hub's http_backoff lines


def closed_port_url() -> str:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def answering_server():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)  # any answer means a server is there
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_an_answering_server_is_reachable_and_a_closed_port_is_not(answering_server):
    assert hub.unreachable_reason(answering_server) is None
    started = time.perf_counter()
    reason = hub.unreachable_reason(closed_port_url())
    assert reason is not None and "refused" in reason.lower()
    assert time.perf_counter() - started < 2


def test_a_server_that_never_answers_is_unreachable_within_the_timeout():
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # accepts the connection, never answers
        started = time.perf_counter()
        reason = hub.unreachable_reason(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.5)
        elapsed = time.perf_counter() - started
    assert reason == "no answer within 0.5 s"
    assert elapsed < 2


@pytest.fixture
def online(monkeypatch):
    """This process as if HF_HUB_OFFLINE were not set (conftest sets it) and never checked yet."""
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(hub, "_state", {})
    return constants


def test_unreachable_goes_offline_everywhere_and_says_so_once(online, monkeypatch, capsys):
    import datasets.config

    url = closed_port_url()
    monkeypatch.setattr(online, "ENDPOINT", url.replace("http://", "http://someone:hf_secret@"))
    assert hub.use_cache_if_unreachable() is True
    assert hub.use_cache_if_unreachable() is True  # asked once: the second call only reads the answer
    err = capsys.readouterr().err
    assert err.count(HUB_LINE) == 1, err
    assert f"hub: {url} is not reachable from this machine (Connection refused); using the local cache only (HF_HUB_OFFLINE=1)" in err
    assert "hf_secret" not in err and "someone" not in err
    assert online.HF_HUB_OFFLINE is True and os.environ["HF_HUB_OFFLINE"] == "1"
    assert datasets.config.HF_HUB_OFFLINE is True
    assert hub.offline_reason() == f"{url} is not reachable from this machine"


def test_reachable_stays_online_and_says_nothing(online, monkeypatch, capsys, answering_server):
    monkeypatch.setattr(online, "ENDPOINT", answering_server)
    assert hub.use_cache_if_unreachable() is False
    assert capsys.readouterr().err == ""
    assert online.HF_HUB_OFFLINE is False and "HF_HUB_OFFLINE" not in os.environ
    assert hub.offline_reason() is None


def test_offline_mode_already_set_asks_nothing(monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "ENDPOINT", "http://never-asked.invalid")
    monkeypatch.setattr(hub, "unreachable_reason", lambda *a, **k: pytest.fail("the hub was asked while offline mode was on"))
    assert hub.use_cache_if_unreachable() is True
    assert capsys.readouterr().err == ""


# --- the CLI as a new user without a network meets it: HF_HUB_OFFLINE not set -------------------

def fasttune_without_network(*args, hf_home, cwd):
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HF_DATASETS_CACHE")}
    env.update(HF_ENDPOINT=closed_port_url(), HF_HOME=str(hf_home))
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "fasttune", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)
    return result, time.perf_counter() - started


def assert_one_hub_line_no_retries(result, elapsed):
    output = result.stdout + result.stderr
    assert elapsed < 20, f"took {elapsed:.1f} s (huggingface_hub's retries take 45 s and more)\n{output}"
    hub_lines = [line for line in output.splitlines() if line.startswith("hub: ")]
    assert len(hub_lines) == 1, output
    assert HUB_LINE in hub_lines[0] and hub_lines[0].endswith("using the local cache only (HF_HUB_OFFLINE=1)")
    assert hub_lines[0] in result.stderr.splitlines()  # stdout stays clean (data inspect --json)
    for text in RETRY_TEXTS:
        assert text not in output, output
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    from fixtures.tiny_models import write_chat_jsonl

    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    write_chat_jsonl(path, 4)
    return path


def test_uncached_hub_model_stops_at_once_with_the_fix(tmp_path, chat_file):
    result, elapsed = fasttune_without_network("data", "inspect", str(chat_file), "--recipe", "qwen3_qlora",
                                               hf_home=tmp_path / "hf", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert_one_hub_line_no_retries(result, elapsed)
    assert "model 'Qwen/Qwen3-8B' is not in the local cache" in result.stderr
    assert "hf download Qwen/Qwen3-8B --local-dir DIR" in result.stderr and "point model.name at it" in result.stderr


def test_uncached_hub_dataset_stops_at_once_with_the_fix(tmp_path):
    result, elapsed = fasttune_without_network("data", "inspect", "someone/not-cached-dataset", "--recipe", "demo",
                                               hf_home=tmp_path / "hf", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert_one_hub_line_no_retries(result, elapsed)
    assert "hub dataset 'someone/not-cached-dataset' could not be loaded" in result.stderr
    assert "is not reachable from this machine and it is not cached" in result.stderr
    assert "point data.path at that folder" in result.stderr


def cache_a_hub_model(hf_home, repo_id: str) -> None:
    """The layout huggingface_hub reads offline: hub/models--ORG--NAME/snapshots/REV/ and refs/main."""
    from fixtures.tiny_models import build_tiny_model
    from fixtures.real_tokenizers import load_tokenizer

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    build_tiny_model("llama", load_tokenizer("smollm2"), repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)


def test_a_model_in_the_hub_cache_still_loads(tmp_path, chat_file):
    hf_home = tmp_path / "hf"
    cache_a_hub_model(hf_home, "fasttune-test/tiny-chat")
    result, elapsed = fasttune_without_network("data", "inspect", str(chat_file), "--recipe", "demo",
                                               "model.name=fasttune-test/tiny-chat", hf_home=hf_home, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_one_hub_line_no_retries(result, elapsed)
    assert "chatml" in result.stdout or "<|im_end|>" in result.stdout, result.stdout

    result, elapsed = fasttune_without_network("recipe", "demo", "--dry-run", f"data.path={chat_file}",
                                               "model.name=fasttune-test/tiny-chat", hf_home=hf_home, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_one_hub_line_no_retries(result, elapsed)
    assert "checked chat template" in result.stdout and "checked parameters:" in result.stdout, result.stdout


def test_a_local_model_folder_never_asks_the_hub(tmp_path, chat_file):
    from fixtures.tiny_models import build_tiny_model
    from fixtures.real_tokenizers import load_tokenizer

    folder = build_tiny_model("llama", load_tokenizer("smollm2"), tmp_path / "model")
    result, elapsed = fasttune_without_network("data", "inspect", str(chat_file), "--recipe", "demo", f"model.name={folder}",
                                               hf_home=tmp_path / "hf", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert HUB_LINE not in result.stdout + result.stderr


@pytest.mark.parametrize("argv", [["--help"], ["recipes"], ["show", "qwen3_qlora"]])
def test_fast_verbs_never_ask_the_hub(argv):
    code = ("import sys\nfrom fasttune.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "assert 'fasttune.hub' not in sys.modules and 'torch' not in sys.modules, 'asked the hub or imported torch'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
