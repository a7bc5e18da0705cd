"""Postcondition of a rewrite: the rewritten model computes what the original did.

Both models run on ONNX Runtime CPU with graph optimizations DISABLE_ALL (ORT's own BN fusion
would otherwise hide a wrong fold), on seeded random inputs; models ORT cannot run (fp64 Conv,
bf16) fall back to onnx.reference. Tolerances are DESIGN.md §6's, by output dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx

from bnsurgery.data import random_batches
from bnsurgery.errors import CheckFailed
from bnsurgery.passes import PassResult

TOLERANCES: dict[str, tuple[float, float]] = {  # dtype -> (atol, rtol)
    "float16": (2.5e-3, 1e-3),
    "bfloat16": (2e-2, 1e-2),
    "float32": (1e-5, 1e-4),
    "float64": (1e-9, 1e-7),
}
TINY = 1e-12


def tolerance_for(dtype: np.dtype) -> tuple[float, float]:
    return TOLERANCES.get(np.dtype(dtype).name, TOLERANCES["float32"])


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
    except Exception as exc:  # a missing kernel, not a wrong model: both were checked
        from bnsurgery.reference import run_reference

        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        engine = f"onnx.reference (onnxruntime could not run the models: {reason})"
        return run_reference(original, feeds), run_reference(rewritten, feeds), engine


def output_errors(reference: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
    """Max abs/rel error and whether every element is within the dtype's tolerance."""
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.shape != cand.shape:
        return {"shape_mismatch": [list(ref.shape), list(cand.shape)], "ok": False}
    atol, rtol = tolerance_for(np.asarray(reference).dtype)
    both_nan = np.isnan(ref) & np.isnan(cand)
    with np.errstate(invalid="ignore"):  # inf - inf: agreeing infinities are handled below
        diff = np.abs(ref - cand)
        diff = np.where(both_nan | (ref == cand), 0.0, diff)  # NaN == NaN, inf == inf agree
        within = (diff <= atol + rtol * np.abs(ref)) | both_nan | (ref == cand)
    return {
        "max_abs": float(diff.max()) if diff.size else 0.0,
        "max_rel": float((diff / (np.abs(ref) + TINY)).max()) if diff.size else 0.0,
        "atol": atol,
        "rtol": rtol,
        "ok": bool(within.all()),
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
    ref_out, new_out, engine = run_pair(original, rewritten, feeds)
    per_output = {}
    for name, ref in ref_out.items():
        if name not in new_out:
            per_output[name] = {"missing": True, "ok": False}
            continue
        per_output[name] = output_errors(ref, new_out[name])
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
