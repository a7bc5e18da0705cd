"""The `bnsurgery` command line: a click group, shared options, and the error-to-exit-code rule.

Every command lives in its own module under bnsurgery/commands/ and does three things: parse,
call the Python API, render text or JSON. Errors derived from BnSurgeryError become one line on
stderr and their exit code (DESIGN.md §2); nothing else prints a traceback unless -vv is given.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import click

from bnsurgery import __version__
from bnsurgery.errors import EXIT_BAD_INPUT, BnSurgeryError

# (module, attribute) of every command; each module defines one click command.
COMMANDS: list[tuple[str, str]] = [
    ("bnsurgery.commands.fold", "fold_command"),
    ("bnsurgery.commands.fold", "info_command"),
    ("bnsurgery.commands.compare", "compare_command"),
    ("bnsurgery.commands.insert", "insert_command"),
    ("bnsurgery.commands.reestimate", "reestimate_command"),
    ("bnsurgery.commands.merge_stats", "merge_stats_command"),
    ("bnsurgery.commands.adapt", "adapt_command"),
    ("bnsurgery.commands.validate", "validate_command"),
    ("bnsurgery.commands.run", "run_command"),
    ("bnsurgery.commands.plugins", "plugins_command"),
]

log = logging.getLogger("bnsurgery")


class State:
    """Global options, reachable from every command through click's context."""

    def __init__(self, verbose: int = 0, quiet: bool = False) -> None:
        self.verbose = verbose
        self.quiet = quiet


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="bnsurgery")
@click.option("-v", "--verbose", count=True, help="More logging on stderr (repeatable).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Surgery on BatchNormalization in ONNX models: fold, insert, re-estimate, compare."""
    ctx.obj = State(verbose, quiet)
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else (
        logging.INFO if verbose else logging.WARNING))  # fmt: skip
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)


def _register() -> None:
    for module_name, attr in COMMANDS:
        cli.add_command(getattr(importlib.import_module(module_name), attr))


def json_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print exactly one JSON document on stdout."
    )(func)


def emit(as_json: bool, payload: dict[str, Any], text: Callable[[], str]) -> None:
    """Print the result: one JSON document, or the rendered text."""
    if as_json:
        click.echo(json.dumps(payload, indent=2, default=_json_default))
    else:
        click.echo(text())


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def info(message: str) -> None:
    """A progress or status line on stderr, unless --quiet."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None and isinstance(ctx.find_root().obj, State) and ctx.find_root().obj.quiet:
        return
    click.echo(message, err=True)


GLOBAL_FLAGS = re.compile(r"^(-v+|--verbose|-q|--quiet)$")


def hoist_global_flags(args: list[str]) -> tuple[list[str], int]:
    """Move -v/-q given after the command name to the front, where the group reads them, so
    `bnsurgery fold m.onnx -q` works like `bnsurgery -q fold m.onnx`. Returns the verbosity."""
    flags = [a for a in args if GLOBAL_FLAGS.match(a)]
    rest = [a for a in args if not GLOBAL_FLAGS.match(a)]
    verbose = sum(len(f) - 1 if f.startswith("-v") else 1 for f in flags if "q" not in f)
    return flags + rest, verbose


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns (and exits with) the documented exit code."""
    _register()
    args, verbose = hoist_global_flags(list(sys.argv[1:] if argv is None else argv))
    try:
        result = cli.main(args=args, standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except BnSurgeryError as exc:
        click.echo(f"bnsurgery: error: {exc}", err=True)
        code = exc.exit_code
    except click.exceptions.Exit as exc:
        code = int(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"bnsurgery: error: {exc.format_message()}", err=True)
        code = EXIT_BAD_INPUT
    except click.exceptions.Abort:
        click.echo("bnsurgery: aborted", err=True)
        code = EXIT_BAD_INPUT
    except Exception as exc:  # a bug or an unforeseen input: one line unless -vv
        if verbose > 1:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        click.echo(
            f"bnsurgery: error: {type(exc).__name__}: {first} (run with -vv for details)",
            err=True,
        )
        code = EXIT_BAD_INPUT
    sys.stdout.flush()
    return code


def run() -> None:
    sys.exit(main())
