"""Postcondition of a rewrite: the rewritten model computes what the original did.

This is the one judge behind `fold`'s verification, `validate`'s fold check and
bnsurgery.testing: it runs `bnsurgery compare`'s own comparison (harness.compare.compare_models)
with compare's defaults (random:4, seed 0, the same shapes for dynamic dimensions) and its rule
(deviation within 8x the rounding noise of the original, harness.metrics; docs/verification.md).
Both models run on ONNX Runtime CPU with graph optimizations off (ORT's own BN fusion would hide
a wrong fold), in a child process, so an ONNX Runtime crash is one line and exit 2. Only where
ONNX Runtime lacks a kernel (NOT_IMPLEMENTED: fp64 Conv, bf16) do the models run on
onnx.reference instead: the same harness (runner and judge) with its other engine, judged by
the same rule.

When the original's outputs are NaN or Inf (a BN that fold keeps has a negative variance, say),
each fold is judged on the tensor it produces, where that tensor is finite in the original,
and the verdict says which folds could not be checked and why.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx

from bnsurgery.data import DEFAULT_RANDOM_SAMPLES, DEFAULT_SEED, random_spec
from bnsurgery.errors import (
    BadInputError,
    BnSurgeryError,
    CheckFailed,
    first_line_or_type,
    is_onnxruntime_error,
)
from bnsurgery.harness.metrics import ErrorMetrics
from bnsurgery.passes import PassResult

logger = logging.getLogger(__name__)

ORT_ENGINE = "onnxruntime CPUExecutionProvider, ORT_DISABLE_ALL"


def is_missing_kernel(exc: BaseException) -> bool:
    """ONNX Runtime's NOT_IMPLEMENTED: it has no kernel for an op/dtype (fp64 Conv, bf16)."""
    name = getattr(exc, "type_name", None) or type(exc).__name__
    return is_onnxruntime_error(exc) and name == "NotImplemented"


def _compare(
    original: onnx.ModelProto, rewritten: onnx.ModelProto, options: dict[str, Any], **extra: Any
) -> Any:
    """compare's own comparison of the rewritten model with the original, on ONNX Runtime CPU
    in a child process (`extra`: more compare_models options, e.g. layerwise)."""
    # imported here, not at the top: `fold --no-verify` must not pay for the harness's import
    from bnsurgery.harness.compare import compare_models
    from bnsurgery.runtime.isolation import run_isolated

    options = dict(options)
    label = options.pop("label")
    return run_isolated(
        compare_models, original, rewritten, what=f"{label} (verifying the rewrite)",
        reference_label=label, candidate_label="rewritten", providers=("cpu",),
        show_progress=False, **options, **extra,
    )  # fmt: skip


def judge_pair(
    original: onnx.ModelProto,
    rewritten: onnx.ModelProto,
    options: dict[str, Any],
) -> tuple[list[ErrorMetrics], str, dict[str, Any]]:
    """(per-output metrics, engine, data description) of the rewritten model against the
    original, on ONNX Runtime, or on onnx.reference where ONNX Runtime lacks a kernel.
    options: label (the original's name, for messages), data (a DATA spec), shapes, seed, atol,
    rtol."""
    try:
        report = _compare(original, rewritten, options)
    except Exception as exc:
        if not is_onnxruntime_error(exc):
            raise
        if not is_missing_kernel(exc):
            raise BadInputError(f"ONNX Runtime cannot run the model: {_first_line(exc)}") from None
        return _judge_on_reference(original, rewritten, options, exc)
    logger.info("verified the rewrite on %s", ORT_ENGINE)
    return report.pairs[0].outputs, ORT_ENGINE, report.data


def _judge_on_reference(
    original: onnx.ModelProto,
    rewritten: onnx.ModelProto,
    options: dict[str, Any],
    cause: BaseException,
) -> tuple[list[ErrorMetrics], str, dict[str, Any]]:
    """The same comparison and rule, run by the same harness on onnx.reference (for kernels
    ONNX Runtime lacks), in this process: onnx.reference is Python, a crash there is an
    exception."""
    from bnsurgery.harness.compare import compare_models

    engine = f"onnx.reference (onnxruntime has no kernel: {_first_line(cause)})"
    logger.info("ONNX Runtime lacks a kernel (%s): verifying on onnx.reference", _first_line(cause))
    options = dict(options)
    label = options.pop("label")
    try:
        report = compare_models(
            original, rewritten, reference_label=label, candidate_label="rewritten",
            show_progress=False, engine="reference", **options,
        )  # fmt: skip
    except BnSurgeryError:
        raise  # the models or the data are at fault, whatever the engine: said as it is
    except Exception as exc:  # neither engine runs it (nor a training-mode BN): say so
        raise BadInputError(
            f"cannot run the model to verify it: onnxruntime: {_first_line(cause)}; "
            f"onnx.reference: {_first_line(exc)}"
        ) from None
    return report.pairs[0].outputs, engine, report.data


def _first_line(exc: BaseException) -> str:
    return first_line_or_type(exc)[:200]


def verify_equivalent(
    original: onnx.ModelProto,
    rewritten: onnx.ModelProto,
    *,
    samples: int = DEFAULT_RANDOM_SAMPLES,
    seed: int = DEFAULT_SEED,
    shapes: Mapping[str, list[int]] | None = None,
    data: Any = None,
    atol: Any = None,
    rtol: Any = None,
    fold_report: Any = None,
    label: str = "the model",
) -> dict[str, Any]:
    """Judge every output of `rewritten` against `original`; the outcome as a dict (the
    `verification` of fold's JSON, documented in docs/verification.md).

    fold_report: the FoldReport of the fold that made `rewritten`, so that a non-finite
    original can still be verified fold by fold on the tensors each fold produces.
    label: the original's name in messages (its path, say)."""
    options = {
        "label": label,
        "data": data if data is not None else random_spec(original, samples),
        "shapes": shapes,
        "seed": seed,
        "atol": atol,
        "rtol": rtol,
    }
    metrics, engine, data_info = judge_pair(original, rewritten, options)
    outcome = _outcome(metrics, engine, data_info, seed)
    nonfinite = [m.name for m in metrics if m.reference_nan or m.reference_inf]
    if not nonfinite:
        return outcome
    if fold_report is not None and fold_report.folded and engine == ORT_ENGINE:
        from bnsurgery.passes.fold.verify_folds import verify_folds_on_tensors

        layer_options = {k: v for k, v in options.items() if k not in ("atol", "rtol")}
        partial = verify_folds_on_tensors(
            original, fold_report, nonfinite,
            lambda: _compare(original, rewritten, layer_options, layerwise=True,
                             tensor_map=fold_report.tensor_map),
        )  # fmt: skip
        outcome["per_fold"] = partial
        outcome["ok"] = outcome["ok"] and partial["ok"]
    elif all(m.finite == 0 for m in metrics):
        raise BadInputError(
            "cannot verify: the original model gives no finite output value on "
            f"{data_info.get('source', 'the data')} (input shapes {_shapes_text(data_info)}); "
            "give the real input shapes with --shape, or use --no-verify"
        )
    return outcome


def _shapes_text(data_info: dict[str, Any]) -> str:
    shapes = data_info.get("input_shapes") or {}
    return ", ".join(f"{k} {v}" for k, v in shapes.items()) or "unknown"


def _outcome(
    metrics: list[ErrorMetrics], engine: str, data_info: dict[str, Any], seed: int
) -> dict[str, Any]:
    finite = [m for m in metrics if np.isfinite(m.max_abs)]
    ratios = [m.ratio for m in metrics if m.ratio is not None]
    return {
        "ok": all(m.passed for m in metrics),
        "rule": "rounding-noise" if all(m.rule == "noise" for m in metrics) else "mixed",
        "ratio": max(ratios) if ratios else None,
        "limit": max((m.limit for m in metrics if m.limit is not None), default=None),
        "max_abs": max((m.max_abs for m in finite), default=0.0),
        "max_rel": max((m.max_rel for m in finite), default=0.0),
        "outputs": {m.name: m.to_dict() for m in metrics},
        "samples": data_info.get("samples"),
        "seed": seed,
        "data": data_info.get("source"),
        "notes": list(data_info.get("notes", [])),
        "engines": [engine],
        "input_shapes": data_info.get("input_shapes", {}),
    }


def verify_fold(
    original: onnx.ModelProto,
    result: PassResult,
    *,
    samples: int = DEFAULT_RANDOM_SAMPLES,
    seed: int = DEFAULT_SEED,
    shapes: Mapping[str, list[int]] | None = None,
    data: Any = None,
    atol: Any = None,
    rtol: Any = None,
    raise_on_mismatch: bool = True,
    label: str = "the model",
) -> dict[str, Any]:
    """Verify a fold result; the outcome goes into its report (`verification`)."""
    outcome = verify_equivalent(
        original, result.model, samples=samples, seed=seed, shapes=shapes, data=data,
        atol=atol, rtol=rtol, fold_report=result.report, label=label,
    )  # fmt: skip
    result.report.verification = outcome  # type: ignore[attr-defined]
    if raise_on_mismatch and not outcome["ok"]:
        raise CheckFailed(f"verification failed: {failure_text(outcome)}")
    return outcome


def failure_text(outcome: dict[str, Any]) -> str:
    """Which outputs (or folds) are beyond the judge's limit, with the verdict's numbers."""
    parts = [
        f"output '{name}': {v['verdict']} (max abs {_g(v['max_abs'])}, max rel {_g(v['max_rel'])})"
        for name, v in outcome["outputs"].items()
        if not v["passed"]
    ]
    per_fold = outcome.get("per_fold")
    if per_fold and not per_fold["ok"]:
        parts += [
            f"fold of '{f['bn']}': {f['verdict']}"
            for f in per_fold["folds"]
            if f["status"] == "failed"
        ]
    return "; ".join(parts)


def _g(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
