"""Verification fold by fold, for a model whose outputs are NaN or Inf.

A BN with a negative or NaN variance (which fold keeps: `bad-statistics`) makes every output
NaN, so comparing outputs proves nothing about the folds that were made. Each fold is then
judged on the tensor it produces, which keeps its name in the folded model (docs/fold.md): the
BN's output for a forward fold, the consuming op's output for a backward fold. The comparison
is `compare --layerwise`'s (the same matching and the same rounding-noise rule); a fold whose
tensor is non-finite in the original, or that lives in a subgraph, is reported as not
verifiable, with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnx

from bnsurgery.harness.metrics import ratio_text
from bnsurgery.model.sites import bn_label
from bnsurgery.passes.fold.report import FoldReport


def fold_tensor(model: onnx.ModelProto, entry: Any) -> str | None:
    """The main-graph tensor a fold's result is visible in, or None (a fold in a subgraph)."""
    if entry.scope:
        return None
    for node in model.graph.node:
        if node.op_type == "BatchNormalization" and bn_label(node) == entry.node:
            if entry.direction != "backward":
                return node.output[0]
            consumers = [n for n in model.graph.node if node.output[0] in n.input]
            target = next((n for n in consumers if n.name == entry.target), None)
            target = target or (consumers[0] if len(consumers) == 1 else None)
            return target.output[0] if target is not None else None
    return None


def _kept_cause(report: FoldReport) -> str:
    bad = [e.node for e in report.kept if e.reason == "bad-statistics"]
    if bad:
        names = ", ".join(f"'{b}'" for b in bad[:3]) + (" ..." if len(bad) > 3 else "")
        return f"kept BN {names} has bad statistics (bad-statistics)"
    return "the original model itself gives NaN/Inf on this data"


def verify_folds_on_tensors(
    original: onnx.ModelProto,
    report: FoldReport,
    nonfinite_outputs: list[str],
    run_layerwise: Callable[[], Any],
) -> dict[str, Any]:
    """Judge each fold of `report` on its own tensor; run_layerwise() gives the CompareReport
    of `compare --layerwise` on the original and the folded model."""
    compared = run_layerwise()
    layers = {}
    for lw in compared.layerwise:
        layers = {layer.match.reference: layer.metrics for layer in lw.layers}
    folds = []
    for entry in report.folded:
        tensor = fold_tensor(original, entry)
        metrics = layers.get(tensor) if tensor else None
        if tensor is None:
            status, verdict = "unverifiable", "its tensor is not in the main graph"
        elif metrics is None:
            status, verdict = "unverifiable", f"tensor '{tensor}' has no counterpart to compare"
        elif metrics.reference_nan or metrics.reference_inf or not metrics.finite:
            status, verdict = "unverifiable", f"tensor '{tensor}' is NaN/Inf in the original"
        else:
            status = "verified" if metrics.passed else "failed"
            verdict = metrics.verdict()
        folds.append(
            {
                "bn": entry.node,
                "tensor": tensor,
                "status": status,
                "verdict": verdict,
                "ratio": metrics.ratio
                if metrics is not None and status != "unverifiable"
                else None,
            }
        )
    verified = sum(f["status"] == "verified" for f in folds)
    failed = sum(f["status"] == "failed" for f in folds)
    return {
        "ok": failed == 0,
        "why": (
            f"output(s) {', '.join(repr(n) for n in nonfinite_outputs)} are NaN/Inf in the "
            f"original: {_kept_cause(report)}"
        ),
        "verified": verified,
        "failed": failed,
        "unverifiable": len(folds) - verified - failed,
        "folds": folds,
    }


def summary_line(per_fold: dict[str, Any]) -> str:
    """One line: what could and could not be verified, and why."""
    total = len(per_fold["folds"])
    ratios = [f["ratio"] for f in per_fold["folds"] if f["status"] == "verified"]
    worst = f" (deviation up to {ratio_text(max(ratios))} the rounding noise)" if ratios else ""
    text = (
        f"{per_fold['verified']} of {total} folds verified on their own tensors{worst}, since "
        f"{per_fold['why']}"
    )
    if per_fold["failed"]:
        text += f"; {per_fold['failed']} FAILED"
    if per_fold["unverifiable"]:
        unverifiable = [f for f in per_fold["folds"] if f["status"] == "unverifiable"]
        reasons = sorted({_short(f) for f in unverifiable})
        text += f"; {per_fold['unverifiable']} could not be checked ({'; '.join(reasons)})"
    return text


def _short(fold: dict[str, Any]) -> str:
    verdict = str(fold["verdict"])
    return (
        verdict.replace(f"tensor '{fold['tensor']}' ", "its tensor ") if fold["tensor"] else verdict
    )
