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
