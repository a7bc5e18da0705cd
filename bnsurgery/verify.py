"""Postcondition of a rewrite: the rewritten model computes what the original did.

Both models run on ONNX Runtime CPU with graph optimizations DISABLE_ALL (ORT's own BN fusion
would otherwise hide a wrong fold), on seeded random inputs; models ORT cannot run (fp64 Conv,
bf16) fall back to onnx.reference. Tolerances are DESIGN.md §6's, by output dtype
(bnsurgery.harness.metrics).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx

from bnsurgery.data import random_batches
from bnsurgery.errors import BadInputError, CheckFailed, first_line
from bnsurgery.harness.metrics import compare_arrays
from bnsurgery.passes import PassResult


def _run_ort(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    from bnsurgery.harness.providers import ProviderConfig, create_session

    session, _ = create_session(model, ProviderConfig("cpu", opt_level="disable_all"))
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds)), strict=True))


ORT_ENGINE = "onnxruntime CPUExecutionProvider, ORT_DISABLE_ALL"


def run_pair(
    original: onnx.ModelProto, rewritten: onnx.ModelProto, feeds: Mapping[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], str]:
    """Run both models on one engine: ORT CPU (DISABLE_ALL) when it can load both, else
    onnx.reference for both (fp64 Conv, bf16 and other kernels ORT lacks)."""
    try:
        return _run_ort(original, feeds), _run_ort(rewritten, feeds), ORT_ENGINE
    except Exception as exc:  # usually a missing kernel (fp64 Conv, bf16): try the reference
        from bnsurgery.reference import run_reference

        reason = _first_line(exc)
        engine = f"onnx.reference (onnxruntime could not run the models: {reason})"
        try:
            return run_reference(original, feeds), run_reference(rewritten, feeds), engine
        except Exception as ref_exc:  # neither engine runs it (nor a training-mode BN): say so
            raise BadInputError(
                f"cannot run the model to verify it: onnxruntime: {reason}; "
                f"onnx.reference: {_first_line(ref_exc)}"
            ) from None


def _first_line(exc: BaseException) -> str:
    return first_line(exc)[:160] or type(exc).__name__


def output_errors(reference: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
    """Max abs/rel error and whether every element is within the dtype's tolerance."""
    if np.shape(reference) != np.shape(candidate):
        return {"shape_mismatch": [list(np.shape(reference)), list(np.shape(candidate))],
                "ok": False}  # fmt: skip
    metrics = compare_arrays(reference, candidate)
    return {
        "max_abs": metrics.max_abs,
        "max_rel": metrics.max_rel,
        "atol": metrics.atol,
        "rtol": metrics.rtol,
        "ok": metrics.passed,
    }


def verify_equivalent(
    original: onnx.ModelProto,
    rewritten: onnx.ModelProto,
    *,
    samples: int = 4,
    seed: int = 0,
    shapes: Mapping[str, list[int]] | None = None,
) -> dict[str, Any]:
    """Run both models on the same seeded random inputs and compare every output."""
    feeds = next(iter(random_batches(original, samples, seed=seed, shapes=shapes)))
    # NaN or inf in a model's outputs is judged below like any other value; numpy's warnings
    # about it (onnx.reference computes in numpy) would only be noise on stderr.
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref_out, new_out, engine = run_pair(original, rewritten, feeds)
        per_output = {}
        for name, ref in ref_out.items():
            if name not in new_out:
                per_output[name] = {"missing": True, "ok": False}
                continue
            per_output[name] = output_errors(ref, new_out[name])
    if ref_out and not any(np.isfinite(v).any() for v in ref_out.values()):
        # Nothing to compare: agreeing NaNs would read as a perfect match.
        shapes_seen = ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())
        raise BadInputError(
            f"cannot verify: the original model gives no finite output value on random inputs "
            f"({shapes_seen}); give the real input shapes with --shape, or use --no-verify"
        )
    finite = [v for v in per_output.values() if "max_abs" in v]
    return {
        "ok": all(v["ok"] for v in per_output.values()),
        "max_abs": max((v["max_abs"] for v in finite), default=0.0),
        "max_rel": max((v["max_rel"] for v in finite), default=0.0),
        "outputs": per_output,
        "samples": samples,
        "seed": seed,
        "engines": [engine],
        "input_shapes": {k: list(v.shape) for k, v in feeds.items()},
    }


def verify_fold(
    original: onnx.ModelProto,
    result: PassResult,
    *,
    samples: int = 4,
    seed: int = 0,
    shapes: Mapping[str, list[int]] | None = None,
    raise_on_mismatch: bool = True,
) -> dict[str, Any]:
    """Verify a fold result; the outcome goes into its report (`verification`)."""
    outcome = verify_equivalent(original, result.model, samples=samples, seed=seed, shapes=shapes)
    result.report.verification = outcome  # type: ignore[attr-defined]
    if raise_on_mismatch and not outcome["ok"]:
        bad = [n for n, v in outcome["outputs"].items() if not v["ok"]]
        raise CheckFailed(
            f"verification failed: output(s) {', '.join(bad)} differ "
            f"(max abs {outcome['max_abs']:.3g}, max rel {outcome['max_rel']:.3g})"
        )
    return outcome
