"""Pipelines declared in TOML: `bnsurgery run pipeline.toml MODEL -o OUT`.

    name = "deploy"                      # optional
    description = "fold, then gate"      # optional

    [[step]]
    pass = "fold"                        # a registered pass: built-in or plugin
    backward = true                      # the pass's options, as keyword arguments

    [[step]]
    pass = "validate"
    fail_on = "warning"

Each `[[step]]` names a pass of the registry (bnsurgery.pipeline.registry: fold, insert,
reestimate, adapt, validate and every `bnsurgery.passes` plugin) and gives its options, checked
against the pass's constructor (bnsurgery.pipeline.options). The file is parsed by tomllib and
checked completely before any model is loaded: every problem is a BadInputError (exit 2) that
names the file, the line and the key, e.g. `pipeline.toml:7: step 2 (fold): unknown option
'bakward' (known: affine, backward)`. tomllib reports no positions for keys, so SourceLines finds
the line of a `[[step]]` header or a `key =` in the text.
"""

from __future__ import annotations

import copy
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnsurgery.entry_points import PluginError
from bnsurgery.errors import EXIT_BAD_INPUT, BadInputError, BnSurgeryError, first_line
from bnsurgery.onnxio import load_model
from bnsurgery.passes import Pass, PassResult, Pipeline
from bnsurgery.passes.base import changes_input
from bnsurgery.pipeline.options import EMPTY, keyword_parameters, type_name, type_ok
from bnsurgery.pipeline.registry import registry

TOP_LEVEL_KEYS = ("name", "description", "step")
SCHEMA = "bnsurgery.run/1"


class StepFailed(BnSurgeryError):
    """A pass raised something that is not one of bnsurgery's errors (a plugin bug, say)."""

    exit_code = EXIT_BAD_INPUT


# -- where keys are ---------------------------------------------------------------------------

_STEP_HEADER = re.compile(r"^\s*\[\[\s*step\s*\]\]\s*(#.*)?$")
_TABLE_HEADER = re.compile(r"^\s*\[\[?\s*[A-Za-z0-9_\-\"'.\s]+\]\]?\s*(#.*)?$")


def _key(key: str) -> str:
    """A regex for `key` as TOML writes it: bare, "quoted" or 'quoted'."""
    bare = re.escape(key)
    return f"(?:{bare}|\"{bare}\"|'{bare}')"


def _code_lines(text: str) -> Iterator[tuple[int, str]]:
    """(number, line) of each line that is not inside a multi-line string."""
    inside: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if inside is None:
            yield number, line
        for quote in ('"""', "'''"):
            if inside in (None, quote) and line.count(quote) % 2 == 1:
                inside = None if inside else quote


class SourceLines:
    """Where a pipeline's steps and keys are in its text (1-based lines, None when not found).

    A small locator, not a parser: tomllib has already parsed the text, so a `[[step]]`
    header line is a step's table and the first `key =` line of that table is the key's. Lines
    inside multi-line strings are skipped; inline tables (`step = [{pass = "fold"}]`) fall back
    to the key's first use anywhere."""

    def __init__(self, text: str) -> None:
        self.lines = list(_code_lines(text))
        self.headers = [n for n, line in self.lines if _STEP_HEADER.match(line)]
        first_table = next((n for n, line in self.lines if _TABLE_HEADER.match(line)), None)
        self._top_end = first_table or len(text.splitlines()) + 1

    def top_key(self, key: str) -> int | None:
        """The line of a top-level `key =` (before the first table), or of a `[key]` table."""
        table = re.compile(rf"^\s*\[\[?\s*{_key(key)}\s*[\].]")
        for number, line in self.lines:
            if table.match(line):
                return self._find(key, 0, self._top_end) or number
        return self._find(key, 0, self._top_end) or self._anywhere(key)

    def step_header(self, step: int) -> int | None:
        """The line of the `[[step]]` header of step `step` (0-based), else of `step =`."""
        if step < len(self.headers):
            return self.headers[step]
        return self._find("step", 0, self._top_end)

    def step_key(self, step: int, key: str) -> int | None:
        """The line of `key =` in step `step`'s table."""
        if step < len(self.headers):
            end = self.headers[step + 1] if step + 1 < len(self.headers) else None
            return self._find(key, self.headers[step], end)
        return self._anywhere(key)

    def _find(self, key: str, start: int, end: int | None) -> int | None:
        pattern = re.compile(rf"^\s*{_key(key)}\s*[=.]")
        for number, line in self.lines:
            if number > start and (end is None or number < end) and pattern.match(line):
                return number
        return None

    def _anywhere(self, key: str) -> int | None:
        pattern = re.compile(rf"(^|[{{,\s]){_key(key)}\s*=")
        for number, line in self.lines:
            if pattern.search(line.split("#", 1)[0]):
                return number
        return None


# -- the spec ---------------------------------------------------------------------------------


@dataclass
class StepSpec:
    """One step as declared: the pass name, its options, and the line of its table."""

    index: int
    pass_name: str
    options: dict[str, Any]
    line: int | None


@dataclass
class PipelineSpec:
    """A checked pipeline file: its steps, ready to build into a Pipeline."""

    path: str
    name: str
    description: str
    steps: list[StepSpec]

    def build(self) -> Pipeline:
        passes = registry()
        built = []
        for step in self.steps:
            built.append(_construct(self.path, step, passes[step.pass_name]))
        return Pipeline(built, options=[s.options for s in self.steps])

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "name": self.name,
            "description": self.description,
            "steps": [
                {"index": s.index + 1, "pass": s.pass_name, "line": s.line} for s in self.steps
            ],
        }


def _where(path: str, line: int | None) -> str:
    return f"{path}:{line}" if line else path


def _fail(path: str, line: int | None, message: str) -> BadInputError:
    return BadInputError(f"{_where(path, line)}: {message}")


def load_pipeline(source: str | os.PathLike[str]) -> PipelineSpec:
    """Read and check a pipeline file (every problem names its line and key; exit 2)."""
    path = Path(source)
    label = str(source)
    if not path.is_file():
        raise BadInputError(f"{label}: no such pipeline file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BadInputError(
            f"{label}: not a pipeline file (a pipeline is TOML text; this file is not UTF-8 text)"
        ) from None
    except OSError as exc:
        raise BadInputError(f"{label}: cannot read the pipeline file ({exc})") from None
    return parse_pipeline(text, label)


def parse_pipeline(text: str, label: str = "<pipeline>") -> PipelineSpec:
    """Check pipeline TOML text; `label` names it in messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = re.search(r"\(at line (\d+), column (\d+)\)", message)
        if match:
            message = message[: match.start()].strip()
            raise _fail(label, int(match.group(1)), f"invalid TOML: {message}") from None
        raise _fail(label, None, f"invalid TOML: {message}") from None
    lines = SourceLines(text)
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise _fail(
                label,
                lines.top_key(key),
                f"unknown key '{key}' (a pipeline has {', '.join(TOP_LEVEL_KEYS)}; "
                "options belong inside a [[step]] table)",
            )
    for key in ("name", "description"):
        if key in data and not isinstance(data[key], str):
            raise _fail(label, lines.top_key(key), f"'{key}' must be a string")
    raw_steps = data.get("step")
    if raw_steps is None:
        raise _fail(label, None, 'no steps: add a [[step]] table with pass = "fold"')
    if not isinstance(raw_steps, list) or not all(isinstance(s, dict) for s in raw_steps):
        raise _fail(label, lines.top_key("step"), "'step' must be an array of tables ([[step]])")
    if not raw_steps:
        raise _fail(label, lines.top_key("step"), "no steps in the pipeline")
    errors: list[PluginError] = []
    passes = registry(errors)
    steps = [_check_step(label, lines, i, raw, passes, errors) for i, raw in enumerate(raw_steps)]
    return PipelineSpec(label, data.get("name", ""), data.get("description", ""), steps)


def _check_step(
    label: str,
    lines: SourceLines,
    index: int,
    raw: dict[str, Any],
    passes: Mapping[str, Any],
    errors: list[PluginError],
) -> StepSpec:
    header = lines.step_header(index)
    what = f"step {index + 1}"
    if "pass" not in raw:
        raise _fail(label, header, f"{what} has no 'pass' key (for example pass = \"fold\")")
    name = raw["pass"]
    if not isinstance(name, str):
        raise _fail(label, lines.step_key(index, "pass"), f"{what}: 'pass' must be a string")
    if name not in passes:
        broken = next((e for e in errors if e.name == name), None)
        if broken is not None:
            raise _fail(
                label,
                lines.step_key(index, "pass"),
                f"{what}: the plugin pass '{name}' ({broken.distribution or broken.value}) "
                f"failed to load: {broken.error}",
            )
        raise _fail(
            label,
            lines.step_key(index, "pass"),
            f"{what}: unknown pass '{name}' (known: {', '.join(sorted(passes))})",
        )
    options = {k: v for k, v in raw.items() if k != "pass"}
    what = f"{what} ({name})"
    factory = passes[name]
    parameters, hints = keyword_parameters(factory)
    if parameters is not None:
        for key, value in options.items():
            if key not in parameters:
                known = ", ".join(sorted(parameters)) or "none"
                raise _fail(
                    label,
                    lines.step_key(index, key),
                    f"{what}: unknown option '{key}' (known: {known})",
                )
            expected = hints.get(key, EMPTY)
            default = parameters[key].default
            if not type_ok(value, expected, default):
                raise _fail(
                    label,
                    lines.step_key(index, key),
                    f"{what}: option '{key}' = {value!r} has the wrong type "
                    f"(expected {type_name(expected, default)})",
                )
        for key, param in parameters.items():
            if param.default is EMPTY and key not in options:
                raise _fail(label, header, f"{what}: missing option '{key}'")
    spec = StepSpec(index, name, options, header)
    _construct(label, spec, factory)  # options the pass itself refuses fail here, early
    return spec


def _construct(label: str, step: StepSpec, factory: Any) -> Pass:
    what = f"step {step.index + 1} ({step.pass_name})"
    try:
        return factory(**step.options)
    except BnSurgeryError as exc:
        raise _prefixed(exc, f"{_where(label, step.line)}: {what}") from None
    except (TypeError, ValueError) as exc:
        raise _fail(label, step.line, f"{what}: bad options: {exc}") from None


# -- running ----------------------------------------------------------------------------------


def run_pipeline(pipeline: str | os.PathLike[str] | PipelineSpec, model: Any) -> PassResult:
    """Run a pipeline file (or a checked PipelineSpec) on a model; the result's report is the
    PipelineReport. An error inside a step names the step and the line of its table."""
    spec = pipeline if isinstance(pipeline, PipelineSpec) else load_pipeline(pipeline)
    built = spec.build()
    steps = [_NamedStep(p, s, spec.path) for p, s in zip(built.passes, spec.steps, strict=True)]
    return Pipeline(steps, options=built.options)(load_model(model))


class _NamedStep:
    """A step's pass, with the same declarations, whose errors say which step raised them."""

    def __init__(self, inner: Pass, step: StepSpec, path: str) -> None:
        self.inner = inner
        self.name = getattr(inner, "name", step.pass_name)
        self.in_place = getattr(inner, "in_place", False)
        self.changes_input = changes_input(inner)
        self.where = f"{_where(path, step.line)}: step {step.index + 1} ({self.name})"

    def __call__(self, model: Any) -> PassResult:
        try:
            return self.inner(model)
        except BnSurgeryError as exc:
            raise _prefixed(exc, self.where) from exc
        except Exception as exc:
            raise StepFailed(
                f"{self.where} raised {type(exc).__name__}: {first_line(exc)}"
            ) from exc


def _prefixed(exc: BnSurgeryError, prefix: str) -> BnSurgeryError:
    """The same error (its type, its `option`, any fields of its own) after `prefix: `."""
    error = copy.copy(exc)
    error.template = f"{prefix}: {exc.template}"
    error.args = (error.render(), *exc.args[1:])
    return error
