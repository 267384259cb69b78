"""The wheel carries the recipes, templates and version lock: an installed fasttune finds its recipes
from any folder."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # --no-build-isolation: the build backend (hatchling) is in the test extra; no download here.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(REPO)],
                   check=True, capture_output=True, timeout=300)
    (built,) = out.glob("fasttune-*.whl")
    return built


def test_wheel_contains_recipes_templates_and_lock(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.name for p in (REPO / "recipes").glob("*.yaml")}
    assert {f"fasttune/builtin_recipes/{n}" for n in shipped} <= names
    assert "fasttune/constraints.txt" in names
    templates = {p.name for p in (REPO / "fasttune/families/templates").glob("*.jinja")}
    assert {f"fasttune/families/templates/{n}" for n in templates} <= names


def test_installed_wheel_lists_recipes_from_another_folder(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import fasttune, fasttune.recipes as r; print(fasttune.__file__); print(r.builtin_dir())"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
    assert str(site) in where.stdout.splitlines()[0] and where.stdout.splitlines()[1].endswith("builtin_recipes")
    listed = subprocess.run([sys.executable, "-m", "fasttune", "recipes"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    assert "mistral_qlora" in listed.stdout and "demo" in listed.stdout
