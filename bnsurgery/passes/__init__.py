"""Passes: rewrites of a whole model, each returning a PassResult (a model and its report).

The contract every pass follows is in passes.base (PassBase: `in_place`, `changes_input`,
`requires`/`ensures`). Passes are registered by name, so pipelines (and third parties, through
the entry-point group `bnsurgery.passes`) can name them; `Pipeline` composes them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bnsurgery.passes.base import (
    AnalysisPass,
    Pass,
    PassBase,
    PassContractError,
    PassResult,
    Report,
    changes_input,
)


@dataclass
class StepRecord:
    """One pipeline step: the pass's registry name, its report and what it cost."""

    name: str
    report: Report
    modified: bool
    seconds: float
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pass": self.name,
            "options": {k: _jsonable(v) for k, v in self.options.items()},
            "modified": self.modified,
            "ok": _report_ok(self.report),
            "seconds": round(self.seconds, 6),
            "report": self.report.to_dict(),
        }


@dataclass
class PipelineReport:
    """Every step's report, in order. `ok` is False when a step's report says so (a failing
    validate step); the steps after it did not run, and `stopped_at` names it."""

    steps: list[StepRecord] = field(default_factory=list)
    stopped_at: int | None = None  # index of the step whose report was not ok
    planned: int = 0

    @property
    def ok(self) -> bool:
        return self.stopped_at is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "steps_planned": self.planned,
            "steps_run": len(self.steps),
            "stopped_at": self.stopped_at,
            "steps": [step.to_dict() for step in self.steps],
        }


def _report_ok(report: Report) -> bool:
    ok = getattr(report, "ok", True)
    return bool(ok() if callable(ok) else ok)


def _jsonable(value: Any) -> Any:
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


@dataclass
class Pipeline:
    """Passes run in order, each on the previous one's model; every step's report is kept.

    Accepts a path, bytes, an onnx.ModelProto or an onnx_ir.Model. Never mutates its input:
    a pass that would change the caller's model (`changes_input`) gets a copy. A composition
    rather than a PassBase: it may return its input unchanged (a first step that stops it).
    A step whose report has `ok == False` (a failing validate step) stops the pipeline; the
    result's report says where.
    """

    passes: Sequence[Pass]
    options: Sequence[dict[str, Any]] | None = None  # per step, for the report (TOML pipelines)
    name = "pipeline"
    in_place = False

    def __call__(self, model: Any) -> PassResult:
        import copy
        import time

        from bnsurgery.onnxio.load import load_model

        current = load_model(model)
        original = current
        report = PipelineReport(planned=len(self.passes))
        modified = False
        for i, step in enumerate(self.passes):
            if changes_input(step) and current is original:
                current = copy.deepcopy(current)
            start = time.perf_counter()
            result = step(current)
            options = dict(self.options[i]) if self.options and i < len(self.options) else {}
            report.steps.append(
                StepRecord(
                    getattr(step, "name", type(step).__name__),
                    result.report,
                    bool(result.modified),
                    time.perf_counter() - start,
                    options,
                )
            )
            current = result.model
            modified = modified or bool(result.modified)
            if not _report_ok(result.report):
                report.stopped_at = i
                break
        return PassResult(current, report, modified)

    run = __call__


_REGISTRY: dict[str, Callable[..., Pass]] = {}


def register(name: str) -> Callable[[Callable[..., Pass]], Callable[..., Pass]]:
    """Register a pass factory (usually the class) under a name."""

    def decorator(factory: Callable[..., Pass]) -> Callable[..., Pass]:
        _REGISTRY[name] = factory
        return factory

    return decorator


# Modules whose import registers the built-in passes (a missing one is skipped: passes land
# one by one).
BUILTIN_PASS_MODULES = (
    "bnsurgery.passes.fold",
    "bnsurgery.passes.insert",
    "bnsurgery.passes.reestimate",
    "bnsurgery.validation.gate",
)


@dataclass
class PluginError:
    """An entry point that could not be loaded: reported by name, never fatal."""

    group: str
    name: str
    value: str
    distribution: str | None
    error: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def load_builtin_passes() -> None:
    import importlib

    for module in BUILTIN_PASS_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def registry(errors: list[PluginError] | None = None) -> dict[str, Callable[..., Pass]]:
    """Built-in passes plus those third parties register under `bnsurgery.passes`.

    A plugin whose entry point fails to load is left out; it is appended to `errors` when a list
    is given (`bnsurgery plugins` shows it). A plugin cannot replace a built-in name.
    """
    from bnsurgery.pipeline.plugins import load_entry_points

    load_builtin_passes()
    found = dict(_REGISTRY)
    for plugin in load_entry_points("bnsurgery.passes", errors):
        if plugin.name not in found:
            found[plugin.name] = plugin.obj
    return found


def make_pass(name: str, **options: Any) -> Pass:
    """The registered pass `name`, built with `options` (KeyError names the known passes)."""
    passes = registry()
    if name not in passes:
        raise KeyError(f"unknown pass '{name}' (known: {', '.join(sorted(passes))})")
    return passes[name](**options)


__all__ = [
    "AnalysisPass",
    "Pass",
    "PassBase",
    "PassContractError",
    "PassResult",
    "Pipeline",
    "PipelineReport",
    "Report",
    "StepRecord",
    "make_pass",
    "register",
    "registry",
]
