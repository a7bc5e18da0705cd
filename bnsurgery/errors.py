"""Error types of bnsurgery, each carrying the CLI exit code it maps to (DESIGN.md §2)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_ENVIRONMENT = 3


class BnSurgeryError(Exception):
    """Base class: a failure the user should see as one clear line, never a traceback."""

    exit_code: int = EXIT_BAD_INPUT


class BadInputError(BnSurgeryError):
    """Unreadable, not ONNX, invalid model, bad data, unsafe path, bad option value."""

    exit_code = EXIT_BAD_INPUT


class UsageError(BadInputError):
    """The command line asks for something inconsistent (OUT == MODEL without --in-place)."""


class UnsafePathError(BadInputError):
    """External data that points outside the model's folder."""


class DataError(BadInputError):
    """DATA that does not fit the model (missing input, wrong shape or dtype, bad labels key)."""


class EnvironmentProblem(BnSurgeryError):
    """A requested execution provider is unavailable, or an optional dependency is missing."""

    exit_code = EXIT_ENVIRONMENT


class CheckFailed(BnSurgeryError):
    """A check ran and failed: verification mismatch, compare beyond tolerance, validate errors."""

    exit_code = EXIT_CHECK_FAILED


def is_onnxruntime_error(exc: BaseException) -> bool:
    """An error raised by onnxruntime itself (a kernel it lacks, a model it rejects), as
    opposed to a bug on our side."""
    return type(exc).__module__.startswith("onnxruntime")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message ("" when it has none), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
