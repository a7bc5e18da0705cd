"""`bnsurgery adapt`: insert -> calibrate on SOURCE -> re-estimate on TARGET -> fold back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from bnsurgery.cli.guarded import finish
from bnsurgery.cli.insert import render_insert
from bnsurgery.cli.options import (
    batch_size_option,
    guard_options,
    json_option,
    measure_opt_level_option,
    memory_budget_option,
    mode_option,
    nodes_option,
    output_option,
    parse_size,
    prior_option,
    provider_option,
    samples_option,
    shape_option,
    source_option,
)
from bnsurgery.cli.output_path import resolve_output_path
from bnsurgery.cli.reestimate import render_reestimate
from bnsurgery.cli.render import ProgressBar, data_notes
from bnsurgery.data import parse_shape_overrides
from bnsurgery.errors import UsageError
from bnsurgery.onnxio import load_model
from bnsurgery.passes.adapt import adapt
from bnsurgery.passes.adapt_auto import guarded

EXAMPLE = """\b
Example:
  bnsurgery adapt sample_models/digits_cnn_nobn.onnx \\
      --source sample_models/digits_train.npz --target shifted.npz -o digits_adapted.onnx
"""


def render_adapt(payload: dict[str, Any]) -> str:
    lines = []
    if payload["inserted"] is not None:
        lines += ["insert + calibrate on SOURCE:", render_insert(payload["inserted"]), ""]
    lines += ["re-estimate on TARGET:", render_reestimate(payload["reestimate"]), ""]
    if payload["folded"]:
        lines.append(
            f"folded back: {payload['bns_after']} BN left, nodes {payload['nodes_before']} -> "
            f"{payload['nodes_after']}"
        )
    else:
        lines.append(
            f"nodes {payload['nodes_before']} -> {payload['nodes_after']}, "
            f"BNs {payload['bns_before']} -> {payload['bns_after']}"
        )
    lines += [f"note: {n}" for n in payload["notes"]]
    lines.append(f"time: {payload['seconds']:.3f} s")
    return "\n".join(lines)


@click.command("adapt", epilog=EXAMPLE)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--target", "target_data", required=True, help="DATA of the new distribution.")
@source_option()
@output_option("adapted")
@click.option(
    "--fold/--no-fold",
    default=True,
    show_default=True,
    help="Fold the inserted BNs back (same node count as MODEL).",
)
@mode_option(None)
@prior_option("Blend with the source statistics.")
@samples_option("At most N samples of each DATA (a variance needs at least 2).")
@batch_size_option()
@click.option(
    "--after", help="Op types to insert BNs after (default Conv,ConvTranspose,Gemm,MatMul)."
)
@nodes_option("Regex: nodes to insert after (no BN) or BNs to re-estimate.")
@memory_budget_option("Exact-mode cache size.")
@guard_options
@shape_option()
@provider_option()
@measure_opt_level_option()
@json_option()
def adapt_command(
    model: Path,
    target_data: str,
    source: str | None,
    output: Path | None,
    fold: bool,
    mode: str,
    prior: float | None,
    samples: int | None,
    batch_size: int | None,
    after: str | None,
    nodes: str | None,
    memory_budget: str,
    max_drop: float,
    force: bool,
    auto: bool,
    shapes: tuple[str, ...],
    provider: str,
    opt_level: str,
    as_json: bool,
) -> None:
    """Adapt MODEL to TARGET's input distribution by re-estimating its BN statistics.

    A model without BN gets BNs inserted and calibrated on SOURCE first, and folded back
    afterwards (--fold), so the output has MODEL's nodes with new weights.
    """
    out = resolve_output_path(model, output, "adapted")
    original = load_model(model)
    shape_overrides = parse_shape_overrides(shapes)
    has_bn = any(n.op_type == "BatchNormalization" for n in original.graph.node)
    if auto and not has_bn:
        raise UsageError("--auto chooses how to adapt a model's own BNs; MODEL has none")
    if not has_bn and source is None:
        raise UsageError(
            "the model has no BatchNormalization: --source DATA is needed to calibrate "
            "the BNs adapt inserts"
        )
    with ProgressBar("adapting") as bar:

        def run(part: Any, src: Any, prior_: float | None, nodes_: str | None) -> Any:
            return adapt(
                original,
                part,
                source=src,
                fold=fold,
                mode=mode,
                prior=prior_,
                samples=None,
                batch_size=batch_size,
                after=after,
                nodes=nodes_,
                memory_budget=parse_size(memory_budget),
                shapes=shape_overrides,
                provider=provider,
                opt_level=opt_level,
                progress=bar,
            )

        outcome = guarded(
            original,
            run,
            target_data,
            source=source,
            prior=prior,
            nodes=nodes,
            auto=auto,
            max_drop=max_drop,
            samples=samples,
            batch_size=batch_size,
            shapes=shape_overrides,
        )
    result = outcome.result
    payload: dict[str, Any] = result.report.to_dict() if result is not None else {}
    if result is not None:
        calibration = (payload["inserted"] or {}).get("calibration")
        if calibration:  # SOURCE, when the model had no BN
            data_notes(calibration["data"], calibration["data_notes"])
        data_notes(payload["reestimate"]["data"], payload["reestimate"]["data_notes"])
    report = result.report.reestimate if result is not None else None
    finish(
        as_json,
        outcome,
        report,
        payload,
        lambda: render_adapt(payload) if result is not None else "",
        out,
        force,
    )
