"""The CLI as a user meets it: fast verbs that never import torch, and mistakes that exit 2 cleanly."""
import subprocess
import sys
import time

import pytest


def fasttune(*args, cwd=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "fasttune", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def assert_user_error(result, *needles):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


@pytest.mark.parametrize("argv", [["--help"], ["recipes"], ["show", "mistral_qlora"]])
def test_fast_verbs_never_import_torch(argv, capsys):
    code = ("import sys\nfrom fasttune.cli import main\n"
            f"main({argv!r}) if {argv!r} != ['--help'] else None\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n")
    if argv == ["--help"]:
        code = ("import sys\nfrom fasttune.cli import build_parser\nbuild_parser().format_help()\n"
                "assert 'torch' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_recipes_lists_every_recipe_quickly():
    started = time.perf_counter()
    result = fasttune("recipes")
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    for name in ("mistral_qlora", "mistral_lora", "llama3_qlora", "qwen2_5_qlora", "qwen3_qlora", "gemma_qlora", "phi3_qlora", "demo"):
        assert name in result.stdout
    assert elapsed < 3.0, f"`recipes` took {elapsed:.1f}s (process start included)"


def test_show_prints_the_resolved_recipe_as_yaml():
    import yaml

    result = fasttune("show", "phi3_qlora", "lora.r=8")
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["family"] == "phi3" and shown["lora"]["r"] == 8
    assert shown["lora"]["target_modules"] == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert shown["quantization"]["bnb_4bit_quant_type"] == "nf4" and shown["data"]["chat_template"] == "auto"


def test_cp_writes_an_editable_copy_and_never_overwrites(tmp_path):
    target = tmp_path / "mine.yaml"
    assert fasttune("cp", "qwen3_qlora", str(target)).returncode == 0
    shown = fasttune("show", str(target), "train.learning_rate=1e-5")
    assert shown.returncode == 0 and "learning_rate: 1.0e-05" in shown.stdout
    assert_user_error(fasttune("cp", "qwen3_qlora", str(target)), "already exists")


def test_unknown_recipe_suggests_the_closest():
    assert_user_error(fasttune("show", "mistral_qlroa"), "mistral_qlroa", "did you mean `mistral_qlora`?")


def test_unknown_key_names_key_value_rule_and_closest_key():
    assert_user_error(fasttune("recipe", "demo", "train.learnin_rate=1e-4", "--dry-run"),
                      "train.learnin_rate = 0.0001", "is not a field of SFTConfig", "did you mean `train.learning_rate`?")


def test_bad_values_are_named():
    assert_user_error(fasttune("recipe", "demo", "lora.r=many", "train.max_steps=lots", "--dry-run"),
                      "lora.r = 'many': must be an integer", "train.max_steps = 'lots'")
    assert_user_error(fasttune("show", "demo", "model.backend=turbo"), "model.backend = 'turbo'", "must be one of")
    assert_user_error(fasttune("show", "demo", "oops"), "override = 'oops'", "key=value")


def test_gpu_recipe_without_gpu_stops_at_once_and_says_what_to_run():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal cannot happen here")
    result = fasttune("recipe", "mistral_qlora")
    assert_user_error(result, "needs a CUDA GPU with about 12 GB", "--dry-run", "recipe demo", "--cpu")


def test_malformed_recipe_file_points_at_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("family: llama\nmodel:\n  name: x\n   bad: indent\n")
    assert_user_error(fasttune("show", str(bad)), "bad.yaml line", "not valid YAML")


def test_malformed_data_points_at_the_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"messages": [\n')
    assert_user_error(fasttune("recipe", "demo", f"data.path={data}", "--dry-run"), "d.jsonl:2", "not valid JSON")


def test_dry_run_of_a_gpu_recipe_checks_everything_offline_and_loads_no_weights():
    result = fasttune("recipe", "mistral_qlora", "--dry-run", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "checked recipe keys and values bound to SFTConfig, LoraConfig, BitsAndBytesConfig" in result.stdout
    assert "not checked" in result.stdout  # the hub is unreachable here: said, not hidden
    assert "memory of one training step" in result.stdout  # the memory plan, on the card the recipe is sized for
    assert "fits the 12 GiB card the recipe is sized for" in result.stdout
    assert "no weights were loaded" in result.stdout


def test_unreachable_hub_dataset_is_one_clear_message():
    result = fasttune("data", "inspect", "someone/not-cached-dataset", "--recipe", "demo")
    assert_user_error(result, "someone/not-cached-dataset", "could not be loaded", "point data.path at a local file")


def test_data_inspect_marks_trained_text_without_colours(tmp_path):
    from fixtures.tiny_models import build_tiny_model
    from fixtures.real_tokenizers import load_tokenizer

    model = build_tiny_model("llama", load_tokenizer("smollm2"), tmp_path / "model")
    data = tmp_path / "chat.jsonl"
    data.write_text('{"conversations": [{"from": "human", "value": "Capital of Italy?"}, {"from": "gpt", "value": "Rome."}]}\n')
    result = fasttune("data", "inspect", str(data), "--recipe", "demo", f"model.name={model}")
    assert result.returncode == 0, result.stderr
    assert "sharegpt" in result.stdout and "⟦Rome.<|im_end|>⟧" in result.stdout
