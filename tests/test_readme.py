"""The README says what the code does: its command table names real options (and the output
options of every command that has them), `validate --help` lists what `--skip` takes, and its
API example writes nothing into the repository."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from conftest import REPO

from bnsurgery.cli.main import COMMANDS
from bnsurgery.cli.main import cli as group

README = (REPO / "README.md").read_text()
# Options a reader must find in the table wherever the command has them: where the output goes.
OUTPUT_OPTIONS = ("--output", "--in-place", "--external-data", "--json")


def _table_rows() -> dict[str, str]:
    """command name -> its usage cell in the README's command table."""
    rows = {}
    for cell in re.findall(r"^\| `(bnsurgery [^`]+)` \|", README, re.MULTILINE):
        rows[cell.split()[1]] = cell
    return rows


def _options(name: str) -> dict[str, click.Option]:
    command = group.get_command(click.Context(group), name)
    assert command is not None
    found = {}
    for param in command.params:
        if isinstance(param, click.Option):
            for opt in [*param.opts, *param.secondary_opts]:
                found[opt] = param
    return found


def test_the_table_has_a_row_for_every_command() -> None:
    assert sorted(_table_rows()) == sorted(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_the_table_names_exists(name: str) -> None:
    cell = _table_rows()[name]
    named = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", cell))
    unknown = named - set(_options(name))
    assert not unknown, f"README names {sorted(unknown)} for `{name}`, which has no such option"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_the_table_names_every_output_option_the_command_has(name: str) -> None:
    cell = _table_rows()[name]
    options = _options(name)
    for wanted in OUTPUT_OPTIONS:
        if wanted in options:
            spellings = [*options[wanted].opts, *options[wanted].secondary_opts]
            assert any(re.search(rf"(?<![\w-]){re.escape(s)}(?![\w-])", cell) for s in spellings), (
                f"README's row for `{name}` does not mention {wanted}"
            )


def test_validate_help_lists_every_check_id_skip_takes(cli) -> None:
    from bnsurgery.validation.checks import builtin_checks

    code, out, _ = cli("validate", "--help")
    assert code == 0
    tokens = set(re.findall(r"[\w-]+", out))
    missing = [c.name for c in builtin_checks() if c.name not in tokens]
    assert not missing, f"validate --help does not list {missing}"


def _api_example() -> str:
    section = README.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)  # type: ignore[union-attr]


def _repo_files() -> set[Path]:
    """Where a relative path in the example would land: the repository root and samples."""
    return {p for folder in (REPO, REPO / "sample_models") for p in folder.iterdir()}


def test_the_api_example_runs_and_writes_nothing_into_the_repository() -> None:
    before = _repo_files()
    proc = subprocess.run(
        [sys.executable, "-c", _api_example()],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("20 -> 0\n")
    assert _repo_files() - before == set()
    assert "/resnet_small.folded.onnx" in (REPO / ".gitignore").read_text().splitlines()
