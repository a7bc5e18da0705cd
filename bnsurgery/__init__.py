"""bnsurgery: surgery on BatchNormalization in ONNX models.

Public API (every function accepts a path, bytes, an onnx.ModelProto or an onnx_ir.Model):

    fold(model, ...) -> PassResult            fold BN into neighbouring linear ops
    fold_file(path, output, ...) -> FoldReport   the same, file to file, weights streamed
    info(model, ...) -> FoldReport            what fold would do, without rewriting
    compare(reference, candidate, ...) -> CompareReport   outputs across models and providers
    insert(model, ...) -> PassResult          BN after Conv/Gemm/..., identity or calibrated
    reestimate(model, data, ...) -> PassResult   BN statistics re-estimated on data (AdaBN)
    adapt(model, target, source=...) -> PassResult   insert, calibrate, re-estimate, fold back
    load_model(source) / save_model(model, path)
    validate(model, ...) -> ValidationReport   the pre-export gate (docs/validate.md)
    Pipeline([...]).run(model), run_pipeline(toml, model)   passes in sequence
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    import onnx

    from bnsurgery.harness.report import CompareReport
    from bnsurgery.onnxio import ModelSource
    from bnsurgery.passes import PassResult
    from bnsurgery.passes.fold import FoldReport


def load_model(source: ModelSource, *, check: bool = True) -> onnx.ModelProto:
    """Load a model from a path, bytes or a ModelProto, with its external data."""
    from bnsurgery.onnxio import load_model as _load

    return _load(source, check=check)


def save_model(model: onnx.ModelProto, path: Any, *, external_data: bool | None = None) -> Any:
    """Write a model atomically (external data beside it when over 2 GB or when asked)."""
    from bnsurgery.onnxio import save_model as _save

    return _save(model, path, external_data=external_data)


def fold(
    model: ModelSource,
    *,
    backward: bool = True,
    affine: bool = True,
    verify: bool = True,
    **verify_options: Any,
) -> PassResult:
    """Fold every foldable BatchNormalization; the report names every BN and why it stayed.

    Like `bnsurgery fold`, it verifies unless verify=False: the original and the folded model
    run on ONNX Runtime CPU (optimizations off), the verdict goes into the report
    (`report.verification`), and CheckFailed is raised when an output deviates beyond 8x the
    original's rounding noise (docs/verification.md). verify_options: samples, seed, shapes,
    data, atol, rtol.
    """
    from bnsurgery.passes.fold import FoldPass

    loaded = load_model(model)
    # A model we loaded ourselves (path, bytes, onnx-ir) is ours to rewrite: no deep copy; the
    # verification then loads the original again from `model`.
    owned = loaded is not model
    fold_pass = FoldPass(
        backward=backward, affine=affine, in_place=owned, verify=verify, source=model,
        **verify_options,
    )  # fmt: skip
    return fold_pass(loaded)


def fold_file(
    model: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    backward: bool = True,
    affine: bool = True,
    verify: bool = True,
    external_data: bool = False,
    shapes: Mapping[str, list[int]] | None = None,
) -> FoldReport:
    """Fold the model at `model` and write it to `output` (what `bnsurgery fold` does).

    Faster and lighter than fold() + save_model() on large models: weights stay in the input
    file until the pass reads them, and those it does not rewrite are copied file to file
    (docs/benchmarks.md, section 1). The output keeps external data when the input had it, or
    when external_data=True. Like the CLI it verifies unless verify=False: both models run on
    ONNX Runtime CPU first, and CheckFailed is raised beyond the judge's limit, with nothing
    written. Returns the report.
    """
    from bnsurgery.passes.fold.streamed import fold_file_checked

    report, _, failure = fold_file_checked(
        model,
        output,
        backward=backward,
        affine=affine,
        verify=verify,
        external_data=external_data,
        shapes=shapes,
    )
    if failure is not None:
        raise type(failure)(f"{failure}; {output} was not written")
    return report


def compare(
    reference: ModelSource,
    candidate: ModelSource | None = None,
    providers: Sequence[str] | str = ("cpu",),
    data: Any = None,
    **options: Any,
) -> CompareReport:
    """Run REFERENCE (on the first provider) and every other (model, provider) pair on the same
    data, and judge each output; `report.passed` is False when any is beyond tolerance.

    data: a DATA spec (path, "random:N"), a {name: array} mapping, or an iterable of feed
    dicts; None means random:4, seed 0. Options (labels_key, atol, rtol, layerwise,
    tensor_map, stability, allow_fallback, opt_level, cuda_tf32, ...) are those of
    bnsurgery.harness.compare.compare; see docs/compare.md.
    """
    from bnsurgery.harness.compare import compare as _compare

    return _compare(reference, candidate, providers, data, **options)


def info(model: ModelSource, *, backward: bool = True, affine: bool = True) -> FoldReport:
    """The fold report (dry run): every BN and what fold would do with it."""
    report = fold(model, backward=backward, affine=affine, verify=False).report
    return report  # type: ignore[return-value]


def insert(model: ModelSource, **options: Any) -> PassResult:
    """Insert BatchNormalization after Conv/ConvTranspose/Gemm/MatMul nodes not followed by one.

    Options: after ("Conv,Gemm" or a sequence), nodes (regex), calibrate (DATA: make each new
    BN the identity on that data's distribution), epsilon, include_outputs, samples,
    batch_size, shapes, provider. Without calibrate the new BNs are exact identities.
    The registered pass "insert" (InsertPass), as a function.
    """
    from bnsurgery.passes.insert import InsertPass

    return InsertPass(**options)(load_model(model))


def reestimate(model: ModelSource, data: Any = None, **options: Any) -> PassResult:
    """Re-estimate BN statistics on DATA (AdaBN); report.stats holds the measured moments.

    Options: mode ("exact" or "batch"), samples, batch_size, prior, nodes (regex, or exact BN
    names), memory_budget (bytes), stats (a StatsSet or .npz path to apply instead of data),
    shapes, provider, opt_level, progress. The registered pass "reestimate" (ReestimatePass),
    as a function.
    """
    from bnsurgery.passes.reestimate import ReestimatePass

    return ReestimatePass(data, **options)(load_model(model))


def adapt(model: ModelSource, target: Any, **options: Any) -> PassResult:
    """Insert (if no BN) -> calibrate on source -> re-estimate on target -> fold back.

    Options: source (DATA; needed when the model has no BN), fold (default True), mode,
    prior, samples, batch_size, after, nodes, include_outputs, memory_budget, shapes, provider.
    The registered pass "adapt" (AdaptPass), as a function.
    """
    from bnsurgery.passes.adapt import AdaptPass

    return AdaptPass(target, **options)(load_model(model))


__all__ = [
    "__version__",
    "adapt",
    "compare",
    "fold",
    "fold_file",
    "info",
    "insert",
    "load_model",
    "reestimate",
    "save_model",
]


# -- validate and pipelines ------------------------------------------------------------------
from bnsurgery.passes import Pipeline  # noqa: E402


def validate(model: Any, **options: Any) -> Any:
    """Run every validate check (BN health, foldability, fold verification, provider parity,
    ONNX checker, shape inference, plugin checks) -> ValidationReport (.ok, .findings,
    .raise_for_findings()).

    Options: data, providers (default ("cpu",)), fail_on ("error" | "warning"), skip, only,
    shapes, seed, plugins, extra_checks, parity_opt_level. See docs/validate.md.
    """
    from bnsurgery.validation.gate import validate as _validate

    return _validate(model, **options)


def run_pipeline(pipeline: Any, model: Any) -> PassResult:
    """Run a TOML pipeline file on a model; the report holds every step's report
    (docs/pipelines.md)."""
    from bnsurgery.pipeline.config import run_pipeline as _run

    return _run(pipeline, model)


__all__ += ["Pipeline", "run_pipeline", "validate"]
