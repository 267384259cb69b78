"""Every shipped recipe resolves, and binds to the real SFTConfig / LoraConfig / BitsAndBytesConfig.

No model is loaded: recipe rot (a renamed TRL field, a typo in a YAML file) is caught here.
"""
import pytest

from fasttune import config, recipes
from fasttune.families import FAMILIES
from fasttune.machine import MachineFacts, plan

CPU = MachineFacts(cuda=False, device_name="CPU", gpu_memory_gb=None, bf16=False, torch_version="test", unsloth_installed=False)
AMPERE_WITH_UNSLOTH = MachineFacts(True, "NVIDIA RTX 4090", 24.0, True, "test", True)
TURING = MachineFacts(True, "Tesla T4", 15.0, False, "test", False)
REQUIRED = {"mistral_qlora", "mistral_lora", "llama3_qlora", "qwen2_5_qlora", "qwen3_qlora", "gemma_qlora", "phi3_qlora", "demo"}


def plain(value):
    """An enum field's string value (SFTConfig turns "cosine" into SchedulerType.COSINE)."""
    return getattr(value, "value", value)


def test_the_required_recipes_ship():
    assert REQUIRED <= set(recipes.recipe_names())


@pytest.mark.parametrize("name", recipes.recipe_names())
def test_recipe_resolves_and_binds(name, tmp_path):
    from fasttune.binding import bind

    recipe = config.resolve(name)
    assert recipe.family in FAMILIES
    assert recipe.model.name and recipe.data.path and recipe.description
    bound = bind(recipe, plan(recipe, CPU, force_cpu=True), tmp_path)
    for key, value in recipe.train.items():
        if key not in ("output_dir",):
            assert plain(getattr(bound.sft, key)) == value, key
    if recipe.method == "qlora":
        assert bound.bnb.load_in_4bit and bound.bnb.bnb_4bit_quant_type == "nf4" and bound.bnb.bnb_4bit_use_double_quant
    else:
        assert bound.bnb is None
    if recipe.method != "full":
        family = FAMILIES[recipe.family]
        assert set(bound.lora.target_modules) == set(family.target_modules)


@pytest.mark.parametrize("name", [n for n in recipes.recipe_names() if config.resolve(n).needs_gpu and config.resolve(n).method != "full"])
def test_gpu_recipes_meet_unsloths_fast_path_conditions(name):
    recipe = config.resolve(name)
    lora = recipe.lora
    assert (lora["r"], lora["lora_alpha"], lora["lora_dropout"], lora["bias"]) == (16, 16, 0.0, "none")
    assert recipe.quantization.get("bnb_4bit_compute_dtype", "bfloat16") == "bfloat16"
    gpu_plan = plan(recipe, AMPERE_WITH_UNSLOTH)
    expected = "unsloth" if FAMILIES[recipe.family].unsloth else "hf"
    assert gpu_plan.backend == expected and gpu_plan.dtype == "bfloat16"


@pytest.mark.parametrize("name", [n for n in recipes.recipe_names() if config.resolve(n).method == "full"])
def test_full_fine_tuning_recipes_plan_the_hf_backend_in_bf16(name):
    recipe = config.resolve(name)
    assert not recipe.lora and not recipe.quantization
    gpu_plan = plan(recipe, AMPERE_WITH_UNSLOTH)
    assert (gpu_plan.backend, gpu_plan.dtype) == ("hf", "bfloat16")
    assert "full fine-tuning runs on the hf backend" in gpu_plan.backend_reason or recipe.model.backend == "hf"


def test_plan_explains_fallbacks():
    recipe = config.resolve("mistral_qlora")
    assert plan(recipe, CPU, force_cpu=True).backend_reason == "no CUDA device"
    assert plan(recipe, TURING).backend_reason.startswith("Unsloth is not installed")
    t4 = plan(recipe, TURING)
    assert t4.dtype == "float16" and "pre-Ampere" in t4.dtype_reason and t4.backend == "hf"
    assert plan(recipe, AMPERE_WITH_UNSLOTH, force_cpu=True).backend_reason == "--cpu was given"


def test_extends_and_overrides_merge():
    recipe = config.resolve("mistral_lora", ["lora.r=32", "train.learning_rate=1e-4", "data.max_rows=10"])
    assert recipe.method == "lora" and recipe.quantization == {}
    assert recipe.lora["r"] == 32 and recipe.train["learning_rate"] == 1e-4 and recipe.data.max_rows == 10
    assert recipe.train["gradient_accumulation_steps"] == 4  # inherited from mistral_qlora


def test_every_sft_guide_parameter_is_settable(tmp_path):
    """The SFTConfig parameters TRL's SFT guides teach all bind from dotted overrides."""
    from fasttune.binding import bind

    overrides = [
        "train.num_train_epochs=2", "train.max_steps=7", "train.per_device_train_batch_size=3",
        "train.gradient_accumulation_steps=5", "train.max_length=333", "train.bf16=false", "train.fp16=false",
        "train.half_precision_backend=auto", "train.activation_offloading=false", "train.gradient_checkpointing=false",
        "train.weight_decay=0.05", "train.max_grad_norm=0.5", "train.eval_strategy=steps", "train.eval_steps=9",
        "train.per_device_eval_batch_size=4", "train.learning_rate=3e-5", "train.lr_scheduler_type=cosine",
        "train.warmup_ratio=0.1", "train.warmup_steps=0", "train.completion_only_loss=true",
        "train.assistant_only_loss=true", "train.save_strategy=steps", "train.save_steps=9",
        "train.save_total_limit=2", "train.load_best_model_at_end=true", "train.metric_for_best_model=eval_loss",
        "train.greater_is_better=false", f"train.logging_dir={tmp_path / 'tb'}", "train.logging_strategy=steps",
        "train.logging_steps=3", "train.packing=true", f"train.output_dir={tmp_path / 'out'}",
    ]
    recipe = config.resolve("demo", overrides)
    bound = bind(recipe, plan(recipe, CPU), tmp_path)
    sft = bound.sft
    assert (sft.num_train_epochs, sft.max_steps, sft.per_device_train_batch_size, sft.gradient_accumulation_steps) == (2, 7, 3, 5)
    assert (sft.max_length, sft.weight_decay, sft.max_grad_norm, sft.learning_rate) == (333, 0.05, 0.5, 3e-5)
    assert plain(sft.lr_scheduler_type) == "cosine" and plain(sft.eval_strategy) == "steps"
    assert (sft.eval_steps, sft.save_steps, sft.save_total_limit, sft.logging_steps) == (9, 9, 2, 3)
    assert sft.packing and sft.load_best_model_at_end and sft.assistant_only_loss and sft.completion_only_loss
    assert sft.warmup_steps == 0.1 and sft.output_dir == str(tmp_path / "checkpoints")
    from fasttune.run_folder import new_run_dir

    assert new_run_dir(recipe.name, recipe.train.get("output_dir")) == tmp_path / "out"
    assert bound.logging_dir == str(tmp_path / "tb")


def test_other_library_fields_are_reachable(tmp_path):
    from fasttune.binding import bind

    recipe = config.resolve("mistral_qlora", ["lora.use_rslora=true", "quantization.bnb_4bit_quant_storage=uint8",
                                              "train.neftune_noise_alpha=5"])
    bound = bind(recipe, plan(recipe, CPU, force_cpu=True), tmp_path)
    assert bound.lora.use_rslora and bound.sft.neftune_noise_alpha == 5.0


def test_all_problems_are_reported_together(tmp_path):
    from fasttune.binding import bind
    from fasttune.errors import UserError

    recipe = config.resolve("demo", ["train.learnin_rate=1e-4", "train.r=8", "lora.r=many", "train.lr_scheduler_type=sideways"])
    with pytest.raises(UserError) as caught:
        bind(recipe, plan(recipe, CPU), tmp_path)
    text = caught.value.render()
    assert "did you mean `train.learning_rate`" in text
    assert "did you mean `lora.r`" in text
    assert "lora.r = 'many': must be an integer" in text


def test_keys_transformers_5_moved_stay_settable(tmp_path):
    from fasttune.binding import bind
    from fasttune.errors import UserError

    recipe = config.resolve("demo", ["train.warmup_ratio=0.1", "train.warmup_steps=3"])
    with pytest.raises(UserError, match="both set the warm-up"):
        bind(recipe, plan(recipe, CPU), tmp_path)
    recipe = config.resolve("demo", ["train.half_precision_backend=apex"])
    with pytest.raises(UserError, match="native AMP"):
        bind(recipe, plan(recipe, CPU), tmp_path)


def test_owned_sections_check_keys_and_values():
    from fasttune.errors import UserError

    with pytest.raises(UserError) as caught:
        config.resolve("demo", ["model.backend=turbo", "data.pth=x.jsonl", "method=qlorra", "trian.x=1"])
    text = caught.value.render()
    assert "model.backend = 'turbo': must be one of 'auto', 'unsloth', 'hf'" in text
    assert "did you mean `path`?" in text
    assert "did you mean `qlora`?" in text
    assert "did you mean `train`?" in text



def test_a_dotted_override_below_a_value_that_is_not_a_mapping_is_refused():
    """``data.eval_path=easy.jsonl data.eval_path.hard=hard.jsonl`` would drop easy.jsonl; any key below a
    value that is set (by the recipe or an earlier override) and is not a mapping is refused, all at once."""
    from fasttune.errors import UserError

    recipe = {"data": {"path": "train.jsonl"}, "train": {"learning_rate": 1e-4}}
    with pytest.raises(UserError) as caught:
        config.apply_overrides(recipe, ["data.eval_path=easy.jsonl", "data.eval_path.hard=hard.jsonl", "train.learning_rate.x=1"])
    problems = caught.value.problems
    assert [p.value for p in problems] == ["data.eval_path.hard=hard.jsonl", "train.learning_rate.x=1"]
    first = problems[0].render()
    assert "'easy.jsonl'" in first and "data.eval_path=easy.jsonl" in first  # the value it would replace, and where it came from
    assert "name every entry: data.eval_path.easy=easy.jsonl data.eval_path.hard=hard.jsonl" in first
    assert "0.0001" in problems[1].rule and "the recipe" in problems[1].rule and "train.learning_rate=VALUE" in problems[1].fix
    # absent or null values still become mappings, and the recipe's own mapping is not edited
    raw = {"data": {"eval_path": None}, "lora": {"r": 8}}
    out = config.apply_overrides(raw, ["data.eval_path.easy=easy.jsonl", "data.eval_path.hard=hard.jsonl", "model.x.y=1"])
    assert out["data"]["eval_path"] == {"easy": "easy.jsonl", "hard": "hard.jsonl"} and out["model"] == {"x": {"y": 1}}
    assert raw == {"data": {"eval_path": None}, "lora": {"r": 8}}


def test_an_eval_set_name_that_starts_with_a_digit_gets_a_usable_suggestion():
    from fasttune.errors import UserError

    for name, suggestion in (("1st", "set_1st"), ("bad-name", "bad_name"), ("2-b", "set_2_b")):
        with pytest.raises(UserError) as caught:
            config.resolve("demo", [f"data.eval_path.{name}=easy.jsonl"])
        (problem,) = [p for p in caught.value.problems if p.where == f"data.eval_path.{name}"]
        assert problem.fix == f"rename it, e.g. {suggestion}" and config.EVAL_SET_NAME.match(suggestion)

def test_explicit_unsloth_backend_is_refused_where_it_cannot_run():
    from fasttune.errors import UserError

    recipe = config.resolve("mistral_qlora", ["model.backend=unsloth"])
    with pytest.raises(UserError, match="cannot run here: Unsloth is not installed"):
        plan(recipe, CPU)
    assert plan(recipe, AMPERE_WITH_UNSLOTH).backend == "unsloth"
    phi3 = config.resolve("phi3_qlora", ["model.backend=unsloth"])
    with pytest.raises(UserError, match="does not support family phi3"):
        plan(phi3, AMPERE_WITH_UNSLOTH)


def test_cpu_runs_drop_16_bit_flags_and_say_so(tmp_path):
    from fasttune.binding import bind

    recipe = config.resolve("demo", ["train.bf16=true"])
    cpu_plan = plan(recipe, CPU)
    bound = bind(recipe, cpu_plan, tmp_path)
    assert bound.sft.use_cpu and not bound.sft.bf16
    assert any("train.bf16=true does not apply on the CPU" in note for note in bound.notes)


def test_a_best_model_metric_with_named_eval_sets_must_name_a_sets_metric():
    """Named eval sets log eval_<name>_loss and no eval_loss, transformers' default metric_for_best_model:
    load_best_model_at_end (or a plateau scheduler) without a set's metric is refused when the recipe resolves,
    not at the run's first save."""
    from fasttune.errors import UserError

    sets = ["data.path=train.jsonl", "data.eval_path.easy=easy.jsonl", "data.eval_path.hard=hard.jsonl",
            "train.eval_strategy=steps", "train.save_strategy=steps"]
    for extra, where, needle in (
        (["train.load_best_model_at_end=true"], "train.load_best_model_at_end", "eval_easy_loss, eval_hard_loss"),
        (["train.lr_scheduler_type=reduce_lr_on_plateau"], "train.lr_scheduler_type", "first evaluation"),
        (["train.load_best_model_at_end=true", "train.metric_for_best_model=loss"], "train.metric_for_best_model", "eval_loss"),
        (["train.metric_for_best_model=eval_medium_loss"], "train.metric_for_best_model", "eval_medium_loss"),
    ):
        with pytest.raises(UserError) as caught:
            config.resolve("demo", [*sets, *extra])
        (problem,) = [p for p in caught.value.problems if p.where.startswith("train.")]
        assert problem.where == where and needle in problem.render(), problem.render()
        assert "e.g. eval_easy_loss" in problem.fix or "=eval_easy_loss" in problem.fix
    for metric in ("eval_hard_loss", "easy_loss", "eval_easy_next_token_accuracy"):
        recipe = config.resolve("demo", [*sets, "train.load_best_model_at_end=true", f"train.metric_for_best_model={metric}"])
        assert recipe.train["metric_for_best_model"] == metric
    one = config.resolve("demo", ["data.path=train.jsonl", "data.eval_path=easy.jsonl", "train.eval_strategy=steps",
                                  "train.save_strategy=steps", "train.load_best_model_at_end=true"])
    assert one.train["load_best_model_at_end"] is True  # one eval set logs eval_loss: as before
