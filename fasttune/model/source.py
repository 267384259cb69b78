"""Resolve ``model.name`` to something ``from_pretrained`` loads: a local folder or a hub id.

Safetensors only: a local folder holding only pickled ``.bin`` weights is refused (loading a pickle
can run arbitrary code).
"""
from __future__ import annotations

from pathlib import Path

from fasttune.errors import Problem, UserError

PACKAGE_PREFIX = "package:"


def is_local(name: str) -> bool:
    return name.startswith((PACKAGE_PREFIX, ".", "/", "~")) or Path(name).expanduser().exists()


def resolve_model_source(name: str) -> str:
    """A local folder path (imported from GGUF if need be) or the hub id unchanged."""
    if name.startswith(PACKAGE_PREFIX):
        from fasttune.model.gguf_import import default_cache_root, import_gguf, resolve_package_file

        try:
            gguf_path = resolve_package_file(name)
        except FileNotFoundError as err:
            raise UserError(Problem("model.name", name, str(err), "install the package named above")) from None
        return str(import_gguf(gguf_path, default_cache_root()))
    path = Path(name).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        from fasttune.model.gguf_import import default_cache_root, import_gguf

        return str(import_gguf(path, default_cache_root()))
    if path.is_dir():
        check_local_folder(path)
        return str(path)
    if is_local(name):
        raise UserError(Problem("model.name", name, "no such folder", "point model.name at a folder with config.json and *.safetensors, or a hub id"))
    from fasttune import hub

    hub.use_cache_if_unreachable()  # a hub id: the first lookup of this process asks once whether the hub answers
    return name


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
