"""Per-channel constant Mul/Add/Sub/Div as foldable affines.

An elementwise op with one constant operand that is uniform, or varies only along the channel
axis of the neighbouring Conv/ConvTranspose/Gemm, is the affine y = s*x + t of that op's
channels, and folds like a BN would (forward into the op before it, backward into the op after
it). Div folds only as Div(x, c) with c nowhere zero; Sub(c, x) is the affine -x + c.
"""

from __future__ import annotations

import numpy as np
import onnx

from bnsurgery.model.dtypes import is_float_array
from bnsurgery.passes.fold.context import ScopeContext
from bnsurgery.passes.fold.plan import AFFINE_TARGETS, Refusal, Site


def neighbour(ctx: ScopeContext, node: onnx.NodeProto, forward: bool) -> onnx.NodeProto:
    """The Conv/ConvTranspose/Gemm before (forward) or after the elementwise op."""
    if forward:
        candidates = [ctx.index.producer(n) for n in node.input]
    else:
        candidates = ctx.index.consumers_of(node.output[0])
    for candidate in candidates:
        if candidate is not None and candidate.op_type in AFFINE_TARGETS:
            return candidate
    raise Refusal("no-linear-neighbour")


def elementwise_site(ctx: ScopeContext, node: onnx.NodeProto, target: onnx.NodeProto) -> Site:
    """The per-channel affine of Mul/Add/Sub/Div with one constant operand, if it is one."""
    if len(node.input) != 2:
        raise Refusal("no-linear-neighbour")
    values = [ctx.index.constant(name) for name in node.input]
    if (values[0] is None) == (values[1] is None):
        raise Refusal("not-constant", "needs exactly one constant operand")
    const_pos = 0 if values[0] is not None else 1
    c = values[const_pos]
    if c is None or not is_float_array(c):
        raise Refusal("unsupported-dtype")
    rank = _tensor_rank_at(ctx, target)
    vector = _channel_vector(c.astype(np.float64), rank)
    if vector is None:
        raise Refusal("channel-axis-mismatch", "constant is not per-channel")
    one, zero = np.ones_like(vector), np.zeros_like(vector)
    op = node.op_type
    if op == "Mul":
        s, t = vector, zero
    elif op == "Add":
        s, t = one, vector
    elif op == "Sub":
        s, t = (one, -vector) if const_pos == 1 else (-one, vector)
    elif const_pos == 1 and (vector != 0).all():  # Div(x, c)
        s, t = 1.0 / vector, zero
    else:
        raise Refusal("no-linear-neighbour", "Div by a tensor is not affine")
    x = node.input[1 - const_pos]
    return Site(node, x, node.output[0], s, t)


def _tensor_rank_at(ctx: ScopeContext, node: onnx.NodeProto) -> int:
    """The rank of a linear op's data tensors (its output, and its input for Conv)."""
    if node.op_type in ("Gemm", "MatMul"):
        return 2
    weight = ctx.index.constant(node.input[1]) if len(node.input) > 1 else None
    if weight is None:
        raise Refusal("not-constant", f"{node.op_type} weight is not constant")
    return int(weight.ndim)


def _channel_vector(c: np.ndarray, rank: int) -> np.ndarray | None:
    """The per-channel vector of a constant broadcast against an [N, C, ...] tensor of `rank`.

    Returns a vector of size C, or of size 1 for a uniform constant; None when the constant
    varies along any axis but the channel axis or would change the output's shape.
    """
    if c.ndim > rank:
        return None
    if c.size == 1:
        return c.reshape(1)
    channel_pos = 1 - (rank - c.ndim)  # dims align right
    if channel_pos < 0:
        return None
    if any(d != 1 for i, d in enumerate(c.shape) if i != channel_pos):
        return None
    return c.reshape(-1)
