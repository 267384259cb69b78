"""Where training rows come from: local files, ``save_to_disk`` folders, the hub, built-in tasks.

Every source becomes a list of plain dict rows. Errors name the file, the line and the fix; the
user's files are only ever read.
"""
from __future__ import annotations

import json
from pathlib import Path

from fasttune.errors import Problem, UserError

BUILTIN_PREFIX = "builtin:"


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(Problem(f"{path}:{number}", line.strip()[:80], f"is not valid JSON ({err.msg} at column {err.colno})",
                                        "fix or delete that line (each line of a .jsonl file is one JSON object)")) from None
            if not isinstance(row, dict):
                raise UserError(Problem(f"{path}:{number}", type(row).__name__, "each line must be a JSON object {...}",
                                        "wrap the line's fields in an object"))
            rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(Problem(f"{path}:{err.lineno}", None, f"is not valid JSON ({err.msg} at column {err.colno})",
                                "fix the JSON at that line")) from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} / {"train": [...]}
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        lengths = {len(v) for v in data.values()}
        if len(lengths) == 1:  # column-oriented records: {"prompt": [...], "completion": [...]}
            keys = list(data)
            data = [dict(zip(keys, values)) for values in zip(*data.values())]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError(Problem(str(path), type(data).__name__, "a .json file must hold a list of objects (or columns of equal length)",
                                "convert it to one object per row, or to .jsonl"))
    return data


def load_rows(spec: str, split: str = "train") -> list[dict]:
    """All rows of a data source. ``builtin:`` sources are handled by the caller (tasks)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise UserError(Problem("data.split", split, f"is not a split of {path} (splits: {', '.join(loaded)})",
                                        f"set data.split to one of {', '.join(loaded)}"))
            loaded = loaded[split]
        return loaded.to_list()
    if path.suffix == ".jsonl":
        return _require_file(path) or _read_jsonl(path)
    if path.suffix == ".json":
        return _require_file(path) or _read_json(path)
    if path.suffix in (".csv", ".parquet"):
        _require_file(path)
        import datasets

        return datasets.load_dataset(path.suffix[1:], data_files=str(path), split="train").to_list()
    if path.suffix or spec.startswith((".", "/", "~")):
        raise UserError(Problem("data.path", spec, "is not a file or folder fasttune reads (.jsonl, .json, .csv, .parquet, a save_to_disk folder)",
                                "check the path and its extension"))
    return _load_hub(spec, split)


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise UserError(Problem("data.path", str(path), "no such file", "check the path (relative paths start from the current folder)"))


class SourceUnavailable(Exception):
    """A hub dataset that cannot be reached from here (offline, not cached): not the user's typo."""


def _load_hub(name: str, split: str) -> list[dict]:
    import datasets

    try:
        return datasets.load_dataset(name, split=split).to_list()
    except (ConnectionError, OSError) as err:
        raise SourceUnavailable(f"hub dataset {name!r} could not be loaded ({type(err).__name__}: {str(err)[:200]}); "
                                "download it once online, or point data.path at a local file") from None
    except ValueError as err:  # unknown split
        raise UserError(Problem("data.split", split, f"could not be read from {name}: {str(err)[:200]}", "set data.split to an existing split")) from None
