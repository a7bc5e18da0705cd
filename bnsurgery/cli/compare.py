"""`bnsurgery compare`: a reference model against a candidate, across execution providers."""

from __future__ import annotations

from pathlib import Path

import click

from bnsurgery.cli.options import (
    allow_fallback_option,
    batch_size_option,
    data_option,
    ep_library_option,
    json_option,
    provider_options_option,
    providers_option,
    seed_option,
    shape_option,
)
from bnsurgery.cli.render import emit, info, quiet
from bnsurgery.data import parse_shape_overrides
from bnsurgery.errors import CheckFailed
from bnsurgery.harness.compare import compare
from bnsurgery.harness.matching import load_tensor_map
from bnsurgery.runtime.providers import CUDNN_CONV_ALGO_SEARCH, OPT_LEVELS

EXAMPLE = """\b
Example:
  bnsurgery fold sample_models/digits_cnn.onnx -o digits_folded.onnx
  bnsurgery compare sample_models/digits_cnn.onnx digits_folded.onnx \\
      --data sample_models/digits_test.npz --layerwise --report report.html
"""


@click.command("compare", epilog=EXAMPLE)
@click.argument("reference", type=click.Path(path_type=Path))
@click.argument("candidate", required=False, type=click.Path(path_type=Path))
@providers_option()
@ep_library_option(
    "Register a plugin execution provider library (repeatable); then --providers NAME."
)
@provider_options_option(
    "An option of one provider (repeatable), e.g. openvino:precision=FP32, "
    "ggml:weights=f32, cuda:use_tf32=1."
)
@data_option()
@click.option("--labels", "labels_key", help="Labels key in DATA (default: 'label' if present).")
@shape_option()
@batch_size_option()
@click.option(
    "--atol",
    multiple=True,
    help="Judge by allclose with this absolute tolerance: A for every output or OUTPUT:A for "
    "one (repeatable). Default: the rounding-noise rule; the half not given is by dtype "
    "(fp32 1e-5, fp16 2.5e-3).",
)
@click.option(
    "--rtol",
    multiple=True,
    help="Judge by allclose with this relative tolerance: R or OUTPUT:R (repeatable); the half "
    "not given is by dtype (fp32 1e-4, fp16 1e-3).",
)
@click.option("--layerwise", is_flag=True, help="Find the first node whose output diverges.")
@click.option(
    "--map",
    "map_path",
    type=click.Path(path_type=Path),
    help="Fold report (`bnsurgery fold --json`) whose tensor_map maps tensors for --layerwise.",
)
@click.option("--stability", is_flag=True, help="Perturbation suite, determinism and fp16 checks.")
@click.option(
    "--report",
    "report_path",
    type=click.Path(path_type=Path),
    help="Also write an HTML report (plots with matplotlib).",
)
@allow_fallback_option()
@click.option(
    "--opt-level",
    type=click.Choice(list(OPT_LEVELS)),
    default="disable_all",
    show_default=True,
    help="ORT graph optimizations for every run but the reference.",
)
@click.option(
    "--reference-opt-level",
    type=click.Choice(list(OPT_LEVELS)),
    default="disable_all",
    show_default=True,
    help="ORT graph optimizations for the reference run.",
)
@click.option(
    "--cuda-tf32/--no-cuda-tf32",
    default=False,
    show_default=True,
    help="Let CUDA use TF32 math (off: full fp32).",
)
@click.option(
    "--cudnn-conv-algo-search",
    type=click.Choice(list(CUDNN_CONV_ALGO_SEARCH)),
    default="EXHAUSTIVE",
    show_default=True,
)
@click.option("--device-id", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--threads", type=click.IntRange(min=0), default=0, help="Intra-op threads (0: ORT default)."
)
@click.option("--inter-op-threads", type=click.IntRange(min=0), default=0, help="0: ORT default.")
@seed_option()
@json_option()
def compare_command(
    reference: Path,
    candidate: Path | None,
    providers: str,
    ep_libraries: tuple[str, ...],
    provider_options: tuple[str, ...],
    data: str | None,
    labels_key: str | None,
    shapes: tuple[str, ...],
    batch_size: int | None,
    atol: tuple[str, ...],
    rtol: tuple[str, ...],
    layerwise: bool,
    map_path: Path | None,
    stability: bool,
    report_path: Path | None,
    allow_fallback: bool,
    opt_level: str,
    reference_opt_level: str,
    cuda_tf32: bool,
    cudnn_conv_algo_search: str,
    device_id: int,
    threads: int,
    inter_op_threads: int,
    seed: int,
    as_json: bool,
) -> None:
    """Compare REFERENCE with CANDIDATE (or with itself on other providers) on ONNX Runtime.

    The reference is REFERENCE on the first provider, graph optimizations off. Every other
    (model, provider) pair runs on the same data and is judged per output by fold's rule: its
    deviation at most 8x the reference's rounding noise (--atol/--rtol: allclose instead).
    Columns: top-1 is the share of samples with the same argmax; "top-5 set" the share whose
    five highest classes are the same set, in any order. Exit 1 when any output is beyond the
    limit, 3 when a requested provider is unavailable or any node ran elsewhere (unless
    --allow-fallback). See docs/compare.md, docs/verification.md and docs/providers.md.
    """
    tensor_map = load_tensor_map(str(map_path)) if map_path is not None else None
    if map_path is not None and not layerwise:
        info("note: --map is used only with --layerwise")
    report = compare(
        reference,
        candidate,
        providers,
        data,
        labels_key=labels_key,
        atol=list(atol) or None,
        rtol=list(rtol) or None,
        layerwise=layerwise,
        tensor_map=tensor_map,
        stability=stability,
        allow_fallback=allow_fallback,
        provider_options=list(provider_options),
        ep_libraries=list(ep_libraries),
        opt_level=opt_level,
        reference_opt_level=reference_opt_level,
        cuda_tf32=cuda_tf32,
        cudnn_conv_algo_search=cudnn_conv_algo_search,
        device_id=device_id,
        intra_op_threads=threads,
        inter_op_threads=inter_op_threads,
        batch_size=batch_size,
        shapes=parse_shape_overrides(shapes),
        seed=seed,
        show_progress=False if quiet() else None,
    )
    for note in report.fallbacks:
        info(f"bnsurgery: WARNING: {note}")
    written = report.write_html(report_path) if report_path is not None else None
    payload = report.to_dict()
    payload["report_html"] = str(written) if written is not None else None
    emit(
        as_json,
        payload,
        lambda: report.render_text() + (f"\nwrote {written}" if written else ""),
    )
    if not report.passed:
        failed = ", ".join(f"{p.model} on {p.provider}" for p in report.failures)
        raise CheckFailed(f"outputs beyond tolerance: {failed}")
