"""Applying a Plan: the staged writes, attributes and rewiring of one fold, and the cleanup
of what the folds of a run left unread.

A rule only computes; nothing here can refuse, so a fold is either applied whole or not at all.
A weight is rewritten in place when the folded node alone reads its initializer; otherwise a
new constant is added beside it (the shared one keeps its value for its other readers).
"""

from __future__ import annotations

import onnx
from onnx import numpy_helper

from bnsurgery.model.edit import add_initializer, drop_dead_constants, replace_tensor_value
from bnsurgery.model.graph import GraphIndex, iter_scopes
from bnsurgery.passes.fold.context import FoldState, ScopeContext
from bnsurgery.passes.fold.plan import Plan, Site, Write, set_float_attr


def apply(ctx: ScopeContext, site: Site, plan: Plan, *, forward: bool) -> None:
    """Apply a plan: write the new constants, remove the affine's node and rewire around it."""
    for write in plan.writes:
        _write_param(ctx, write)
    for name, value in plan.attributes.items():
        set_float_attr(plan.target, name, value)
    if plan.become_gemm:
        plan.target.op_type = "Gemm"
        if ctx.scope.opset < 7:
            plan.target.attribute.append(onnx.helper.make_attribute("broadcast", 1))
    ctx.state.detached.update(n for n in site.node.input if n != site.x)
    ctx.index.remove_node(site.node)
    if forward:
        producer = ctx.index.producer(plan.chain[0].input[0] if plan.chain else site.x)
        assert producer is not None
        _relink(ctx, producer, plan.chain, site.y)
    else:
        assert plan.rewire is not None
        position = list(plan.rewire.input).index(site.y)
        ctx.index.set_input(plan.rewire, position, site.x)


def _relink(
    ctx: ScopeContext, producer: onnx.NodeProto, chain: list[onnx.NodeProto], y: str
) -> None:
    """After a forward fold: Identity nodes of the chain go, the others keep their places
    under new output names (their values have changed), and the last one outputs y."""
    kept = [node for node in chain if node.op_type != "Identity"]
    for node in chain:
        if node.op_type == "Identity":
            ctx.index.remove_node(node)
    names = [ctx.state.names(f"{node.input[0]}_folded") for node in kept] + [y]
    ctx.index.set_output(producer, 0, names[0])
    for i, node in enumerate(kept):
        ctx.index.set_input(node, 0, names[i])
        ctx.index.set_output(node, 0, names[i + 1])


def _write_param(ctx: ScopeContext, write: Write) -> None:
    node, index = write.node, write.index
    while len(node.input) <= index:
        node.input.append("")
    old = node.input[index]
    if old and _owns_initializer(ctx.index, old):
        replace_tensor_value(ctx.index.initializers[old], write.value)
        ctx.index.forget_constant(old)
        ctx.state.rewritten.add(old)
        return
    tensor = numpy_helper.from_array(write.value)
    base = old or f"{node.name or node.op_type}_{write.hint}"
    tensor.name = ctx.state.names(f"{base}_folded")
    _add_constant(ctx, tensor, before=node)
    ctx.index.set_input(node, index, tensor.name)
    if old:
        ctx.state.detached.add(old)


def _owns_initializer(index: GraphIndex, name: str) -> bool:
    return name in index.initializers and index.use_count(name) == 1 and name not in index.inputs


def _add_constant(ctx: ScopeContext, tensor: onnx.TensorProto, before: onnx.NodeProto) -> None:
    """An initializer in a graph; a Constant node in a function, which has no initializers."""
    graph = ctx.scope.graph
    if graph is not None:
        stored = add_initializer(graph, tensor, ir_version=ctx.scope.ir_version)
        ctx.index.initializers[tensor.name] = stored
        if ctx.scope.ir_version < 4:  # listed as a graph input too
            ctx.index.inputs.add(tensor.name)
        return
    constant = onnx.helper.make_node(
        "Constant", [], [tensor.name], name=ctx.state.names(f"{tensor.name}_const"), value=tensor
    )
    nodes = ctx.scope.nodes
    position = next(i for i, n in enumerate(nodes) if n is before)
    nodes.insert(position, constant)
    ctx.index.producers[tensor.name] = (nodes[position], 0)


def cleanup(model: onnx.ModelProto, state: FoldState) -> None:
    """Drop the constants the folds detached once nobody reads them, and stale value_info.

    Inner scopes go first, so an outer constant only a subgraph read is seen as unread.
    Constants the model already carried unread are left alone: that is not this pass's job.
    """
    for scope in reversed(list(iter_scopes(model))):
        drop_dead_constants(GraphIndex(scope), set(state.detached))
        if scope.graph is not None:
            defined = scope.defined_names()
            stale = [
                i
                for i, v in enumerate(scope.graph.value_info)
                if v.name not in defined or v.name in state.rewritten
            ]
            for i in reversed(stale):
                del scope.graph.value_info[i]
