"""The distribution: one import root (`steerstore`), every subpackage listed, the console script works."""

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("jobs", "operators", "schemas", "infra")


def test_every_code_folder_with_an_init_is_a_listed_subpackage_of_steerstore():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    on_disk = {"steerstore." + ".".join(init.parent.relative_to(ROOT).parts)
               for folder in FOLDERS for init in (ROOT / folder).rglob("__init__.py")}
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert listed - on_disk == set()
    assert setuptools["package-dir"] == {f"steerstore.{f}": f for f in FOLDERS}


@pytest.mark.slow
def test_the_wheel_installs_only_steerstore_and_its_console_script(tmp_path):
    # build from a clean copy: setuptools builds in the source tree and would reuse a stale build/
    source = tmp_path / "src"
    for name in FOLDERS:
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True)
    names = {p.name for p in target.iterdir()}
    assert {n for n in names if not n.endswith(".dist-info")} == {"steerstore", "bin"}
    assert sorted(p.name for p in (target / "steerstore").iterdir()) == sorted(FOLDERS)  # a namespace: no __init__
    assert not (target / "steerstore" / "infra" / "deploy").exists()

    env = dict(os.environ, PYTHONPATH=str(target))
    probe = ("import importlib.util, steerstore.jobs.cli as cli; print(cli.__file__); "
             "print([importlib.util.find_spec(n) is None for n in ('jobs', 'operators', 'schemas', 'infra')])")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, check=True, capture_output=True,
                         text=True).stdout.splitlines()
    assert out[0].startswith(str(target / "steerstore" / "jobs"))
    assert out[1] == "[True, True, True, True]"  # nothing but steerstore on the import path
    script = subprocess.run([str(target / "bin" / "steerstore"), "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert script.returncode == 0, script.stderr
    assert "refresh" in script.stdout and "bench" in script.stdout


def _constraints() -> dict[str, str]:
    path = ROOT / "infra" / "deploy" / "constraints.txt"
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            pins[name.strip().lower()] = pinned.strip()
    return pins


def test_the_pinned_test_versions_are_inside_the_ranges_steerstore_declares():
    """infra/deploy/constraints.txt (what CI and the image install) must be installable with pyproject's ranges."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for extra in project.get("optional-dependencies", {}).values() for r in extra]
    pins = _constraints()
    assert {"transformers", "tokenizers"} <= set(pins)
    for req in declared:
        name = req.name.lower()
        if name in pins:
            assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {req}"


def test_the_installed_model_stack_is_the_pinned_one():
    """The real-model tests were written against these versions; `make setup` installs exactly them."""
    from importlib.metadata import version

    differ = {n: (v, version(n)) for n, v in _constraints().items() if version(n) != v}
    assert not differ, f"installed versions differ from infra/deploy/constraints.txt (pinned, installed): {differ}"
