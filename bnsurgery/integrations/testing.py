"""Assertions for a project's own test suite (pytest or unittest):

    from bnsurgery.integrations.testing import assert_bn_healthy, assert_fold_equivalent

    def test_exported_model_is_healthy():
        assert_bn_healthy("build/model.onnx")

    def test_fold_keeps_outputs():
        result = assert_fold_equivalent("build/model.onnx", data="tests/calib.npz")
        assert result.report.bns_after == 0

Both raise AssertionError with every problem in the message; both accept a path, bytes, an
onnx.ModelProto or an onnx_ir.Model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from bnsurgery.passes import PassResult

# The static BN checks: no ONNX Runtime, fast enough for every test run.
HEALTH_CHECKS = (
    "bn-invalid-params",
    "bn-training-mode",
    "bn-nonfinite-params",
    "bn-negative-variance",
    "bn-dead-channels",
    "bn-untrained-stats",
    "bn-small-epsilon",
    "bn-fp16-overflow-risk",
)


def assert_bn_healthy(
    model: Any,
    *,
    fail_on: str = "warning",
    ignore: Sequence[str] = (),
) -> None:
    """Assert the BatchNormalization nodes are healthy: the BN checks of `bnsurgery validate`
    (training mode, NaN/Inf, negative variance, dead channels, untrained statistics, small
    fp16 epsilon, fp16 overflow after folding) find nothing at or above `fail_on`.

    ignore: check ids to leave out (e.g. "bn-untrained-stats" for a freshly built model).
    """
    from bnsurgery.validation.gate import validate

    unknown = set(ignore) - set(HEALTH_CHECKS)
    if unknown:
        raise ValueError(
            f"unknown BN check(s) {', '.join(sorted(unknown))} (known: {', '.join(HEALTH_CHECKS)})"
        )
    only = [c for c in HEALTH_CHECKS if c not in ignore]
    report = validate(model, fail_on=fail_on, only=only, plugins=False)
    failing = report.failing()
    if failing:
        lines = [f"{len(failing)} BatchNormalization problem(s) at or above {fail_on}:"]
        lines += [f"  {f.severity} {f.id} [{f.where}]: {f.message}" for f in failing]
        raise AssertionError("\n".join(lines))


def assert_fold_equivalent(
    model: Any,
    *,
    data: Any = None,
    atol: float | None = None,
    rtol: float | None = None,
    backward: bool = True,
    affine: bool = True,
    shapes: Mapping[str, list[int]] | None = None,
    seed: int = 0,
    expect_folded: int | None = None,
) -> PassResult:
    """Fold the model and assert the folded model gives the original's outputs (ONNX Runtime
    CPU, optimizations off) on DATA, or on the judge's default random data; returns the fold's
    PassResult.

    The rule is `bnsurgery fold`'s and `compare`'s: each output's deviation within 8x the
    original's rounding noise (docs/verification.md). atol/rtol: judge by allclose instead.
    expect_folded: also assert exactly this many BNs were folded.
    """
    from bnsurgery.onnxio import load_model
    from bnsurgery.passes.fold import FoldPass
    from bnsurgery.passes.fold.verify import failure_text, verify_equivalent

    original = load_model(model)
    result = FoldPass(backward=backward, affine=affine)(original)
    report = result.report
    if expect_folded is not None and len(report.folded) != expect_folded:  # type: ignore[attr-defined]
        kept = ", ".join(f"{e.node} ({e.reason})" for e in report.kept)  # type: ignore[attr-defined]
        raise AssertionError(
            f"expected {expect_folded} BN(s) folded, got {len(report.folded)}"  # type: ignore[attr-defined]
            + (f"; kept: {kept}" if kept else "")
        )
    outcome = verify_equivalent(
        original, result.model, data=data, atol=atol, rtol=rtol, shapes=shapes, seed=seed,
        fold_report=report,
    )  # fmt: skip
    report.verification = outcome  # type: ignore[attr-defined]
    if not outcome["ok"]:
        raise AssertionError(
            f"the folded model's outputs differ from the original's: {failure_text(outcome)}"
        )
    return result


__all__ = ["HEALTH_CHECKS", "assert_bn_healthy", "assert_fold_equivalent"]
