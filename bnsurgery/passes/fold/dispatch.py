"""Which rule folds an affine: the op next to it decides.

Forward: the affine's input comes from a Conv, ConvTranspose, Gemm, MatMul (or the bias Add of
one) or another BN, directly or through a chain of layout ops; that op's module computes the
fold. Backward: the affine's output goes to a Conv, Gemm or MatMul, directly or through a
Flatten/Reshape. When neither holds, the refusal says what stands in the way.
"""

from __future__ import annotations

import onnx

from bnsurgery.passes.fold import batchnorm, conv, gemm, matmul
from bnsurgery.passes.fold.context import ScopeContext
from bnsurgery.passes.fold.plan import FLATTENING_OPS, LINEAR_OPS, Plan, Refusal, Site
from bnsurgery.passes.fold.walk import layout_chain, nonlinear_path, site_through


def plan_forward(ctx: ScopeContext, site: Site) -> Plan:
    """Fold the affine into the op that produces its input, or Refusal."""
    chain = layout_chain(ctx, site.x)
    head = ctx.index.producer(chain[0].input[0]) if chain else None
    if head is not None and head.output[0] == chain[0].input[0] and _leads(ctx, head):
        for node in chain:
            ctx.require_single_use(node.output[0], node)
        plan = _forward_into(ctx, site_through(ctx, site, chain, head), head)
        plan.chain = chain
        return plan
    producer = ctx.index.producer(site.x)
    if producer is None or producer.output[0] != site.x:
        raise Refusal("no-linear-neighbour", "its input is not produced by a linear op")
    return _forward_into(ctx, site, producer)


def _forward_into(ctx: ScopeContext, site: Site, producer: onnx.NodeProto) -> Plan:
    op = producer.op_type
    foldable = op in LINEAR_OPS or op == "BatchNormalization" or op == "Add"
    if not foldable:
        between = nonlinear_path(ctx, site.x, upstream=True)
        if between:
            raise Refusal("nonlinear-between", f"{between} between it and a linear op")
        raise Refusal("no-linear-neighbour", f"its input comes from {op}")
    if op == "Add" and not matmul.is_bias_add(ctx, producer):
        raise Refusal("no-linear-neighbour", "its input comes from Add")
    ctx.require_single_use(producer.output[0], producer)
    if op == "Conv":
        return conv.forward(ctx, site, producer)
    if op == "ConvTranspose":
        return conv.transpose_forward(ctx, site, producer)
    if op == "Gemm":
        return gemm.forward(ctx, site, producer)
    if op == "MatMul":
        return matmul.forward(ctx, site, producer, bias_add=None)
    if op == "Add":
        product = matmul.matmul_of_bias_add(ctx, producer)
        ctx.require_single_use(product.output[0], product)
        return matmul.forward(ctx, site, product, bias_add=producer)
    return batchnorm.forward(ctx, site, producer)


def _leads(ctx: ScopeContext, head: onnx.NodeProto) -> bool:
    """An op a layout chain may lead back to: a linear op, a MatMul's bias Add, a BN."""
    if head.domain not in ("", "ai.onnx"):
        return False
    if head.op_type == "Add":
        return matmul.is_bias_add(ctx, head)
    return head.op_type in LINEAR_OPS or head.op_type == "BatchNormalization"


def plan_backward(ctx: ScopeContext, site: Site) -> Plan:
    """Fold the affine into the op that consumes its output, or Refusal."""
    consumer, position = ctx.single_consumer(site.y)
    flatten = None
    if consumer.op_type in FLATTENING_OPS and position == 0:
        flatten = consumer
        consumer, position = ctx.single_consumer(flatten.output[0])
    op = consumer.op_type
    if op not in LINEAR_OPS:
        between = nonlinear_path(ctx, site.y, upstream=False)
        if between:
            raise Refusal("nonlinear-between", f"{between} between it and a linear op")
        raise Refusal("no-linear-neighbour", f"its output goes to {op}")
    if position != 0:
        raise Refusal("no-linear-neighbour", f"it feeds input {position} of {op}, not data")
    if op == "ConvTranspose":
        raise Refusal(
            "no-linear-neighbour", "a backward fold into ConvTranspose is not exact at borders"
        )
    if op == "Conv":
        if flatten is not None:
            raise Refusal("channel-axis-mismatch", "a Conv after a flatten")
        plan = conv.backward(ctx, site, consumer)
    elif op == "Gemm":
        plan = gemm.backward(ctx, site, consumer, flatten)
    else:
        plan = matmul.backward(ctx, site, consumer, flatten)
    plan.rewire = flatten if flatten is not None else consumer
    return plan
