"""Packaging metadata, read from pyproject.toml and the checkout: nothing is built here (.ci/run's
wheel step builds the wheel and checks that LICENSE and py.typed are in it)."""

import importlib.metadata
import re
from pathlib import Path

import pytest

import numba_bn

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_build_needs_setuptools_77(pyproject):
    # license = "MIT" (an SPDX expression) and license-files need setuptools >= 77
    (setuptools,) = [r for r in pyproject["build-system"]["requires"] if r.startswith("setuptools")]
    minimum = re.fullmatch(r"setuptools\s*>=\s*(\d+)(\.\d+)*", setuptools)
    assert minimum, f"{setuptools!r}: expected setuptools>=N"
    assert int(minimum.group(1)) >= 77


def test_license_file_matches_the_license_field(pyproject):
    project = pyproject["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 the numba_bn authors" in text
    assert "Permission is hereby granted, free of charge" in text
    # PEP 639: no license classifier next to a license expression (setuptools refuses both)
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]


def test_py_typed_is_shipped(pyproject):
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["numba_bn"]
    assert (ROOT / "numba_bn" / "py.typed").is_file()
    assert "Typing :: Typed" in pyproject["project"]["classifiers"]


def test_version_has_one_source(pyproject):
    try:
        installed = importlib.metadata.version("numba-bn")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("numba-bn is not installed (a bare source tree)")
    assert numba_bn.__version__ == installed
    assert installed == pyproject["project"]["version"], (
        "the installed metadata is stale: reinstall (pip install -e .)"
    )
    # and no module of the package spells the version out (the C ABI's version is its own)
    literal = re.compile(rf"['\"]{re.escape(installed)}['\"]")
    for path in (ROOT / "numba_bn").rglob("*.py"):
        assert not literal.search(path.read_text()), f"{path} hardcodes {installed}"
