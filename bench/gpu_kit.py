"""A kit of wheels for a CUDA machine that has torch and transformers but no package index.

Such a machine (a bare cloud image, an offline lab box) can run the GPU check and the bench once
the rest of fasttune's stack is there. What travels to it is small, so the kit holds only the
wheels of bench/gpu_wheels.txt, and the two large ones are repacked without what a CUDA training
run never loads (TRIMS below). Run where PyPI is reachable (stdlib only, any Python)::

    bench/gpu_kit.sh DIR                          # = python3 bench/gpu_kit.py build DIR
    python3 bench/gpu_kit.py build DIR --python-version 3.12 --cuda 130
    python3 bench/gpu_kit.py fetch DIR            # download only (no repacking)
    python3 bench/gpu_kit.py build KIT --from DIR # repack wheels downloaded before

On the CUDA machine (``bench/gpu_check.py --wheels KIT`` and ``bench/gpu_proof.py --kit KIT`` do this)::

    python3 bench/gpu_kit.py install KIT TARGET   # pip install --no-deps --no-index --target TARGET
    PYTHONPATH=TARGET:. python3 bench/gpu_check.py

A repacked wheel keeps its name, version and metadata; its RECORD lists exactly the files it
still holds, with their hashes (``wheel_problems`` checks that, for every wheel of the kit).
"""
from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
WHEELS_LIST = HERE / "gpu_wheels.txt"
MANIFEST = "kit.json"
# The kit travels with the working tree, which may carry 64 MiB in all to the GPU machine:
# 40 MiB leaves room for the tree itself and the results coming back.
KIT_LIMIT_MIB = 40
DEFAULT_PYTHON = "3.12"
DEFAULT_CUDA = ("130",)
"""bitsandbytes' library names for CUDA 13.0 (what torch 2.11.0+cu130 reports); several allowed."""
# What the CUDA machine the kit is for already has (distribution names), and so the kit leaves out;
# what they depend on is there too. tests/test_gpu_kit.py rebuilds such a machine from these names.
MACHINE_HAS = ("torch", "transformers", "accelerate", "peft", "safetensors", "sentencepiece", "tokenizers", "triton",
               "numpy", "pandas", "pyarrow", "xxhash", "psutil", "rich", "pip")
# pip does not widen a manylinux_2_X tag to older glibc versions by itself: list them all.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux_2_12_x86_64", "manylinux2010_x86_64", "manylinux_2_5_x86_64",
             "manylinux1_x86_64")


@dataclass(frozen=True)
class Trim:
    """Files one distribution's wheel ships that a CUDA training run never loads."""

    distribution: str
    why: str

    def drops(self, path: str, cuda: tuple[str, ...]) -> bool:
        if self.distribution == "bitsandbytes":
            # One native library per CUDA, ROCm and XPU version (bitsandbytes 0.50.2). It loads the
            # one matching torch.version.cuda (cextension.get_cuda_bnb_library_path); the CPU one is
            # kept so the kit also imports on a CPU machine (the rehearsal).
            found = re.fullmatch(r"bitsandbytes/libbitsandbytes_(\w+)\.so", path)
            return bool(found) and found.group(1) not in ("cpu", *(f"cuda{version}" for version in cuda))
        if self.distribution == "unsloth":
            return path.startswith("studio/")
        raise ValueError(self.distribution)


TRIMS = {trim.distribution: trim for trim in (
    Trim("bitsandbytes", "the native libraries for other CUDA versions, ROCm and XPU"),
    Trim("unsloth", "studio/, Unsloth Studio's web app; training never imports it"),
)}


def log(message: str) -> None:
    print(f"gpu_kit: {message}", flush=True)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_wheels(path: Path = WHEELS_LIST) -> dict[str, str]:
    """``{canonical name: version}`` from a requirements file of ``name==version`` lines."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        name, _, version = line.split("#")[0].strip().partition("==")
        if name:
            pins[canonical(name)] = version
    return pins


def wheel_name_version(wheel: Path) -> tuple[str, str]:
    """``(canonical distribution name, version)`` from a wheel's file name (PEP 427)."""
    parts = wheel.name[:-len(".whl")].split("-")
    return canonical(parts[0]), parts[1]


# ---------------------------------------------------------------------------------------------
# RECORD: the hash and size of every file in a wheel (PEP 376 / PEP 427).


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode("ascii")


def record_name(archive: zipfile.ZipFile) -> str:
    names = [n for n in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/RECORD", n)]
    if len(names) != 1:
        raise ValueError(f"expected one .dist-info/RECORD, found {names}")
    return names[0]


def wheel_problems(wheel: Path) -> list[str]:
    """What makes ``wheel`` invalid: files missing from RECORD, RECORD rows without a file or with a
    wrong hash or size, metadata whose name or version differs from the file name."""
    problems = []
    with zipfile.ZipFile(wheel) as archive:
        record = record_name(archive)
        rows = {row[0]: row for row in csv.reader(io.StringIO(archive.read(record).decode("utf-8"))) if row}
        files = {info.filename for info in archive.infolist() if not info.is_dir()}
        for name in sorted(files - rows.keys()):
            problems.append(f"{name} is not in RECORD")
        for name, row in rows.items():
            if name == record or name.endswith((".dist-info/RECORD.jws", ".dist-info/RECORD.p7s")):
                continue
            if name not in files:
                problems.append(f"RECORD lists {name}, which the wheel does not hold")
                continue
            data = archive.read(name)
            if row[1] != record_hash(data) or row[2] != str(len(data)):
                problems.append(f"{name}: RECORD says {row[1]} ({row[2]} bytes), the file is {record_hash(data)} ({len(data)})")
        metadata = archive.read(record.replace("RECORD", "METADATA")).decode("utf-8")
    fields = dict(line.split(": ", 1) for line in metadata.split("\n\n")[0].splitlines() if ": " in line)
    name, version = wheel_name_version(wheel)
    if canonical(fields.get("Name", "")) != name or fields.get("Version") != version:
        problems.append(f"METADATA says {fields.get('Name')} {fields.get('Version')}, the file name {name} {version}")
    return problems


def repack(source: Path, dest_dir: Path, trim: Trim, cuda: tuple[str, ...]) -> dict:
    """Copy ``source`` into ``dest_dir`` (same file name) without the files ``trim`` drops; RECORD rewritten."""
    dest = dest_dir / source.name
    partial = dest.with_name(dest.name + ".partial")
    dropped, dropped_bytes = [], 0
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as out:
        record = record_name(archive)
        for info in archive.infolist():
            if info.filename == record:
                continue
            if trim.drops(info.filename, cuda):
                dropped.append(info.filename)
                dropped_bytes += info.file_size
                continue
            out.writestr(info, archive.read(info), compress_type=zipfile.ZIP_DEFLATED)
        kept = io.StringIO()
        writer = csv.writer(kept, lineterminator="\n")
        for row in csv.reader(io.StringIO(archive.read(record).decode("utf-8"))):
            if row and row[0] not in dropped:
                writer.writerow(row)
        out.writestr(archive.getinfo(record), kept.getvalue())
    os.replace(partial, dest)
    return {"files": len(dropped), "bytes": dropped_bytes, "why": trim.why}


# ---------------------------------------------------------------------------------------------
# Building the kit.


def fetch(dest: Path, python_version: str, pins_file: Path = WHEELS_LIST) -> None:
    """``pip download`` the pinned wheels for ``python_version`` on manylinux x86_64, no dependencies."""
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps", "--only-binary", ":all:",
               "--python-version", python_version, "--implementation", "cp",
               *[arg for platform in PLATFORMS for arg in ("--platform", platform)], "-d", str(dest), "-r", str(pins_file)]
    log(f"downloading the wheels of {pins_file.name} for Python {python_version} into {dest}")
    subprocess.run(command, check=True)


def select_wheels(folder: Path, pins: dict[str, str]) -> dict[str, Path]:
    """The one wheel per pin in ``folder``; refuses a missing pin or two candidates."""
    found: dict[str, list[Path]] = {}
    for wheel in sorted(folder.glob("*.whl")):
        name, version = wheel_name_version(wheel)
        if pins.get(name) == version:
            found.setdefault(name, []).append(wheel)
    missing = sorted(set(pins) - found.keys())
    if missing:
        raise SystemExit(f"gpu_kit: {folder} lacks {', '.join(f'{n}=={pins[n]}' for n in missing)}: run `gpu_kit.py fetch` first")
    doubled = {name: [w.name for w in wheels] for name, wheels in found.items() if len(wheels) > 1}
    if doubled:
        raise SystemExit(f"gpu_kit: {folder} holds several wheels for one pin: {doubled}; fetch into an empty folder")
    return {name: wheels[0] for name, wheels in found.items()}


def build(kit: Path, python_version: str, cuda: tuple[str, ...], downloads: Path | None = None) -> dict:
    """Write the kit into ``kit`` (replaced whole): the pinned wheels, trimmed, and kit.json."""
    pins = pinned_wheels()
    if downloads is None:
        downloads = kit.with_name(kit.name + ".download")
        fetch(downloads, python_version)
    wheels = select_wheels(downloads, pins)
    partial = kit.with_name(kit.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    manifest = {"python_version": python_version, "cuda": list(cuda), "limit_mib": KIT_LIMIT_MIB, "wheels": {}}
    for name, wheel in sorted(wheels.items()):
        entry = {"file": wheel.name, "downloaded_bytes": wheel.stat().st_size}
        if name in TRIMS:
            entry["dropped"] = repack(wheel, partial, TRIMS[name], cuda)
        else:
            shutil.copy2(wheel, partial / wheel.name)
        problems = wheel_problems(partial / wheel.name)
        if problems:
            raise SystemExit(f"gpu_kit: {wheel.name} is not a valid wheel after repacking: {problems[:5]}")
        entry["bytes"] = (partial / wheel.name).stat().st_size
        manifest["wheels"][name] = entry
    total = sum(entry["bytes"] for entry in manifest["wheels"].values())
    manifest["total_bytes"] = total
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    if total > KIT_LIMIT_MIB * 2**20:
        raise SystemExit(f"gpu_kit: the kit is {total / 2**20:.1f} MiB, over its {KIT_LIMIT_MIB} MiB limit "
                         f"(left in {partial}); trim more or shorten {WHEELS_LIST.name}")
    shutil.rmtree(kit, ignore_errors=True)
    os.replace(partial, kit)
    downloaded = sum(entry["downloaded_bytes"] for entry in manifest["wheels"].values())
    log(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB (downloaded {downloaded / 2**20:.1f} MiB) in {kit}")
    return manifest


# ---------------------------------------------------------------------------------------------
# Installing it, on the CUDA machine.


def install(kit: Path, target: Path, use_pip: bool | None = None) -> list[str]:
    """Install every wheel of ``kit`` into ``target`` without dependencies or an index; returns their names.

    With pip (``pip install --no-deps --no-index --target``) where this Python has it; otherwise the
    wheels are unpacked the way pip's ``--target`` lays them out (libraries and data at the top,
    scripts in bin/), because a machine without pip must not cost its GPU minutes.
    """
    wheels = sorted(kit.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"gpu_kit: {kit} holds no wheels (build it with bench/gpu_kit.sh {kit})")
    target.mkdir(parents=True, exist_ok=True)
    if use_pip is None:
        use_pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0
    if use_pip:
        command = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-index", "--no-deps",
                   "--no-compile", "--upgrade", "--target", str(target), *map(str, wheels)]
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode == 0:
            return [wheel.name for wheel in wheels]
        log(f"pip failed (exit {proc.returncode}): {' | '.join(proc.stderr.strip().splitlines()[-3:])}; unpacking instead")
    else:
        log("pip is not available here: unpacking the wheels into the target")
    for wheel in wheels:
        unpack(wheel, target)
    return [wheel.name for wheel in wheels]


def unpack(wheel: Path, target: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            parts = info.filename.split("/")
            if parts[0].endswith(".data"):  # where pip's --target puts each scheme
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib", "data", "scripts"):
                    continue
                parts = (["bin"] if parts[1] == "scripts" else []) + parts[2:]
            path = target.joinpath(*parts)
            if info.is_dir():
                path.mkdir(parents=True, exist_ok=True)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(archive.read(info))
            if info.external_attr >> 16 & 0o111:
                path.chmod(0o755)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    for verb in ("build", "fetch"):
        p = verbs.add_parser(verb, help="download and repack the kit" if verb == "build" else "download the wheels only")
        p.add_argument("dir", type=Path)
        p.add_argument("--python-version", default=DEFAULT_PYTHON, help=f"the CUDA machine's Python (default {DEFAULT_PYTHON})")
        if verb == "build":
            p.add_argument("--cuda", default=",".join(DEFAULT_CUDA),
                           help="bitsandbytes CUDA libraries to keep, e.g. 130 or 128,130 (default %(default)s)")
            p.add_argument("--from", dest="downloads", type=Path, help="wheels downloaded before (gpu_kit.py fetch)")
    p = verbs.add_parser("install", help="install a kit into a folder (for PYTHONPATH)")
    p.add_argument("kit", type=Path)
    p.add_argument("target", type=Path)
    args = parser.parse_args(argv)
    if args.verb == "fetch":
        fetch(args.dir, args.python_version)
    elif args.verb == "build":
        build(args.dir, args.python_version, tuple(c for c in args.cuda.split(",") if c), args.downloads)
    else:
        log(f"installed {len(install(args.kit, args.target))} wheels into {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
