"""Unsloth's saving calls on ``fasttune.FastLanguageModel`` models, answered by fasttune's export station.

Unsloth (2026.10.9, ``unsloth/save.py``) attaches ``save_pretrained_merged``, ``save_pretrained_gguf``,
``push_to_hub_merged`` and ``push_to_hub_gguf`` to the models it loads; its GGUF path clones and
compiles llama.cpp. :func:`attach_saving_calls` sets fasttune's on one model instance instead (on the
unsloth backend, over Unsloth's), with Unsloth's argument names and defaults:

- ``merged_16bit``: the LoRA merged into the 16-bit base it was loaded from (never into 4-bit
  weights); a model without LoRA (``full_finetuning=True``) as it is, in 16 bits;
- GGUF: that merged folder, written by fasttune's own writer (no llama.cpp, no compiler, no network)
  where Unsloth puts it, ``<save_directory>_gguf/<model>.<TYPE>.gguf``, with an Ollama Modelfile
  when the tokenizer's chat template is one fasttune knows;
- the hub: the same files written to a temporary folder, then ``HfApi.create_repo`` + ``upload_folder``.

The method names are checked in ``save_methods``, before any work; what is written, and how
(atomically, never over a folder fasttune did not write), is ``save_outputs``.
"""
from __future__ import annotations

import tempfile
import types
from dataclasses import dataclass, field
from pathlib import Path

from fasttune import hub
from fasttune.errors import Problem, UserError
from fasttune.families import FAMILIES
from fasttune.output_paths import folder_problem
from fasttune.run_folder import save_dtype
from fasttune.unsloth_api import save_methods, save_outputs
from fasttune.unsloth_api.save_outputs import SAVING

# Unsloth's arguments about its own memory budget, temporary buffers, shard size and processes:
# nothing here to apply them to (merge_adapter keeps the base's shards and needs about one in memory).
IGNORED = frozenset({"is_main_process", "temporary_location", "maximum_memory_usage", "max_shard_size",
                     "safe_serialization", "use_temp_dir", "tags", "save_peft_format"})


@dataclass(repr=False)
class Trained:
    """What the saving calls are bound to: the model, the dtype its merge is written in, and the
    calls they replaced on it (Unsloth's, on its backend), for :func:`detach_saving_calls`."""

    model: object
    merged_dtype: str
    loaded_from: tuple[str, ...] = ()
    """Folders the model's weights came from: never a save_directory."""
    replaced: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"<{type(self.model).__name__} loaded by fasttune.FastLanguageModel>"


def attach_saving_calls(model, engine) -> None:
    """Set fasttune's saving calls on this ``model`` instance (a patch of it alone), replacing any there."""
    trained = Trained(model, save_dtype(engine.dtype), engine.loaded_from)
    for call in (save_pretrained_merged, save_pretrained_gguf, push_to_hub_merged, push_to_hub_gguf):
        previous = vars(model).get(call.__name__)
        owner = getattr(previous, "__self__", None)
        # Attached twice (from_pretrained, then get_peft_model, may return the same object): keep the original.
        trained.replaced[call.__name__] = owner.replaced[call.__name__] if isinstance(owner, Trained) else previous
        setattr(model, call.__name__, types.MethodType(call, trained))


def detach_saving_calls(model) -> None:
    """Undo :func:`attach_saving_calls`: the calls that were there before come back (or none)."""
    trained = vars(model)["save_pretrained_merged"].__self__
    for name, previous in trained.replaced.items():
        if previous is None:
            delattr(model, name)
        else:
            setattr(model, name, previous)


def save_pretrained_merged(self: Trained, save_directory, tokenizer=None, save_method: str = "merged_16bit",
                           push_to_hub: bool = False, token=None, **unsloth_only):
    """Write the model to ``save_directory``: ``merged_16bit`` (Unsloth's default) the LoRA merged into
    the 16-bit base, ``lora`` the adapter alone. ``merged_4bit`` and the FP8/FP4 methods are refused."""
    method = save_methods.save_method(save_method)
    _check_unused("save_pretrained_merged", unsloth_only)
    if push_to_hub:
        return push_to_hub_merged(self, str(save_directory), tokenizer, save_method=method, token=token)
    out = save_outputs.claim_folder(save_directory, self.loaded_from)
    if method == "lora":
        return save_outputs.save_adapter(self.model, out, tokenizer)
    _require_tokenizer(tokenizer, "save_pretrained_merged")
    return save_outputs.save_16bit_model(self.model, self.merged_dtype, out, tokenizer)


def save_pretrained_gguf(self: Trained, save_directory, tokenizer=None, quantization_method="fast_quantized",
                         push_to_hub: bool = False, token=None, **unsloth_only) -> dict:
    """The 16-bit model in ``save_directory`` and, from it, one GGUF per ``quantization_method`` (a name
    or a list; Unsloth's default ``fast_quantized`` is q8_0) in ``<save_directory>_gguf``, with a Modelfile."""
    presets = save_methods.gguf_methods(quantization_method, self.merged_dtype)
    _check_unused("save_pretrained_gguf", unsloth_only)
    _require_tokenizer(tokenizer, "save_pretrained_gguf")
    _require_gguf_family(self.model)
    if push_to_hub:
        return push_to_hub_gguf(self, str(save_directory), tokenizer, quantization_method=presets, token=token)
    out = save_outputs.claim_folder(save_directory, self.loaded_from)
    gguf_dir = Path(f"{out}_gguf")
    problem = folder_problem(gguf_dir, "save_directory", "give a save_directory whose <name>_gguf folder can be written")
    if problem is not None:
        raise UserError(problem, "cannot write the GGUF")
    merged = save_outputs.save_16bit_model(self.model, self.merged_dtype, out, tokenizer)
    files, modelfile = save_outputs.write_ggufs(merged, gguf_dir, presets, tokenizer, save_outputs.model_stem(self.model))
    return {"save_directory": str(merged), "gguf_directory": str(gguf_dir), "gguf_files": [str(f) for f in files],
            "modelfile_location": str(modelfile) if modelfile else None}


def push_to_hub_merged(self: Trained, repo_id: str, tokenizer=None, save_method: str = "merged_16bit", token=None,
                       private: bool | None = None, commit_message: str | None = None, commit_description: str | None = None,
                       revision: str | None = None, create_pr: bool = False, **unsloth_only):
    """:func:`save_pretrained_merged` into a temporary folder, uploaded to the hub repository ``repo_id``."""
    method = save_methods.save_method(save_method)
    _check_unused("push_to_hub_merged", unsloth_only)
    if method != "lora":
        _require_tokenizer(tokenizer, "push_to_hub_merged")
    token = _hub_token(token, "push_to_hub_merged")
    with tempfile.TemporaryDirectory(prefix="fasttune-push-") as tmp:
        folder = Path(tmp) / Path(repo_id).name
        if method == "lora":
            save_outputs.save_adapter(self.model, folder, tokenizer)
        else:
            save_outputs.save_16bit_model(self.model, self.merged_dtype, folder, tokenizer)
        return _upload(folder, repo_id, token, private, commit_message, commit_description, revision, create_pr)


def push_to_hub_gguf(self: Trained, repo_id: str, tokenizer=None, quantization_method="fast_quantized", token=None,
                     private: bool | None = None, commit_message: str | None = None, commit_description: str | None = None,
                     revision: str | None = None, create_pr: bool = False, **unsloth_only):
    """:func:`save_pretrained_gguf` into a temporary folder; the GGUF files and Modelfile are uploaded to ``repo_id``."""
    presets = save_methods.gguf_methods(quantization_method, self.merged_dtype)
    _check_unused("push_to_hub_gguf", unsloth_only)
    _require_tokenizer(tokenizer, "push_to_hub_gguf")
    _require_gguf_family(self.model)
    token = _hub_token(token, "push_to_hub_gguf")
    with tempfile.TemporaryDirectory(prefix="fasttune-push-") as tmp:
        # Named after the repository: the folder's name is the GGUF's general.name.
        merged = save_outputs.save_16bit_model(self.model, self.merged_dtype, Path(tmp) / Path(repo_id).name, tokenizer)
        gguf_dir = Path(tmp) / f"{merged.name}_gguf"
        save_outputs.write_ggufs(merged, gguf_dir, presets, tokenizer, save_outputs.model_stem(self.model))
        return _upload(gguf_dir, repo_id, token, private, commit_message, commit_description, revision, create_pr)


def _upload(folder: Path, repo_id: str, token: str, private, commit_message, commit_description, revision, create_pr):
    import huggingface_hub

    api = huggingface_hub.HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=url.repo_id, folder_path=folder, repo_type="model", revision=revision,
                                 commit_message=commit_message or "Upload model trained with fasttune",
                                 commit_description=commit_description, create_pr=create_pr)
    except Exception as err:  # refused, unreachable, no such namespace: the hub's words, never the token
        said = (str(err).splitlines() or [""])[0].replace(token, "<token>")
        raise UserError(Problem("repo_id", repo_id, f"the hub did not take the upload ({type(err).__name__}: {said})",
                                "check the repository id and that the token may write to it"), "cannot upload") from None
    print(f"fasttune: uploaded {', '.join(sorted(p.name for p in folder.iterdir()))} to {url}")
    return info


def _hub_token(token, call: str) -> str:
    """The token to upload with: ``token``, else huggingface_hub's (HF_TOKEN, or ``hf auth login``'s)."""
    if hub.offline_mode():
        raise UserError(Problem(call, "HF_HUB_OFFLINE", "offline mode is on: nothing can be uploaded",
                                "unset HF_HUB_OFFLINE, or save locally with save_pretrained_merged / save_pretrained_gguf"),
                        "cannot upload")
    if isinstance(token, str) and token.strip():
        return token.strip()
    import huggingface_hub

    found = huggingface_hub.get_token()
    if not found:
        raise UserError(Problem("token", None, f"{call} uploads to the Hugging Face Hub, which needs a token with write access",
                                "pass token='hf_...', set HF_TOKEN, or run `hf auth login` "
                                "(tokens: https://huggingface.co/settings/tokens)"), "cannot upload")
    return found


def _check_unused(call: str, arguments: dict) -> None:
    unknown = sorted(set(arguments) - IGNORED)
    if unknown:
        raise UserError(Problem(call, unknown, "are arguments fasttune does not take (in Unsloth they drive llama.cpp, "
                                "llm-compressor or a multi-process save)", f"remove them (see help(model.{call}))"), SAVING)


def _require_tokenizer(tokenizer, call: str) -> None:
    if tokenizer is None:
        raise UserError(Problem("tokenizer", None, f"{call} writes the tokenizer beside the weights (a GGUF's vocabulary "
                                "comes from it)", f"pass the tokenizer from_pretrained returned: model.{call}(folder, tokenizer)"),
                        SAVING)


def _require_gguf_family(model) -> None:
    model_type = getattr(model.config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None or family.gguf_arch is None:
        known = sorted(name for name, f in FAMILIES.items() if f.gguf_arch)
        raise UserError(Problem("model", model_type, f"fasttune writes GGUF for the families {', '.join(known)}",
                                "save_pretrained_merged(folder, tokenizer) writes the 16-bit model; convert that with "
                                "llama.cpp's convert_hf_to_gguf.py"), "cannot write the GGUF")


