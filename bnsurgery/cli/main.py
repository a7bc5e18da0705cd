"""The `bnsurgery` command line: the click group, its global options (-v, -q), logging, and the
error-to-exit-code rule.

Every command lives in its own module under bnsurgery/cli/ and does three things: parse, call
the Python API, render text or JSON (cli.render); the options several commands share are
defined once in cli.options. Errors derived from BnSurgeryError become one line on stderr and
their exit code (docs/design.md), unforeseen ones one line and exit 2; -vv prints the traceback
of either above that line (the exit code stays the same). A library error names the parameter
at fault (`option="prior"`); `flag_for` turns it into the command's flag (`--prior`).

Logging is configured here and nowhere else: the `bnsurgery` logger's records go to stderr
(warnings always, INFO with -v, DEBUG with -vv, errors only with -q), so stdout keeps only the
result. This module imports no onnx, numpy or onnxruntime: `bnsurgery --help` stays fast.
"""

from __future__ import annotations

import importlib
import logging
import re
import sys
import time
import traceback
from collections.abc import Sequence

import click

from bnsurgery import __version__
from bnsurgery.errors import (
    EXIT_BAD_INPUT,
    BnSurgeryError,
    first_line,
    is_onnxruntime_error,
)

logger = logging.getLogger(__name__)

# name -> (module, attribute, summary) of every command; each module defines one click command.
# They are imported only when used: `bnsurgery --help` lists them from the summaries here
# without importing onnx or numpy (tests/test_cli_startup.py), and a test keeps each summary
# equal to its command's own first help line. The command modules import what they use at the
# top; this module is the only one that must stay light.
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


class State:
    """Global options, reachable from every command through click's context (`ctx.obj`), and
    the command being run (for the flags its errors name)."""

    def __init__(self, verbose: int = 0, quiet: bool = False) -> None:
        self.verbose = verbose
        self.quiet = quiet
        self.command: str | None = None
        self.start: float | None = None  # when the command began (perf_counter)


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
    state = ctx.ensure_object(State)
    state.verbose, state.quiet, state.command = verbose, quiet, ctx.invoked_subcommand
    state.start = time.perf_counter()
    configure_logging(ctx, verbose, quiet)


@cli.result_callback()
@click.pass_context
def _finished(ctx: click.Context, result: object, **_options: object) -> object:
    """-v: how long the command took, once it succeeded (a failure is its error line)."""
    state = ctx.find_object(State)
    if state is not None and state.start is not None:
        logger.info("%s took %.3f s", state.command, time.perf_counter() - state.start)
    return result


# -- logging -----------------------------------------------------------------------------------
class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is when a record arrives (click's and pytest's capture
    replace it), as logging's own last-resort handler does."""

    @property  # type: ignore[override]
    def stream(self):  # type: ignore[no-untyped-def]
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


class _Formatter(logging.Formatter):
    """Warnings and errors as their bare message (the library's `note: ...` lines read as they
    always did); INFO and DEBUG marked as such, -vv with the logger's name."""

    def __init__(self, verbose: int) -> None:
        super().__init__()
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.WARNING:
            return message
        level = record.levelname.lower()
        return f"{level}: {record.name}: {message}" if self.verbose > 1 else f"{level}: {message}"


def configure_logging(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Send the `bnsurgery` logger's records to stderr at the level -v/-q ask for, for the run
    of one command: the handler, level and propagation are restored when its context closes,
    so a command run in-process (tests, notebooks) leaves logging as it found it."""
    package = logging.getLogger("bnsurgery")
    level = logging.ERROR if quiet else (
        logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    )  # fmt: skip
    handler = _StderrHandler()
    handler.setFormatter(_Formatter(verbose))
    saved = package.level, package.propagate
    package.addHandler(handler)
    package.setLevel(level)
    package.propagate = False  # a root handler (another library's basicConfig) would repeat it

    def restore() -> None:
        package.removeHandler(handler)
        package.setLevel(saved[0])
        package.propagate = saved[1]

    ctx.call_on_close(restore)


# -- library errors in the command line's terms -------------------------------------------------
# Parameters whose flag is not `--` + the name with `_` as `-`.
OPTION_FLAGS: dict[str, str] = {
    "shapes": "--shape",
    "provider_options": "--provider-option",
    "ep_libraries": "--ep-library",
    "labels_key": "--labels",
    "tensor_map": "--map",
    "intra_op_threads": "--threads",
}
# A parameter that a command spells its own way: adapt re-estimates on --target and calibrates
# the BNs it inserts on --source.
COMMAND_FLAGS: dict[str, dict[str, str]] = {
    "adapt": {"data": "--target", "calibrate": "--source"},
}


def flag_for(option: str, command: str | None = None) -> str:
    """The flag through which COMMAND (or, without one, any command) sets the Python API's
    parameter OPTION: `prior` -> `--prior`, `shapes` -> `--shape`."""
    if command is not None and option in COMMAND_FLAGS.get(command, {}):
        return COMMAND_FLAGS[command][option]
    return OPTION_FLAGS.get(option, "--" + option.replace("_", "-"))


def command_flags(command: str) -> set[str]:
    """Every flag COMMAND accepts (its module is imported)."""
    found = cli.get_command(click.Context(cli), command)
    flags: set[str] = set()
    for param in found.params if found is not None else ():
        if isinstance(param, click.Option):
            flags.update([*param.opts, *param.secondary_opts])
    return flags


def error_message(exc: BnSurgeryError, command: str | None) -> str:
    """A library error's message with its parameter spelled as the command's flag; under a
    command without that flag (a pipeline's step options, say) as the parameter itself."""
    if exc.option is None:
        return str(exc)
    flag = flag_for(exc.option, command)
    if command is not None and flag not in command_flags(command):
        return exc.render()
    return exc.render(flag)


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
    state = State(verbose)  # the group fills it in; it outlives the command's context
    try:
        result = cli.main(args=args, standalone_mode=False, obj=state)
        code = result if isinstance(result, int) else 0
    except BnSurgeryError as exc:
        if verbose > 1:
            _print_traceback()
        click.echo(f"bnsurgery: error: {error_message(exc, state.command)}", err=True)
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
    click.echo(traceback.format_exc().rstrip(), err=True)


def run() -> None:
    """The console script `bnsurgery`."""
    sys.exit(main())
