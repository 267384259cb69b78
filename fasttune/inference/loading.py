"""What ``chat`` and ``generate`` talk to: a run folder's trained result, or a model folder or hub id.

A run folder loads as it trained: its base (4-bit NF4 for QLoRA, as the recipe quantized it) with
its ``adapter/`` on top, or the full fine-tune's ``model/``, or with ``--merged`` its ``merged/``.
The tokenizer is always the one the run saved beside its weights: it carries the training chat
template and the end-of-turn token as EOS, so what the chat shows is what was trained. Everything
is checked (``locate``) before any weights load.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fasttune.config import Recipe
from fasttune.errors import Problem, UserError, suggest
from fasttune.run_folder import CONFIG

KEY = "RUN_DIR|MODEL"


@dataclass(frozen=True)
class Target:
    """What to load, resolved from the command line (no weights yet)."""

    kind: str
    """``adapter`` (a run's base + adapter), ``full`` (a full fine-tune's model/), ``merged`` (a run's
    merged/), ``model`` (a model folder or hub id)."""
    weights: str
    """The folder (or hub id) whose weights load last: the adapter, or the model itself."""
    recipe: Recipe | None = None
    """The run's own recipe (None for a plain model)."""
    run_dir: Path | None = None


@dataclass
class Loaded:
    model: object
    tokenizer: object
    target: Target
    stops: tuple[str, ...]
    """Strings that end an answer (the chat format's; the tokenizer's EOS always does)."""
    template: str
    """The chat template's name, or what the tokenizer's own template is."""
    dtype: str
    device: str
    quantized: bool

    @property
    def context(self) -> int:
        """Tokens the model reads at most (its config's ``max_position_embeddings``)."""
        return int(getattr(self.model.config, "max_position_embeddings", None) or 2048)

    def check_answer_length(self, max_new_tokens: int) -> None:
        """An answer length that leaves no room for a prompt in the model's context is refused."""
        if max_new_tokens >= self.context:
            raise UserError(Problem("--max-new-tokens", max_new_tokens, f"leaves no room for the prompt: the model reads "
                                    f"{self.context} tokens at most, prompt and answer together",
                                    f"e.g. --max-new-tokens {min(256, self.context // 2)}"))

    def describe(self) -> str:
        target, recipe = self.target, self.target.recipe
        what = {"adapter": f"adapter {target.weights} on {recipe.model.name if recipe else '?'}"
                           + (" (4-bit NF4, as trained)" if self.quantized else ""),
                "full": f"fully fine-tuned model {target.weights}", "merged": f"merged model {target.weights}",
                "model": f"model {target.weights}"}[target.kind]
        return f"{what}; hf backend, {self.dtype}, {self.device}; template {self.template}"


def system_prompt(target: Target) -> str | None:
    """The system prompt the run's rows carried: ``data.system_prompt``, or a builtin task's own."""
    recipe = target.recipe
    if recipe is None:
        return None
    if recipe.data.system_prompt:
        return recipe.data.system_prompt
    from fasttune.config import BUILTIN_PREFIX
    from fasttune.tasks import get_task

    path = recipe.data.path if isinstance(recipe.data.path, str) else None
    if path and path.startswith(BUILTIN_PREFIX):
        try:
            return get_task(path[len(BUILTIN_PREFIX):]).system_prompt
        except KeyError:
            return None
    return None


def locate(spec: str, merged: bool = False) -> Target:
    """Resolve ``spec`` (a run folder, a model folder or a hub id) or say, by name, why it cannot load."""
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        raise UserError(Problem(KEY, spec, "is a GGUF file: fasttune talks to a run folder or a transformers model",
                                "give the run folder it was exported from, or chat with the GGUF in Ollama "
                                "(ollama create NAME -f gguf/Modelfile) or llama.cpp (llama-cli -m FILE -cnv)"))
    if path.name in ("adapter", "model", "merged") and (path.parent / CONFIG).is_file():
        return locate(str(path.parent), merged=merged or path.name == "merged")
    if (path / CONFIG).is_file():
        return _run_target(path, merged)
    if merged:
        raise UserError(Problem("--merged", spec, "only applies to a run folder (its merged/ model)",
                                "drop --merged: a model folder or hub id is loaded as it is"))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(Problem(KEY, spec, "is a folder with neither config.yaml (a run) nor config.json (a model)",
                                    "give a run folder (runs/<recipe>-<time>) or a saved Hugging Face model folder"))
        from fasttune.model.source import check_local_folder

        check_local_folder(path)
        return Target("model", str(path))
    from fasttune.model.source import is_local

    runs_here = [str(p) for folder in (Path("."), Path("runs")) if folder.is_dir() for p in folder.iterdir() if (p / CONFIG).is_file()]
    if not is_local(spec) and "/" not in spec and suggest(spec, runs_here):  # `chat demo-2026...` with a typo, not a hub id
        raise UserError(Problem(KEY, spec, "no such run folder or model folder", suggest(spec, runs_here)))
    if is_local(spec) or (path.parent != Path(".") and path.parent.is_dir()):
        runs = sorted(str(p) for p in path.parent.glob("*") if (p / CONFIG).is_file()) if path.parent.is_dir() else []
        raise UserError(Problem(KEY, spec, "no such run folder or model folder",
                                suggest(str(path), runs) or (f"runs here: {', '.join(runs[-3:])}" if runs else
                                                             "give a run folder (runs/<recipe>-<time>), a model folder or a hub id")))
    return Target("model", spec)


def _run_target(run_dir: Path, merged: bool) -> Target:
    from fasttune.prepare import resolve_finished_run

    recipe = resolve_finished_run(run_dir)
    if merged:
        folder = run_dir / ("model" if recipe.method == "full" else "merged")
        if not (folder / "config.json").is_file():
            raise UserError(Problem("--merged", str(run_dir), "has no merged/ model",
                                    f"write it first: python -m fasttune export {run_dir} --merged (or drop --merged: the adapter "
                                    "on its base answers nearly the same; merged/ is rounded to 16 bits)"))
        return Target("full" if recipe.method == "full" else "merged", str(folder), recipe, run_dir)
    if recipe.method == "full":
        folder, kind = run_dir / "model", "full"
        ready = (folder / "config.json").is_file()
    else:
        folder, kind = run_dir / "adapter", "adapter"
        ready = (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    if not ready:
        raise UserError(Problem(KEY, str(run_dir), f"has no {folder.name}/: its training did not finish",
                                f"finish it: python -m fasttune recipe {run_dir / CONFIG} --resume {run_dir}"))
    return Target(kind, str(folder), recipe, run_dir)


def load(target: Target, force_cpu: bool = False) -> Loaded:
    """The model and tokenizer of ``target``, on the GPU when there is one (``force_cpu``: the CPU)."""
    import transformers

    from fasttune import machine
    from fasttune.model.backends.hf import load_base

    transformers.utils.logging.disable_progress_bar()  # the start-up line says what loads
    facts = machine.detect()
    recipe = target.recipe
    device = "cuda" if facts.cuda and not force_cpu else "cpu"
    if recipe is not None:
        plan = machine.plan(recipe, facts, force_cpu)
        dtype, attention = plan.dtype, plan.attention
    else:
        dtype, attention = ("bfloat16" if facts.bf16 else "float16") if device == "cuda" else "float32", "sdpa"
    tokenizer = _tokenizer(target)
    quantization = _quantization(recipe, plan) if target.kind == "adapter" and recipe.method == "qlora" else None
    source = target.weights
    if target.kind == "adapter":
        from fasttune.model.source import resolve_model_source

        source = resolve_model_source(recipe.model.name)
    trust = bool(recipe and recipe.model.trust_remote_code)
    model = _from_hub_or_folder(lambda: load_base(source, dtype=dtype, attention=attention, device=device, quantization=quantization,
                                                  revision=recipe.model.revision if target.kind == "adapter" else None,
                                                  trust_remote_code=trust), source)
    if quantization is None:
        model.to(device)
    if target.kind == "adapter":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, target.weights, is_trainable=False)
    stops, template = _stops(tokenizer, recipe)
    return Loaded(model, tokenizer, target, stops, template, dtype, facts.device_name if device == "cuda" else "CPU",
                  quantization is not None)


def _tokenizer(target: Target):
    """The run's own tokenizer (training template, end of turn as EOS, a pad), or a plain model's own."""
    from transformers import AutoTokenizer

    folder = target.weights
    tokenizer = _from_hub_or_folder(lambda: AutoTokenizer.from_pretrained(folder), folder)
    if not tokenizer.chat_template:
        raise UserError(Problem(KEY, folder, "has a tokenizer without a chat template: there is no conversation format to use",
                                "give a run folder, or an instruct model whose tokenizer has a chat template"))
    return tokenizer


def _stops(tokenizer, recipe: Recipe | None) -> tuple[tuple[str, ...], str]:
    from fasttune.families.chat_templates import recognize
    from fasttune.model.tokenizer import training_template

    if recipe is not None:
        template = training_template(tokenizer, recipe)
        return template.stop, template.name
    template = recognize(tokenizer.chat_template, tokenizer.get_vocab())
    if template is None:
        return (), "the tokenizer's own (not a known format: answers end at its EOS)"
    return template.stop, f"the tokenizer's own ({template.name})"


def _quantization(recipe: Recipe, plan):
    """The recipe's BitsAndBytesConfig, as binding made it for training (compute dtype per the plan)."""
    import tempfile

    from fasttune.binding import bind

    with tempfile.TemporaryDirectory() as tmp:
        return bind(recipe, plan, Path(tmp)).bnb


def _from_hub_or_folder(load, source: str):
    """``load()``; a hub id that is not cached while offline is said as such (fasttune.hub)."""
    from fasttune import hub

    local = Path(source).is_dir()
    if not local:
        hub.use_cache_if_unreachable()
    try:
        return load()
    except OSError as err:
        if not local and hub.offline_reason():
            raise hub.not_cached("model", source, KEY, err) from None
        raise
