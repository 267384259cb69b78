"""Where training rows come from: local files, ``save_to_disk`` folders, the hub, built-in tasks.

Every source becomes a list of plain dict rows. ``data.path`` may name several sources (a YAML
list, or a comma-separated string on the command line); their rows are concatenated in order.
Errors name the file, the line and the fix; the user's files are only ever read.
"""
from __future__ import annotations

import csv
import json
import os
import typing
from pathlib import Path

from fasttune.config import source_paths
from fasttune.errors import Problem, SourceUnavailable, UserError

FILE_KINDS = ".jsonl, .json, .csv, .parquet, a save_to_disk folder"


def load_rows(spec: typing.Union[str, list], split: str = "train") -> list[dict]:
    """All rows of one or several sources, in order. ``builtin:`` sources are handled by the caller."""
    rows: list[dict] = []
    for path in source_paths(spec):
        rows.extend(load_source(path, split))
    return rows


def load_source(spec: str, split: str = "train", key: str = "data.path") -> list[dict]:
    """All rows of one file, folder or hub dataset; ``key`` is the recipe key that named it."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return _read_saved(path, split, key)
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    if path.suffix in readers:
        if not path.is_file():
            raise UserError(Problem(key, str(path), "no such file", "check the path (relative paths start from the current folder)"))
        try:
            return readers[path.suffix](path)
        except UnicodeDecodeError:
            raise UserError(_not_text(path)) from None
    if path.suffix or spec.startswith((".", "/", "~")) or path.exists():
        raise UserError(Problem(key, spec, f"is not a file or folder fasttune reads ({FILE_KINDS})",
                                "check the path and its extension"))
    return _load_hub(spec, split)


def _not_text(path: Path) -> Problem:
    """The first byte of ``path`` that is not UTF-8, as a Problem naming the file and line."""
    data = path.read_bytes()
    try:
        data.decode("utf-8-sig")
        start = len(data)
    except UnicodeDecodeError as err:
        start = err.start
    binary = b"\x00" in data[:8192]
    shown = f"byte 0x{data[start]:02x}" if start < len(data) else None
    line = data[:start].count(b"\n") + 1
    return Problem(f"{path}:{line}", shown,
                   "is a binary file, not text" if binary else "is not UTF-8 text",
                   f"give the data as UTF-8 text ({FILE_KINDS})" if binary else "save the file as UTF-8 (e.g. iconv -t UTF-8)")


def _too_deep(path: Path, line: int) -> Problem:
    return Problem(f"{path}:{line}", None, "nests lists or objects deeper than Python's JSON reader follows (about 1000 levels)",
                   "flatten that record: a row is an object of text fields or a list of messages")


def _json_line(path: Path, number: int, line: str) -> dict:
    try:
        row = json.loads(line)
    except RecursionError:
        raise UserError(_too_deep(path, number)) from None
    except json.JSONDecodeError as err:
        raise UserError(Problem(f"{path}:{number}", line.strip()[:80], f"is not valid JSON ({err.msg} at column {err.colno})",
                                "fix or delete that line (each line of a .jsonl file is one JSON object)")) from None
    if not isinstance(row, dict):
        raise UserError(Problem(f"{path}:{number}", type(row).__name__, "each line must be a JSON object {...}",
                                "wrap the line's fields in an object"))
    return row


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8-sig") as handle:
        return [_json_line(path, number, line) for number, line in enumerate(handle, start=1) if line.strip()]


def _read_json(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except RecursionError:
        raise UserError(_too_deep(path, 1)) from None
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and text.lstrip().startswith("{"):
            return _read_jsonl(path)  # JSON Lines saved as .json (what `datasets` to_json writes)
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


def _read_csv(path: Path) -> list[dict]:
    # Reasoning traces easily pass csv's default 128 KiB field limit.
    csv.field_size_limit(2**31 - 1)
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        rows = []
        try:
            for row in reader:
                if any("\x00" in cell for cell in row.values() if isinstance(cell, str)):
                    raise csv.Error("a cell holds a NUL byte: the file is binary or damaged")
                rows.append(dict(row))
        except csv.Error as err:  # a NUL byte, or a quote left open at the end of the file
            raise UserError(Problem(f"{path}:{reader.line_num}", None, f"is not readable CSV ({err})",
                                    "fix that line, or export the data as .jsonl")) from None
    for number, row in enumerate(rows, start=2):
        if None in row:  # more cells than header names
            raise UserError(Problem(f"{path}:{number}", row[None], f"has more cells than the header has columns ({', '.join(reader.fieldnames or [])})",
                                    "quote cells that contain commas, or fix the header"))
    return rows


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet

    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except Exception as err:  # pyarrow's errors for a damaged file vary by version
        raise UserError(Problem(str(path), None, f"is not a readable Parquet file ({type(err).__name__}: {str(err)[:200]})",
                                "check the file, or export the data as .jsonl")) from None


def _read_saved(path: Path, split: str, key: str = "data.path") -> list[dict]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise UserError(Problem(key, str(path), "is a folder but not one written by datasets' save_to_disk",
                                f"point data.path at a file inside it ({FILE_KINDS}) or at a save_to_disk folder")) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UserError(Problem("data.split", split, f"is not a split of {path} (splits: {', '.join(loaded)})",
                                    f"set data.split to one of {', '.join(loaded)}"))
        loaded = loaded[split]
    return loaded.to_list()


def _load_hub(name: str, split: str) -> list[dict]:
    import datasets

    from fasttune import hub

    hub.use_cache_if_unreachable()
    try:
        return datasets.load_dataset(name, split=split).to_list()
    except (ConnectionError, OSError) as err:
        if hub.unreachable():
            offline = f" ({hub.offline_reason()} and it is not cached)"
        else:
            offline = " (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set and it is not cached)" if _offline() else ""
        raise SourceUnavailable(f"hub dataset {name!r} could not be loaded{offline}: {type(err).__name__}: {str(err)[:200]}; "
                                "connect this machine and download it once, or download it elsewhere (datasets' save_to_disk) "
                                "and point data.path at that folder, or point data.path at a local file") from None
    except ValueError as err:  # unknown split
        raise UserError(Problem("data.split", split, f"could not be read from {name}: {str(err)[:200]}", "set data.split to an existing split")) from None


def _offline() -> bool:
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on") for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
