"""Ruff over the whole repository with the rules in pyproject.toml: unused or undefined names, syntax errors."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def run_ruff(*paths: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", *paths],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_code_has_no_unused_or_undefined_names():
    out = run_ruff(".")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-1000:]


def test_the_lint_finds_an_unused_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\nprint(undefined_name)\n")
    out = run_ruff(str(bad))
    assert out.returncode == 1 and "F401" in out.stdout and "F821" in out.stdout, out.stdout
