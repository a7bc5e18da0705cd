"""`bnsurgery fold` and `bnsurgery info`: fold BatchNormalization, or show what fold would do."""

from __future__ import annotations

import time
from pathlib import Path

import click

from bnsurgery.cli.options import (
    external_data_option,
    in_place_option,
    json_option,
    output_option,
    shape_option,
)
from bnsurgery.cli.output_path import resolve_output_path
from bnsurgery.cli.render import emit, table
from bnsurgery.data import parse_shape_overrides
from bnsurgery.errors import CheckFailed
from bnsurgery.harness.metrics import ratio_text
from bnsurgery.onnxio import load_model
from bnsurgery.passes.fold import FoldPass
from bnsurgery.passes.fold.report import FoldReport
from bnsurgery.passes.fold.streamed import fold_file_checked
from bnsurgery.passes.fold.verify_folds import summary_line


def render_table(report: FoldReport, *, dry_run: bool = False) -> str:
    """BN node | action | target | reason, one row per BN, scope-qualified when not main; a
    dry run (info) speaks of what fold would do ("would fold forward", "would keep")."""
    rows = [("BN node", "action", "target", "reason")]
    for e in report.entries:
        name = f"{e.scope}/{e.node}" if e.scope else e.node
        target = f"{e.target} ({e.target_op})" if e.target else "-"
        action = f"{e.action} {e.direction}" if e.direction else e.action
        if dry_run:
            action = f"would fold {e.direction}" if e.action == "folded" else "would keep"
        reason = e.reason if not e.detail or e.action == "folded" else f"{e.reason}: {e.detail}"
        rows.append((name, action, target, reason))
    if len(rows) == 1:
        return "no BatchNormalization nodes in the model"
    return "\n".join(table(rows, max_width=60, free_last=True))


def render_summary(report: FoldReport, seconds: float, output: Path | None) -> str:
    lines = [
        f"BatchNormalization: {report.bns_before} -> {report.bns_after}   "
        f"nodes: {report.nodes_before} -> {report.nodes_after}   "
        f"affine ops folded: {len(report.affine_folds)}"
    ]
    v = report.verification
    if v is not None:
        lines.append(verification_line(v))
        for note in v.get("notes", []):
            lines.append(f"  note: {note}")
    else:
        lines.append("verification: skipped (--no-verify)")
    lines.append(f"time: {seconds:.3f} s")
    if output is not None:
        lines.append(f"wrote {output}")
    return "\n".join(lines)


def verification_line(v: dict) -> str:
    """The verdict in one line: its number against the limit, then the raw errors."""
    status = "ok" if v["ok"] else "FAILED"
    if v.get("per_fold"):  # the outputs are NaN/Inf in the original: judged fold by fold
        return f"verification: {status}, {summary_line(v['per_fold'])}"
    if v.get("ratio") is not None and v.get("rule") == "rounding-noise":
        judged = f"deviation {ratio_text(v['ratio'])} the rounding noise (limit {v['limit']:g}x)"
    else:
        judged = "; ".join(o["verdict"] for o in v["outputs"].values())
    return (
        f"verification: {status}, {judged}; max abs error {v['max_abs']:.3g}, max rel error "
        f"{v['max_rel']:.3g} ({v['samples']} samples of {v['data']}; {'; '.join(v['engines'])})"
    )


def _payload(report: FoldReport, seconds: float, output: Path | None) -> dict:
    payload = report.to_dict()
    payload["summary"]["total_seconds"] = round(seconds, 6)
    payload["output"] = str(output) if output is not None else None
    return payload


@click.command("fold")
@click.argument("model", type=click.Path(path_type=Path))
@output_option("folded")
@in_place_option()
@click.option("--no-backward", is_flag=True, help="Only fold BN into the op before it.")
@click.option("--no-affine", is_flag=True, help="Leave per-channel constant Mul/Add/Sub/Div.")
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Run original and folded model on ORT CPU (optimizations off) and judge the outputs: "
    "deviation within 8x the original's rounding noise (docs/verification.md).",
)
@shape_option("Input shape for verification, NAME:1x3x8x8 (default: dynamic dimensions are 1).")
@external_data_option()
@json_option()
def fold_command(
    model: Path,
    output: Path | None,
    in_place: bool,
    no_backward: bool,
    no_affine: bool,
    verify: bool,
    shapes: tuple[str, ...],
    external_data: bool,
    as_json: bool,
) -> None:
    """Fold BatchNormalization into neighbouring Conv/ConvTranspose/Gemm/MatMul.

    Every BN appears in the table with what happened to it and a reason code. Exit 1 when
    verification finds the folded model's outputs beyond tolerance (nothing is written then).

    \b
    Example:
      bnsurgery fold sample_models/digits_cnn.onnx -o digits_folded.onnx
    """
    start = time.perf_counter()
    target = resolve_output_path(model, output, "folded", in_place=in_place)
    shape_overrides = parse_shape_overrides(shapes)
    report, written, failure = fold_file_checked(
        model,
        target,
        backward=not no_backward,
        affine=not no_affine,
        verify=verify,
        external_data=external_data,
        shapes=shape_overrides,
    )
    seconds = time.perf_counter() - start
    emit(
        as_json,
        _payload(report, seconds, written),
        lambda: render_table(report) + "\n\n" + render_summary(report, seconds, written),
    )
    if failure is not None:
        raise CheckFailed(f"{failure}; {target} was not written")


@click.command("info")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--no-backward", is_flag=True, help="As fold --no-backward.")
@click.option("--no-affine", is_flag=True, help="As fold --no-affine.")
@json_option()
def info_command(model: Path, no_backward: bool, no_affine: bool, as_json: bool) -> None:
    """List every BN and what fold would do with it (a dry run: nothing is written).

    \b
    Example:
      bnsurgery info sample_models/resnet_small.onnx --json
    """
    start = time.perf_counter()
    # A dry run: the loaded model is only read, so no copy; external data is read on demand.
    loaded = load_model(model, external_data="lazy")
    result = FoldPass(backward=not no_backward, affine=not no_affine, in_place=True)(loaded)
    report: FoldReport = result.report  # type: ignore[assignment]
    seconds = time.perf_counter() - start
    emit(
        as_json,
        _payload(report, seconds, None),
        lambda: (
            render_table(report, dry_run=True)
            + "\n\n"
            + render_summary(report, seconds, None).replace(
                "verification: skipped (--no-verify)", "dry run: nothing written"
            )
        ),
    )
