"""Pipelines declared in TOML: `bnsurgery run pipeline.toml MODEL -o OUT`.

    name = "deploy"                      # optional
    description = "fold, then gate"      # optional

    [[step]]
    pass = "fold"                        # a registered pass: built-in or plugin
    backward = true                      # the pass's options, as keyword arguments

    [[step]]
    pass = "validate"
    fail_on = "warning"

Each `[[step]]` names a pass of the registry (bnsurgery.passes.registry: fold, insert,
reestimate, validate and every `bnsurgery.passes` plugin) and gives its options. The file is
checked completely before any model is loaded: every problem is a BadInputError (exit 2) that
names the file, the line and the key, e.g. `pipeline.toml:7: step 2 (fold): unknown option
'bakward' (known: affine, backward)`. tomllib reports no positions for keys, so the lines come
from a small scan of the text (`key_lines`).
"""

from __future__ import annotations

import inspect
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnsurgery.errors import EXIT_BAD_INPUT, BadInputError, BnSurgeryError
from bnsurgery.passes import Pass, PassResult, Pipeline, PluginError, registry
from bnsurgery.passes.base import changes_input

TOP_LEVEL_KEYS = ("name", "description", "step")
SCHEMA = "bnsurgery.run/1"


class StepFailed(BnSurgeryError):
    """A pass raised something that is not one of bnsurgery's errors (a plugin bug, say)."""

    exit_code = EXIT_BAD_INPUT


# -- where keys are ---------------------------------------------------------------------------


@dataclass
class StepLines:
    """Line numbers (1-based) of one `[[step]]` table: its header and each of its keys."""

    header: int
    keys: dict[str, int] = field(default_factory=dict)


@dataclass
class KeyLines:
    top: dict[str, int] = field(default_factory=dict)
    steps: list[StepLines] = field(default_factory=list)
    text: str = ""

    def step_key(self, step: int, key: str) -> int | None:
        if step < len(self.steps):
            line = self.steps[step].keys.get(key)
            if line is not None:
                return line
        return self._search(key)

    def step_header(self, step: int) -> int | None:
        return self.steps[step].header if step < len(self.steps) else self.top.get("step")

    def _search(self, key: str) -> int | None:
        """Fallback for inline tables (`step = [{pass = "fold"}]`): the key's first use."""
        pattern = re.compile(rf"(^|[{{,\s]){re.escape(key)}\s*=")
        for number, line in enumerate(self.text.splitlines(), 1):
            if pattern.search(line.split("#", 1)[0]):
                return number
        return None


_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"""^\s*("[^"]*"|'[^']*'|[A-Za-z0-9_\-]+)\s*(\.\s*[^=]+?)?\s*=""")


def key_lines(text: str) -> KeyLines:
    """Scan TOML text for table headers and `key =` lines (skipping multi-line strings)."""
    lines = KeyLines(text=text)
    table: tuple[str, ...] = ()
    in_string: str | None = None
    depth = 0  # open brackets of a multi-line array or inline table
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw
        if in_string is not None:
            if in_string in line:
                in_string = None
            continue
        if depth == 0:
            header = _HEADER.match(line)
            if header:
                path = tuple(p.strip().strip("\"'") for p in header.group(2).split("."))
                table = path
                if header.group(1) == "[[" and path == ("step",):
                    lines.steps.append(StepLines(header=number))
                continue
            key = _KEY.match(line)
            if key:
                name = key.group(1).strip("\"'")
                if key.group(2):
                    name += "." + ".".join(
                        p.strip().strip("\"'") for p in key.group(2)[1:].split(".")
                    )
                if table == ():
                    lines.top.setdefault(name, number)
                    if name == "step":
                        lines.top["step"] = number
                elif table[0] == "step" and lines.steps:
                    full = ".".join([*table[1:], name])
                    lines.steps[-1].keys.setdefault(full, number)
        code = _strip_strings(line)
        for quote in ('"""', "'''"):
            if code.count(quote) % 2 == 1:
                in_string = quote
        depth = max(0, depth + code.count("[") + code.count("{") - code.count("]")
                    - code.count("}"))  # fmt: skip
        if _HEADER.match(line):
            depth = 0
    return lines


def _strip_strings(line: str) -> str:
    """The line without comments and single-line strings (brackets inside them don't count)."""
    out, quote, i = [], None, 0
    while i < len(line):
        ch = line[i]
        if quote is None:
            if line.startswith(('"""', "'''"), i):
                out.append(line[i : i + 3])
                i += 3
                continue
            if ch == "#":
                break
            if ch in "\"'":
                quote = ch
            else:
                out.append(ch)
        elif ch == "\\" and quote == '"':
            i += 1
        elif ch == quote:
            quote = None
        i += 1
    return "".join(out)


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
    lines = key_lines(text)
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise _fail(
                label,
                lines.top.get(key) or lines._search(key),
                f"unknown key '{key}' (a pipeline has {', '.join(TOP_LEVEL_KEYS)}; "
                "options belong inside a [[step]] table)",
            )
    for key in ("name", "description"):
        if key in data and not isinstance(data[key], str):
            raise _fail(label, lines.top.get(key), f"'{key}' must be a string")
    raw_steps = data.get("step")
    if raw_steps is None:
        raise _fail(label, None, 'no steps: add a [[step]] table with pass = "fold"')
    if not isinstance(raw_steps, list) or not all(isinstance(s, dict) for s in raw_steps):
        raise _fail(label, lines.top.get("step"), "'step' must be an array of tables ([[step]])")
    if not raw_steps:
        raise _fail(label, lines.top.get("step"), "no steps in the pipeline")
    errors: list[PluginError] = []
    passes = registry(errors)
    steps = [_check_step(label, lines, i, raw, passes, errors) for i, raw in enumerate(raw_steps)]
    return PipelineSpec(label, data.get("name", ""), data.get("description", ""), steps)


def _check_step(
    label: str,
    lines: KeyLines,
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
    parameters, hints = _signature(factory)
    if parameters is not None:
        for key, value in options.items():
            if key not in parameters:
                known = ", ".join(sorted(parameters)) or "none"
                raise _fail(
                    label,
                    lines.step_key(index, key),
                    f"{what}: unknown option '{key}' (known: {known})",
                )
            expected = hints.get(key, inspect.Parameter.empty)
            default = parameters[key].default
            if not _type_ok(value, expected, default):
                raise _fail(
                    label,
                    lines.step_key(index, key),
                    f"{what}: option '{key}' = {value!r} has the wrong type "
                    f"(expected {_type_name(expected, default)})",
                )
        for key, param in parameters.items():
            if param.default is inspect.Parameter.empty and key not in options:
                raise _fail(label, header, f"{what}: missing option '{key}'")
    spec = StepSpec(index, name, options, header)
    _construct(label, spec, factory)  # options the pass itself refuses fail here, early
    return spec


def _construct(label: str, step: StepSpec, factory: Any) -> Pass:
    what = f"step {step.index + 1} ({step.pass_name})"
    try:
        return factory(**step.options)
    except BnSurgeryError as exc:
        raise _fail(label, step.line, f"{what}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise _fail(label, step.line, f"{what}: bad options: {exc}") from None


def _signature(factory: Any) -> tuple[dict[str, inspect.Parameter] | None, dict[str, Any]]:
    """Keyword parameters a pass factory takes (None if it takes **kwargs) and their types."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return None, {}
    params: dict[str, inspect.Parameter] = {}
    for name, param in sig.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            return None, {}
        if param.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            params[name] = param
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # names only imported for type checking: fall back to the defaults
        hints = {}
    return params, hints


_SIMPLE = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def _type_ok(value: Any, hint: Any, default: Any) -> bool:
    if hint is inspect.Parameter.empty or hint is Any:
        if default is inspect.Parameter.empty or default is None:
            return True
        return _type_ok(value, type(default), inspect.Parameter.empty)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arm, inspect.Parameter.empty) for arm in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    cls = origin or hint
    if cls in (list, tuple, Sequence, typing.Sequence) or (
        isinstance(cls, type) and issubclass(cls, Sequence) and cls is not str
    ):
        return isinstance(value, list)
    if cls in (dict, Mapping) or (isinstance(cls, type) and issubclass(cls, Mapping)):
        return isinstance(value, dict)
    if cls in (os.PathLike, Path) or (isinstance(cls, type) and issubclass(cls, os.PathLike)):
        return isinstance(value, str)
    if isinstance(cls, type):
        return isinstance(value, cls)
    return True  # a TypeVar, a Protocol or a Callable: the pass judges


def _type_name(hint: Any, default: Any) -> str:
    if hint is inspect.Parameter.empty or hint is Any:
        return _SIMPLE.get(type(default), type(default).__name__)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join(_type_name(a, None) for a in arms)
    if hint in _SIMPLE:
        return _SIMPLE[hint]
    origin = typing.get_origin(hint) or hint
    if origin in (list, tuple) or origin is Sequence:
        return "an array"
    if origin in (dict, Mapping):
        return "a table"
    return getattr(hint, "__name__", str(hint))


# -- running ----------------------------------------------------------------------------------


def run_pipeline(pipeline: str | os.PathLike[str] | PipelineSpec, model: Any) -> PassResult:
    """Run a pipeline file (or a checked PipelineSpec) on a model; the result's report is the
    PipelineReport. Errors inside a step name the step."""
    spec = pipeline if isinstance(pipeline, PipelineSpec) else load_pipeline(pipeline)
    built = spec.build()
    runner = _NamedSteps(built, spec)
    return runner(model)


class _NamedSteps:
    """Runs a Pipeline and prefixes any error with the step (and line) that raised it."""

    def __init__(self, pipeline: Pipeline, spec: PipelineSpec) -> None:
        self.pipeline = pipeline
        self.spec = spec

    def __call__(self, model: Any) -> PassResult:
        from bnsurgery.onnxio import load_model

        current = load_model(model)
        wrapped = [_Guard(p, s, self.spec.path) for p, s in zip(
            self.pipeline.passes, self.spec.steps, strict=True)]  # fmt: skip
        return Pipeline(wrapped, options=self.pipeline.options)(current)


class _Guard:
    def __init__(self, inner: Any, step: StepSpec, path: str) -> None:
        self.inner = inner
        self.step = step
        self.path = path
        self.name = getattr(inner, "name", step.pass_name)
        self.in_place = getattr(inner, "in_place", False)
        self.changes_input = changes_input(inner)

    def __call__(self, model: Any) -> PassResult:
        where = f"{_where(self.path, self.step.line)}: step {self.step.index + 1} ({self.name})"
        try:
            return self.inner(model)
        except BnSurgeryError as exc:
            try:
                error = type(exc)(f"{where}: {exc}")
            except Exception:
                raise exc from None
            raise error from exc
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise StepFailed(f"{where} raised {type(exc).__name__}: {first}") from exc
