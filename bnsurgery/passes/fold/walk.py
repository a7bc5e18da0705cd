"""The paths between an affine and the linear op it folds into.

Forward, a chain of Identity/Reshape/Transpose/Flatten may stand between the linear op and the
BN: `layout_chain` finds it and `site_through` re-expresses the BN's affine per channel of the
linear op (layout.channel_map proves each channel lands on one BN channel). Backward, a
Flatten or Reshape may stand between the BN and a Gemm/MatMul: `input_affine` expands the
per-channel affine to the features, once `require_channel_major_flatten` has proven the
layout. `nonlinear_path` names the nonlinearity that makes a refusal `nonlinear-between`.
"""

from __future__ import annotations

import numpy as np
import onnx

from bnsurgery.passes.fold import arithmetic as fm
from bnsurgery.passes.fold.context import ScopeContext
from bnsurgery.passes.fold.layout import LAYOUT_OPS, LayoutError, LayoutStep, channel_map
from bnsurgery.passes.fold.plan import AFFINE_OPS, LINEAR_OPS, NONLINEAR_OPS, Refusal, Site, attr

MAX_CHAIN = 8  # layout ops followed between a BN and its linear op


def layout_chain(ctx: ScopeContext, name: str) -> list[onnx.NodeProto]:
    """The Identity/Reshape/Transpose/Flatten nodes right above `name`, upstream first."""
    chain: list[onnx.NodeProto] = []
    node = ctx.index.producer(name)
    while (
        node is not None
        and node.op_type in LAYOUT_OPS
        and node.domain in ("", "ai.onnx")
        and node.output[0] == name
        and node.input
        and len(chain) < MAX_CHAIN
    ):
        chain.insert(0, node)
        name = node.input[0]
        node = ctx.index.producer(name)
    return chain


def site_through(
    ctx: ScopeContext, site: Site, chain: list[onnx.NodeProto], head: onnx.NodeProto
) -> Site:
    """The BN's affine as seen at the head's output: its vectors gathered per head channel
    (channel_map proves each head channel lands on one BN channel)."""
    source = chain[0].input[0]
    if all(node.op_type == "Identity" for node in chain):
        return Site(site.node, source, site.y, site.s, site.t)
    shape = ctx.shape(source)
    ops = " -> ".join(node.op_type for node in chain)
    last_axis = head.op_type in ("MatMul", "Add")  # MatMul's channels are its last axis
    axis = (len(shape) - 1 if last_axis else 1) if shape else 0
    try:
        steps = [_layout_step(ctx, node) for node in chain]
        mapping = channel_map(steps, shape or (), axis, site.s.size)
    except LayoutError as exc:
        raise Refusal("channel-axis-mismatch", f"through {ops}: {exc}") from None
    return Site(site.node, source, site.y, site.s[mapping], site.t[mapping])


def _layout_step(ctx: ScopeContext, node: onnx.NodeProto) -> LayoutStep:
    op = node.op_type
    if op == "Transpose":
        perm = attr(node, "perm", None)
        return LayoutStep(op, perm=tuple(int(p) for p in perm) if perm else None)
    if op == "Flatten":
        return LayoutStep(op, axis=int(attr(node, "axis", 1)))
    if op == "Reshape":
        target = ctx.index.constant(node.input[1]) if len(node.input) > 1 else None
        if target is None and len(node.input) == 1:  # Reshape-1: the shape is an attribute
            target = attr(node, "shape", None)
        if target is None:
            raise LayoutError("the Reshape target is not a constant")
        dims = tuple(int(d) for d in np.ravel(target))
        return LayoutStep(op, target=dims, allowzero=bool(attr(node, "allowzero", 0)))
    return LayoutStep(op)


def nonlinear_path(ctx: ScopeContext, name: str, *, upstream: bool) -> str:
    """The ops between a BN and the nearest linear op on a single path, when one of them is
    a nonlinearity ("Mul -> Add -> Relu"); "" when there is no such path. Per-channel
    constant Mul/Add/Sub/Div, layout ops and other BNs may stand on the path too."""
    ops: list[str] = []
    nonlinear = False
    for _ in range(16):
        if upstream:
            node = ctx.index.producer(name)
        else:
            users = ctx.index.consumers_of(name)
            single = len(users) == 1 and not ctx.index.is_graph_output(name)
            node = users[0] if single else None
        if node is None:
            return ""
        if node.op_type in LINEAR_OPS:
            return " -> ".join(reversed(ops) if upstream else ops) if nonlinear else ""
        data = _data_input(ctx, node)
        if data is None:
            return ""
        nonlinear |= node.op_type in NONLINEAR_OPS
        ops.append(node.op_type)
        name = data if upstream else node.output[0]
    return ""


def _data_input(ctx: ScopeContext, node: onnx.NodeProto) -> str | None:
    """The one input a path through `node` follows, or None if the path cannot pass."""
    op = node.op_type
    if op in NONLINEAR_OPS or op in LAYOUT_OPS or op == "BatchNormalization":
        return node.input[0] if node.input else None
    if op in AFFINE_OPS and len(node.input) == 2:
        constant = [ctx.index.constant(n) is not None for n in node.input]
        if constant.count(True) == 1:
            return node.input[constant.index(False)]
    return None


def input_affine(
    ctx: ScopeContext, site: Site, node: onnx.NodeProto, flatten: onnx.NodeProto | None, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) per input feature of a Gemm/MatMul reading k features, through `flatten` if any."""
    if flatten is None:
        return site.channels(k, f"{node.op_type} '{node.name}'")
    channels = site.s.size
    require_channel_major_flatten(ctx, flatten, k, channels, site.x)
    if channels > 1:
        return fm.expand_to_features(site.s, site.t, k)
    return site.channels(k, "flatten")


def require_channel_major_flatten(
    ctx: ScopeContext, node: onnx.NodeProto, features: int, channels: int, source: str
) -> None:
    """Flatten(axis=1), or a Reshape proven to give one row per sample ([N, C*HW]): then
    feature f belongs to channel f // HW. A Reshape whose rows mix samples is refused."""
    if features % channels:
        raise Refusal("channel-axis-mismatch", f"{features} features for {channels} channels")
    if node.op_type == "Flatten":
        if int(attr(node, "axis", 1)) != 1:
            raise Refusal("channel-axis-mismatch", "Flatten axis is not 1")
        return
    shape = ctx.index.constant(node.input[1]) if len(node.input) > 1 else None
    if shape is None or shape.ndim != 1 or shape.size != 2:
        raise Refusal("channel-axis-mismatch", "Reshape target is not a constant 2-D shape")
    rows, cols = (int(v) for v in shape)
    if int(attr(node, "allowzero", 0)) and 0 in (rows, cols):
        raise Refusal("channel-axis-mismatch", "Reshape with allowzero")
    if cols not in (-1, features):
        raise Refusal("channel-axis-mismatch", f"Reshape to {[rows, cols]}")
    if rows == 0:  # copies the batch axis: one row per sample
        return
    source_shape = ctx.shape(source)
    if rows == -1 and cols == features and source_shape is not None:
        per_sample = source_shape[1:]
        if all(d is not None for d in per_sample) and int(np.prod(per_sample)) == features:
            return
    if rows > 0 and source_shape is not None and source_shape and source_shape[0] == rows:
        return
    raise Refusal(
        "channel-axis-mismatch",
        f"Reshape to {[rows, cols]} is not proven to keep one row per sample",
    )
