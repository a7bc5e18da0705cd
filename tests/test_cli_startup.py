"""`bnsurgery --help` and `--version` start fast: listing the commands imports no onnx, numpy or
onnxruntime (onnx alone costs about a second of start-up through ml_dtypes)."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest

from bnsurgery.cli.main import COMMANDS
from bnsurgery.cli.main import cli as group

HEAVY = ("onnx", "onnxruntime", "numpy", "ml_dtypes")


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["--version"], []])
def test_listing_the_commands_imports_no_onnx_numpy_or_onnxruntime(tmp_path, args) -> None:
    code = (
        "import sys\n"
        "from bnsurgery.cli.main import main\n"
        f"code = main({args!r})\n"
        f"heavy = sorted(n for n in {HEAVY!r} if n in sys.modules)\n"
        "print('HEAVY', code, heavy, file=sys.stderr)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    # a bare `bnsurgery` shows the help on stderr and exits 2, as click does
    assert f"HEAVY {2 if not args else 0} []" in proc.stderr, proc.stdout + proc.stderr
    if args != ["--version"]:
        assert all(name in proc.stdout + proc.stderr for name in COMMANDS)
        assert "bnsurgery: error" not in proc.stdout + proc.stderr


def test_each_listed_summary_is_the_commands_own_first_help_line() -> None:
    """The summaries --help shows without importing the commands are the commands' own."""
    ctx = click.Context(group)
    for name, (_, _, summary) in COMMANDS.items():
        command = group.get_command(ctx, name)
        assert command is not None
        assert summary == command.get_short_help_str(limit=10_000), name


@pytest.mark.parametrize("width", [80, 200])
def test_help_lists_the_commands_exactly_as_click_would(width: int) -> None:
    """Same text as click's own listing, which imports every command to ask for its help."""
    ctx = click.Context(group, terminal_width=width, max_content_width=width)
    ours, clicks = click.HelpFormatter(width=width), click.HelpFormatter(width=width)
    group.format_commands(ctx, ours)
    click.Group.format_commands(group, ctx, clicks)
    assert ours.getvalue() == clicks.getvalue()
    assert all(name in ours.getvalue() for name in COMMANDS)
