"""What ``pip install .`` (not editable) puts in the wheel: pyproject.toml lists the packages by hand, so a
package or data file added without its line would be missing from every user's install while every editable
checkout, this suite's included, still finds it in the source tree."""

import fnmatch
import subprocess
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # (Python 3.11+)

ROOT = Path(__file__).parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _tracked(under: str) -> list[str]:
    """The files git tracks under ``under`` (the source tree holds build outputs and caches beside them)."""
    try:
        out = subprocess.run(["git", "ls-files", under], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return out.stdout.split()


def _glob_matches(parts: tuple[str, ...], pattern: str) -> bool:
    """A package-data glob as setuptools applies it: component by component (``*`` never spans a ``/``)."""
    wanted = pattern.split("/")
    return len(wanted) == len(parts) and all(fnmatch.fnmatchcase(p, w) for p, w in zip(parts, wanted))


def test_every_package_of_the_source_tree_is_installed():
    packages = {str(Path(f).parent).replace("/", ".") for f in _tracked("latentrt") if f.endswith("/__init__.py")}
    assert sorted(PYPROJECT["tool"]["setuptools"]["packages"]) == sorted(packages)


def test_every_data_file_of_the_packages_is_installed():
    """Every tracked file of latentrt that is not Python source matches a package-data pattern of its
    package (the built-in models' configs, weights, tokenizers, training records)."""
    data = PYPROJECT["tool"]["setuptools"]["package-data"]
    missing = []
    for f in _tracked("latentrt"):
        if f.endswith(".py"):
            continue
        parts = Path(f).parts
        # the nearest package above the file, and the file's path relative to it
        for depth in range(len(parts) - 1, 0, -1):
            package = ".".join(parts[:depth])
            if package in data:
                if any(_glob_matches(parts[depth:], pattern) for pattern in data[package]):
                    break
        else:
            missing.append(f)
    assert not missing, missing
    assert any(f.endswith("model.safetensors") for f in _tracked("latentrt"))  # (the check saw the models)
