"""``fasttune.FastLanguageModel``: Unsloth's calling convention on either backend.

An Unsloth notebook ports by changing one import::

    from fasttune import FastLanguageModel          # was: from unsloth import FastLanguageModel
    model, tokenizer = FastLanguageModel.from_pretrained("mistralai/Mistral-7B-Instruct-v0.3",
                                                         max_seq_length=2048, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16)

``backend="auto"`` takes Unsloth (fused kernels) when it is installed, CUDA is present and the
family is supported, and transformers + bitsandbytes + PEFT otherwise; the choice and its reason
are printed and kept (:meth:`FastLanguageModel.engine`). Defaults follow Unsloth's
(4-bit, 2048 tokens, r=16, alpha=16, dropout 0, seed 3407). Weights load from safetensors only;
``trust_remote_code`` stays off unless asked for.

For the Unsloth backend to take effect, import fasttune before transformers, TRL and PEFT: Unsloth
patches them when it is imported, which happens in ``from_pretrained``.
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

from fasttune import machine
from fasttune.errors import Problem, UserError
from fasttune.families import FAMILIES
from fasttune.families.base import LLAMA_STYLE_TARGETS
from fasttune.model import trained_adapter
from fasttune.model.backends import Engine, hf, import_unsloth, unsloth
from fasttune.model.local_model import has_tokenizer_files
from fasttune.model.source import resolve_model_source
from fasttune.unsloth_api import unsloth_arguments
from fasttune.unsloth_api.saving import attach_saving_calls

BACKENDS = ("auto", "unsloth", "hf")
_ENGINE_ATTRIBUTE = "_fasttune_engine"


class FastLanguageModel:
    """Load a causal LM for LoRA/QLoRA training, and attach LoRA, the way Unsloth does."""

    @staticmethod
    def from_pretrained(model_name: str, max_seq_length: int = 2048, dtype=None, load_in_4bit: bool = True,
                        backend: str = "auto", token: str | None = None, device_map=None, trust_remote_code: bool = False,
                        revision: str | None = None, attn_implementation: str | None = None, full_finetuning: bool = False,
                        load_in_16bit: bool = False, use_gradient_checkpointing="unsloth", **kwargs):
        """``(model, tokenizer)``. ``model_name``: a hub id or a local folder with safetensors, or a
        LoRA adapter (a folder ``model.save_pretrained`` wrote, or a hub id): its base, named in its
        ``adapter_config.json``, loads as asked and the adapter is attached trainable, as Unsloth does.
        Unsloth's other arguments are accepted where fasttune can honour them
        (fasttune/unsloth_api/unsloth_arguments.py)."""
        if backend not in BACKENDS:
            raise UserError(Problem("backend", backend, f"must be one of {', '.join(BACKENDS)}", "use backend='auto'"))
        unsloth_arguments.check(kwargs)
        load_in_4bit = load_in_4bit and not load_in_16bit

        adapter = _adapter_at(model_name, token, revision)
        if adapter is not None and not adapter.base:
            raise UserError(Problem("model_name", model_name, "is a LoRA adapter whose adapter_config.json names no base model",
                                    "load the base with from_pretrained(BASE), then PeftModel.from_pretrained(model, ADAPTER)"))
        # With an adapter, `revision` is the adapter's (as in Unsloth); the base's is in its config.
        base_revision = adapter.config.get("revision") if adapter else revision
        source = resolve_model_source(adapter.base if adapter else model_name)
        if Path(source).expanduser().is_dir():  # absolute: the adapter's config names its base wherever the merge runs
            source = str(Path(source).expanduser().resolve())
        model_type = _model_type(source, base_revision, token)
        family = FAMILIES.get(model_type)
        facts = machine.detect()
        chosen, reason = machine.choose_backend(backend, "backend", on_gpu=facts.cuda, cuda=facts.cuda,
                                                unsloth_installed=facts.unsloth_installed, family=family,
                                                full=full_finetuning)
        if chosen == "unsloth":
            late = [name for name in ("transformers", "trl", "peft") if name in sys.modules and "unsloth" not in sys.modules]
            failure = import_unsloth(explicit=backend == "unsloth", key="backend")
            if failure:
                chosen, reason = "hf", failure
            elif late:
                warnings.warn(f"{', '.join(late)} imported before Unsloth: import fasttune first so Unsloth can patch them",
                              stacklevel=2)
        dtype_name, dtype_reason = _dtype(dtype, facts)
        device = "cuda" if facts.cuda else "cpu"
        if chosen == "unsloth":  # Unsloth loads an adapter folder itself: base from its config, adapter trainable
            model, tokenizer = unsloth.load_base(adapter.location if adapter else source, max_seq_length=max_seq_length,
                                                 dtype=dtype_name, load_in_4bit=load_in_4bit and not full_finetuning, revision=revision,
                                                 trust_remote_code=trust_remote_code, token=token,
                                                 full_finetuning=full_finetuning)
            engine = Engine("unsloth", reason, dtype_name, "unsloth", facts.device_name, dtype_reason=dtype_reason)
        else:
            model, tokenizer, kernels, attention = _load_hf(
                source, max_seq_length, dtype_name, device, load_in_4bit and not full_finetuning, token, device_map,
                trust_remote_code, base_revision, attn_implementation or "sdpa", family)
            engine = Engine("hf", reason, dtype_name, attention, facts.device_name, kernels=kernels,
                            dtype_reason=dtype_reason)
            if adapter is not None:
                model, tokenizer = _attach_adapter_hf(model, tokenizer, adapter, use_gradient_checkpointing, trust_remote_code,
                                                      token, revision)
        engine.loaded_from = tuple(str(Path(p).resolve()) for p in (source, adapter.location if adapter else None)
                                   if p and Path(p).is_dir())
        setattr(model, _ENGINE_ATTRIBUTE, engine)
        attach_saving_calls(model, engine)  # Unsloth's save_pretrained_merged & co, fasttune's way
        print(f"fasttune: {engine.describe()}" + (f"; adapter {adapter.spec} on {adapter.base}" if adapter else ""))
        return model, tokenizer

    @staticmethod
    def get_peft_model(model, r: int = 16, target_modules=None, lora_alpha: float = 16, lora_dropout: float = 0.0,
                       bias: str = "none", use_gradient_checkpointing="unsloth", random_state: int = 3407,
                       use_rslora: bool = False, modules_to_save=None, **kwargs):
        """``model`` with LoRA attached. Unsloth backend: its fused path, checked and reported. A model
        that has LoRA already (``from_pretrained(adapter)``) is returned as it is, as Unsloth does."""
        engine = FastLanguageModel.engine(model)
        if hasattr(model, "peft_config"):
            warnings.warn("the model has LoRA adapters already (loaded with them): get_peft_model leaves them as they are",
                          stacklevel=2)
            return model
        if target_modules is None:
            target_modules = _default_targets(model)
        if engine.backend == "unsloth":
            losses = machine.fast_path_losses(target_modules, lora_dropout, bias, engine.dtype) if engine.device != "CPU" else []
            for loss in losses:  # (Unsloth's CPU fallback has no fused kernels to lose)
                warnings.warn(f"Unsloth's fused fast path will be skipped: {loss}", stacklevel=2)
            model, engine.fast_path = unsloth.attach_lora(
                model, r=r, target_modules=list(target_modules), lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                bias=bias, use_gradient_checkpointing=use_gradient_checkpointing, random_state=random_state,
                use_rslora=use_rslora, modules_to_save=modules_to_save, **kwargs)
            print(f"fasttune: {engine.fast_path.describe()}")
        else:
            model = _attach_hf(model, r, target_modules, lora_alpha, lora_dropout, bias, use_gradient_checkpointing,
                               random_state, use_rslora, modules_to_save, kwargs)
        setattr(model, _ENGINE_ATTRIBUTE, engine)
        attach_saving_calls(model, engine)  # over Unsloth's own, on its backend
        return model

    @staticmethod
    def engine(model) -> Engine:
        """What loaded ``model``: backend and why, dtype, attention, device, fast-path counts."""
        engine = getattr(model, _ENGINE_ATTRIBUTE, None)
        if engine is None:
            raise UserError(Problem("model", type(model).__name__, "was not loaded by fasttune.FastLanguageModel",
                                    "load it with FastLanguageModel.from_pretrained(...) first"))
        return engine

    @staticmethod
    def for_inference(model):
        """Generation mode (KV cache on, dropout off)."""
        if FastLanguageModel.engine(model).backend == "unsloth":
            from unsloth import FastLanguageModel as Unsloth

            return Unsloth.for_inference(model)
        model.eval()
        model.config.use_cache = True
        return model

    @staticmethod
    def for_training(model, use_gradient_checkpointing: bool = True):
        """Back to training mode after :meth:`for_inference`."""
        if FastLanguageModel.engine(model).backend == "unsloth":
            from unsloth import FastLanguageModel as Unsloth

            return Unsloth.for_training(model, use_gradient_checkpointing=use_gradient_checkpointing)
        model.train()
        model.config.use_cache = not use_gradient_checkpointing
        return model


def _adapter_at(model_name: str, token: str | None, revision: str | None):
    """The LoRA adapter ``model_name`` names (fasttune.model.trained_adapter.AdapterSource), or None
    when it names a model: a folder with adapter_config.json and no config.json, or such a hub repository."""
    folder = Path(model_name).expanduser()
    if folder.is_dir():
        if (folder / trained_adapter.ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file():
            return trained_adapter.locate(str(folder))
        return None
    if model_name.count("/") != 1:
        return None
    try:
        from huggingface_hub import file_exists

        if (file_exists(model_name, "config.json", revision=revision, token=token)
                or not file_exists(model_name, trained_adapter.ADAPTER_CONFIG, revision=revision, token=token)):
            return None
    except Exception:  # offline, private or unknown: it is read as a model below, and that error is the one said
        return None
    return trained_adapter.locate(model_name, token, revision)


def _attach_adapter_hf(model, tokenizer, adapter, use_gradient_checkpointing, trust_remote_code, token, revision):
    """The adapter on the loaded base, trainable (Unsloth's ``from_pretrained(adapter)``), and the
    tokenizer saved with the adapter where there is one (the notebook saved it there)."""
    from transformers import AutoTokenizer

    checkpointing = use_gradient_checkpointing in (True, "unsloth")
    model = hf.ready_for_lora(model, gradient_checkpointing=checkpointing,
                              gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None)
    model = trained_adapter.attach(model, adapter.location, token, revision)
    folder = Path(adapter.location)
    if folder.is_dir() and has_tokenizer_files(folder):
        max_length = tokenizer.model_max_length
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        tokenizer.model_max_length = max_length
    return model, tokenizer


def _model_type(source: str, revision: str | None, token: str | None) -> str | None:
    """``config.json``'s model_type, read without transformers (Unsloth must be imported first)."""
    path = Path(source) / "config.json"
    if not path.is_file():
        from huggingface_hub import hf_hub_download

        from fasttune import hub

        hub.use_cache_if_unreachable()
        try:
            path = Path(hf_hub_download(source, "config.json", revision=revision, token=token))
        except Exception as err:  # offline, private, or no such repository: the hub's own words
            raise UserError(Problem("model_name", source, f"cannot read its config.json ({type(err).__name__}: "
                                    f"{str(err).splitlines()[0] if str(err) else ''})",
                                    "check the hub id and your network/HF_TOKEN, or pass a local folder")) from None
    return json.loads(path.read_text(encoding="utf-8")).get("model_type")


def _dtype(dtype, facts) -> tuple[str, str]:
    """The compute dtype's name: as given, else what the device dictates (fasttune.machine.device_dtype)."""
    if dtype is None:
        return machine.device_dtype(facts, on_gpu=facts.cuda)
    name = str(dtype).removeprefix("torch.")
    if name not in ("bfloat16", "float16", "float32"):
        raise UserError(Problem("dtype", dtype, "must be torch.bfloat16, torch.float16, torch.float32 or None",
                                "pass dtype=None to pick from the device"))
    return name, "given"


def _load_hf(source, max_seq_length, dtype, device, load_in_4bit, token, device_map, trust_remote_code, revision,
             attention, family):
    import torch
    from transformers import AutoTokenizer, BitsAndBytesConfig

    quantization = None
    if load_in_4bit:
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=getattr(torch, dtype))
    model = hf.load_base(source, dtype=dtype, attention=attention, device=device, quantization=quantization,
                         revision=revision, trust_remote_code=trust_remote_code, token=token, device_map=device_map)
    if quantization is None and device_map is None and device == "cuda":
        model.to("cuda")
    kernels = hf.apply_liger(model, device)
    model.max_seq_length = max_seq_length
    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, token=token, trust_remote_code=trust_remote_code)
    tokenizer.model_max_length = max_seq_length
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        # Padding with EOS hides EOS from the loss once padding is masked: the model never learns to stop.
        vocab = tokenizer.get_vocab()
        candidates = [*(family.pad_candidates if family else ()), tokenizer.unk_token]
        pad = next((t for t in candidates if t and t in vocab and t != tokenizer.eos_token), None)
        if pad is not None:
            tokenizer.pad_token = pad
    return model, tokenizer, kernels, attention


def _default_targets(model) -> list[str]:
    """All seven projections where the model has them (Unsloth's default), else the family's own."""
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [name for name in LLAMA_STYLE_TARGETS if name in leaves]
    if targets:
        return targets
    family = FAMILIES.get(getattr(model.config, "model_type", None))
    return [name for name in (family.target_modules if family else ()) if name in leaves]


def _attach_hf(model, r, target_modules, lora_alpha, lora_dropout, bias, use_gradient_checkpointing, random_state,
               use_rslora, modules_to_save, extra):
    from peft import LoraConfig
    from transformers import set_seed

    # Unsloth's "unsloth" checkpointing offloads activations to host RAM; here it is plain checkpointing.
    checkpointing = use_gradient_checkpointing in (True, "unsloth")
    for key in ("max_seq_length", "temporary_location", "loftq_config"):
        extra.pop(key, None)  # Unsloth-only arguments with no meaning for PEFT's LoraConfig
    try:
        config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias=bias,
                            target_modules=list(target_modules), use_rslora=use_rslora, modules_to_save=modules_to_save,
                            task_type="CAUSAL_LM", **extra)
    except (TypeError, ValueError) as err:
        raise UserError(Problem("get_peft_model", {"r": r, "bias": bias, **extra}, f"LoraConfig refused it: {err}",
                                "change the arguments named in the message")) from None
    set_seed(random_state)
    return hf.attach_lora(model, config, gradient_checkpointing=checkpointing,
                          gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None)
