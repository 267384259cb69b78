"""Resolve ``model.name`` to something ``from_pretrained`` loads: a local folder or a hub id.

Safetensors only: a local folder holding only pickled ``.bin`` weights is refused (loading a pickle
can run arbitrary code).
"""
from __future__ import annotations

from pathlib import Path

from fasttune.errors import Problem, UserError
from fasttune.model.gguf_import import PACKAGE_PREFIX, cached_folder, default_cache_root, gguf_file, import_gguf, names_gguf


def is_local(name: str) -> bool:
    return name.startswith((PACKAGE_PREFIX, ".", "/", "~")) or Path(name).expanduser().exists()


def resolve_model_source(name: str) -> str:
    """A local folder path (imported from GGUF if need be) or the hub id unchanged."""
    if name.startswith(PACKAGE_PREFIX):
        return str(import_gguf(_package_gguf(name), default_cache_root()))
    path = Path(name).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return str(import_gguf(path, default_cache_root()))
    if path.is_dir():
        check_local_folder(path)
        return str(path)
    if is_local(name):
        raise UserError(Problem("model.name", name, "no such folder", "point model.name at a folder with config.json and *.safetensors, or a hub id"))
    from fasttune import hub

    hub.use_cache_if_unreachable()  # a hub id: the first lookup of this process asks once whether the hub answers
    return name


def tokenizer_source(name: str) -> str | None:
    """Where ``model.name``'s tokenizer loads from without loading (or converting) weights: a
    local folder, the hub id itself (the tokenizer files alone are fetched), or a GGUF file's
    converted folder; ``None`` for a GGUF file not converted yet (the first run converts it)."""
    path = Path(name).expanduser()
    if name.startswith(PACKAGE_PREFIX) or (names_gguf(name) and path.is_file()):
        folder = cached_folder(_package_gguf(name) if name.startswith(PACKAGE_PREFIX) else gguf_file(name), default_cache_root())
        return str(folder) if folder.is_dir() else None
    if path.is_dir() or is_local(name):
        if not path.is_dir():
            raise UserError(Problem("model.name", name, "no such folder", "point model.name at a model or tokenizer folder"))
        return str(path)
    return name


def _package_gguf(name: str) -> Path:
    try:
        return gguf_file(name)
    except FileNotFoundError as err:
        raise UserError(Problem("model.name", name, str(err), "install the package named above")) from None


def check_local_folder(path: Path) -> None:
    problems = []
    if not (path / "config.json").is_file():
        problems.append(Problem("model.name", str(path), "has no config.json", "point model.name at a saved Hugging Face model folder"))
    if not any(path.glob("*.safetensors")):
        pickled = any(path.glob("*.bin")) or any(path.glob("*.pt"))
        problems.append(Problem("model.name", str(path),
                                "holds only pickled weights (.bin); fasttune loads safetensors only" if pickled else "holds no *.safetensors weights",
                                "convert it once with `model.save_pretrained(dir, safe_serialization=True)`" if pickled
                                else "point model.name at a folder with *.safetensors"))
    if problems:
        raise UserError(problems, "cannot load this model")
