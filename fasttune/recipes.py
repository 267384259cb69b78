"""The recipe registry: named recipes shipped in ``recipes/*.yaml`` (torch-free).

In a source checkout the files are read from ``recipes/`` at the top of the repository; an
installed wheel carries the same files as ``fasttune/builtin_recipes/`` (see pyproject.toml).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from fasttune.errors import Problem, UserError, suggest

_PACKAGED = Path(__file__).parent / "builtin_recipes"
_CHECKOUT = Path(__file__).parent.parent / "recipes"


def builtin_dir() -> Path:
    """Where the named recipes are: inside the wheel, or in the source checkout."""
    return _PACKAGED if _PACKAGED.is_dir() else _CHECKOUT


def recipe_names() -> list[str]:
    return sorted(p.stem for p in builtin_dir().glob("*.yaml"))


@dataclass(frozen=True)
class RecipeSource:
    """A recipe as written: its name, where it came from, and its raw mapping."""

    name: str
    path: Path
    raw: dict


def _read_yaml(path: Path) -> dict:
    text = read_text(path, "recipe file")
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise UserError(Problem(str(path), None, "nests mappings or lists deeper than a YAML reader can follow",
                                "a recipe is a few sections of keys: start from `python -m fasttune cp demo my.yaml`")) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        if mark is not None:
            line, problem = mark.line + 1, getattr(err, "problem", err)
        else:  # a character YAML refuses (a control character: a binary file), found by position
            line, problem = text[:getattr(err, "position", 0)].count("\n") + 1, getattr(err, "reason", err)
        raise UserError(Problem(f"{path} line {line}", None, f"is not valid YAML ({problem})",
                                "fix the YAML syntax at that line")) from None
    if not isinstance(data, dict):
        raise UserError(Problem(str(path), type(data).__name__, "a recipe file must hold a mapping of sections",
                                "start from `python -m fasttune cp demo my.yaml`"))
    return data


def read_text(path: Path, what: str) -> str:
    """A text file's contents; a file that is not UTF-8 (or is binary) is a UserError naming where."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(Problem(str(path), None, f"the {what} cannot be read ({err.strerror})", "check the path and its permissions")) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        binary = b"\x00" in data[:8192]
        raise UserError(Problem(f"{path} line {line}", f"byte 0x{data[err.start]:02x}",
                                f"the {what} is {'a binary file, not text' if binary else 'not UTF-8 text'}",
                                f"give a YAML text file{'' if binary else ' (save it as UTF-8)'}")) from None


def find(name_or_path: str) -> RecipeSource:
    """Look up a named recipe, or read a recipe file (anything ending in .yaml/.yml or existing)."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.is_file():
        if not candidate.is_file():
            raise UserError(Problem("recipe file", name_or_path, "is a folder, not a recipe file" if candidate.is_dir() else "no such file",
                                    "check the path, or run `python -m fasttune recipes` for named recipes"))
        return RecipeSource(candidate.stem, candidate, _read_yaml(candidate))
    path = builtin_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        names = recipe_names()
        hint = suggest(name_or_path, names)
        hint += " " if hint else ""
        raise UserError(Problem("recipe", name_or_path, f"is not a named recipe (known: {', '.join(names)})",
                                f"{hint}run `python -m fasttune recipes` to list them, or pass a .yaml file"))
    return RecipeSource(name_or_path, path, _read_yaml(path))


def load_merged(name_or_path: str, _seen: tuple[str, ...] = ()) -> RecipeSource:
    """Read a recipe and merge it over the recipe it ``extends`` (recursively)."""
    source = find(name_or_path)
    parent_name = source.raw.get("extends")
    if parent_name is None:
        return source
    seen = (*_seen, str(source.path.resolve()))  # by file: a chain may name recipes or paths
    if not isinstance(parent_name, str) or not parent_name:
        raise UserError(Problem(f"{source.path}: extends", parent_name, "must name one recipe (a name or a .yaml file)",
                                "e.g. `extends: demo`"))
    if parent_name == source.name or str(find(parent_name).path.resolve()) in seen:
        raise UserError(Problem(f"{source.path}: extends", parent_name, "recipes may not extend themselves in a cycle",
                                "point `extends` at a recipe that does not lead back here"))
    parent = load_merged(parent_name, seen)
    merged = deep_merge(parent.raw, {k: v for k, v in source.raw.items() if k != "extends"})
    return RecipeSource(source.name, source.path, merged)


def own_section(name_or_path: str, section: str) -> dict:
    """The keys of ``section`` that the recipe file itself writes (not those of the recipes it
    extends); empty for a recipe fasttune ships, whose settings are fasttune's, not the user's."""
    source = find(name_or_path)
    if source.path.resolve().parent == builtin_dir().resolve():
        return {}
    value = source.raw.get(section)
    return dict(value) if isinstance(value, dict) else {}


def deep_merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``; nested mappings merge, everything else (lists included) replaces."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out
