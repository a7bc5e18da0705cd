"""The `bnsurgery` command line: a click group, shared options, and the error-to-exit-code rule.

Every command lives in its own module under bnsurgery/commands/ and does three things: parse,
call the Python API, render text or JSON. Errors derived from BnSurgeryError become one line on
stderr and their exit code (DESIGN.md §2), unforeseen ones one line and exit 2; -vv prints the
traceback of either above that line (the exit code stays the same).
"""

from __future__ import annotations

import importlib
import json
import logging
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from bnsurgery import __version__
from bnsurgery.errors import (
    EXIT_BAD_INPUT,
    BnSurgeryError,
    UsageError,
    first_line,
    is_onnxruntime_error,
)

# name -> (module, attribute, summary) of every command; each module defines one click command.
# They are imported only when used, so `bnsurgery fold` does not pay for the harness and
# validate, and `bnsurgery --help` lists them from the summaries here without importing onnx
# or numpy (a test keeps each summary equal to its command's own first help line).
COMMANDS: dict[str, tuple[str, str, str]] = {
    "fold": (
        "bnsurgery.cli.fold", "fold_command",
        "Fold BatchNormalization into neighbouring Conv/ConvTranspose/Gemm/MatMul.",
    ),
    "info": (
        "bnsurgery.cli.fold", "info_command",
        "List every BN and what fold would do with it (a dry run: nothing is written).",
    ),
    "compare": (
        "bnsurgery.cli.compare", "compare_command",
        "Compare REFERENCE with CANDIDATE (or with itself on other providers) on ONNX Runtime.",
    ),
    "insert": (
        "bnsurgery.cli.insert", "insert_command",
        "Insert a BatchNormalization after each selected node not already followed by one.",
    ),
    "reestimate": (
        "bnsurgery.cli.reestimate", "reestimate_command",
        "Re-estimate the BatchNormalization statistics of MODEL on DATA.",
    ),
    "merge-stats": (
        "bnsurgery.cli.merge_stats", "merge_stats_command",
        "Merge BN statistics files exactly (Chan's formula, float64).",
    ),
    "adapt": (
        "bnsurgery.cli.adapt", "adapt_command",
        "Adapt MODEL to TARGET's input distribution by re-estimating its BN statistics.",
    ),
    "validate": (
        "bnsurgery.cli.validate", "validate_command",
        "Gate a model before it ships: BN health, foldability, fold verification, provider "
        "parity, the ONNX checker and shape inference.",
    ),
    "run": (
        "bnsurgery.cli.run", "run_command",
        "Run the passes PIPELINE (a TOML file) declares on MODEL and write the result.",
    ),
    "providers": (
        "bnsurgery.cli.providers", "providers_command",
        "List the ONNX Runtime installed (and warn when two flavours collide), its execution "
        "providers, plugin EP libraries and their devices.",
    ),
    "plugins": (
        "bnsurgery.cli.plugins", "plugins_command",
        "List passes (entry points `bnsurgery.passes`) and validate checks "
        "(`bnsurgery.checks`), built-in and from installed plugins; plugins that fail to load "
        "are listed with the error.",
    ),
}  # fmt: skip


log = logging.getLogger("bnsurgery")


class State:
    """Global options, reachable from every command through click's context."""

    def __init__(self, verbose: int = 0, quiet: bool = False) -> None:
        self.verbose = verbose
        self.quiet = quiet


class LazyGroup(click.Group):
    """A click group whose commands are imported from COMMANDS on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module_name, attr, _ = COMMANDS[cmd_name]
        command: click.Command = getattr(importlib.import_module(module_name), attr)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list of --help, from COMMANDS' summaries: no command module (and so
        no onnx, numpy or onnxruntime) is imported to show it."""
        limit = formatter.width - 6 - max(len(name) for name in COMMANDS)
        rows = [  # a help-only stand-in shortens each summary exactly as the command would
            (name, click.Command(name, help=summary).get_short_help_str(limit))
            for name, (_, _, summary) in COMMANDS.items()
        ]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="bnsurgery")
@click.option(
    "-v",
    "--verbose",
    count=True,
    help="-v: validate lists its info findings, logging at INFO; -vv: logging at DEBUG, and an "
    "error's Python traceback above its one-line message.",
)
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Surgery on BatchNormalization in ONNX models: fold, insert, re-estimate, compare."""
    ctx.obj = State(verbose, quiet)
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else (
        logging.INFO if verbose else logging.WARNING))  # fmt: skip
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)


# -- options several commands share (each a plain click.option) ------------------------------
def json_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print exactly one JSON document on stdout."
    )(func)


def output_option(suffix: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """-o/--output, whose default is <stem>.SUFFIX.onnx beside MODEL."""
    return click.option(
        "-o", "--output", type=click.Path(path_type=Path), help=f"Default: <stem>.{suffix}.onnx"
    )


in_place_option = click.option("--in-place", is_flag=True, help="Overwrite MODEL.")
shape_option = click.option(
    "--shape", "shapes", multiple=True, help="Input shape for random data, NAME:1x3x8x8."
)
batch_size_option = click.option(
    "--batch-size", type=click.IntRange(min=1), help="Samples per batch (default 64)."
)
provider_option = click.option(
    "--provider", default="cpu", show_default=True, help="Execution provider alias."
)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """`2GB`, `512M`, `1.5GiB`, `1000000` to bytes (K/M/G/T are powers of 1024)."""
    match = _SIZE.match(str(text))
    if not match:
        raise UsageError(f"--memory-budget '{text}': expected a size such as 2GB, 512MB or 0")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** " kmgt".index(unit or " "))


# -- output ------------------------------------------------------------------------------------


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


def save_and_emit(
    as_json: bool,
    model: Any,
    target: Path,
    payload: dict[str, Any],
    text: Callable[[], str],
    **extra: Any,
) -> None:
    """The tail of a command that writes a model: save MODEL to TARGET, add "output" (then
    EXTRA) to the payload and print it; the text ends with `wrote OUT`."""
    from bnsurgery.onnxio import save_model

    written = save_model(model, target)
    payload["output"] = str(written)
    payload.update(extra)
    emit(as_json, payload, lambda: f"{text()}\nwrote {written}")


def _quiet() -> bool:
    ctx = click.get_current_context(silent=True)
    state = ctx.find_root().obj if ctx is not None else None
    return isinstance(state, State) and state.quiet


def info(message: str) -> None:
    """A progress or status line on stderr, unless --quiet."""
    if not _quiet():
        click.echo(message, err=True)


def data_notes(source_description: str | None, notes: Sequence[str] = ()) -> None:
    """Say on stderr when the data a command ran on is synthetic (random:N), and what reading
    it noted (an array used under another name)."""
    if source_description and source_description.startswith("random:"):
        info(f"note: DATA is synthetic ({source_description})")
    for note in notes:
        info(f"note: {source_description}: {note}" if source_description else f"note: {note}")


class ProgressBar:
    """A click progress bar on stderr, only when stderr is a TTY and not --quiet; the engines
    call it as progress(advance, total)."""

    def __init__(self, label: str) -> None:
        self.enabled = not _quiet() and sys.stderr.isatty()
        self.label = label
        self._bar: Any = None
        self._total: int | None = None

    def __call__(self, advance: int, total: int | None) -> None:
        if not self.enabled or total is None:
            return
        if self._bar is not None and total != self._total:  # the next phase (adapt)
            self._bar.__exit__(None, None, None)
            self._bar = None
        if self._bar is None:
            self._bar = click.progressbar(length=total, label=self.label, file=sys.stderr)
            self._bar.__enter__()
            self._total = total
        self._bar.update(advance)

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
            self._bar = None


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
    args, verbose = hoist_global_flags(list(sys.argv[1:] if argv is None else argv))
    try:
        result = cli.main(args=args, standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except BnSurgeryError as exc:
        if verbose > 1:
            _print_traceback()
        click.echo(f"bnsurgery: error: {exc}", err=True)
        code = exc.exit_code
    except click.exceptions.Exit as exc:
        code = int(exc.exit_code)
    except click.ClickException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare `bnsurgery`: help, not an error
            click.echo(exc.format_message(), err=True)
        else:
            click.echo(f"bnsurgery: error: {exc.format_message()}", err=True)
        code = EXIT_BAD_INPUT
    except click.exceptions.Abort:
        click.echo("bnsurgery: aborted", err=True)
        code = EXIT_BAD_INPUT
    except Exception as exc:  # a bug or an unforeseen input: one line (after the traceback, -vv)
        if verbose > 1:
            _print_traceback()
        if is_onnxruntime_error(exc):  # ORT rejected or could not run the model: bad input
            message = f"ONNX Runtime cannot run the model: {first_line(exc)}"
        else:
            details = "" if verbose > 1 else " (run with -vv for details)"
            message = f"{type(exc).__name__}: {first_line(exc)}{details}"
        click.echo(f"bnsurgery: error: {message}", err=True)
        code = EXIT_BAD_INPUT
    sys.stdout.flush()
    return code


def _print_traceback() -> None:
    """-vv: the traceback of the error being handled, on stderr, above its one-line message."""
    import traceback

    click.echo(traceback.format_exc().rstrip(), err=True)


def run() -> None:
    sys.exit(main())
