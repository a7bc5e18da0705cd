"""`bnsurgery reestimate`: recompute BatchNormalization statistics on new data (AdaBN).

Its text rendering (the per-BN statistics table) is also `bnsurgery adapt`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from bnsurgery.cli.guarded import finish
from bnsurgery.cli.options import (
    batch_size_option,
    data_option,
    guard_options,
    in_place_option,
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
from bnsurgery.cli.render import ProgressBar, data_notes, table
from bnsurgery.data import parse_shape_overrides
from bnsurgery.errors import UsageError
from bnsurgery.measure.cache import DEFAULT_MEMORY_BUDGET
from bnsurgery.measure.ray import RayOptions, require_ray
from bnsurgery.onnxio import load_model
from bnsurgery.passes.adapt_auto import guarded
from bnsurgery.passes.reestimate import ReestimatePass
from bnsurgery.passes.source_relative import is_stats_file

EXAMPLE = """\b
Example:
  bnsurgery reestimate sample_models/digits_cnn.onnx --data sample_models/digits_test.npz \\
      -o digits_adapted.onnx --prior 16
"""


def _g(value: float) -> str:
    return f"{value:.4g}"


def render_bns(bns: list[dict[str, Any]]) -> str:
    """One row per BN: wave, mean and var averages old -> new, largest changes."""
    rows = [("BN", "wave", "mean (avg) old -> new", "var (avg) old -> new", "var ratio")]
    for b in bns:
        rows.append(
            (
                b["name"],
                str(b["wave"]),
                f"{_g(b['mean']['old_avg'])} -> {_g(b['mean']['new_avg'])}",
                f"{_g(b['var']['old_avg'])} -> {_g(b['var']['new_avg'])}",
                f"{_g(b['var']['min_ratio'])}..{_g(b['var']['max_ratio'])}",
            )
        )
    return "\n".join(table(rows, max_width=48))


def render_reestimate(payload: dict[str, Any]) -> str:
    lines = [render_bns(payload["bns"]), ""]
    if payload.get("stats_file"):
        lines.append(
            f"applied statistics from {payload['stats_file']} ({payload['samples']} samples)"
        )
    else:
        lines.append(
            f"mode {payload['mode']}: {payload['samples']} samples from {payload['data']} "
            f"in {payload['batches']} batches of {payload['batch_size']}, "
            f"{payload['waves']} wave(s), {payload['passes']} pass(es) "
            f"({payload['forward_equivalents']} forward equivalents), "
            f"{payload['seconds']:.3f} s"
        )
    relative = payload.get("source_relative")
    if relative:
        lines.append(
            f"source-relative: the change from {relative['source']} "
            f"({relative['source_samples']} samples) to DATA composed into the stored statistics"
            + (
                f"; {relative['clamped_channels']} channel(s) with a negative variance written "
                "as var 0 with the scale compensated"
                if relative["clamped_channels"]
                else ""
            )
        )
    if payload.get("prior") is not None:
        lines.append(f"prior: {payload['prior']:g} (blended with the model's statistics)")
    for skipped in payload.get("skipped", []):
        lines.append(f"skipped {skipped['name']}: {skipped['reason']}")
    return "\n".join(lines)


@click.command("reestimate", epilog=EXAMPLE)
@click.argument("model", type=click.Path(path_type=Path))
@data_option("DATA to measure on: file.npz, file.npy, folder, script.py, random:N.")
@source_option(
    "Clean DATA of your own (or a statistics file with source moments): adapt by the "
    "change from SOURCE to DATA instead of replacing the statistics."
)
@click.option(
    "--stats",
    "stats_path",
    type=click.Path(path_type=Path),
    help="Apply saved statistics (from --save-stats or merge-stats) instead of measuring.",
)
@output_option("reestimated")
@in_place_option()
@mode_option()
@samples_option()
@batch_size_option()
@prior_option()
@nodes_option()
@memory_budget_option()
@click.option(
    "--save-stats",
    type=click.Path(path_type=Path),
    help="Also write the measured statistics (.npz) for merge-stats.",
)
@guard_options
@shape_option()
@provider_option()
@measure_opt_level_option()
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: this process; ray: workers on a Ray cluster over the .npz/.npy shards of "
    "DATA (a folder or glob); needs pip install 'bnsurgery[ray]'. See docs/scale.md.",
)
@click.option("--address", help="--engine ray: the Ray cluster to join (default: start one here).")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="--engine ray: how many workers (default: one per CPU of the cluster).",
)
@json_option()
def reestimate_command(
    model: Path,
    data: str | None,
    source: str | None,
    stats_path: Path | None,
    output: Path | None,
    in_place: bool,
    mode: str,
    samples: int | None,
    batch_size: int | None,
    prior: float | None,
    nodes: str | None,
    memory_budget: str,
    save_stats: Path | None,
    max_drop: float,
    force: bool,
    auto: bool,
    shapes: tuple[str, ...],
    provider: str,
    opt_level: str,
    engine: str,
    address: str | None,
    workers: int | None,
    as_json: bool,
) -> None:
    """Re-estimate the BatchNormalization statistics of MODEL on DATA.

    Exact mode measures each BN's input in inference mode once every BN upstream of it has
    its new statistics; independent BNs share a pass. The stored var is the population
    (biased) variance. See docs/reestimate.md.
    """
    if data is None and stats_path is None:
        raise UsageError("give --data DATA to measure on, or --stats FILE to apply")
    if data is not None and stats_path is not None:
        raise UsageError("--data and --stats exclude each other")
    target = resolve_output_path(model, output, "reestimated", in_place=in_place)
    budget = parse_size(memory_budget) if memory_budget else DEFAULT_MEMORY_BUDGET
    ray_options = _ray_options(engine, address, workers, data)
    original = load_model(model)
    shape_overrides = parse_shape_overrides(shapes)
    if auto and data is None:
        raise UsageError("--auto needs --data (it measures candidates on a held-out part)")
    if auto and ray_options is not None:
        raise UsageError("--auto runs on the local engine (it reads DATA into this process)")
    with ProgressBar("re-estimating") as bar:

        def run(part: Any, src: Any, prior_: float | None, nodes_: str | None) -> Any:
            return ReestimatePass(
                part,
                mode=mode,
                samples=samples if part is None else None,
                batch_size=batch_size,
                prior=prior_,
                nodes=nodes_,
                memory_budget=budget,
                stats=stats_path,
                source=src,
                shapes=shape_overrides,
                provider=provider,
                opt_level=opt_level,
                progress=bar,
            )(original)

        if data is None:  # saved statistics: nothing to measure the models on
            result, outcome = run(None, source, prior, nodes), None
        elif ray_options is not None:  # DATA stays on the cluster: no held-out check here
            result, outcome = run_on_ray(ReestimatePass, original, data, source, ray_options, {
                "mode": mode, "samples": samples, "batch_size": batch_size, "prior": prior,
                "nodes": nodes, "memory_budget": budget, "shapes": shape_overrides,
                "provider": provider, "opt_level": opt_level, "progress": bar,
            }), None  # fmt: skip
        else:
            outcome = guarded(
                original,
                run,
                data,
                source=source,
                source_is_data=source is not None and not is_stats_file(source),
                prior=prior,
                nodes=nodes,
                auto=auto,
                max_drop=max_drop,
                samples=samples,
                batch_size=batch_size,
                shapes=shape_overrides,
            )
            result = outcome.result
    report = result.report if result is not None else None
    payload: dict[str, Any] = report.to_dict() if report is not None else {}
    if report is not None:
        data_notes(report.data, report.data_notes)  # type: ignore[attr-defined]
        if save_stats is not None:
            report.stats.save(save_stats)  # type: ignore[attr-defined]
    finish(
        as_json,
        outcome,
        report,
        payload,
        lambda: (
            (render_reestimate(payload) if report is not None else "")
            + (f"\nsaved statistics to {save_stats}" if save_stats else "")
        ),
        target,
        force,
        model=result.model if result is not None else None,
        saved_stats=str(save_stats) if save_stats is not None else None,
    )


def run_on_ray(pass_class, model, data, source, ray_options, options: dict[str, Any]):
    """--engine ray: the pass over DATA's shards on the cluster (source-relative too)."""
    return pass_class(data, source=source, engine="ray", ray_options=ray_options, **options)(model)


def _ray_options(engine: str, address: str | None, workers: int | None, data: str | None):
    """--engine ray's options (Ray checked first: exit 3 with the install line); --address and
    --workers without it are refused."""
    if engine != "ray":
        if address is not None or workers is not None:
            raise UsageError("--address and --workers need --engine ray")
        return None
    require_ray()
    if data is None:
        raise UsageError("--engine ray measures on --data shards; it does not apply --stats")
    return RayOptions(address=address, workers=workers, log=_stderr_line)


def _stderr_line(message: str) -> None:
    click.echo(message, err=True)
