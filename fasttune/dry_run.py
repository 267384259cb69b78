"""``recipe NAME --dry-run``: everything a run checks before loading weights, and what it would do.

Each check either passes with a one-line summary, is reported as a problem (exit 2), or, when
the thing cannot be reached from this machine (an uncached hub model offline), is listed as not
checked with the reason: never silently skipped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fasttune.binding import Bound
from fasttune.config import Recipe
from fasttune.errors import Problem, UserError


@dataclass
class DryRunReport:
    checked: list[str] = field(default_factory=list)
    not_checked: list[str] = field(default_factory=list)


def _source_offline_safe(recipe: Recipe, report: DryRunReport) -> str | None:
    """The model source as a local folder, or None (and a note) when only the hub has it."""
    from fasttune.model.source import PACKAGE_PREFIX, is_local, resolve_model_source

    name = recipe.model.name
    if name.startswith(PACKAGE_PREFIX) or name.endswith(".gguf"):
        from fasttune.model.gguf_import import cached_folder, default_cache_root, resolve_package_file

        gguf_path = resolve_package_file(name) if name.startswith(PACKAGE_PREFIX) else Path(name).expanduser()
        folder = cached_folder(gguf_path, default_cache_root())
        if folder.is_dir():
            return str(folder)
        report.not_checked.append(f"model {name}: converted from GGUF on the first real run (a dry run reads no weights); "
                                  "tokenizer, template, LoRA target modules and parameter count were not checked")
        return None
    if is_local(name):
        return resolve_model_source(name)
    from fasttune import hub

    hub.use_cache_if_unreachable()
    try:
        from huggingface_hub import snapshot_download

        # Config and tokenizer files only: a dry run never downloads weights.
        return snapshot_download(recipe.model.name, revision=recipe.model.revision,
                                 allow_patterns=["config.json", "tokenizer*", "special_tokens_map.json", "*.model", "*.tiktoken"])
    except Exception as err:  # offline, gated, or not cached: the hub's error types vary
        offline = f"; {hub.offline_reason()} and they are not cached" if hub.offline_reason() else ""
        report.not_checked.append(f"model {recipe.model.name}: config and tokenizer not reachable ({type(err).__name__}{offline}); "
                                  "tokenizer, template, LoRA target modules and parameter count were not checked")
        return None


def dry_run(recipe: Recipe, bound: Bound) -> DryRunReport:
    from fasttune.data.prepare import prepare
    from fasttune.data.sources import SourceUnavailable

    report = DryRunReport()
    report.checked.append("recipe keys and values bound to SFTConfig"
                          + (", LoraConfig" if bound.lora else "") + (", BitsAndBytesConfig" if bound.bnb else ""))
    data = None
    try:
        data = prepare(recipe)
        report.checked.append(f"data {data.source}: {len(data.train)} train / {len(data.eval)} eval rows, format {data.format}")
        for source_report in (data.report, data.eval_report):
            if source_report is not None:
                report.checked.extend(source_report.lines())
        if data.train:
            from fasttune.data.tokenize import MaskRules, check_rules, row_shape

            check_rules(row_shape(data.train[0]), MaskRules.from_sft(bound.sft))  # what SFTTrainer would refuse
    except SourceUnavailable as err:
        report.not_checked.append(f"data: {err}")

    source = _source_offline_safe(recipe, report)
    if source is None:
        return report
    from fasttune.model.tokenizer import load_tokenizer

    tokenizer, template = load_tokenizer(source, recipe)
    report.checked.append(f"chat template {template.describe()}")
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
    trainable, total = count_parameters_without_weights(source, recipe, bound)
    report.checked.append(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%), counted on the meta device")
    return report


def count_parameters_without_weights(source: str, recipe: Recipe, bound: Bound) -> tuple[int, int]:
    """Trainable and total parameters from the architecture alone (no weights are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    if bound.lora is not None:
        from peft import get_peft_model

        _check_targets(model, recipe)
        model = get_peft_model(model, bound.lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def _check_targets(model, recipe: Recipe) -> None:
    """Every LoRA target names modules of the architecture (PEFT refuses none matching only after
    the weights load, and silently skips a target that matches nothing while others do)."""
    from fasttune.model.local_model import model_target_problem

    problem = model_target_problem(recipe.lora.get("target_modules"), model, recipe.model.name)
    if problem is not None:
        raise UserError(problem)
