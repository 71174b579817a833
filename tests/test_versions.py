"""The declared version ranges are the tested ones, and an untested release is named."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
from helpers import tiny_llama

from adaption_fx.capture import hf_compat
from adaption_fx.capture.export_model import capture
from adaption_fx.capture.hf_compat import (
    TESTED_RANGES,
    UntestedVersionWarning,
    check_versions,
    is_tested,
)

ROOT = Path(__file__).resolve().parents[1]


def _declared() -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {}
    for requirement in project["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*([^;]*)", requirement.split(";")[0].strip())
        declared[match.group(1).lower()] = match.group(2).replace(" ", "")
    return declared


def test_pyproject_declares_exactly_the_tested_ranges():
    declared = _declared()
    for package in TESTED_RANGES:
        assert declared[package] == hf_compat.tested_range_text(package), package


def test_installed_releases_are_in_the_tested_range():
    # The suite itself runs on a tested pair; test-matrix runs it on others on purpose.
    for package in TESTED_RANGES:
        version = hf_compat.installed_version(package)
        assert version is not None
        if not is_tested(package, version):
            pytest.skip(f"{package} {version} is outside the tested range (a matrix run)")


@pytest.mark.parametrize(
    ("package", "version", "tested"),
    [
        ("transformers", "4.57.6", True),
        ("transformers", "5.0.0", True),
        ("transformers", "5.23.0", True),
        ("transformers", "5.24.0", True),
        ("transformers", "5.24.3", True),
        ("transformers", "4.57.5", False),
        ("transformers", "4.56.2", False),
        ("transformers", "5.25.0", False),
        ("torch", "2.13.0+cpu", True),
        ("torch", "2.13.1", True),
        ("torch", "2.14.1+cu130", True),
        ("torch", "2.12.0", False),
        ("torch", "2.15.0", False),
    ],
)
def test_is_tested(package, version, tested):
    assert is_tested(package, version) is tested


def test_untested_release_warns_once_naming_the_range(monkeypatch):
    monkeypatch.setattr(hf_compat, "warned_versions", set())
    monkeypatch.setattr(
        hf_compat,
        "installed_version",
        lambda p: "4.50.0" if p == "transformers" else hf_compat.importlib.metadata.version(p),
    )
    with pytest.warns(UntestedVersionWarning, match=r"transformers>=4\.57\.6,<5\.25.*4\.50\.0"):
        assert check_versions(("transformers",)) == ["transformers"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntestedVersionWarning)
        check_versions(("transformers",))  # once per process and version


def test_capture_of_a_hugging_face_model_checks_the_versions(monkeypatch):
    monkeypatch.setattr(hf_compat, "warned_versions", set())
    monkeypatch.setattr(hf_compat, "installed_version", lambda p: "9.0.0")
    with pytest.warns(UntestedVersionWarning) as record:
        capture(tiny_llama(num_hidden_layers=1))
    assert {str(w.message).split(" is tested with ")[1].split(">=")[0] for w in record} == {
        "torch",
        "transformers",
    }


@pytest.mark.parametrize("page", ["README.md", "docs/guides/supported-versions.md"])
def test_readme_states_the_tested_ranges(page):
    text = (ROOT / page).read_text()
    section = re.split(r"^#{1,2} Supported versions\n", text, maxsplit=1, flags=re.M)[1]
    section = section.split("\n## ", 1)[0]
    # The first table: transformers | PEFT | torch | how it is tested.
    table = section.strip().split("\n\n", 1)[0].splitlines()
    assert table[0].startswith("| transformers | PEFT"), table[0]
    for package, (low, newest_line) in TESTED_RANGES.items():
        assert f"`{package}{hf_compat.tested_range_text(package)}`" in section, package
        # The table names the oldest release and one of the newest line.
        column = 0 if package == "transformers" else 2
        cells = [row.split("|")[1:-1][column].strip() for row in table[2:]]
        assert any(cell.startswith(low) for cell in cells), (package, cells)
        assert any(cell.startswith(f"{newest_line}.") for cell in cells), (package, cells)
