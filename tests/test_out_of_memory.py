"""An out-of-memory during training is one message: the plan against the card, what would fit, and the resume."""
from fasttune import prepare
from fasttune.machine import MachineFacts
from fasttune.memory import for_run
from fasttune.memory.cards import Card


def test_out_of_memory_names_the_step_the_plan_the_fix_and_the_resume(monkeypatch):
    facts = MachineFacts(True, "NVIDIA GeForce RTX 3070", 8.0, True, "test", False)  # a card too small for the recipe
    monkeypatch.setattr(for_run.machine, "detect", lambda: facts)
    monkeypatch.setattr(for_run, "machine_has_cuda", lambda: False)  # bind as the CPU must (TRL refuses bf16 here)
    recipe = prepare.resolve("mistral_qlora")
    err = for_run.out_of_memory(recipe, 41, "runs/m/checkpoints/checkpoint-40", "python -m fasttune recipe mistral_qlora --resume runs/m")
    text = err.render()
    assert "step 42" in text and "ran out of memory" in text
    assert "does not fit NVIDIA GeForce RTX 3070 (8 GiB, this machine)" in text
    assert "train.per_device_train_batch_size=1 train.gradient_accumulation_steps=8" in text  # what fits, from the plan
    assert "from runs/m/checkpoints/checkpoint-40: python -m fasttune recipe mistral_qlora --resume runs/m" in text
    assert "--force" in text  # the changed recipe must be allowed to resume


def test_a_run_that_cannot_fit_the_card_is_refused_before_loading_and_auto_fit_applies_what_fits(monkeypatch):
    import pytest

    from fasttune.errors import UserError

    monkeypatch.setattr(for_run, "machine_has_cuda", lambda: False)

    class Console:
        lines: list[str] = []

        def print(self, text):
            self.lines.append(text)

    tiny = MachineFacts(True, "a 2 GiB card", 2.0, True, "test", False)
    with pytest.raises(UserError) as refused:
        for_run.fit_the_card("mistral_qlora", [], prepare.resolve("mistral_qlora"), tiny, Console())
    assert "does not fit" in refused.value.render() and "train.auto_fit=false" in refused.value.render()

    card = MachineFacts(True, "an 8 GiB card", 8.0, True, "test", False)
    console = Console()
    fitted = for_run.fit_the_card("mistral_qlora", ["train.auto_fit=true"], prepare.resolve("mistral_qlora", ["train.auto_fit=true"]),
                                  card, console)
    assert fitted.train["per_device_train_batch_size"] == 1 and fitted.train["gradient_accumulation_steps"] == 8
    assert fitted.train["auto_fit"] is True
    assert any("auto-fit" in line for line in console.lines)
    assert for_run.run_memory(fitted, card).plan.total <= Card("x", 8.0).gib * 2**30
