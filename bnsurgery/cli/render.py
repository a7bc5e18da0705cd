"""How commands print: the result on stdout (one JSON document, or text), notes and progress on
stderr, plain text tables, and the tail of a command that writes a model.

stdout carries only the result, so `--json` output is exactly one document; everything else
(notes, warnings, progress bars, logging) goes to stderr.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np

from bnsurgery.cli.main import State
from bnsurgery.harness.render_text import text_table
from bnsurgery.onnxio import save_model

logger = logging.getLogger(__name__)


def emit(as_json: bool, payload: dict[str, Any], text: Callable[[], str]) -> None:
    """Print the result: one JSON document, or the rendered text."""
    if as_json:
        click.echo(json.dumps(payload, indent=2, default=_json_default))
    else:
        click.echo(text())


def _json_default(value: Any) -> Any:
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
    start = time.perf_counter()
    written = save_model(model, target)
    logger.info("saved %s in %.3f s", written, time.perf_counter() - start)
    payload["output"] = str(written)
    payload.update(extra)
    emit(as_json, payload, lambda: f"{text()}\nwrote {written}")


def table(
    rows: Sequence[Sequence[str]], *, max_width: int | None = None, free_last: bool = False
) -> list[str]:
    """A plain text table, the first row its header underlined with dashes; each column as wide
    as its widest cell, at most MAX_WIDTH. FREE_LAST: the last column (free text, such as a
    reason) is not measured, and its rule is as long as its header."""
    if not free_last:
        return text_table(rows, max_width=max_width)
    head = [row[:-1] for row in rows]
    widths = [max(len(r[i]) for r in head) for i in range(len(head[0]))]
    if max_width is not None:
        widths = [min(w, max_width) for w in widths]
    lines = []
    for n, row in enumerate(rows):
        cells = [cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in [*widths, len(row[-1])]))
    return lines


def quiet() -> bool:
    """Whether -q/--quiet was given (False outside a command)."""
    ctx = click.get_current_context(silent=True)
    state = ctx.find_root().obj if ctx is not None else None
    return isinstance(state, State) and state.quiet


def verbosity() -> int:
    """How many -v were given (0 outside a command)."""
    ctx = click.get_current_context(silent=True)
    state = ctx.find_root().obj if ctx is not None else None
    return state.verbose if isinstance(state, State) else 0


def info(message: str) -> None:
    """A progress or status line on stderr, unless --quiet."""
    if not quiet():
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
        self.enabled = not quiet() and sys.stderr.isatty()
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
