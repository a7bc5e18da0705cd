"""`bnsurgery run PIPELINE MODEL`: run the passes a TOML file declares, one JSON of reports."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from bnsurgery.cli.options import (
    external_data_option,
    in_place_option,
    json_option,
    output_option,
)
from bnsurgery.cli.output_path import resolve_output_path
from bnsurgery.cli.render import emit
from bnsurgery.errors import CheckFailed, UsageError
from bnsurgery.onnxio import save_model
from bnsurgery.passes import PipelineReport
from bnsurgery.pipeline.config import SCHEMA, PipelineSpec, load_pipeline, run_pipeline


def step_summary(report: Any) -> str:
    """One line about a step's report (fold and validate known; others by their keys)."""
    summary = getattr(report, "summary", None)
    if callable(summary):
        return str(summary())
    if hasattr(report, "bns_before") and hasattr(report, "bns_after"):
        return f"BatchNormalization {report.bns_before} -> {report.bns_after}"
    parts = []
    for key, value in report.to_dict().items():
        if key == "seconds" or value is None or isinstance(value, dict):
            continue
        parts.append(f"{key} {len(value)}" if isinstance(value, list) else f"{key} {value}")
    text = ", ".join(parts)
    return text if len(text) <= 100 else text[:97] + "..."


def render_text(spec: PipelineSpec, report: PipelineReport, output: Path | None) -> str:
    lines = [f"pipeline {spec.name or spec.path}: {report.planned} step(s)"]
    for i, step in enumerate(report.steps):
        state = "modified" if step.modified else "unchanged"
        lines.append(
            f"  {i + 1}. {step.name:<12} {state:<9} {step.seconds:7.3f} s  "
            f"{step_summary(step.report)}"
        )
    if report.stopped_at is not None:
        lines.append(
            f"stopped at step {report.stopped_at + 1} ({report.steps[-1].name}): its report "
            f"is not ok; {report.planned - len(report.steps)} step(s) not run"
        )
    lines.append(f"wrote {output}" if output is not None else "nothing written")
    return "\n".join(lines)


def _looks_like_onnx(path: Path) -> bool:
    """An .onnx name, or a file that starts like a serialised ModelProto (field 1, ir_version,
    a varint: byte 0x08), which no TOML text does."""
    if not path.is_file():
        return False  # "no such file" is said where the file is read
    if path.suffix.lower() == ".onnx":
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(1) == b"\x08"
    except OSError:
        return False


def check_argument_order(pipeline: Path, model: Path) -> None:
    """Refuse, in one line, a model given where the pipeline goes (or a TOML file where the
    model goes): the usual mistake is the two arguments swapped."""
    onnx_first = _looks_like_onnx(pipeline)
    toml_second = model.suffix.lower() == ".toml" and model.is_file()
    if onnx_first and toml_second:
        raise UsageError(
            f"the arguments are swapped: {pipeline} is an ONNX model and {model} a pipeline; "
            f"run bnsurgery run {model} {pipeline}"
        )
    if onnx_first:
        raise UsageError(
            f"{pipeline} is an ONNX model, not a pipeline file: bnsurgery run takes "
            "PIPELINE.toml first, then MODEL"
        )
    if toml_second:
        raise UsageError(
            f"{model} is a TOML file, not an ONNX model: bnsurgery run takes PIPELINE.toml "
            "first, then MODEL"
        )


@click.command("run")
@click.argument("pipeline", type=click.Path(path_type=Path))
@click.argument("model", type=click.Path(path_type=Path))
@output_option("pipeline")
@in_place_option()
@external_data_option()
@json_option()
def run_command(
    pipeline: Path,
    model: Path,
    output: Path | None,
    in_place: bool,
    external_data: bool,
    as_json: bool,
) -> None:
    """Run the passes PIPELINE (a TOML file) declares on MODEL and write the result.

    The file is checked before anything runs (a bad key is named with its line, exit 2). A
    validate step that fails stops the pipeline: nothing is written and the exit code is 1.
    --json prints every step's report in one document (docs/pipelines.md).

    \b
    Example:
      bnsurgery run deploy.toml sample_models/digits_cnn.onnx -o digits_deploy.onnx
    """
    start = time.perf_counter()
    check_argument_order(pipeline, model)
    spec = load_pipeline(pipeline)
    target = resolve_output_path(model, output, "pipeline", in_place=in_place)
    result = run_pipeline(spec, model)
    report: PipelineReport = result.report  # type: ignore[assignment]
    written = None
    if report.ok:
        written = save_model(result.model, target, external_data=True if external_data else None)
    payload = {
        "schema": SCHEMA,
        "pipeline": spec.to_dict(),
        "model": str(model),
        "output": str(written) if written is not None else None,
        **report.to_dict(),
        "seconds": round(time.perf_counter() - start, 6),
    }
    emit(as_json, payload, lambda: render_text(spec, report, written))
    if not report.ok:
        step = report.steps[-1]
        raise CheckFailed(
            f"pipeline stopped at step {len(report.steps)} ({step.name}): "
            f"{step_summary(step.report)}; {target} was not written"
        )
