"""The layers of docs/design.md hold: `lint-imports` keeps every contract of pyproject.toml's
[tool.importlinter] (the layers, and no import cycles).

import-linter comes with the `testing` extra, so CI runs this (and `lint-imports` itself, in the
README's test command: tests/test_runtime_install.py); without it the check is skipped.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO


def _lint_imports() -> str:
    """The `lint-imports` script of the interpreter running the tests (its venv), else PATH's."""
    pytest.importorskip("importlinter", reason="import-linter is not installed (testing extra)")
    beside = Path(sys.executable).with_name("lint-imports")
    found = str(beside) if beside.exists() else shutil.which("lint-imports")
    assert found is not None, "import-linter is installed but its lint-imports script is not"
    return found


def test_lint_imports_keeps_every_contract() -> None:
    proc = subprocess.run(
        [_lint_imports(), "--no-cache"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "Contracts:" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, proc.stdout[-4000:]
