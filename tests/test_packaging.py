"""The package as users get it: its metadata, and a wheel that installs and runs on its own.

``requires-python`` is checked against the interpreter running the tests (CI's), and the
classifiers and static checkers against ``requires-python``, so the three cannot drift apart.
The wheel test builds the wheel, installs it into a fresh venv and runs ``brokerexec --help``
there, from the installed copy, not from this checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path
from typing import Any

import pytest
import tomllib
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT: dict[str, Any] = PYPROJECT["project"]


def minimum_python() -> Version:
    (lower,) = [s for s in SpecifierSet(PROJECT["requires-python"]) if s.operator == ">="]
    return Version(lower.version)


def test_requires_python_admits_the_interpreter_ci_runs() -> None:
    running = ".".join(map(str, sys.version_info[:3]))
    assert running in SpecifierSet(PROJECT["requires-python"]), (running, PROJECT["requires-python"])


def test_classifiers_name_every_supported_python_up_to_the_one_tested() -> None:
    low = minimum_python()
    classifiers = set(PROJECT["classifiers"])
    named = {c.rsplit(" :: ", 1)[1] for c in classifiers
             if c.startswith("Programming Language :: Python :: 3.")}
    expected = {f"3.{minor}" for minor in range(low.minor, sys.version_info.minor + 1)}
    assert expected <= named, f"missing classifiers for {sorted(expected - named)}"
    assert all(Version(v) >= low for v in named), "a classifier below requires-python"
    assert "License :: OSI Approved :: MIT License" in classifiers
    assert "Typing :: Typed" in classifiers


def test_the_static_checkers_target_the_oldest_supported_python() -> None:
    # mypy and ruff then flag what the oldest Python lacks, though CI runs a newer one.
    low = minimum_python()
    assert PYPROJECT["tool"]["mypy"]["python_version"] == f"{low.major}.{low.minor}"
    assert PYPROJECT["tool"]["ruff"]["target-version"] == f"py{low.major}{low.minor}"


def test_license_file_and_project_urls() -> None:
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert license_text.startswith("MIT License") and PROJECT["license"] == {"text": "MIT"}
    assert {"Homepage", "Documentation", "Source", "Issues"} <= set(PROJECT["urls"])
    assert all(url.startswith("https://") for url in PROJECT["urls"].values())


@pytest.mark.wheel
@pytest.mark.timeout(300)
def test_wheel_installs_in_a_fresh_venv_and_runs(tmp_path: Path) -> None:
    # Given the wheel, built without build isolation (setuptools is in the test extra: no
    # index is needed, and the build takes seconds) from a copy of what it is made of, so
    # that setuptools' build/ folder (stale modules included) never stays in the checkout.
    source, dist = tmp_path / "source", tmp_path / "dist"
    shutil.copytree(ROOT / "brokerexec", source / "brokerexec",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--quiet", "--wheel-dir", str(dist), str(source)], check=True, timeout=240)
    (wheel,) = dist.glob("brokerexec-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert "brokerexec/py.typed" in names and "brokerexec/protocol/names.py" in names
    assert not {n for n in names if n.startswith(("tests/", "bench/", "examples/"))}
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)
    # When it is installed into a fresh venv (no pip of its own: this pip installs into it)
    # whose dependencies are this environment's, seen through a .pth file: the packages, not
    # this environment's editable brokerexec, whose finder lives in a .pth that is not read there.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n", encoding="utf-8")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                    "--no-index", "--quiet", str(wheel)], check=True, timeout=120)
    # Then brokerexec imports from the venv, its dependencies are met, and its command runs.
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    where = subprocess.run([str(python), "-c", "import brokerexec; print(brokerexec.__file__)"],
                           check=True, capture_output=True, text=True, env=env, cwd=tmp_path).stdout
    assert Path(where.strip()).is_relative_to(site), where
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "check"],
                   check=True, capture_output=True, env=env, cwd=tmp_path, timeout=120)
    shown = subprocess.run([str(venv / "bin" / "brokerexec"), "--help"], check=True,
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert "Run long computations on workers" in shown.stdout and "worker" in shown.stdout
