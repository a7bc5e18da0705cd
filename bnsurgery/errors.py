"""Error types of bnsurgery, each carrying the CLI exit code it maps to (docs/design.md).

A library error speaks of the parameter at fault, never of a command-line flag: it is raised as

    BadInputError("{option} must be within [0, 1], got 2", option="prior")

`str(error)` reads "prior must be within [0, 1], got 2" (the Python parameter), and the CLI
renders the same error with its flag, "--prior must be within [0, 1], got 2"
(`error.render("--prior")`). Tests assert on `error.option`, not on the wording.
"""

from __future__ import annotations

import signal

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_ENVIRONMENT = 3


class BnSurgeryError(Exception):
    """Base class: a failure the user should see as one clear line, never a traceback.

    `option` names the parameter at fault (a keyword of the Python API, e.g. "prior",
    "shapes"), or is None; `{option}` in the message stands for it, so each front end names it
    in its own terms (`render`)."""

    exit_code: int = EXIT_BAD_INPUT

    def __init__(self, message: str = "", *args: object, option: str | None = None) -> None:
        self.template = message
        self.option = option
        super().__init__(self.render(option), *args)

    def render(self, option_label: str | None = None) -> str:
        """The message with `{option}` spelled as `option_label` (the parameter by default)."""
        label = option_label or self.option
        return self.template.replace("{option}", label) if label else self.template

    def __reduce__(self):  # type: ignore[no-untyped-def]
        # Errors cross the isolated child's pipe; the keyword-only option must travel too.
        return _rebuild, (type(self), self.args, self.__dict__)


class BadInputError(BnSurgeryError):
    """Unreadable, not ONNX, invalid model, bad data, unsafe path, bad option value."""

    exit_code = EXIT_BAD_INPUT


class UsageError(BadInputError):
    """The command line asks for something inconsistent (OUT == MODEL without --in-place)."""


class UnsafePathError(BadInputError):
    """External data that points outside the model's folder."""


class DataError(BadInputError):
    """DATA that does not fit the model (missing input, wrong shape or dtype, bad labels key)."""


class EngineCrashed(BadInputError):
    """ONNX Runtime died in the isolated process that ran it (a signal such as SIGSEGV, or an
    exit without a result): the model is one the engine cannot survive, so bad input (exit 2).
    `signal_number` or `exit_status` says how it ended."""

    def __init__(
        self, what: str, signal_number: int | None = None, exit_status: int | None = None
    ) -> None:
        self.what = what
        self.signal_number = signal_number
        self.exit_status = exit_status
        super().__init__(self._message())

    def _message(self) -> str:
        number, what, status = self.signal_number, self.what, self.exit_status
        if number is None:
            return f"ONNX Runtime ended without a result (exit status {status}) running {what}"
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = "unknown signal"
        hint = " (killed; out of memory?)" if number == signal.SIGKILL else ""
        return f"ONNX Runtime crashed (signal {number}, {name}) running {what}{hint}"

    def __reduce__(self) -> tuple[type, tuple[str, int | None, int | None]]:
        return type(self), (self.what, self.signal_number, self.exit_status)


class EngineError(Exception):
    """An exception of onnxruntime's own that was raised in the isolated process and could not
    travel back as itself (its type does not pickle): the original type's name and module, and
    its message, which `str()` returns unchanged. `is_onnxruntime_error` recognises it."""

    def __init__(self, type_name: str, module: str, message: str) -> None:
        super().__init__(type_name, module, message)
        self.type_name = type_name
        self.module = module
        self.message = message

    def __str__(self) -> str:
        return self.message


class EnvironmentProblem(BnSurgeryError):
    """A requested execution provider is unavailable, or an optional dependency is missing."""

    exit_code = EXIT_ENVIRONMENT


class CheckFailed(BnSurgeryError):
    """A check ran and failed: verification mismatch, compare beyond tolerance, validate errors."""

    exit_code = EXIT_CHECK_FAILED


def _rebuild(kind: type[BnSurgeryError], args: tuple, state: dict) -> BnSurgeryError:
    error = kind.__new__(kind)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


def is_onnxruntime_error(exc: BaseException) -> bool:
    """An error raised by onnxruntime itself (a kernel it lacks, a model it rejects), as
    opposed to a bug on our side; also one carried back from an isolated child as EngineError."""
    return isinstance(exc, EngineError) or type(exc).__module__.startswith("onnxruntime")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message ("" when it has none), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def first_line_or_type(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    return first_line(exc) or type(exc).__name__
