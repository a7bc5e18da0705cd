"""The pass protocol: a pass takes a model and returns a PassResult (a model and its report).

A pass never mutates the model it is given unless it declares `in_place = True`. Passes are
registered by name, so pipelines (and third parties, through the entry-point group
`bnsurgery.passes`) can name them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import onnx


@runtime_checkable
class Report(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


@dataclass
class PassResult:
    """What a pass produced: the rewritten model and a report of what it did."""

    model: onnx.ModelProto
    report: Report
    modified: bool = True


@runtime_checkable
class Pass(Protocol):
    """A rewrite of a whole model. `name` is its registry key; `in_place` its mutation contract."""

    name: str
    in_place: bool

    def __call__(self, model: onnx.ModelProto) -> PassResult: ...


@dataclass
class PipelineReport:
    steps: list[tuple[str, Report]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"steps": [{"pass": name, "report": rep.to_dict()} for name, rep in self.steps]}


@dataclass
class Pipeline:
    """Passes run in order; each step's report is kept."""

    passes: Sequence[Pass]

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        report = PipelineReport()
        modified = False
        for step in self.passes:
            result = step(model)
            report.steps.append((step.name, result.report))
            model = result.model
            modified = modified or result.modified
        return PassResult(model, report, modified)

    run = __call__


_REGISTRY: dict[str, Callable[..., Pass]] = {}


def register(name: str) -> Callable[[Callable[..., Pass]], Callable[..., Pass]]:
    """Register a pass factory (usually the class) under a name."""

    def decorator(factory: Callable[..., Pass]) -> Callable[..., Pass]:
        _REGISTRY[name] = factory
        return factory

    return decorator


def registry() -> dict[str, Callable[..., Pass]]:
    """Built-in passes plus those third parties register under `bnsurgery.passes`."""
    from importlib.metadata import entry_points

    found = dict(_REGISTRY)
    for entry in entry_points(group="bnsurgery.passes"):
        if entry.name not in found:
            found[entry.name] = entry.load()
    return found
