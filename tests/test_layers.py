"""The layers of docs/design.md hold: `lint-imports` keeps every contract of pyproject.toml's
[tool.importlinter] (the layers, and no import cycles), and CI runs it beside the tests.

import-linter comes with the `testing` extra, so CI runs this; without it the check is skipped.
"""

from __future__ import annotations

import re
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
    if found is None:
        pytest.skip("import-linter is installed but its lint-imports script is not found")
    return found


@pytest.mark.xfail(
    strict=False,
    reason="modules are still moving into their layers on other branches; remove this marker "
    "once they are merged",
)
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


def _readme_test_command() -> str:
    readme = (REPO / "README.md").read_text()
    block = re.search(r"exactly what CI runs.*?```bash\n(.*?)\n```", readme, re.DOTALL)
    assert block is not None, "README has no test command block"
    return block.group(1).strip()


def test_ci_runs_the_readme_test_command_and_it_checks_the_layers() -> None:
    command = _readme_test_command()
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert command in ci, f".ci/run does not run the README's test command: {command}"
    assert re.search(r"(^|&&\s*)lint-imports(\s|$)", command), command
