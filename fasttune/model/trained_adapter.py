"""``model.adapter``: train on from a LoRA adapter someone already has.

The adapter is a PEFT folder (``adapter_config.json`` + safetensors), a fasttune run folder (its
``adapter/``), or a hub id. Its LoRA settings (rank, alpha, targets, ...) come from its own
``adapter_config.json``: the recipe's ``lora:`` section may repeat them but not contradict them, and
the resolved recipe carries the adapter's values (so ``config.yaml``, the dry run and the memory
estimates describe the adapter that trains). A base model other than the one the adapter names is
said as a note, not refused: training on from a sibling checkpoint (a 4-bit upload of the same
model, a local copy) is a normal thing to do.

Reading the adapter's settings is torch-free; :func:`attach` (PEFT) runs in the backends.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from fasttune.errors import Problem, UserError, suggest
from fasttune.model.gguf_import import PACKAGE_PREFIX, cached_folder, default_cache_root, names_gguf, resolve_package_file
from fasttune.run_folder import CONFIG

ADAPTER_CONFIG = "adapter_config.json"

# The adapter_config.json keys that say what the adapter is (its shape, scale and where it sits),
# in PEFT's LoraConfig names; a recipe's lora: value for one of them must agree with the adapter's.
SETTINGS = ("r", "lora_alpha", "target_modules", "lora_dropout", "bias", "use_rslora", "use_dora",
            "modules_to_save", "layers_to_transform", "layers_pattern", "fan_in_fan_out", "rank_pattern", "alpha_pattern")


@dataclass(frozen=True)
class AdapterSource:
    """Where an adapter is and what its config says."""

    spec: str
    """``model.adapter`` as written."""
    location: str
    """What PEFT loads: a local adapter folder, or a hub id."""
    config: dict
    """Its adapter_config.json."""
    base_of_run: str | None = None
    """For a fasttune run folder: the ``model.name`` that run trained on."""

    @property
    def recorded(self) -> str:
        """``spec`` as config.yaml records it: a local folder made absolute (a run read back from
        elsewhere still finds it), a hub id as written."""
        return str(Path(self.spec).expanduser().resolve()) if self.location != self.spec or Path(self.spec).exists() else self.spec

    @property
    def base(self) -> str | None:
        return self.base_of_run or self.config.get("base_model_name_or_path")

    def settings(self) -> dict:
        """The adapter's LoRA settings, as a recipe ``lora:`` section (defaults PEFT writes left out)."""
        out = {key: self.config[key] for key in SETTINGS if self.config.get(key) not in (None, {}, [])}
        for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
            if out.get(key) is False:
                del out[key]
        if isinstance(out.get("target_modules"), list):
            out["target_modules"] = sorted(out["target_modules"])
        return out


def _looks_local(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or Path(spec).expanduser().exists() or spec.count("/") > 1


def locate(spec: str, token: str | None = None, revision: str | None = None) -> AdapterSource:
    """The adapter ``spec`` names (``revision``, ``token``: of a hub adapter); a UserError saying what
    is wrong where it is not one."""
    if _looks_local(spec):
        return _local(spec)
    return _from_hub(spec, token, revision)


def _local(spec: str) -> AdapterSource:
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(Problem("model.adapter", spec, "no such folder", _nearby(path) or
                                "give a PEFT adapter folder, a fasttune run folder or a hub id"))
    if path.is_file():
        raise UserError(Problem("model.adapter", spec, "is a file, not an adapter folder",
                                "name the folder that holds adapter_config.json, or a fasttune run folder"))
    base_of_run = None
    if (path / CONFIG).is_file() and not (path / ADAPTER_CONFIG).is_file():  # a fasttune run folder
        if (path / "model" / "config.json").is_file() and not (path / "adapter").exists():
            raise UserError(Problem("model.adapter", spec, "is a full fine-tune run: every parameter trained, there is no adapter",
                                    f"train on from its model instead: model.name={path / 'model'}"))
        base_of_run = _run_base(path / CONFIG)
        path = path / "adapter"
        if not (path / ADAPTER_CONFIG).is_file():
            raise UserError(Problem("model.adapter", spec, "is a run folder without adapter/ (the run did not finish)",
                                    f"finish it first (python -m fasttune recipe NAME --resume {spec}), or name another adapter"))
    if not (path / ADAPTER_CONFIG).is_file():
        raise UserError(Problem("model.adapter", spec, f"has no {ADAPTER_CONFIG}: not a PEFT adapter folder",
                                "name the folder model.save_pretrained(...) wrote for a LoRA model, or a fasttune run folder"))
    if not any(path.glob("adapter_model*.safetensors")):
        raise UserError(Problem("model.adapter", spec, "has no adapter_model.safetensors (fasttune loads safetensors only)",
                                "re-save the adapter with model.save_pretrained(folder, safe_serialization=True)"))
    return AdapterSource(spec, str(path.resolve()), _read_config(path / ADAPTER_CONFIG, spec), base_of_run)


def _run_base(config_yaml: Path) -> str | None:
    import yaml

    try:
        document = yaml.safe_load(config_yaml.read_text(encoding="utf-8")) or {}
        return (document.get("model") or {}).get("name")
    except (OSError, ValueError, AttributeError):
        return None


def _read_config(path: Path, spec: str) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError(f"it holds a {type(config).__name__}, not an object")
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise UserError(Problem("model.adapter", spec, f"has an {ADAPTER_CONFIG} that cannot be read ({str(err)[:120]})",
                                "restore it (model.save_pretrained(folder) writes it)")) from None
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(Problem("model.adapter", spec, f"is a {config.get('peft_type')} adapter; fasttune trains LoRA adapters",
                                "name a LoRA adapter"))
    return config


@lru_cache(maxsize=8)
def _from_hub(spec: str, token: str | None = None, revision: str | None = None) -> AdapterSource:
    from huggingface_hub import hf_hub_download

    from fasttune import hub

    hub.use_cache_if_unreachable()
    try:
        path = Path(hf_hub_download(spec, ADAPTER_CONFIG, revision=revision, token=token))
    except Exception as err:  # offline and not cached, private, no such repository, or no adapter in it
        reason = hub.offline_reason()
        raise UserError(Problem("model.adapter", spec, f"is no local folder, and its {ADAPTER_CONFIG} cannot be read from the "
                                f"hub ({type(err).__name__}" + (f"; {reason}" if reason else "") + ")",
                                _nearby(Path(spec)) or "check the path, or the hub id and your network/HF_TOKEN")) from None
    if not _hub_has_safetensors(spec, token, revision):
        raise UserError(Problem("model.adapter", spec, "has no adapter_model.safetensors on the hub (fasttune loads safetensors only)",
                                "ask its author for a safetensors upload, or convert it yourself and give the local folder"))
    return AdapterSource(spec, spec, _read_config(path, spec))


def _hub_has_safetensors(spec: str, token: str | None, revision: str | None) -> bool:
    """Whether the hub adapter has safetensors weights (True where the hub cannot be asked: offline,
    PEFT then loads from the cache or says itself what is missing)."""
    from huggingface_hub import file_exists

    try:
        return file_exists(spec, "adapter_model.safetensors", revision=revision, token=token)
    except Exception:  # offline or unreachable
        return True


def _nearby(path: Path) -> str:
    """``did you mean `runs/demo-1`?`` for a folder beside ``path`` with a close name, else ``""``."""
    parent = path.expanduser().parent
    if not parent.is_dir():
        return ""
    close = suggest(path.name, [p.name for p in parent.iterdir() if p.is_dir()])
    return close.replace("`", f"`{parent}/" if str(parent) != "." else "`", 1)


def contradictions(recipe_lora: dict, adapter: AdapterSource) -> list[Problem]:
    """The recipe's ``lora:`` values that differ from the adapter's own (all of them, one Problem each)."""
    theirs = adapter.settings()
    problems = []
    for key, ours in recipe_lora.items():
        if key not in SETTINGS:
            continue
        value = theirs.get(key)
        same = (sorted(ours) == sorted(value) if isinstance(ours, list) and isinstance(value, list) else ours == value)
        if ours is None:  # lora.KEY=null: take the adapter's
            continue
        if not same and not (value is None and ours in (False, [], {})):
            problems.append(Problem(f"lora.{key}", ours, f"contradicts the adapter, whose {ADAPTER_CONFIG} says {value!r}",
                                    f"set lora.{key}={_written(value)}, or lora.{key}=null to take the adapter's"))
    return problems


def _written(value: object) -> str:
    """``value`` as it is written on the command line (``[q_proj,v_proj]``, ``16``)."""
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _names_of(model_name: str) -> set[str]:
    """Every way a base may be named in an adapter config: as written, and the folder it loads from."""
    names = {model_name}
    if model_name.startswith(PACKAGE_PREFIX) or names_gguf(model_name):
        try:
            gguf = resolve_package_file(model_name) if model_name.startswith(PACKAGE_PREFIX) else Path(model_name).expanduser().resolve()
            names.add(str(cached_folder(gguf, default_cache_root())))
        except (FileNotFoundError, ValueError):
            pass
    elif Path(model_name).expanduser().is_dir():
        names.add(str(Path(model_name).expanduser().resolve()))
    return names


def base_note(model_name: str, adapter: AdapterSource) -> str | None:
    """A note when the recipe's base is not the one the adapter was trained on (None when it is)."""
    base = adapter.base
    if not base:
        return f"model.adapter: {adapter.spec} does not say which base it was trained on; training on from it on {model_name}"
    theirs = {base, str(Path(base).expanduser().resolve())} if _looks_local(base) else {base}
    if theirs & _names_of(model_name) or base.lower() == model_name.lower():
        return None
    return (f"model.adapter: {adapter.spec} was trained on {base}, this run loads {model_name}: training goes on "
            "from it on a different base (fine for a copy or a 4-bit upload of the same model)")


def adopt(recipe):
    """``recipe`` with its ``lora:`` section set to the adapter's own settings (call after the
    checks found no contradiction)."""
    import dataclasses

    adapter = locate(recipe.model.adapter)
    kept = {key: value for key, value in recipe.lora.items() if not (key in SETTINGS and value is None)}
    return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, adapter=adapter.recorded),
                               lora={**kept, **adapter.settings()})


def attach(model, adapter: str, token: str | None = None, revision: str | None = None):
    """``model`` with the adapter at ``adapter`` (a folder, or a hub id at ``revision``) attached,
    trainable (PEFT; :func:`locate` made sure it has safetensors weights)."""
    from peft import PeftModel

    hub = {key: value for key, value in (("token", token), ("revision", revision)) if value}
    try:
        return PeftModel.from_pretrained(model, adapter, is_trainable=True, **hub)
    except RuntimeError as err:  # "size mismatch for ...": an adapter made for another architecture or size
        first = str(err).strip().splitlines()
        detail = next((line.strip() for line in first if "size mismatch" in line), first[0] if first else "")
        raise UserError(Problem("model.adapter", adapter, f"does not fit this base model ({detail[:200]})",
                                "train on from it with the base it was made for (its adapter_config.json "
                                "base_model_name_or_path)")) from None
