"""Every family trains on the CPU through fasttune's real path, on a tiny model of its real architecture.

For every registered family (fasttune.families.FAMILIES), its ``qlora`` recipe (and ``mistral_lora``): ``config.resolve`` → ``machine.plan``
(CPU) → ``prepare.prepare`` → ``runner.setup`` / ``train`` / ``save`` on a random 2-layer model
(tests/fixtures/tiny_models.py) with the family's real tokenizer (tests/fixtures/real_tokenizers.py).
Checked: the base is NF4 4-bit where the recipe says qlora; every LoRA matrix of every target
module moved and nothing else did (bit for bit, quantization constants included); the loss is
finite; the saved adapter names the family's targets. And the batches the trainer learns from:
their ids are the publisher's chat template rendered by the real tokenizer, and their labels
select exactly each assistant reply plus its end-of-turn token.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from rich.console import Console

from fasttune import config, machine, prepare
from fasttune.families import FAMILIES as REGISTRY
from fasttune.families import get_family
from fasttune.families.chat_templates import get_template
from fasttune.train import runner
from fixtures.family_recipes import family_recipes
from fixtures.tiny_models import build_tiny_model, write_chat_jsonl
from fixtures.spans import decoded_runs
from fixtures.real_tokenizers import TOKENIZER_FOR, load_tokenizer, original_templates

# End to end on tiny models: about a minute for the whole file on 2 cores.
pytestmark = pytest.mark.slow

# model_type -> (qlora recipe, test tokenizer, chat template the recipe trains with), for every
# registered family; None where one is missing (tests/test_family_stations.py names what).
FAMILIES = {
    model_type: (family_recipes("qlora").get(model_type), TOKENIZER_FOR.get(family.chat_template), family.chat_template)
    for model_type, family in REGISTRY.items()
}
# Families whose template refuses system messages (Gemma 2's raises "System role not supported").
NO_SYSTEM = {"gemma2"}

ROWS = 8
STEPS = 2
# Tiny, fast and deterministic. warmup_steps=0: with the recipes' 10 warm-up steps the first
# step's learning rate is 0, lora_B would leave zero only at step 2 and lora_A not at all.
# adamw_8bit (the recipes' optimizer) stays: bitsandbytes runs it on the CPU at no extra cost here.
OVERRIDES = (
    f"data.max_rows={ROWS}",
    "data.eval_fraction=0",
    f"train.max_steps={STEPS}",
    "train.per_device_train_batch_size=2",
    "train.gradient_accumulation_steps=1",
    "train.max_length=128",
    "train.packing=false",  # rows are checked one by one here; tests/test_packing.py checks packed batches
    "train.warmup_steps=0",
    "train.logging_steps=1",
    "train.save_strategy=no",
    "train.eval_strategy=no",
)


@pytest.fixture(scope="module")
def reference_tokenizer():
    """model_type -> the test's copy of its real tokenizer, with the family's template (loaded once:
    the 128k- and 151k-token vocabularies take seconds)."""
    loaded = {}

    def get(family: str):
        if family not in loaded:
            _, tokenizer_name, template = FAMILIES[family]
            loaded[family] = load_tokenizer(tokenizer_name, template)
        return loaded[family]

    return get


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, reference_tokenizer):
    """model_type -> folder of its tiny model, built on first use."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny_model(family, reference_tokenizer(family), tmp_path_factory.mktemp(f"tiny-{family}"))
        return built[family]

    return get


@dataclass
class Run:
    family: str
    recipe: str
    session: runner.Session
    rows: list[dict]
    before: dict[str, torch.Tensor]
    """Every parameter before training (4-bit weights as their packed uint8 data)."""
    quant_before: dict[str, list[torch.Tensor]]
    """Each 4-bit layer's quantization constants before training."""


def _quant_constants(model) -> dict[str, list[torch.Tensor]]:
    import bitsandbytes as bnb

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            tensors = [state.absmax]
            if state.nested:  # double quantization: the absmax values are themselves quantized
                tensors += [state.offset, state.state2.absmax, state.state2.code]
            out[name] = [t.detach().clone() for t in tensors]
    return out


def _train(recipe_name: str, family: str, model_dir: Path, run_dir: Path) -> Run:
    run_dir.mkdir(parents=True)
    data_path = run_dir.parent / f"{run_dir.name}.jsonl"
    rows = write_chat_jsonl(data_path, ROWS, system=family not in NO_SYSTEM)
    recipe = config.resolve(recipe_name, [f"model.name={model_dir}", f"data.path={data_path}",
                                          f"train.output_dir={run_dir}", *OVERRIDES])
    plan = machine.plan(recipe, machine.detect(), force_cpu=True)
    session = runner.setup(prepare.prepare(recipe, plan, run_dir), Console(quiet=True))
    model = session.trainer.model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    quant_before = _quant_constants(model)
    runner.train(session)
    runner.save(session)
    return Run(family, recipe_name, session, rows, before, quant_before)


@pytest.fixture(scope="module", params=list(FAMILIES))
def qlora_run(request, tiny_model_dir, tmp_path_factory) -> Run:
    family = request.param
    recipe = FAMILIES[family][0]
    assert recipe is not None, f"family {family!r} has no qlora recipe in recipes/"
    return _train(recipe, family, tiny_model_dir(family), tmp_path_factory.mktemp(recipe) / "run")


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory) -> Run:
    return _train("mistral_lora", "mistral", tiny_model_dir("mistral"), tmp_path_factory.mktemp("mistral_lora") / "run")


# --- what trained ---------------------------------------------------------------------------


def _lora_modules(model) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def _check_adapted_modules(run: Run) -> dict[str, torch.nn.Module]:
    """Every target projection of every layer carries LoRA, and nothing else does."""
    model = run.session.trainer.model
    targets = get_family(run.family).target_modules
    adapted = _lora_modules(model)
    layers = model.config.num_hidden_layers
    assert sorted(name.rsplit(".", 1)[-1] for name in adapted) == sorted(targets * layers)
    return adapted


def _check_only_lora_moved(run: Run) -> None:
    model = run.session.trainer.model
    after = dict(model.named_parameters())
    assert after.keys() == run.before.keys()
    lora = {name for name in after if ".lora_A." in name or ".lora_B." in name}
    trainable = {name for name, p in after.items() if p.requires_grad}
    assert trainable == lora, "only the LoRA matrices may be trainable"
    assert len(lora) == 2 * len(_check_adapted_modules(run))

    unchanged = sorted(name for name in lora if torch.equal(after[name], run.before[name]))
    assert not unchanged, f"LoRA matrices that did not train: {unchanged}"
    for name in lora:
        if ".lora_B." in name:
            assert not run.before[name].any(), f"{name} should start at zero (PEFT's init)"
            assert after[name].any(), f"{name} is still zero after training"

    moved = sorted(name for name in after if name not in lora and not torch.equal(after[name], run.before[name]))
    assert not moved, f"frozen base parameters changed: {moved}"


def test_qlora_base_is_nf4_4bit(qlora_run):
    import bitsandbytes as bnb

    model = qlora_run.session.trainer.model
    adapted = _check_adapted_modules(qlora_run)
    for name, module in adapted.items():
        base = module.get_base_layer()
        assert isinstance(base, bnb.nn.Linear4bit), f"{name} wraps {type(base).__name__}, not a 4-bit layer"
        assert isinstance(base.weight, bnb.nn.Params4bit) and base.weight.dtype == torch.uint8
        # The recipes' quantization: NF4 with double quantization (QLoRA paper, fasttune QLORA_DEFAULTS).
        assert base.weight.quant_state.quant_type == "nf4"
        assert base.weight.quant_state.nested
    assert model.get_base_model().is_loaded_in_4bit


def test_qlora_trains_lora_and_only_lora(qlora_run):
    _check_only_lora_moved(qlora_run)
    model = qlora_run.session.trainer.model
    after = _quant_constants(model)
    assert after.keys() == qlora_run.quant_before.keys() and after
    for name, tensors in after.items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, qlora_run.quant_before[name])), \
            f"{name}: quantization constants changed"


def test_qlora_adapter_trains_in_the_plans_dtype(qlora_run):
    dtype = getattr(torch, qlora_run.session.plan.dtype)
    model = qlora_run.session.trainer.model
    wrong = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad and p.dtype != dtype})
    assert not wrong, f"LoRA weights are {wrong}, the plan says {dtype}"


def _check_loss_and_files(run: Run) -> None:
    run_dir = run.session.run_dir
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == STEPS, records
    assert all(isinstance(loss, float) and math.isfinite(loss) for loss in losses), losses
    assert run.session.trainer.state.global_step == STEPS

    adapter = run_dir / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == sorted(get_family(run.family).target_modules)
    from safetensors import safe_open

    with safe_open(adapter / "adapter_model.safetensors", "pt") as tensors:
        keys = list(tensors.keys())
    assert len(keys) == 2 * len(_check_adapted_modules(run)), keys
    assert all(".lora_A." in key or ".lora_B." in key for key in keys), keys
    report = (run_dir / "report.md").read_text()
    assert f"fasttune run: {run.recipe}" in report
    assert (run_dir / "loss.png").is_file()


def test_qlora_loss_finite_and_adapter_saved(qlora_run):
    _check_loss_and_files(qlora_run)


def test_mistral_lora_trains_16bit_base_without_quantization(lora_run):
    import bitsandbytes as bnb

    model = lora_run.session.trainer.model
    assert lora_run.session.recipe.method == "lora"
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert not getattr(model.get_base_model(), "is_loaded_in_4bit", False)
    for module in _check_adapted_modules(lora_run).values():
        assert type(module.get_base_layer()) is torch.nn.Linear
        # The plan's dtype on a CPU (fasttune.machine.plan): float32.
        assert module.get_base_layer().weight.dtype == torch.float32
    _check_only_lora_moved(lora_run)
    _check_loss_and_files(lora_run)


# --- what the trainer learns from -------------------------------------------------------------


def _expected_spans(messages: list[dict], template: str) -> list[str]:
    """Each assistant reply plus the end-of-turn token, as the labels must select them."""
    end_of_turn = get_template(template).end_of_turn
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    spans = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            # Qwen3's template gives the reply after the last user message an empty reasoning
            # block, trained with the reply (see GOLDEN_SPANS in test_templates.py).
            think = "<think>\n\n</think>\n\n" if template == "qwen3" and i > last_user else ""
            spans.append(think + message["content"] + end_of_turn)
    return spans


def _label_spans(input_ids: list[int], labels: list[int], tokenizer) -> list[str]:
    assert all(label == token for token, label in zip(input_ids, labels) if label != -100), \
        "labels are the input ids themselves (the model shifts them)"
    return decoded_runs(input_ids, [label != -100 for label in labels], tokenizer)


def test_batches_are_publisher_template_and_labels_are_assistant_replies(qlora_run, reference_tokenizer):
    family = qlora_run.family
    template = FAMILIES[family][2]
    trainer, tokenizer = qlora_run.session.trainer, qlora_run.session.tokenizer
    # The publisher's own template, rendered by the test's copy of the real tokenizer (whose
    # eos_token is the vocabulary's, not fasttune's end of turn).
    reference = reference_tokenizer(family)
    original = next(iter(original_templates(template).values()))
    expected = {}
    for row in qlora_run.rows:
        ids = reference.apply_chat_template(row["messages"], chat_template=original, tokenize=True)["input_ids"]
        expected[tuple(ids)] = row["messages"]

    seen = 0
    for batch in trainer.get_train_dataloader():
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            ids, labels = ids[mask.bool()].tolist(), labels[mask.bool()].tolist()
            assert tuple(ids) in expected, (
                f"{family}: the trainer's sequence is not the publisher's template rendering of any row:\n"
                f"{tokenizer.decode(ids)!r}")
            messages = expected[tuple(ids)]
            assert _label_spans(ids, labels, tokenizer) == _expected_spans(messages, template)
            seen += 1
        assert (batch["labels"][~batch["attention_mask"].bool()] == -100).all(), "padding is never trained"
    assert seen == ROWS
