"""Validate checks: the Finding they report, the built-in checks, and how plugins plug in.

A check looks at a model through a ValidationContext (checks.context) and yields
Findings. Every built-in check has one stable id, which is also the `id` of its findings and the
name `--skip` takes. Severities are `error`, `warning` and `info`.

Third-party checks register under the entry-point group `bnsurgery.checks`; the entry point
names a callable `check(ctx) -> iterable of Finding` (or an object with such a `run` method):

    from bnsurgery.validation.checks import Finding

    def max_bn(ctx):
        if len(ctx.batchnorms()) > 50:
            yield Finding("max-bn", "warning", "more than 50 BNs", hint="fold them")

A check that cannot apply to a model raises `Skip("why")`; a check that crashes is reported as a
`check-crashed` error naming it, and the other checks still run.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bnsurgery.validation.checks.context import BnSite, ValidationContext

SEVERITIES = ("info", "warning", "error")
RANK = {name: i for i, name in enumerate(SEVERITIES)}

# Modules that define the built-in checks, in the order the checks run.
BUILTIN_MODULES = (
    "bnsurgery.validation.checks.model",
    "bnsurgery.validation.checks.bn_health",
    "bnsurgery.validation.checks.folding",
    "bnsurgery.validation.checks.parity",
)
CRASHED = "check-crashed"


class Skip(Exception):
    """Raised by a check that does not apply to this model (the reason goes in the report)."""


@dataclass
class Finding:
    """One problem (or fact) a check found. `id` is stable; `node` the BN or op it concerns."""

    id: str
    severity: str
    message: str
    node: str | None = None
    hint: str = ""
    scope: str = ""
    check: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.severity not in RANK:
            raise ValueError(
                f"finding '{self.id}': severity must be one of {', '.join(SEVERITIES)}, "
                f"got {self.severity!r}"
            )
        if not isinstance(self.id, str) or not self.id:
            raise ValueError("a finding needs a non-empty string id")

    @property
    def where(self) -> str:
        """`scope/node`, `node`, or '' for model-wide findings."""
        if self.node is None:
            return self.scope
        return f"{self.scope}/{self.node}" if self.scope else self.node

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "severity": self.severity,
            "check": self.check or self.id,
            "node": self.node,
            "scope": self.scope,
            "message": self.message,
            "hint": self.hint,
            "details": self.details,
        }


@dataclass(frozen=True)
class BuiltinCheck:
    """A built-in check: its id (= its findings' id), severity, summary, default fix hint."""

    name: str
    severity: str
    summary: str
    hint: str
    func: Callable[[ValidationContext], Iterable[Finding]]
    runs_model: bool = False  # needs onnxruntime (skipped when the model fails the checker)

    def run(self, ctx: ValidationContext) -> Iterable[Finding]:
        return self.func(ctx)

    def finding(
        self,
        message: str,
        bn: BnSite | None = None,
        *,
        node: str | None = None,
        scope: str = "",
        hint: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> Finding:
        return Finding(
            id=self.name,
            severity=self.severity,
            message=message,
            node=bn.label if bn is not None else node,
            scope=bn.scope if bn is not None else scope,
            hint=self.hint if hint is None else hint,
            check=self.name,
            details=details or {},
        )


_BUILTIN: dict[str, BuiltinCheck] = {}


def check(
    name: str, severity: str, summary: str, hint: str, *, runs_model: bool = False
) -> Callable[[Callable[[ValidationContext], Iterable[Finding]]], BuiltinCheck]:
    """Declare a built-in check (the decorated function becomes a BuiltinCheck)."""

    def decorator(func: Callable[[ValidationContext], Iterable[Finding]]) -> BuiltinCheck:
        built = BuiltinCheck(name, severity, summary, hint, func, runs_model)
        _BUILTIN[name] = built
        return built

    return decorator


def builtin_checks() -> list[BuiltinCheck]:
    """Every built-in check, in run order."""
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    return list(_BUILTIN.values())


# The meta finding: a check (built-in or plugin) raised. Not a check itself.
CRASH_HINT = (
    "the check could not judge the model, so the gate does not pass; fix or uninstall the "
    "plugin (bnsurgery plugins lists it), or skip it with --skip NAME"
)


def crash_finding(name: str, source: str, error: str) -> Finding:
    kind = "plugin check" if source.startswith("plugin") else "check"
    what = f"{kind} '{name}' ({source})"
    return Finding(
        id=CRASHED,
        severity="error",
        message=f"{what} raised {error}",
        hint=CRASH_HINT,
        check=name,
        details={"source": source, "error": error},
    )


__all__ = [
    "CRASHED",
    "RANK",
    "SEVERITIES",
    "BuiltinCheck",
    "Finding",
    "Skip",
    "builtin_checks",
    "check",
]
