"""Checks built on the fold pass's dry run: what fold would do, fp16 range, and verification.

All three reuse one in-memory FoldPass result (ValidationContext.fold): its report gives every
BN's reason code, its model gives the exact folded weights, and the harness runs it against the
original on CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx

from bnsurgery.errors import BadInputError
from bnsurgery.model.dtypes import dtype_max
from bnsurgery.model.graph import GraphIndex, iter_scopes
from bnsurgery.passes.fold.report import FOLDED, BnDecision, dry_run_words
from bnsurgery.validation.checks import Finding, Skip, check
from bnsurgery.validation.checks.context import ValidationContext

FP16_MAX = dtype_max(np.dtype(np.float16))  # 65504

KEPT_HINTS = {
    "training-mode": "export in eval mode (see bn-training-mode); then it folds",
    "bad-statistics": "fix the statistics (see bn-nonfinite-params / bn-negative-variance)",
    "not-constant": "export the BN parameters as initializers, not graph inputs",
    "per-activation-stats": "re-export with opset >= 9 (per-channel BatchNormalization)",
    "overflow": "the folded values do not fit the stored dtype (see bn-fp16-overflow-risk)",
    "unsupported-dtype": "nothing to do: integer (quantized) weights are not folded",
}
KEPT_DEFAULT_HINT = (
    "nothing to do: the BN stays an op at run time (docs/fold.md explains the reason code)"
)


def _entry_where(entry: BnDecision) -> dict[str, Any]:
    return {"node": entry.node, "scope": entry.scope}


@check(
    "bn-not-folded",
    "info",
    "every BN fold would remove (a dry run of bnsurgery fold), and why the others stay",
    "fold before deployment: bnsurgery fold MODEL (ONNX Runtime fuses Conv+BN itself, but not "
    "Gemm+BN nor backward folds)",
)
def not_folded(ctx: ValidationContext) -> Iterator[Finding]:
    for entry in ctx.fold().report.entries:  # type: ignore[attr-defined]
        details = {  # the fold report's own fields, as `bnsurgery info --json` gives them
            "reason": entry.reason,
            "action": entry.action,
            "direction": entry.direction,
            "target": entry.target,
            "target_op": entry.target_op,
            "detail": entry.detail,
        }
        hint = None if entry.action == "folded" else KEPT_HINTS.get(entry.reason, KEPT_DEFAULT_HINT)
        yield not_folded.finding(
            dry_run_words(entry), **_entry_where(entry), hint=hint, details=details
        )


# -- fp16 range of the folded weights --------------------------------------------------------


def _indexes(model: onnx.ModelProto) -> dict[str, GraphIndex]:
    by_path: dict[str, GraphIndex] = {}
    built: dict[int, GraphIndex] = {}
    for scope in iter_scopes(model):
        parent = built.get(id(scope.parent)) if scope.parent is not None else None
        built[id(scope)] = by_path[scope.path] = GraphIndex(scope, parent)
    return by_path


def _node(index: GraphIndex, name: str, *, by_output: bool) -> onnx.NodeProto | None:
    for node in index.scope.nodes:
        if node.name == name or (by_output and not node.name and name in node.output):
            return node
    return None


def _weights(index: GraphIndex, node: onnx.NodeProto) -> dict[str, np.ndarray]:
    """The float constants a folded target computes with: its own constant inputs, and for a
    MatMul + Add bias pair the partner's."""
    nodes = [node]
    if node.op_type == "Add":
        nodes += [p for p in (index.producer(n) for n in node.input) if p and p.op_type == "MatMul"]
    elif node.op_type == "MatMul":
        nodes += [c for c in index.consumers_of(node.output[0]) if c.op_type == "Add"]
    found: dict[str, np.ndarray] = {}
    for n in nodes:
        for name in n.input:
            value = index.constant(name) if name else None
            if value is not None and value.dtype.kind == "f":
                found[name] = value
    return found


def _peak(values: dict[str, np.ndarray]) -> tuple[str, float]:
    best = ("", 0.0)
    for name, value in values.items():
        if value.size:
            peak = float(np.max(np.abs(value.astype(np.float64))))
            if peak > best[1] or not np.isfinite(peak):
                best = (name, peak)
    return best


@check(
    "bn-fp16-overflow-risk",
    "warning",
    "folding a BN keeps every weight and bias within float16's range (|s*W| <= 65504)",
    "keep this layer in float32 when converting to float16, or fix the channel with the huge "
    "scale gamma/sqrt(var+eps) (often a dead channel); bnsurgery fold on the float16 model "
    "refuses it with reason 'overflow'",
)
def fp16_overflow_risk(ctx: ValidationContext) -> Iterator[Finding]:
    result = ctx.fold()
    folded = _indexes(result.model)
    original = {index.scope.path: index for index in ctx.indexes}
    for entry in result.report.entries:  # type: ignore[attr-defined]
        where = _entry_where(entry)
        if entry.reason == "overflow":
            yield fp16_overflow_risk.finding(
                f"fold refuses it: {entry.detail} (values beyond the stored dtype's range)",
                **where,
                details={"reason": entry.reason, "detail": entry.detail},
            )
            continue
        if entry.reason not in FOLDED or entry.target is None or entry.scope not in folded:
            continue
        index = folded[entry.scope]
        target = _node(index, entry.target, by_output=True)
        if target is None:
            continue
        tensor, peak = _peak(_weights(index, target))
        if not peak > FP16_MAX:
            continue
        before = _node(original[entry.scope], entry.target, by_output=False)
        _, original_peak = _peak(_weights(original[entry.scope], before)) if before else ("", 0)
        if before is not None and original_peak > FP16_MAX:
            continue  # the weights were out of fp16 range before any fold: not this BN's doing
        yield fp16_overflow_risk.finding(
            f"folding it into {entry.target} ({entry.target_op}) gives values up to {peak:.3g} "
            f"(in '{tensor}'), beyond float16's {FP16_MAX:g}: a float16 conversion of the "
            "folded model would turn them into inf",
            **where,
            details={
                "target": entry.target,
                "target_op": entry.target_op,
                "tensor": tensor,
                "max_abs": peak,
                "max_abs_before_fold": original_peak if before is not None else None,
                "float16_max": FP16_MAX,
            },
        )


# -- verification ----------------------------------------------------------------------------


@check(
    "fold-verification",
    "error",
    "the model folded in memory gives the original's outputs on CPU (ORT_DISABLE_ALL)",
    "if provider-parity fails the same way, the unfused graph is ill-conditioned (a large "
    "offset the BN cancels); otherwise do not deploy this fold: bnsurgery fold --json and "
    "--no-backward / --no-affine narrow it down",
    runs_model=True,
)
def fold_verification(ctx: ValidationContext) -> Iterator[Finding]:
    from bnsurgery.passes.fold.verify import verify_equivalent

    ctx.require_runnable()
    result = ctx.fold()
    if not result.modified:
        raise Skip("nothing to fold")
    try:
        outcome = verify_equivalent(
            ctx.model, result.model, data=ctx.data_source(), shapes=ctx.shapes, seed=ctx.seed,
            fold_report=result.report,
        )  # fmt: skip
    except BadInputError as exc:  # no engine runs it, or ONNX Runtime crashed: say so
        raise Skip(f"the model could not be run ({exc})") from None
    ctx.details["fold-verification"] = outcome
    for name, errors in outcome["outputs"].items():
        if not errors["passed"]:
            yield fold_verification.finding(
                f"the folded model's output '{name}' differs from the original: "
                f"{errors['verdict']}; max abs error {errors['max_abs']:.3g}, max rel error "
                f"{errors['max_rel']:.3g} ({'; '.join(outcome['engines'])})",
                details={"output": errors},
            )
    for fold in (outcome.get("per_fold") or {}).get("folds", []):
        if fold["status"] == "failed":
            yield fold_verification.finding(
                f"the fold of '{fold['bn']}' changes its tensor '{fold['tensor']}': "
                f"{fold['verdict']}",
                details={"fold": fold},
            )
