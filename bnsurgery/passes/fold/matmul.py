"""Folding into MatMul with a constant 2-D weight, and its bias Add.

BN normalises axis 1 while MatMul's channels are its last axis, so only 2-D MatMuls fold
(the input's rank is proven by shape inference). A MatMul followed by a constant bias Add is
folded as one op: the weight and the Add's bias are rewritten. A lone MatMul becomes
Gemm(A, B', C'), which gives the shift a place to live.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from bnsurgery.passes.fold import arithmetic as fm
from bnsurgery.passes.fold.context import ScopeContext
from bnsurgery.passes.fold.plan import Plan, Refusal, Site
from bnsurgery.passes.fold.walk import input_affine


def forward(
    ctx: ScopeContext, site: Site, matmul: onnx.NodeProto, bias_add: onnx.NodeProto | None
) -> Plan:
    b_mat = ctx.weight(matmul, 1)
    if b_mat.ndim != 2 or ctx.rank(matmul.input[0]) != 2:
        raise Refusal(
            "channel-axis-mismatch",
            "BN normalises axis 1 but MatMul's channels are its last axis; folds only 2-D",
        )
    s, t = site.channels(b_mat.shape[1], f"MatMul '{matmul.name}'")
    return _rewrite(ctx, matmul, bias_add, b_mat, s, t, fm.matmul_forward, on_add=True)


def backward(
    ctx: ScopeContext, site: Site, matmul: onnx.NodeProto, flatten: onnx.NodeProto | None
) -> Plan:
    b_mat = ctx.weight(matmul, 1)
    if b_mat.ndim != 2:
        raise Refusal("channel-axis-mismatch", "MatMul weight is not 2-D")
    k = b_mat.shape[0]
    if flatten is None and ctx.rank(matmul.input[0]) != 2:
        raise Refusal("channel-axis-mismatch", "MatMul input is not proven 2-D")
    s, t = input_affine(ctx, site, matmul, flatten, k)
    bias_add = _bias_add_after(ctx, matmul)
    return _rewrite(ctx, matmul, bias_add, b_mat, s, t, fm.matmul_backward, on_add=False)


def _rewrite(
    ctx: ScopeContext,
    matmul: onnx.NodeProto,
    bias_add: onnx.NodeProto | None,
    b_mat: np.ndarray,
    s: np.ndarray,
    t: np.ndarray,
    arithmetic: Callable[..., tuple[np.ndarray, np.ndarray]],
    on_add: bool,
) -> Plan:
    """Both directions' writes: the weight, and the shift into the bias Add's constant, or,
    with no Add, into C of the Gemm the MatMul becomes. `on_add`: the plan is attached to the
    Add (forward: the BN sat after it) rather than to the MatMul."""
    if bias_add is None:
        new_b, shift = arithmetic(b_mat, None, s, t)
        writes = ctx.writes(matmul, (1, new_b, b_mat.dtype, "B"), (2, shift, b_mat.dtype, "C"))
        return Plan(matmul, writes, become_gemm=True)
    bias_index = 1 if bias_add.input[0] == matmul.output[0] else 0
    bias = ctx.index.constant(bias_add.input[bias_index])
    assert bias is not None  # is_bias_add and _bias_add_after checked it
    new_b, new_bias = arithmetic(b_mat, bias, s, t)
    writes = ctx.writes(matmul, (1, new_b, b_mat.dtype, "B"))
    writes += ctx.writes(bias_add, (bias_index, new_bias, bias.dtype, "bias"))
    return Plan(bias_add if on_add else matmul, writes)


def is_bias_add(ctx: ScopeContext, add: onnx.NodeProto) -> bool:
    try:
        matmul_of_bias_add(ctx, add)
    except Refusal:
        return False
    return True


def matmul_of_bias_add(ctx: ScopeContext, add: onnx.NodeProto) -> onnx.NodeProto:
    """The MatMul whose output `add` adds a constant row vector to, or Refusal."""
    for i, name in enumerate(add.input[:2]):
        producer = ctx.index.producer(name)
        other = add.input[1 - i] if len(add.input) == 2 else ""
        if producer is not None and producer.op_type == "MatMul" and other:
            bias = ctx.index.constant(other)
            if bias is not None and bias.ndim <= 2 and (bias.ndim < 2 or bias.shape[0] == 1):
                return producer
    raise Refusal("no-linear-neighbour", "Add is not a MatMul bias")


def _bias_add_after(ctx: ScopeContext, matmul: onnx.NodeProto) -> onnx.NodeProto | None:
    name = matmul.output[0]
    users = ctx.index.consumers_of(name)
    if ctx.index.is_graph_output(name) or len(users) != 1 or users[0].op_type != "Add":
        return None
    return users[0] if is_bias_add(ctx, users[0]) else None
