"""The pre-export gate: run every check on a model and judge the findings against `fail_on`.

    report = bnsurgery.validate("net.onnx", providers=["cpu", "cuda"], data="calib.npz")
    report.ok                 # no finding at or above fail_on ("error" by default)
    report.findings           # every Finding, info included
    report.raise_for_findings()

Checks are the built-in ones (validation.checks, one stable id each) and the third-party ones of
the entry-point group `bnsurgery.checks`. A check that crashes becomes a `check-crashed` error
naming it; the others still run. Bad input (unreadable model, bad DATA) raises BadInputError
(exit 2); a requested execution provider that is not available raises EnvironmentProblem
(exit 3) before anything runs.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bnsurgery.entry_points import CHECK_GROUP, PluginError, describe_error, load_entry_points
from bnsurgery.errors import BadInputError, BnSurgeryError, CheckFailed, EnvironmentProblem
from bnsurgery.passes import AnalysisPass, PassResult, register
from bnsurgery.validation.checks import (
    RANK,
    SEVERITIES,
    Finding,
    Skip,
    builtin_checks,
    crash_finding,
)

if TYPE_CHECKING:  # `import bnsurgery` imports this module: it stays light (no onnx, numpy)
    import onnx

    from bnsurgery.validation.checks.context import ValidationContext

logger = logging.getLogger(__name__)

SCHEMA = "bnsurgery.validate/1"
FAIL_ON = ("error", "warning")


@dataclass
class CheckRun:
    """One check's run: where it came from, whether it ran, what it found, how long it took."""

    name: str
    source: str  # "builtin" or "plugin <distribution> <version>"
    status: str  # "ran", "skipped" or "crashed"
    findings: int = 0
    seconds: float = 0.0
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "status": self.status,
            "findings": self.findings,
            "seconds": round(self.seconds, 6),
            "note": self.note,
        }


class ValidationFailed(CheckFailed):
    """Findings at or above `fail_on` (exit 1); carries the report."""

    def __init__(self, message: str, report: ValidationReport, *, option: str | None = None):
        super().__init__(message, option=option)
        self.report = report


@dataclass
class ValidationReport:
    """Every finding and every check of one validation. `to_dict()` is the stable JSON
    (docs/validate.md)."""

    model: str
    fail_on: str = "error"
    findings: list[Finding] = field(default_factory=list)
    checks: list[CheckRun] = field(default_factory=list)
    providers: list[str] = field(default_factory=list)
    batchnorms: int = 0
    data: str | None = None
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def failing(self, fail_on: str | None = None) -> list[Finding]:
        """Findings at or above `fail_on` (the report's own threshold by default)."""
        threshold = RANK[_fail_on(fail_on or self.fail_on)]
        return [f for f in self.findings if RANK[f.severity] >= threshold]

    @property
    def ok(self) -> bool:
        return not self.failing()

    def counts(self) -> dict[str, int]:
        counts = {severity: 0 for severity in reversed(SEVERITIES)}
        for finding in self.findings:
            counts[finding.severity] += 1
        return counts

    def by_id(self, finding_id: str) -> list[Finding]:
        return [f for f in self.findings if f.id == finding_id]

    def summary(self, fail_on: str | None = None, *, option: str = "fail_on") -> str:
        """The verdict and the counts in one line; the threshold is named as OPTION (the CLI
        says `--fail-on`): "validation passed (fail_on error): 0 error(s), ..."."""
        return self._summary(fail_on).replace("{option}", option)

    def _summary(self, fail_on: str | None) -> str:
        counts = self.counts()
        verdict = "FAILED" if self.failing(fail_on) else "passed"
        return (
            f"validation {verdict} ({{option}} {fail_on or self.fail_on}): "
            f"{counts['error']} error(s), {counts['warning']} warning(s), {counts['info']} info"
        )

    def raise_for_findings(self, fail_on: str | None = None) -> None:
        """Raise ValidationFailed (a CheckFailed, exit 1) when findings reach `fail_on`."""
        failing = self.failing(fail_on)
        if failing:
            listed = "; ".join(_short(f) for f in failing[:5])
            more = f" and {len(failing) - 5} more" if len(failing) > 5 else ""
            raise ValidationFailed(
                f"{self._summary(fail_on)}: {listed}{more}", self, option="fail_on"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "model": self.model,
            "ok": self.ok,
            "fail_on": self.fail_on,
            "counts": self.counts(),
            "batchnorms": self.batchnorms,
            "providers": list(self.providers),
            "data": self.data,
            "findings": [f.to_dict() for f in _ordered(self.findings)],
            "checks": [c.to_dict() for c in self.checks],
            "details": self.details,
            "notes": list(self.notes),
            "seconds": round(self.seconds, 6),
        }


def _short(finding: Finding) -> str:
    """`id where` for a message: `bn-training-mode bn_train`, `check-crashed (example-broken)`."""
    if finding.where:
        return f"{finding.id} {finding.where}"
    if finding.check and finding.check != finding.id:
        return f"{finding.id} ({finding.check})"
    return finding.id


def _ordered(findings: list[Finding]) -> list[Finding]:
    """Errors first, then warnings, then info; stable within a severity (check order)."""
    return sorted(findings, key=lambda f: -RANK[f.severity])


def _fail_on(value: str) -> str:
    if value not in FAIL_ON:
        raise BadInputError(
            f"{{option}} must be one of {', '.join(FAIL_ON)}, got '{value}'", option="fail_on"
        )
    return value


def _label(source: Any) -> str:
    if isinstance(source, str | os.PathLike):
        return str(source)
    if isinstance(source, bytes | bytearray):
        return "<bytes>"
    import onnx

    if isinstance(source, onnx.ModelProto):
        return f"<ModelProto {source.graph.name}>" if source.graph.name else "<ModelProto>"
    return f"<{type(source).__name__}>"


def _require_providers(aliases: list[str]) -> None:
    from bnsurgery.runtime.providers import (
        INSTALL_HINTS,
        available_providers,
        resolve_alias,
    )

    available = available_providers()
    for alias in aliases:
        name = resolve_alias(alias)
        if name not in available:
            hint = f"; {INSTALL_HINTS[name]}" if name in INSTALL_HINTS else ""
            raise EnvironmentProblem(
                f"execution provider {name} ({alias}) is not available in this onnxruntime "
                f"build (available: {', '.join(available)}){hint}"
            )


@dataclass
class _Runnable:
    name: str
    source: str
    run: Callable[[ValidationContext], Iterable[Any]]
    builtin: bool
    runs_model: bool = False


def _plugin_checks(crashes: list[Finding], builtin: set[str], notes: list[str]) -> list[_Runnable]:
    errors: list[PluginError] = []
    runnables = []
    for plugin in load_entry_points(CHECK_GROUP, errors):
        if plugin.name in builtin:
            notes.append(
                f"plugin check '{plugin.name}' ({plugin.distribution}) ignored: a built-in "
                "check has this name"
            )
            continue
        source = " ".join(["plugin", *(p for p in (plugin.distribution, plugin.version) if p)])
        obj = plugin.obj
        run = getattr(obj, "run", None) if not isinstance(obj, type) else None
        if run is None and isinstance(obj, type):
            try:
                run = obj().run
            except Exception as exc:
                crashes.append(crash_finding(plugin.name, source, _describe(exc)))
                continue
        if run is None and callable(obj):
            run = obj
        if run is None:
            crashes.append(crash_finding(plugin.name, source, "TypeError: not callable"))
            continue
        runnables.append(_Runnable(plugin.name, source, run, builtin=False))
    for error in errors:
        source = f"plugin {error.distribution}" if error.distribution else "plugin"
        crashes.append(crash_finding(error.name, source, f"{error.error} (while loading)"))
    return runnables


def _describe(exc: BaseException) -> str:
    return describe_error(exc)


def _as_finding(item: Any, name: str) -> Finding:
    if isinstance(item, Finding):
        finding = item
    elif isinstance(item, Mapping):
        finding = Finding(**dict(item))
    else:
        raise TypeError(
            f"yielded {type(item).__name__}, expected bnsurgery.validation.checks.Finding"
        )
    if not finding.check:
        finding.check = name
    return finding


def validate(
    model: Any,
    *,
    data: Any = None,
    providers: Sequence[str] | str = ("cpu",),
    fail_on: str = "error",
    skip: Sequence[str] = (),
    shapes: Mapping[str, list[int]] | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    plugins: bool = True,
    extra_checks: Sequence[Callable[[ValidationContext], Iterable[Finding]]] = (),
    parity_opt_level: str = "all",
    only: Sequence[str] | None = None,
    provider_options: Mapping[str, Any] | Sequence[str] | None = None,
    ep_libraries: Mapping[str, str] | Sequence[str] | None = None,
    allow_fallback: bool = False,
) -> ValidationReport:
    """Validate a model (path, bytes, onnx.ModelProto or onnx_ir.Model); never raises for
    findings (see ValidationReport.raise_for_findings).

    data: DATA for fold verification and provider parity (default random:4, seed 0).
    providers: execution providers whose parity with the CPU reference is checked.
    skip / only: check names to leave out / to run exclusively (built-in or plugin).
    extra_checks: more check callables (`check(ctx) -> iterable of Finding`), run after the
    built-ins, named by their __name__.
    parity_opt_level: the graph optimisation level providers run at (`all` = ORT's default).
    provider_options: {provider: {key: value}} or `EP:KEY=VALUE` strings; ep_libraries:
    {name: path} or `NAME=PATH` strings of plugin EP libraries to register; allow_fallback:
    run parity even where a provider is missing or leaves nodes to another (said loudly).
    """
    from bnsurgery.onnxio import load_model
    from bnsurgery.runtime.providers import OPT_LEVELS, parse_provider_options, parse_providers
    from bnsurgery.validation.checks.context import ValidationContext

    start = time.perf_counter()
    fail_on = _fail_on(fail_on)
    aliases = parse_providers(providers, ep_libraries)
    options_by_provider = parse_provider_options(provider_options)
    if parity_opt_level not in OPT_LEVELS:
        raise BadInputError(
            f"{{option}}: unknown optimisation level '{parity_opt_level}' "
            f"(known: {', '.join(OPT_LEVELS)})",
            option="parity_opt_level",
        )
    if not allow_fallback:
        _require_providers(aliases)
    proto = load_model(model, check=False)

    crashes: list[Finding] = []
    runnables = [
        _Runnable(c.name, "builtin", c.run, builtin=True, runs_model=c.runs_model)
        for c in builtin_checks()
    ]
    runnables += [
        _Runnable(getattr(f, "__name__", f"check{i}"), "api", f, builtin=False)
        for i, f in enumerate(extra_checks)
    ]
    plugin_notes: list[str] = []
    if plugins:
        runnables += _plugin_checks(crashes, {r.name for r in runnables}, plugin_notes)
    known = {r.name for r in runnables} | {c.check for c in crashes}
    listed = ", ".join(sorted(known))
    for name in skip:
        if name not in known:
            raise BadInputError(
                f"unknown check '{name}' in {{option}} (known: {listed})", option="skip"
            )
    for name in only or ():
        if name not in known:
            raise BadInputError(
                f"unknown check '{name}' in {{option}} (known: {listed})", option="only"
            )
    skipped = set(skip)
    if only is not None:
        skipped |= known - set(only)

    ctx = ValidationContext(
        proto, label=_label(model), data=data, providers=aliases, shapes=shapes, seed=seed,
        batch_size=batch_size, parity_opt_level=parity_opt_level,
        provider_options=options_by_provider, ep_libraries=ep_libraries,
        allow_fallback=allow_fallback,
    )  # fmt: skip
    report = ValidationReport(model=_label(model), fail_on=fail_on, providers=aliases)
    report.findings.extend(f for f in crashes if f.check not in skipped)
    for runnable in runnables:
        if runnable.name in skipped:
            logger.debug("check %s: skipped (asked)", runnable.name)
            report.checks.append(CheckRun(runnable.name, runnable.source, "skipped", note="--skip"))
            continue
        report.checks.append(_run_one(runnable, ctx, report.findings))
    for crash in crashes:
        if crash.check not in skipped:
            report.checks.append(
                CheckRun(crash.check, crash.details.get("source", "plugin"), "crashed", 1, 0.0,
                         crash.details.get("error", ""))
            )  # fmt: skip
    report.batchnorms = len(ctx.batchnorms())
    report.notes = plugin_notes + list(ctx.notes)
    report.details = dict(ctx.details)
    report.data = ctx.data_label
    report.seconds = time.perf_counter() - start
    return report


def _run_one(runnable: _Runnable, ctx: ValidationContext, findings: list[Finding]) -> CheckRun:
    start = time.perf_counter()
    produced: list[Finding] = []
    status, note = "ran", ""
    crash: BaseException | None = None
    try:
        for item in runnable.run(ctx) or ():
            produced.append(_as_finding(item, runnable.name))
    except Skip as why:
        status, note = "skipped", str(why)
    except BnSurgeryError as exc:
        if runnable.builtin:
            raise  # bad DATA, unavailable provider: exit 2 / 3, not a finding
        crash = exc
    except Exception as exc:
        crash = exc
    if crash is not None:
        status = "crashed"
        note = _describe(crash)
        produced.append(crash_finding(runnable.name, runnable.source, note))
    findings.extend(produced)
    seconds = time.perf_counter() - start
    logger.info(
        "check %s: %s, %d finding(s) in %.3f s%s", runnable.name, status, len(produced), seconds,
        f" ({note})" if note else "",
    )  # fmt: skip
    return CheckRun(runnable.name, runnable.source, status, len(produced), seconds, note)


@register("validate")
class ValidatePass(AnalysisPass):
    """Validate the model (bnsurgery validate) as a pipeline step; the model is unchanged.

    The step's report is the ValidationReport; a pipeline stops at a step whose report is not
    ok (findings at or above fail_on)."""

    name = "validate"

    def __init__(
        self,
        *,
        data: Any = None,
        providers: Sequence[str] | str = ("cpu",),
        fail_on: str = "error",
        skip: Sequence[str] = (),
        shapes: Mapping[str, list[int]] | None = None,
        seed: int = 0,
        plugins: bool = True,
        parity_opt_level: str = "all",
        provider_options: Mapping[str, Any] | Sequence[str] | None = None,
        ep_libraries: Mapping[str, str] | Sequence[str] | None = None,
        allow_fallback: bool = False,
    ) -> None:
        _fail_on(fail_on)
        self.options = dict(
            data=data, providers=providers, fail_on=fail_on, skip=tuple(skip), shapes=shapes,
            seed=seed, plugins=plugins, parity_opt_level=parity_opt_level,
            provider_options=provider_options, ep_libraries=ep_libraries,
            allow_fallback=allow_fallback,
        )  # fmt: skip

    def call(self, model: onnx.ModelProto) -> PassResult:
        report = validate(model, **self.options)
        return PassResult(model, report, modified=False)
