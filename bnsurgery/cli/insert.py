"""`bnsurgery insert`: put BatchNormalization back after Conv / ConvTranspose / Gemm / MatMul."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import click

from bnsurgery.cli.options import (
    batch_size_option,
    in_place_option,
    json_option,
    measure_opt_level_option,
    nodes_option,
    output_option,
    provider_option,
    samples_option,
    shape_option,
)
from bnsurgery.cli.output_path import resolve_output_path
from bnsurgery.cli.render import ProgressBar, data_notes, emit, save_and_emit, table
from bnsurgery.data import parse_shape_overrides
from bnsurgery.onnxio import load_model
from bnsurgery.passes.insert import DEFAULT_AFTER, insert

EXAMPLE = """\b
Example:
  bnsurgery insert sample_models/digits_cnn_nobn.onnx \\
      --calibrate sample_models/digits_train.npz -o digits_bn.onnx
"""


def render_insert(payload: dict[str, Any]) -> str:
    rows = [("after node", "op", "BN", "channels", "dtype")]
    for e in payload["inserted"]:
        rows.append((e["after"], e["op"], e["bn"], str(e["channels"]), e["dtype"]))
    lines = table(rows, max_width=48) if payload["inserted"] else []
    for s in payload["skipped"]:
        lines.append(f"skipped {s['node']} ({s['op']}): {s['reason']}")
    cal = payload.get("calibration")
    if cal:
        lines.append(
            f"calibrated on {cal['data']}: {cal['samples']} samples, one pass, "
            f"{cal['seconds']:.3f} s (identity on DATA's distribution)"
        )
    elif payload["inserted"]:
        lines.append("identity BNs (mean 0, var 1-eps, scale 1, B 0); --calibrate DATA to fit them")
    lines.append(f"inserted {len(payload['inserted'])} BatchNormalization node(s)")
    return "\n".join(lines)


@click.command("insert", epilog=EXAMPLE)
@click.argument("model", type=click.Path(path_type=Path))
@output_option("inserted")
@in_place_option()
@click.option(
    "--after",
    default=",".join(DEFAULT_AFTER),
    show_default=True,
    help="Op types to follow with a BN (comma-separated).",
)
@nodes_option("Only nodes whose name (or output) matches this regular expression.")
@click.option(
    "--calibrate",
    "calibrate",
    help="DATA: make each new BN the identity on this data's distribution (mean = mu, "
    "var = sigma^2, scale = sqrt(sigma^2 + eps), B = mu).",
)
@click.option(
    "--epsilon",
    type=click.FloatRange(min=0, min_open=True),
    default=1e-5,
    show_default=True,
    help="The new BNs' epsilon.",
)
@click.option(
    "--include-outputs",
    is_flag=True,
    help="Also insert after nodes that produce a graph output (the classifier, usually).",
)
@samples_option("Calibrate on at most N samples (a variance needs at least 2).")
@batch_size_option()
@shape_option()
@provider_option()
@measure_opt_level_option()
@json_option()
def insert_command(
    model: Path,
    output: Path | None,
    in_place: bool,
    after: str,
    nodes: str | None,
    calibrate: str | None,
    epsilon: float,
    include_outputs: bool,
    samples: int | None,
    batch_size: int | None,
    shapes: tuple[str, ...],
    provider: str,
    opt_level: str,
    as_json: bool,
) -> None:
    """Insert a BatchNormalization after each selected node not already followed by one.

    Without --calibrate the new BNs compute the identity exactly. With it they stay the
    identity and carry DATA's statistics, so `bnsurgery reestimate` on shifted data then
    adapts a model whose BNs the exporter had folded away.
    """
    target = resolve_output_path(model, output, "inserted", in_place=in_place)
    original = load_model(model)
    with ProgressBar("calibrating") as bar:
        result = insert(
            original,
            after=after,
            nodes=nodes,
            calibrate=calibrate,
            epsilon=epsilon,
            include_outputs=include_outputs,
            samples=samples,
            batch_size=batch_size,
            shapes=parse_shape_overrides(shapes),
            provider=provider,
            opt_level=opt_level,
            progress=bar,
        )
    payload = result.report.to_dict()
    if payload.get("calibration"):
        data_notes(payload["calibration"]["data"], payload["calibration"]["data_notes"])
    if payload["inserted"]:
        save_and_emit(as_json, result.model, target, payload, lambda: render_insert(payload))
    elif output is not None and not in_place:  # asked for a file by name: write it, say why
        save_and_emit(
            as_json, result.model, target, payload,
            lambda: f"{render_insert(payload)}\n{why_nothing(payload)}; {target} is an "
            f"unchanged copy of {model}",
        )  # fmt: skip
    else:  # a copy identical to MODEL helps nobody: write nothing
        payload["output"] = None
        emit(as_json, payload, lambda: f"{render_insert(payload)}\n{why_nothing(payload)}; "
             "nothing written")  # fmt: skip


def why_nothing(payload: dict[str, Any]) -> str:
    """Why no BN was inserted: the skip reasons, counted ("4 followed-by-bn, ...")."""
    reasons = Counter(s["reason"] for s in payload["skipped"])
    counted = ", ".join(f"{reason}: {count}" for reason, count in reasons.items())
    if "produces-graph-output" in reasons:
        counted += "; --include-outputs inserts after a graph output too"
    return f"nothing to insert (skipped {counted})"
