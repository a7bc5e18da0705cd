"""Folding into Gemm (Y = alpha * A' B' + beta * C).

Forward: the affine scales B's output columns (rows when transB) and shifts C; backward: it
scales B's input rows (columns when transB) and its shift, pushed through B, joins C. beta is
folded into the new C (beta becomes 1). transA=1 reads the BN's channels as rows, so a backward
fold refuses it; a Flatten/Reshape between the BN and the Gemm is followed (walk.input_affine).
"""

from __future__ import annotations

import onnx

from bnsurgery.passes.fold import arithmetic as fm
from bnsurgery.passes.fold.context import ScopeContext
from bnsurgery.passes.fold.plan import Plan, Refusal, Site, attr
from bnsurgery.passes.fold.walk import input_affine


def forward(ctx: ScopeContext, site: Site, gemm: onnx.NodeProto) -> Plan:
    b_mat, c = ctx.weight(gemm, 1), ctx.optional_const(gemm, 2)
    trans_b = bool(attr(gemm, "transB", 0))
    n = b_mat.shape[0 if trans_b else 1] if b_mat.ndim == 2 else -1
    s, t = site.channels(n, f"Gemm '{gemm.name}'")
    beta = float(attr(gemm, "beta", 1.0))
    new_b, new_c = fm.gemm_forward(b_mat, c, s, t, trans_b=trans_b, beta=beta)
    writes = ctx.writes(gemm, (1, new_b, b_mat.dtype, "B"), (2, new_c, b_mat.dtype, "C"))
    return Plan(gemm, writes, attributes={"beta": 1.0})


def backward(
    ctx: ScopeContext, site: Site, gemm: onnx.NodeProto, flatten: onnx.NodeProto | None
) -> Plan:
    b_mat = ctx.weight(gemm, 1)
    if b_mat.ndim != 2:
        raise Refusal("channel-axis-mismatch", "Gemm weight is not 2-D")
    trans_b = bool(attr(gemm, "transB", 0))
    if attr(gemm, "transA", 0):
        raise Refusal("channel-axis-mismatch", "Gemm transA=1 reads BN channels as rows")
    k = b_mat.shape[1 if trans_b else 0]
    s, t = input_affine(ctx, site, gemm, flatten, k)
    alpha, beta = float(attr(gemm, "alpha", 1.0)), float(attr(gemm, "beta", 1.0))
    c = ctx.optional_const(gemm, 2)
    new_b, new_c = fm.gemm_backward(b_mat, c, s, t, trans_b=trans_b, alpha=alpha, beta=beta)
    writes = ctx.writes(gemm, (1, new_b, b_mat.dtype, "B"), (2, new_c, b_mat.dtype, "C"))
    return Plan(gemm, writes, attributes={"beta": 1.0})
