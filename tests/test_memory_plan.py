"""`plan`: the memory of one training step, predicted offline before any weights load, what makes it
fit a card, and the pieces behind it (cards, the estimate's parts, auto-fit, longest-first order)."""
import json
from dataclasses import replace
from pathlib import Path

import pytest

from fasttune.cli import main
from fasttune.errors import EXIT_USER_ERROR

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
SHIPPED = sorted(path.stem for path in RECIPES_DIR.glob("*.yaml"))
MISTRAL = "mistralai/Mistral-7B-Instruct-v0.3"


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def plan_json(capsys, *argv):
    code, out, err = run_cli(capsys, "plan", *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def assert_user_error(code, err, *needles):
    assert code == EXIT_USER_ERROR, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def no_gpu_facts():
    from fasttune.machine import MachineFacts

    return MachineFacts(False, "CPU", None, False, "test", False)


@pytest.fixture(autouse=True)
def no_gpu_here(monkeypatch):
    """The plans below are of a machine without a GPU (the default card is then the recipe's own),
    whatever this machine has."""
    from fasttune import machine

    real = machine.detect
    monkeypatch.setattr(machine, "detect", lambda: replace(real(), cuda=False, device_name="CPU", gpu_memory_gb=None, bf16=False))


# --- the verb ------------------------------------------------------------------------------------

def test_plan_json_on_a_card_too_small_lists_what_makes_it_fit(capsys):
    from fasttune.memory.plan import PARTS

    shown = plan_json(capsys, "mistral_qlora", "--gpu", "8")
    assert set(shown) >= {"total_gib", "parts", "gpu_gib", "fits", "suggestions"}
    assert list(shown["parts"]) == list(PARTS) and len(PARTS) == 8
    assert shown["total_gib"] == pytest.approx(sum(shown["parts"].values()), abs=1e-3)
    assert shown["gpu_gib"] == 8
    assert shown["fits"] is False and shown["total_gib"] > 8
    totals = [s["total_gib"] for s in shown["suggestions"]]
    assert totals, shown
    assert all(later < earlier for earlier, later in zip([shown["total_gib"], *totals], totals)), totals
    assert totals[-1] <= 8
    for suggestion in shown["suggestions"]:
        assert suggestion["overrides"] and all("=" in item for item in suggestion["overrides"])


def test_plan_json_suggestions_shrink_step_by_step(capsys):
    # A run far over the card: several changes, each one on top of those before, each one smaller.
    shown = plan_json(capsys, "mistral_qlora", "train.per_device_train_batch_size=8", "train.gradient_checkpointing=false",
                      "train.optim=adamw_torch", "--gpu", "8")
    totals = [s["total_gib"] for s in shown["suggestions"]]
    assert len(totals) >= 3, shown["suggestions"]
    assert all(later < earlier for earlier, later in zip([shown["total_gib"], *totals], totals)), totals
    assert totals[-1] <= 8 and all(total > 8 for total in totals[:-1])
    firsts = [s["overrides"][0] for s in shown["suggestions"]]
    assert firsts[0] == "train.gradient_checkpointing=true" and "train.optim=adamw_8bit" in firsts


def test_plan_on_a_card_large_enough_fits_with_no_suggestions(capsys):
    shown = plan_json(capsys, "mistral_qlora", "--gpu", "24")
    assert shown["gpu_gib"] == 24 and shown["fits"] is True and shown["suggestions"] == []
    assert shown["total_gib"] <= 24


def test_plan_text_says_whether_it_fits(capsys):
    code, out, err = run_cli(capsys, "plan", "mistral_qlora", "--gpu", "8")
    assert code == 0, err
    assert "does not fit" in out and "train.per_device_train_batch_size=" in out
    code, out, err = run_cli(capsys, "plan", "mistral_qlora", "--gpu", "24")
    assert code == 0, err
    assert "fits" in out and "does not fit" not in out
    assert "train.per_device_train_batch_size=" not in out


def test_gpu_by_card_name(capsys):
    assert plan_json(capsys, "mistral_qlora", "--gpu", "RTX 4090")["gpu_gib"] == 24


@pytest.mark.parametrize("gpu, needles", [("nonsense", ("--gpu", "nonsense")), ("0", ("--gpu", "more than 0 GiB")),
                                          ("-4", ("--gpu",))])
def test_bad_gpu_is_a_user_error(capsys, gpu, needles):
    code, out, err = run_cli(capsys, "plan", "mistral_qlora", "--gpu", gpu)
    assert_user_error(code, err, *needles)
    assert out == ""


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_plans_offline_within_its_stated_card(capsys, name):
    from fasttune import prepare

    shown = plan_json(capsys, name)
    assert shown["total_gib"] > 0
    assert shown["total_gib"] == pytest.approx(sum(shown["parts"].values()), abs=1e-3)
    recipe = prepare.resolve(name)
    if recipe.gpu_memory_gb is None:
        assert shown["gpu_gib"] is None and shown["fits"] is None
    else:
        # a recipe's stated size is at or above its plan
        assert shown["gpu_gib"] == recipe.gpu_memory_gb
        assert shown["total_gib"] <= recipe.gpu_memory_gb, f"{name}: plan {shown['total_gib']} GiB > {recipe.gpu_memory_gb}"
        assert shown["fits"] is True and shown["suggestions"] == []


def test_the_shipped_recipes_are_all_there():
    assert set(SHIPPED) >= {"mistral_qlora", "llama3_qlora", "qwen2_5_qlora", "qwen3_qlora", "qwen3_full", "gemma_qlora",
                            "phi3_qlora", "mistral_lora", "demo", "demo_full"}


def test_plan_on_the_cpu_has_no_card_and_no_cuda_overhead(capsys):
    shown = plan_json(capsys, "demo", "--cpu")
    assert shown["gpu_gib"] is None and shown["fits"] is None and shown["suggestions"] == []
    assert shown["parts"]["overhead"] == 0
    assert shown["total_gib"] > 0


def test_cpu_plan_of_a_gpu_recipe_drops_the_cuda_overhead(capsys):
    on_card = plan_json(capsys, "mistral_qlora")
    on_cpu = plan_json(capsys, "mistral_qlora", "--cpu")
    assert on_card["parts"]["overhead"] > 0 and on_cpu["parts"]["overhead"] == 0
    assert on_cpu["gpu_gib"] is None and on_cpu["fits"] is None


def test_unknown_hub_model_is_a_user_error_naming_model_name(capsys):
    code, out, err = run_cli(capsys, "plan", "mistral_qlora", "model.name=someone/unknown-7b")
    assert_user_error(code, err, "model.name", "someone/unknown-7b")


def test_auto_fit_must_be_a_boolean(capsys):
    code, _, err = run_cli(capsys, "plan", "mistral_qlora", "train.auto_fit=maybe")
    assert_user_error(code, err, "train.auto_fit", "maybe")
    code, out, err = run_cli(capsys, "plan", "mistral_qlora", "train.auto_fit=true", "--json")
    assert code == 0, err
    assert json.loads(out)["total_gib"] > 0


# --- cards ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, gib", [("12", 12), ("12GB", 12), ("12 GiB", 12), ("7.5", 7.5), ("RTX 4090", 24),
                                       ("rtx4090", 24), ("GeForce RTX 3090", 24), ("A100", 80), ("T4", 16)])
def test_card_reads_sizes_and_names(text, gib):
    from fasttune.memory.cards import card

    assert card(text).gib == gib


def test_card_reads_a_bare_card_number():
    from fasttune.memory.cards import card

    assert card("4090").gib == 24


@pytest.mark.parametrize("text", ["0", "0GB", "-1", "nonsense", ""])
def test_card_refuses_what_is_no_card(text):
    from fasttune.errors import UserError
    from fasttune.memory.cards import card

    with pytest.raises(UserError) as raised:
        card(text)
    assert "--gpu" in raised.value.render()


def test_card_suggests_the_closest_name():
    from fasttune.errors import UserError
    from fasttune.memory.cards import card

    with pytest.raises(UserError) as raised:
        card("RTX 4909")
    assert "did you mean `RTX 4090`?" in raised.value.render()


# --- the estimate --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mistral():
    from fasttune.architectures import BASE_CONFIGS
    from fasttune.families import get_family
    from fasttune.memory.plan import Setup, Shape

    shape = Shape.from_config(BASE_CONFIGS[MISTRAL])
    base = Setup(method="qlora", width=2, batch=2, sequence=1024, packing=False, gradient_checkpointing=False,
                 optimizer="adamw_torch", attention="sdpa", backend="hf", cuda=True)
    return shape, get_family("mistral"), base


def plan_of(mistral, **changes):
    from fasttune.memory.plan import estimate

    shape, family, base = mistral
    return estimate(shape, family, replace(base, **changes))


def test_estimate_total_is_the_sum_of_its_parts(mistral):
    from fasttune.memory.plan import PARTS

    plan = plan_of(mistral)
    assert tuple(plan.parts) == PARTS
    assert plan.total == sum(plan.parts.values())
    assert all(isinstance(v, int) and v >= 0 for v in plan.parts.values())
    assert plan.parts["overhead"] > 0 and plan_of(mistral, cuda=False).parts["overhead"] == 0


def test_bigger_batch_keeps_more_activations_and_logits(mistral):
    small, big = plan_of(mistral, batch=1), plan_of(mistral, batch=4)
    assert big.parts["activations"] > small.parts["activations"]
    assert big.parts["logits"] > small.parts["logits"]
    assert big.parts["weights"] == small.parts["weights"] and big.parts["optimizer"] == small.parts["optimizer"]


def test_longer_rows_keep_more_activations(mistral):
    assert plan_of(mistral, sequence=2048).parts["activations"] > plan_of(mistral, sequence=512).parts["activations"]


def test_gradient_checkpointing_keeps_fewer_activations(mistral):
    stored, checkpointed = plan_of(mistral), plan_of(mistral, gradient_checkpointing=True)
    assert checkpointed.parts["activations"] < stored.parts["activations"]
    assert checkpointed.parts["logits"] == stored.parts["logits"]


def test_8bit_adamw_keeps_smaller_states(mistral):
    assert plan_of(mistral, optimizer="adamw_8bit").parts["optimizer"] < plan_of(mistral, optimizer="adamw_torch").parts["optimizer"]
    assert plan_of(mistral, optimizer="sgd").parts["optimizer"] == 0


def test_qlora_weights_are_smaller_than_lora_weights(mistral):
    qlora, lora = plan_of(mistral, method="qlora"), plan_of(mistral, method="lora")
    assert qlora.parts["weights"] < lora.parts["weights"]
    assert qlora.parts["quant_constants"] > 0 and lora.parts["quant_constants"] == 0
    assert qlora.parts["trainable"] == lora.parts["trainable"]


def test_full_finetune_trains_every_parameter(mistral):
    lora, full = plan_of(mistral, method="lora"), plan_of(mistral, method="full")
    assert full.parts["trainable"] > 10 * lora.parts["trainable"]
    assert full.parts["gradients"] > lora.parts["gradients"]


def test_packing_with_eager_attention_keeps_more_activations(mistral):
    padded = plan_of(mistral, attention="eager", packing=False)
    packed = plan_of(mistral, attention="eager", packing=True)
    assert packed.parts["activations"] > padded.parts["activations"]


# --- what makes it fit, applied ------------------------------------------------------------------

def overrides_dict(items):
    return dict(item.split("=", 1) for item in items)


@pytest.mark.parametrize("extra", [(), ("train.per_device_train_batch_size=8",)])
def test_auto_fit_overrides_make_the_run_fit(extra):
    from fasttune import prepare
    from fasttune.memory.fit import auto_fit_overrides
    from fasttune.memory.for_run import run_memory
    from fasttune.memory.plan import GIB

    facts = no_gpu_facts()
    recipe = prepare.resolve("mistral_qlora", list(extra))
    memory = run_memory(recipe, facts, gpu="8")
    assert memory.card.gib == 8 and memory.plan.total > 8 * GIB
    overrides = auto_fit_overrides(memory.changes, memory.card)
    assert overrides and all("=" in item for item in overrides)
    keys = [item.split("=", 1)[0] for item in overrides]
    assert len(keys) == len(set(keys)), overrides  # each key once, its last value

    before = overrides_dict(extra)
    batch = int(before.get("train.per_device_train_batch_size", recipe.train["per_device_train_batch_size"]))
    accumulation = int(recipe.train.get("gradient_accumulation_steps", 1))
    after = overrides_dict(overrides)
    new_batch, new_accumulation = int(after["train.per_device_train_batch_size"]), int(after["train.gradient_accumulation_steps"])
    assert new_batch < batch
    assert new_batch * new_accumulation == batch * accumulation  # the global batch is kept
    assert new_accumulation == accumulation * (batch // new_batch)

    fitted = run_memory(prepare.resolve("mistral_qlora", [*extra, *overrides]), facts, gpu="8")
    assert fitted.plan.total <= 8 * GIB
    assert fitted.changes == []
    assert fitted.plan.total == pytest.approx(memory.changes[-1].plan.total, rel=1e-6)


def test_auto_fit_overrides_none_when_nothing_fits():
    from fasttune import prepare
    from fasttune.memory.fit import auto_fit_overrides
    from fasttune.memory.for_run import run_memory

    memory = run_memory(prepare.resolve("mistral_qlora"), no_gpu_facts(), gpu="2")
    assert memory.changes and auto_fit_overrides(memory.changes, memory.card) is None
    assert auto_fit_overrides([], memory.card) is None


# --- the longest batch first ---------------------------------------------------------------------

class ListSampler:
    def __init__(self, order):
        self.order, self.epochs = list(order), []

    def __iter__(self):
        return iter(self.order)

    def __len__(self):
        return len(self.order)

    def set_epoch(self, epoch):
        self.epochs.append(epoch)


def test_longest_first_moves_the_longest_batch_to_the_front():
    from fasttune.train.longest_first import LongestFirst

    inner = ListSampler([3, 1, 4, 0, 2])
    sampler = LongestFirst(inner, [5, 50, 7, 40, 9], batch=2)
    assert len(sampler) == 5
    for epoch in range(2):  # every epoch, not just the first
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert order == [1, 3, 4, 0, 2]
        assert sorted(order) == [0, 1, 2, 3, 4]
    assert inner.epochs == [0, 1]


def test_longest_first_follows_the_inner_order_of_each_epoch():
    from fasttune.train.longest_first import LongestFirst

    inner = ListSampler([0, 1, 2, 3, 4, 5])
    sampler = LongestFirst(inner, [1, 9, 2, 8, 3, 7], batch=3)
    assert list(sampler) == [1, 3, 5, 0, 2, 4]
    inner.order = [4, 2, 0, 5, 3, 1]
    assert list(sampler) == [1, 3, 5, 4, 2, 0]


# --- the cost of a shorter max_length -----------------------------------------------------------

def test_lengths_cut_at_counts_rows_and_trained_tokens_lost():
    from fasttune.memory.fit import Lengths

    lengths = Lengths(lengths=(10, 300), trained=((5, 6, 7), tuple(range(200, 300))))
    assert lengths.cut_at(256) == (0.5, 44 / 103)
    assert lengths.cut_at(300) == (0.0, 0.0)
    assert lengths.cut_at(5) == (1.0, 1.0)
    assert Lengths((), ()).cut_at(256) == (0.0, 0.0)
