"""The GPU kit (bench/gpu_kit.py): it fits, its wheels are valid, and it runs beside only what a bare CUDA machine has.

The last test is also bench/gpu_check.py's rehearsal: ``--smoke`` on both backends (Unsloth's CPU
fallback for the unsloth one), inside the whole proof, from the kit.

The kit is built from the wheels ``make test`` fetched for this Python (the GPU machine's kit is
the same list for its Python; the repacked wheels are pure Python or tag-independent). It is then
installed into an empty folder by a stand-in for that machine (tests/fixtures/gpu_machine.py: a
Python that sees only ``MACHINE_HAS`` and what those depend on), which imports fasttune's GPU path
from it and runs the whole proof (bench/gpu_proof.py --smoke) on a tiny model.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from fixtures.gpu_machine import canonical, closure, machine_python
from fixtures.import_scan import unconditional_imports

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import gpu_kit  # noqa: E402  (bench/ is not a package)

DOWNLOADS = REPO / ".venv" / "test-assets" / "gpu-kit-wheels"
PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "UNSLOTH_DISABLE_STATISTICS": "1"}


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> Path:
    if not any(DOWNLOADS.glob("*.whl")):
        pytest.fail(f"{DOWNLOADS} holds no wheels: `make test` fetches them (bench/gpu_kit.py fetch)")
    folder = tmp_path_factory.mktemp("kit") / "kit"
    gpu_kit.build(folder, PYTHON_VERSION, gpu_kit.DEFAULT_CUDA, DOWNLOADS)
    return folder


@pytest.fixture(scope="module")
def machine(tmp_path_factory) -> Path:
    return machine_python(tmp_path_factory.mktemp("machine") / "venv", gpu_kit.MACHINE_HAS)


@pytest.fixture(scope="module")
def site(kit, machine, tmp_path_factory) -> Path:
    """The kit installed by the stand-in machine's own Python and pip into an empty folder."""
    target = tmp_path_factory.mktemp("site") / "site"
    proc = subprocess.run([str(machine), str(REPO / "bench" / "gpu_kit.py"), "install", str(kit), str(target)],
                          capture_output=True, text=True, env=ENV, cwd=target.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return target


def in_machine(machine: Path, site: Path, code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(machine), "-c", code], capture_output=True, text=True, cwd=site.parent, timeout=300,
                          env={**ENV, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), **env})


def test_the_kit_fits_and_holds_one_valid_wheel_per_pin(kit):
    manifest = json.loads((kit / gpu_kit.MANIFEST).read_text(encoding="utf-8"))
    wheels = sorted(kit.glob("*.whl"))
    assert sum(w.stat().st_size for w in wheels) == manifest["total_bytes"] <= gpu_kit.KIT_LIMIT_MIB * 2**20
    assert {gpu_kit.wheel_name_version(w) for w in wheels} == set(gpu_kit.pinned_wheels().items())
    for wheel in wheels:
        assert gpu_kit.wheel_problems(wheel) == [], wheel.name


def test_the_trims_drop_only_what_a_cuda_13_run_never_loads(kit):
    manifest = json.loads((kit / gpu_kit.MANIFEST).read_text(encoding="utf-8"))
    for name, entry in manifest["wheels"].items():
        assert ("dropped" in entry) == (name in gpu_kit.TRIMS)
    bnb = zipfile.ZipFile(next(kit.glob("bitsandbytes-*.whl"))).namelist()
    assert sorted(n for n in bnb if n.endswith(".so")) == ["bitsandbytes/libbitsandbytes_cpu.so",
                                                            "bitsandbytes/libbitsandbytes_cuda130.so"]
    assert "bitsandbytes/cextension.py" in bnb and "bitsandbytes/backends/cuda/ops.py" in bnb
    unsloth = zipfile.ZipFile(next(kit.glob("unsloth-*.whl"))).namelist()
    assert not [n for n in unsloth if n.startswith("studio/")]
    assert "unsloth/__init__.py" in unsloth and "unsloth/kernels/fast_lora.py" in unsloth
    downloaded = {n for n in zipfile.ZipFile(DOWNLOADS / manifest["wheels"]["unsloth"]["file"]).namelist()
                  if not n.startswith("studio/")}
    assert downloaded == set(unsloth), "only studio/ may be dropped from Unsloth"


def test_wheel_problems_catches_a_changed_a_missing_and_an_unlisted_file(kit, tmp_path):
    source = next(kit.glob("trl-*.whl"))

    def rewritten(change=lambda name, data: data, add: dict[str, bytes] | None = None) -> Path:
        out = tmp_path / source.name
        with zipfile.ZipFile(source) as archive, zipfile.ZipFile(out, "w") as copy:
            for info in archive.infolist():
                data = change(info.filename, archive.read(info))
                if data is not None:
                    copy.writestr(info, data)
            for name, data in (add or {}).items():
                copy.writestr(name, data)
        return out

    assert gpu_kit.wheel_problems(rewritten()) == []
    changed = rewritten(lambda name, data: data + b"\n# changed" if name == "trl/__init__.py" else data)
    assert any(p.startswith("trl/__init__.py: RECORD says") for p in gpu_kit.wheel_problems(changed))
    missing = rewritten(lambda name, data: None if name == "trl/cli/__init__.py" else data)
    assert "RECORD lists trl/cli/__init__.py, which the wheel does not hold" in gpu_kit.wheel_problems(missing)
    unlisted = rewritten(add={"trl/extra.py": b"new"})
    assert gpu_kit.wheel_problems(unlisted) == ["trl/extra.py is not in RECORD"]


def test_unpacking_without_pip_lays_out_what_pip_installs(kit, site, tmp_path):
    unpacked = tmp_path / "unpacked"
    gpu_kit.install(kit, unpacked, use_pip=False)

    def files(root: Path) -> set[str]:
        found = set()
        for path in root.rglob("*"):
            relative = path.relative_to(root)
            if path.is_dir() or relative.parts[0] == "bin" or "__pycache__" in relative.parts:
                continue
            if relative.parts[0].endswith(".dist-info") and relative.name in ("INSTALLER", "REQUESTED", "RECORD", "direct_url.json"):
                continue
            found.add(relative.as_posix())
        return found

    assert files(unpacked) == files(site)
    assert (unpacked / "bitsandbytes" / "libbitsandbytes_cuda130.so").read_bytes() == \
        (site / "bitsandbytes" / "libbitsandbytes_cuda130.so").read_bytes()


def test_a_failing_pip_falls_back_to_unpacking(kit, tmp_path, monkeypatch, capsys):
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: something pip-specific\n")
    monkeypatch.setattr(gpu_kit.subprocess, "run", lambda *args, **kwargs: failed)
    names = gpu_kit.install(kit, tmp_path / "site", use_pip=True)
    assert len(names) == len(list(kit.glob("*.whl")))
    assert (tmp_path / "site" / "trl" / "__init__.py").is_file()
    assert "pip failed (exit 1): ERROR: something pip-specific; unpacking instead" in capsys.readouterr().out


def test_the_kit_covers_fasttunes_dependencies_beside_the_machines_packages():
    """Every dependency fasttune declares is either on the machine (with what it needs) or in the kit."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    have = set(closure(gpu_kit.MACHINE_HAS)) | {canonical(n) for n in gpu_kit.MACHINE_HAS}
    declared = [Requirement(line) for line in requires("fasttune") if "extra ==" not in line]
    kit = gpu_kit.pinned_wheels()
    missing = [r.name for r in declared if canonical(r.name) not in have and canonical(r.name) not in kit]
    assert missing == []
    for requirement in declared:
        if canonical(requirement.name) in kit:
            assert requirement.specifier.contains(kit[canonical(requirement.name)]), requirement


def test_the_kit_is_pinned_to_the_tested_set():
    """bench/gpu_wheels.txt pins every wheel, to constraints.txt, pyproject's unsloth extra, or what the venv holds."""
    def pins(lines):
        return {canonical(name): pinned for name, _, pinned in (line.split("#")[0].strip().partition("==") for line in lines)
                if name}

    wheels = gpu_kit.pinned_wheels()
    tested = pins((REPO / "constraints.txt").read_text(encoding="utf-8").splitlines())
    extra = re.search(r"^unsloth = \[(.*)\]", (REPO / "pyproject.toml").read_text(encoding="utf-8"), re.MULTILINE)
    tested.update(pins(re.findall(r'"([^"]+)"', extra.group(1))))
    assert {"trl", "peft", "bitsandbytes", "datasets", "unsloth", "unsloth-zoo"} <= wheels.keys()
    for name, pinned in wheels.items():
        assert pinned, f"{name} is not pinned with =="
        if name in tested:
            assert pinned == tested[name], f"{name}=={pinned}, but the tested set has {tested[name]}"
            continue
        try:
            assert pinned == version(name), f"{name}=={pinned}, but this environment has {version(name)}"
        except PackageNotFoundError:
            pytest.fail(f"{name} is neither in constraints.txt nor installed: its version cannot be checked")


def test_the_stand_in_machine_lacks_what_the_kit_brings(machine, tmp_path):
    """The stand-in is honest: without the kit, trl, datasets, bitsandbytes and Unsloth are not there."""
    proc = subprocess.run([str(machine), "-c", "import importlib.util as u; print([n for n in "
                           "('trl', 'datasets', 'bitsandbytes', 'unsloth', 'matplotlib', 'torch', 'transformers') "
                           "if u.find_spec(n)])"], capture_output=True, text=True, cwd=tmp_path, env=ENV)
    assert proc.stdout.strip() == "['torch', 'transformers']", proc.stderr


def test_fasttunes_gpu_path_imports_from_the_kit(machine, site):
    code = f"""
import importlib, pkgutil, sys
import fasttune
failed = []
for info in pkgutil.walk_packages(fasttune.__path__, "fasttune."):
    if not info.name.endswith("__main__"):
        try:
            importlib.import_module(info.name)
        except Exception as err:
            failed.append((info.name, repr(err)))
assert not failed, failed
from trl import SFTConfig, SFTTrainer
import bitsandbytes, datasets, gguf, matplotlib.backends.backend_agg, peft, google.protobuf
for module in (bitsandbytes, datasets, gguf, matplotlib, peft, sys.modules["trl"]):
    assert module.__file__.startswith({str(site)!r}), module.__file__
# bitsandbytes' own choice of native library for torch built with CUDA 13.0 is in the kit.
from bitsandbytes.cextension import get_cuda_bnb_library_path
from bitsandbytes.cuda_specs import CUDASpecs
path = get_cuda_bnb_library_path(CUDASpecs(highest_compute_capability=(9, 0), cuda_version_string="130", cuda_version_tuple=(13, 0)))
assert path.is_file(), path
print("ok", path.name)
"""
    proc = in_machine(machine, site, code)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "ok libbitsandbytes_cuda130.so" in proc.stdout


def test_unsloth_imports_from_the_kit_and_fails_only_for_want_of_a_gpu(machine, site):
    proc = in_machine(machine, site, "import unsloth; print(unsloth.__file__)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(site / "unsloth" / "__init__.py")
    assert "no GPU found" in proc.stdout + proc.stderr
    proc = in_machine(machine, site, "import unsloth", UNSLOTH_DISABLE_CPU_FALLBACK="1")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "NotImplementedError: Unsloth cannot find any torch accelerator? You need a GPU.", proc.stderr[-3000:]


def test_what_unsloth_imports_unconditionally_is_on_the_machine_or_in_the_kit(machine, site):
    """Unsloth's CUDA path cannot run here, so its module-level imports are read from its source."""
    needed = unconditional_imports(site, "unsloth", within={"unsloth", "unsloth_zoo"})
    assert {"torch", "transformers", "trl", "peft", "bitsandbytes", "triton"} <= needed.keys()
    # triton comes with CUDA builds of torch (MACHINE_HAS names it); the CPU build here has none.
    names = sorted(set(needed) - {"triton"})
    proc = in_machine(machine, site, f"import importlib.util as u; print([n for n in {names!r} if u.find_spec(n) is None])")
    assert proc.stdout.strip() == "[]", {n: sorted(needed[n]) for n in re.findall(r"'(\w+)'", proc.stdout)}


def test_the_import_scan_counts_only_imports_that_can_fail_the_import(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("from .inner import x\nimport plain\n", encoding="utf-8")
    (package / "inner.py").write_text("""
import os
try:
    import guarded
except ImportError:
    guarded = None
try:
    import narrow_handler
except KeyError:
    pass
def later():
    import in_function
from importlib.util import find_spec
if find_spec("optional") is not None:
    import optional
if HAS_FLASH:
    import flash
if DEVICE == "cuda":
    import cuda_only
else:
    import other_branch
class Holder:
    import in_class
x = 1
""", encoding="utf-8")
    found = unconditional_imports(tmp_path, "pkg", within={"pkg"})
    assert set(found) == {"plain", "narrow_handler", "cuda_only", "other_branch", "in_class"}
    assert found["cuda_only"] == {"pkg.inner"}


@pytest.mark.slow
def test_the_whole_proof_runs_on_the_stand_in_machine(kit, machine, tmp_path):
    """bench/gpu_proof.py --smoke, as the GPU machine runs it: kit, check (both backends), bench, summary."""
    out = tmp_path / "out"
    proc = subprocess.run([str(machine), str(REPO / "bench" / "gpu_proof.py"), "--smoke", "--kit", str(kit), "--out", str(out),
                           "--workdir", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    proof = json.loads((out / "proof.json").read_text(encoding="utf-8"))
    assert [(p["name"], p["status"]) for p in proof["phases"]] == [("kit", "ran"), ("chat data", "ran"), ("gpu_check", "ran"),
                                                                   ("bench", "ran")]
    assert proof["versions"]["unsloth"] == gpu_kit.pinned_wheels()["unsloth"]
    outcomes = {o["backend"]: o["result"] for o in proof["gpu_check"]["outcomes"]}
    for backend, result in outcomes.items():  # gpu_check.py --smoke: both backends ran, from the kit
        assert result["backend"] == backend and result["steps"] == 3 and result["loss_finite"], result
        assert result["tokens_per_s"] > 0 and result["loss_tokens_per_row"] == result["seq_len"] == 64
    assert "Unsloth's CPU fallback" in outcomes["unsloth"]["reason"]
    assert proof["gpu_check"]["passed"] and proof["bench"]["ratios"]["trained_tokens_per_s"] > 0
    assert (out / "bench" / "bench.png").is_file()
    text = (out / "proof.md").read_text(encoding="utf-8")
    for heading in ("## Engine check", "## Bench: fasttune against vanilla PEFT", "### Targets", "## Findings"):
        assert heading in text
    assert not list(tmp_path.glob("fasttune-gpu-proof-*")), "the proof's temporary folder (model, site) is removed"
