"""``recipe NAME --dry-run``: everything a run checks before loading weights, and what it would do.

Each check either passes with a one-line summary, is reported as a problem (exit 2), or, when
the thing cannot be reached from this machine (an uncached hub model offline), is listed as not
checked with the reason: never silently skipped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fasttune.config import Recipe
from fasttune.data.rows import read_data
from fasttune.data.tokenize import IGNORE, MaskRules, row_shape, rules_for_shape, tokenize
from fasttune.errors import Problem, SourceUnavailable, UserError
from fasttune.export.checks import tokenizer_export_problems
from fasttune.model.local_model import model_target_problem
from fasttune.model.source import check_local_folder, is_local, tokenizer_source
from fasttune.model.tokenizer import load_tokenizer
from fasttune.prepare import Prepared


@dataclass
class DryRunReport:
    checked: list[str] = field(default_factory=list)
    not_checked: list[str] = field(default_factory=list)


def _config_and_tokenizer(recipe: Recipe, report: DryRunReport) -> str | None:
    """A local folder with the model's config and tokenizer, or None (and a note) when they are
    not on this machine: a GGUF file not converted yet, a hub model not cached while offline."""
    name = recipe.model.name
    if is_local(name):
        if Path(name).expanduser().is_dir():
            check_local_folder(Path(name).expanduser())  # safetensors only, as the run will load it
        folder = tokenizer_source(name)
        if folder is None:
            report.not_checked.append(f"model {name}: converted from GGUF on the first real run (a dry run reads no weights); "
                                      "tokenizer, template, LoRA target modules and parameter count were not checked")
        return folder
    from fasttune import hub

    hub.use_cache_if_unreachable()
    try:
        from huggingface_hub import snapshot_download

        # Config and tokenizer files only: a dry run never downloads weights.
        return snapshot_download(name, revision=recipe.model.revision,
                                 allow_patterns=["config.json", "tokenizer*", "special_tokens_map.json", "*.model", "*.tiktoken"])
    except Exception as err:  # offline, gated, or not cached: the hub's error types vary
        offline = f"; {hub.offline_reason()} and they are not cached" if hub.offline_reason() else ""
        report.not_checked.append(f"model {name}: config and tokenizer not reachable ({type(err).__name__}{offline}); "
                                  "tokenizer, template, LoRA target modules and parameter count were not checked")
        return None


def dry_run(prepared: Prepared) -> DryRunReport:
    recipe, configs = prepared.recipe, prepared.configs
    report = DryRunReport()
    report.checked.append("recipe keys and values bound to SFTConfig"
                          + (", LoraConfig" if configs.lora else "") + (", BitsAndBytesConfig" if configs.bnb else ""))
    if recipe.model.adapter:
        lora, targets = recipe.lora, recipe.lora.get("target_modules")
        shown = ", ".join(targets) if isinstance(targets, list) else targets
        report.checked.append(f"adapter {recipe.model.adapter}: trains on from it with its own settings (r {lora.get('r')}, "
                              f"alpha {lora.get('lora_alpha')}, targets {shown})")
    data = None
    formatting_func = prepared.hooks.formatting_func
    try:
        data = read_data(recipe, formatting_func)
        report.checked.append(f"data {data.source}: {len(data.train)} train / {data.eval_summary()}, format {data.format}"
                              + (" (rows made by hooks.formatting_func)" if formatting_func else ""))
        for source_report in data.reports():
            report.checked.extend(source_report.lines())
        if data.train:  # what the loss trains in these rows (or the one combination that cannot be honoured)
            shape = row_shape(data.train[0])
            report.checked.append(f"loss mask for {shape} rows: {rules_for_shape(shape, MaskRules.from_sft(configs.sft))[1]}")
    except SourceUnavailable as err:
        report.not_checked.append(f"data: {err}")

    source = _config_and_tokenizer(recipe, report)
    if source is None:
        return report

    tokenizer, template = load_tokenizer(source, recipe)
    report.checked.append(f"chat template {template.describe()}")
    refused = tokenizer_export_problems(tokenizer, recipe)
    if refused:
        raise UserError(refused, "the export this recipe asks for would be refused after training")
    if formatting_func is not None and data is not None and data.train:
        # the first row as it trains: tokenized by fasttune.data.tokenize, as a run tokenizes it (its text and EOS)
        text = data.train[0]["text"]
        made = tokenize(data.train[:1], tokenizer, MaskRules.from_sft(configs.sft))
        ids, labels = made.dataset[0]["input_ids"], made.dataset[0]["labels"]
        trained = sum(label != IGNORE for label in labels)
        limit = made.rules.max_length
        cut = (f"; train.max_length {limit} keeps {limit} of them ({made.rules.truncation_mode})"
               if limit is not None and len(ids) > limit else "")
        report.checked.append(f"hooks.formatting_func: first row -> {len(ids)} tokens, "
                              + ("every one trained" if trained == len(ids) else f"{trained} trained") + f"{cut}: {text[:80]!r}"
                              + ("..." if len(text) > 80 else ""))
    if recipe.export.gguf:
        report.checked.append(f"GGUF export ({', '.join(recipe.export.gguf)}): family, templates and tokenizer can be written")
    if data is not None and data.train and "messages" in data.train[0]:
        encoded = tokenizer.apply_chat_template(data.train[0]["messages"], tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
        trained = sum(encoded["assistant_masks"])
        if trained == 0:
            raise UserError(Problem("data.chat_template", recipe.data.chat_template,
                                    "marks no assistant token in the first example: nothing would be trained",
                                    "use a template with {% generation %} markers (fasttune/families/templates)"))
        report.checked.append(f"template {template.template.name}: first example has {len(encoded['input_ids'])} tokens, "
                              f"{trained} trained (assistant replies + {tokenizer.eos_token!r})")
    trainable, total = count_parameters_without_weights(source, recipe, configs.lora)
    report.checked.append(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%), counted on the meta device")
    return report  # the memory (every method's) is the plan the dry run prints next (fasttune.memory)


def count_parameters_without_weights(source: str, recipe: Recipe, lora) -> tuple[int, int]:
    """Trainable and total parameters from the architecture alone (no weights are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    if lora is not None:
        from peft import get_peft_model

        _check_targets(model, recipe)
        model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def _check_targets(model, recipe: Recipe) -> None:
    """Every LoRA target names modules of the architecture (PEFT refuses none matching only after
    the weights load, and silently skips a target that matches nothing while others do)."""
    problem = model_target_problem(recipe.lora.get("target_modules"), model, recipe.model.name)
    if problem is not None:
        raise UserError(problem)
