"""What a local ``model.name`` holds, read without torch or transformers: checked when a recipe resolves.

A ``.gguf`` path must be a GGUF file, a folder's ``config.json`` must be JSON, a tokenizer must be
there, and every LoRA target module must name modules of the model. Module names come from the
safetensors headers (or the shard index): the weights themselves are never read. A hub model is
not looked at here (``--dry-run`` checks it when its config is cached, and says so when not).
"""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path

from fasttune.errors import Problem
from fasttune.model.gguf_import import PACKAGE_PREFIX, cached_folder, default_cache_root, resolve_package_file

GGUF_MAGIC = b"GGUF"
"""The first four bytes of every GGUF file (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md)."""
MAX_HEADER_BYTES = 100 * 2**20
"""A safetensors header longer than this is not one (the format caps it at 100 MB)."""


def is_gguf_file(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == GGUF_MAGIC


def has_tokenizer_files(folder: Path) -> bool:
    """Any file AutoTokenizer builds a tokenizer from: tokenizer.json / tokenizer_config.json /
    a SentencePiece or tiktoken model / a vocab file."""
    return any(p.name.startswith(("tokenizer", "vocab", "spiece", "merges")) or p.suffix in (".model", ".tiktoken")
               for p in folder.iterdir())


def weight_names(folder: Path) -> list[tuple[str, int]] | None:
    """``(tensor name, number of dimensions)`` of the folder's safetensors weights, from the file
    headers; None when there are none or a header cannot be read (loading names that problem)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return None
        return [(name, 2) for name in weight_map]  # the index has no shapes: every tensor counts
    names = []
    shards = sorted(folder.glob("*.safetensors"))
    for shard in shards:
        try:
            with open(shard, "rb") as handle:
                (size,) = struct.unpack("<Q", handle.read(8))
                if size > MAX_HEADER_BYTES:
                    return None
                header = json.loads(handle.read(size))
        except (OSError, ValueError, struct.error, UnicodeDecodeError):
            return None
        names += [(name, len(info.get("shape", ()))) for name, info in header.items() if name != "__metadata__" and isinstance(info, dict)]
    return names or None


def module_names(weights: list[tuple[str, int]]) -> tuple[set[str], list[str]]:
    """Every module that owns a weight, and the distinct last names of those owning a matrix
    (the layers LoRA can target, e.g. q_proj, down_proj, embed_tokens)."""
    modules, layers = set(), {}
    for name, dims in weights:
        module = name.rsplit(".", 1)[0]
        parts = module.split(".")
        modules.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        if dims == 2:
            layers[parts[-1]] = None
    return modules, list(layers)


def target_list(targets: object) -> list[str] | None:
    """``lora.target_modules`` as fasttune.binding gives it to PEFT (a string is a comma list);
    None for PEFT's ``all-linear`` shorthand, which needs no name to exist."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        return None
    if [t.lower() for t in targets] == ["all-linear"]:
        return None
    return targets


def missing_targets(targets: list[str], modules: set[str]) -> list[str]:
    """Targets that match no module, the way PEFT matches a list (a name, or a dotted suffix of one)."""
    return [t for t in targets if t not in modules and not any(m.endswith(f".{t}") for m in modules)
            and not _is_pattern_match(t, modules)]


def _is_pattern_match(target: str, modules: set[str]) -> bool:
    if not re.search(r"[\\^$*+?()\[\]|]", target):
        return False
    try:
        pattern = re.compile(target)
    except re.error:
        return False
    return any(pattern.fullmatch(m) for m in modules)


def target_problem(targets: object, folder: Path, name: str) -> Problem | None:
    """A Problem naming the targets ``folder``'s model lacks, or None (also when it cannot tell)."""
    weights = weight_names(folder) if target_list(targets) else None
    if not weights:
        return None
    return targets_problem(targets, *module_names(weights), name)


def model_target_problem(targets: object, model, name: str) -> Problem | None:
    """The same check on a built model (a meta-device one in a dry run), from its module tree."""
    modules = {n for n, _ in model.named_modules() if n}
    layers = dict.fromkeys(n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                           if n and getattr(getattr(m, "weight", None), "ndim", 0) == 2)
    return targets_problem(targets, modules, list(layers), name)


def targets_problem(targets: object, modules: set[str], layers: list[str], name: str) -> Problem | None:
    wanted = target_list(targets)
    missing = missing_targets(wanted, modules) if wanted else []
    if not missing:
        return None
    return Problem("lora.target_modules", targets, f"names module{'s' if len(missing) > 1 else ''} {', '.join(missing)} that "
                   f"{name} does not have (its layers: {', '.join(layers)})",
                   "list modules of this model, or leave lora.target_modules out for the family's default")


def _gguf_problems(path: Path, name: str) -> list[Problem]:
    if not path.is_file():
        return [Problem("model.name", name, "no such GGUF file", "check the path, or point model.name at a model folder or hub id")]
    try:
        magic_ok = is_gguf_file(path)
    except OSError as err:
        return [Problem("model.name", name, f"cannot be read ({err.strerror})", "check the file's permissions")]
    if not magic_ok:
        return [Problem("model.name", name, f"is not a GGUF file ({path} does not start with GGUF's magic bytes)",
                        "point model.name at a real .gguf file, a model folder, or a hub id")]
    return []


def local_model_problems(name: str, targets: object) -> list[Problem]:
    """What is wrong with a local ``model.name`` (a folder, a .gguf file, or package:<pkg>/<file>.gguf)."""
    converted = None
    if name.startswith(PACKAGE_PREFIX):
        try:
            path = resolve_package_file(name)
        except (FileNotFoundError, ValueError) as err:
            return [Problem("model.name", name, str(err).removeprefix(f"model source {name!r}: "),
                            "install the package named, or write package:<package>/<file>.gguf")]
        problems = _gguf_problems(path, name)
        converted = None if problems else cached_folder(path, default_cache_root())
    else:
        path = Path(name).expanduser()
        if path.suffix == ".gguf":
            problems = _gguf_problems(path, name)
            converted = None if problems else cached_folder(path.resolve(), default_cache_root())
        elif path.is_dir():
            problems = _folder_problems(path, name)
            converted = None if problems else path
        elif path.is_file():
            return [Problem("model.name", name, "is a file, not a model folder (nor a .gguf file)",
                            "point model.name at a saved model folder (config.json, *.safetensors, tokenizer), a .gguf file or a hub id")]
        else:
            return []
    if converted is not None and converted.is_dir():
        found = target_problem(targets, converted, name)
        problems += [found] if found else []
    return problems


def _folder_problems(folder: Path, name: str) -> list[Problem]:
    problems = []
    config = folder / "config.json"
    if config.is_file():
        try:
            loaded = json.loads(config.read_text(encoding="utf-8"))
            if not isinstance(loaded, dict):
                raise ValueError(f"it holds a {type(loaded).__name__}, not an object")
        except (ValueError, UnicodeDecodeError) as err:
            problems.append(Problem("model.name", name, f"has a config.json that is not a JSON object ({str(err)[:120]})",
                                    "restore config.json (model.config.save_pretrained(folder) writes it)"))
    if not has_tokenizer_files(folder):
        problems.append(Problem("model.name", name, "has no tokenizer files (tokenizer.json, tokenizer_config.json, tokenizer.model)",
                                "save the tokenizer beside the weights: tokenizer.save_pretrained(folder)"))
    return problems
