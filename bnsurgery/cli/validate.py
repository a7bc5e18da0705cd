"""`bnsurgery validate`: the pre-export gate (exit 0 clean, 1 failing, 2 bad input, 3 env)."""

from __future__ import annotations

import textwrap
from collections import Counter
from pathlib import Path

import click

from bnsurgery.cli.main import flag_for
from bnsurgery.cli.options import (
    allow_fallback_option,
    data_option,
    ep_library_option,
    json_option,
    provider_options_option,
    providers_option,
    seed_option,
    shape_option,
)
from bnsurgery.cli.render import emit, verbosity
from bnsurgery.data import parse_shape_overrides
from bnsurgery.validation.checks import builtin_checks
from bnsurgery.validation.gate import FAIL_ON, ValidationReport, validate


def render_text(report: ValidationReport, *, verbose: bool) -> str:
    lines = [
        f"{report.model}: {report.batchnorms} BatchNormalization node(s), "
        f"{sum(c.status == 'ran' for c in report.checks)} check(s) ran; "
        f"providers: {', '.join(report.providers)}"
        + (f"; data: {report.data}" if report.data else "")
    ]
    shown = [f for f in report.findings if verbose or f.severity != "info"]
    shown.sort(key=lambda f: {"error": 0, "warning": 1, "info": 2}[f.severity])
    if shown:
        lines.append("")
    for finding in shown:
        where = f"  [{finding.where}]" if finding.where else ""
        lines.append(f"{finding.severity:<8} {finding.id}{where}")
        lines.append(f"         {finding.message}")
        if finding.hint:
            lines.append(f"         fix: {finding.hint}")
    if not verbose:
        infos = Counter(f.id for f in report.findings if f.severity == "info")
        if infos:
            listed = ", ".join(f"{name} x{count}" for name, count in infos.items())
            lines.append("")
            lines.append(f"info: {listed} (-v or --json lists them)")
    skipped = [c for c in report.checks if c.status == "skipped"]
    if skipped:
        lines.append("")
        lines.append(
            "skipped: " + "; ".join(f"{c.name} ({c.note})" if c.note else c.name for c in skipped)
        )
    for note in report.notes:
        lines.append(f"note: {note}")
    lines.append("")
    lines.append(report.summary(option=flag_for("fail_on")))
    return "\n".join(lines)


def _check_ids_epilog() -> str:
    """The ids --skip takes, unwrapped by click (\b) and never broken at their hyphens."""
    ids = textwrap.wrap(", ".join(c.name for c in builtin_checks()), 76, break_on_hyphens=False)
    return "\b\nChecks (ids for --skip; `bnsurgery plugins` adds plugin checks):\n" + "\n".join(
        f"  {line}" for line in ids
    )


@click.command("validate", epilog=_check_ids_epilog())
@click.argument("model", type=click.Path(path_type=Path))
@data_option("DATA for fold verification and parity (default random:4, seed 0).")
@providers_option(
    "Execution providers whose parity with the CPU reference is checked, e.g. cpu,cuda."
)
@ep_library_option()
@provider_options_option()
@allow_fallback_option(
    "Check parity even where a provider is unavailable or leaves nodes to another "
    "(stated loudly) instead of exit 3."
)
@click.option(
    "--fail-on",
    type=click.Choice(FAIL_ON),
    default="error",
    show_default=True,
    help="Exit 1 when a finding has this severity or a higher one.",
)
@click.option(
    "--skip",
    "skip",
    multiple=True,
    metavar="CHECK",
    help="Leave a check out (repeatable): a check id listed below, or a plugin check's name.",
)
@shape_option()
@seed_option("Seed of random data.")
@click.option("--no-plugins", is_flag=True, help="Run only the built-in checks.")
@json_option()
def validate_command(
    model: Path,
    data: str | None,
    providers: str,
    ep_libraries: tuple[str, ...],
    provider_options: tuple[str, ...],
    allow_fallback: bool,
    fail_on: str,
    skip: tuple[str, ...],
    shapes: tuple[str, ...],
    seed: int,
    no_plugins: bool,
    as_json: bool,
) -> None:
    """Gate a model before it ships: BN health, foldability, fold verification, provider parity,
    the ONNX checker and shape inference.

    Exit 0 when no finding reaches --fail-on, 1 when one does, 2 on bad input, 3 when a
    requested provider is unavailable. --json lists every finding (docs/validate.md).

    \b
    Example:
      bnsurgery validate sample_models/digits_cnn.onnx --providers cpu --fail-on warning
    """
    report = validate(
        model,
        data=data,
        providers=providers,
        fail_on=fail_on,
        skip=skip,
        shapes=parse_shape_overrides(shapes),
        seed=seed,
        plugins=not no_plugins,
        provider_options=list(provider_options),
        ep_libraries=list(ep_libraries),
        allow_fallback=allow_fallback,
    )
    emit(as_json, report.to_dict(), lambda: render_text(report, verbose=verbosity() > 0))
    report.raise_for_findings()
