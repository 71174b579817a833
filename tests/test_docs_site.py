"""The docs site builds strictly, the README stays a front page, and its numbers are current.

Every Python block of the README and of the docs pages runs as a test: pytest-markdown-docs
collects them in a pytest run of their own (markdown files only: given a Python file, the
plugin imports it to read its docstrings, which would import every test module twice).
docs/conftest.py runs each block in a temporary directory and binds its placeholders.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def test_mkdocs_build_strict(tmp_path):
    # --strict: a broken link, a missing include or an API name that does not resolve fails.
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    api = (tmp_path / "api" / "passes" / "index.html").read_text()
    assert "Rewrite a copy of" in api  # insert_adaption_prompt's docstring, rendered
    performance = (tmp_path / "performance" / "index.html").read_text()
    assert "ours eager / base HF generate" in performance  # bench/results/embedded.md, included


def test_readme_is_a_front_page():
    assert len(README.read_bytes()) <= 12 * 1024


def test_readme_performance_table_is_the_bench_results():
    from bench.summary import readme_block, table

    assert readme_block(README.read_text()) == table(), "run: python -m bench.summary --write"


def test_summary_refuses_a_row_the_results_lack(monkeypatch):
    import bench.summary as summary

    monkeypatch.setattr(summary, "ROWS", (("embedded.md", "no such measurement", "x"),))
    with pytest.raises(LookupError, match="no such measurement"):
        summary.table()


def test_docs_links_point_at_pages_that_exist():
    # The README is read on GitHub as well as from the site: its relative links must resolve.
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README.read_text()):
        if "://" not in target:
            assert (ROOT / target).exists(), target


def _pages() -> list[str]:
    pages = [README, *sorted((ROOT / "docs").rglob("*.md"))]
    return [str(p.relative_to(ROOT)) for p in pages if "bench-results" not in p.parts]


@pytest.fixture(scope="module")
def code_block_run() -> subprocess.CompletedProcess:
    """One pytest-markdown-docs run over the README and every docs page (verbose: a line per
    code block and its outcome)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--markdown-docs",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:logging",
            "-v",
            *_pages(),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )


def test_the_code_blocks_run(code_block_run):
    summary = code_block_run.stdout.strip().splitlines()[-1]
    assert code_block_run.returncode == 0, (
        code_block_run.stdout[-6000:] + code_block_run.stderr[-2000:]
    )
    assert " passed" in summary and "failed" not in summary, summary


def test_every_python_block_is_collected(code_block_run):
    lines = code_block_run.stdout.splitlines()
    collected = {line.split("::")[0] for line in lines if "::[CodeFence#" in line}
    fenced = {p for p in _pages() if re.search(r"^```python *$", (ROOT / p).read_text(), re.M)}
    assert "README.md" in fenced and fenced <= collected, fenced - collected
