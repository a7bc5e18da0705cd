"""BNs in nested scopes: If branches, Loop and Scan bodies, model-local functions, and
subgraphs that share a weight or read an outer Conv's output."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .build import BOOL, I64, _const, bn_inits, bn_node, bn_stats, init, make, rng, vi, weight


def _branch(tag: str, r: np.random.Generator, c: int, local: bool) -> tuple[onnx.GraphProto, list]:
    """A Conv -> BN subgraph reading outer x. Weights are local initializers or outer names."""
    prefix = f"{tag}_"
    tensors = [
        init(f"{prefix}W", weight(r, [c, 3, 3, 3])),
        *bn_inits(f"{prefix}bn", bn_stats(r, c)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", f"{prefix}W"], [f"{prefix}conv_out"], name=f"{prefix}conv"),
        bn_node(f"{prefix}bn", f"{prefix}conv_out", f"{prefix}y"),
    ]
    graph = helper.make_graph(
        nodes, f"{tag}_branch", [], [vi(f"{prefix}y", [1, c, 3, 3])], tensors if local else []
    )
    return graph, [] if local else tensors


def if_bn(c: int = 4) -> onnx.ModelProto:
    """If(cond) with Conv -> BN in both branches; then_branch holds its weights, else_branch
    reads them from the main graph's initializers (outer scope)."""
    r = rng(31)
    then_g, _ = _branch("then", r, c, local=True)
    else_g, outer = _branch("else", r, c, local=False)
    node = helper.make_node(
        "If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g
    )
    return make(
        [node],
        [vi("cond", [], BOOL), vi("x", [1, 3, 5, 5])],
        [vi("y", [1, c, 3, 3])],
        outer,
        name="if_bn",
    )


def loop_bn(c: int = 4, trips: int = 3) -> onnx.ModelProto:
    """Loop body: x -> Conv(3x3, pad 1) -> BN -> Relu, carried for `trips` iterations."""
    r = rng(32)
    inits = [
        init("W", weight(r, [c, c, 3, 3]) * 0.7),
        *bn_inits("bn", bn_stats(r, c)),
        numpy_helper.from_array(np.array(trips, dtype=np.int64), "trips"),
        numpy_helper.from_array(np.array(True), "keep_going"),
    ]
    body_nodes = [
        helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
        helper.make_node("Conv", ["x_in", "W"], ["conv_out"], name="body_conv", pads=[1, 1, 1, 1]),
        bn_node("body_bn", "conv_out", "bn_out", prefix="bn"),
        helper.make_node("Relu", ["bn_out"], ["x_out"], name="body_relu"),
    ]
    body = helper.make_graph(
        body_nodes,
        "body",
        [vi("i", [], I64), vi("cond_in", [], BOOL), vi("x_in", [1, c, 4, 4])],
        [vi("cond_out", [], BOOL), vi("x_out", [1, c, 4, 4])],
    )
    loop = helper.make_node("Loop", ["trips", "keep_going", "x"], ["y"], name="loop", body=body)
    return make([loop], [vi("x", [1, c, 4, 4])], [vi("y", [1, c, 4, 4])], inits, name="loop_bn")


def scan_bn(c: int = 4, steps: int = 3) -> onnx.ModelProto:
    """Scan over axis 0 of x[T, 1, C, 4, 4]; the body runs Conv -> BN on each step."""
    r = rng(51)
    inits = [init("W", weight(r, [c, c, 3, 3])), *bn_inits("bn", bn_stats(r, c))]
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["s_in"], ["s_out"], name="scan_state"),
            helper.make_node("Conv", ["x_t", "W"], ["conv_out"], name="scan_conv", pads=[1] * 4),
            bn_node("scan_bn", "conv_out", "y_t", prefix="bn"),
        ],
        "scan_body",
        [vi("s_in", [1]), vi("x_t", [1, c, 4, 4])],
        [vi("s_out", [1]), vi("y_t", [1, c, 4, 4])],
    )
    scan = helper.make_node(
        "Scan", ["s0", "x"], ["s_final", "y"], name="scan", body=body, num_scan_inputs=1
    )
    inits.append(init("s0", np.zeros(1)))
    return make(
        [scan],
        [vi("x", [steps, 1, c, 4, 4])],
        [vi("y", [steps, 1, c, 4, 4]), vi("s_final", [1])],
        inits,
        name="scan_bn",
    )


def function_bn(c: int = 4, constant_params: bool = True) -> onnx.ModelProto:
    """A model-local function custom::ConvBn (Conv -> BN), called twice from the main graph.

    With constant_params, W and the BN parameters are Constant nodes inside the function; else
    the BN parameters are function inputs (not constant inside the function)."""
    r = rng(33)
    w = weight(r, [c, c, 1, 1])
    st = bn_stats(r, c)
    f_nodes = [_const("W", w)]
    f_inputs = ["X"]
    if constant_params:
        f_nodes += [
            _const("bn.scale", st.scale),
            _const("bn.B", st.bias),
            _const("bn.mean", st.mean),
            _const("bn.var", st.var),
        ]
    else:
        f_inputs += ["bn.scale", "bn.B", "bn.mean", "bn.var"]
    f_nodes += [
        helper.make_node("Conv", ["X", "W"], ["conv_out"], name="conv"),
        bn_node("bn", "conv_out", "Y"),
    ]
    func = helper.make_function(
        "custom", "ConvBn", f_inputs, ["Y"], f_nodes, [helper.make_opsetid("", 13)]
    )
    extra = [] if constant_params else ["bn.scale", "bn.B", "bn.mean", "bn.var"]
    main_inits = [] if constant_params else bn_inits("bn", st)
    nodes = [
        helper.make_node("ConvBn", ["x", *extra], ["h"], name="block1", domain="custom"),
        helper.make_node("Relu", ["h"], ["h_relu"], name="relu"),
        helper.make_node("ConvBn", ["h_relu", *extra], ["y"], name="block2", domain="custom"),
    ]
    return make(
        nodes,
        [vi("x", [1, c, 3, 3])],
        [vi("y", [1, c, 3, 3])],
        main_inits,
        functions=[func],
        extra_opsets=[("custom", 1)],
        name="function_bn",
    )


def weight_shared_with_subgraph(c: int = 4) -> onnx.ModelProto:
    """Main graph: Conv(W) -> BN -> y1; an If branch also runs Conv(W) on x (no BN)."""
    r = rng(41)
    inits = [init("W", weight(r, [c, 3, 3, 3])), *bn_inits("bn", bn_stats(r, c))]
    branch_nodes = [helper.make_node("Conv", ["x", "W"], ["b_out"], name="branch_conv")]
    then_g = helper.make_graph(branch_nodes, "then", [], [vi("b_out", [1, c, 3, 3])])
    else_nodes = [helper.make_node("Relu", ["conv_in_else"], ["e_out"], name="else_relu")]
    else_g = helper.make_graph(else_nodes, "else", [], [vi("e_out", [1, c, 3, 3])])
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["conv_out"], name="conv"),
        bn_node("bn", "conv_out", "y1"),
        helper.make_node("Identity", ["y1"], ["conv_in_else"], name="id"),
        helper.make_node("If", ["cond"], ["y2"], name="if", then_branch=then_g, else_branch=else_g),
    ]
    return make(
        nodes,
        [vi("cond", [], BOOL), vi("x", [1, 3, 5, 5])],
        [vi("y1", [1, c, 3, 3]), vi("y2", [1, c, 3, 3])],
        inits,
        name="shared_subgraph",
    )


def conv_out_read_by_subgraph(c: int = 4) -> onnx.ModelProto:
    """Conv -> BN -> y1, and an If branch reads the Conv output too (an implicit consumer)."""
    r = rng(42)
    inits = [init("W", weight(r, [c, 3, 3, 3])), *bn_inits("bn", bn_stats(r, c))]
    then_g = helper.make_graph(
        [helper.make_node("Relu", ["conv_out"], ["t_out"], name="then_relu")],
        "then",
        [],
        [vi("t_out", [1, c, 3, 3])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Neg", ["conv_out"], ["e_out"], name="else_neg")],
        "else",
        [],
        [vi("e_out", [1, c, 3, 3])],
    )
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["conv_out"], name="conv"),
        bn_node("bn", "conv_out", "y1"),
        helper.make_node("If", ["cond"], ["y2"], name="if", then_branch=then_g, else_branch=else_g),
    ]
    return make(
        nodes,
        [vi("cond", [], BOOL), vi("x", [1, 3, 5, 5])],
        [vi("y1", [1, c, 3, 3]), vi("y2", [1, c, 3, 3])],
        inits,
        name="read_by_subgraph",
    )


def bn_in_branch_after_outer_conv(c: int = 4) -> onnx.ModelProto:
    """Main-graph Conv; the then-branch applies a BN to its output, the else-branch does not."""
    r = rng(43)
    inits = [init("W", weight(r, [c, 3, 3, 3])), *bn_inits("bn", bn_stats(r, c))]
    then_g = helper.make_graph(
        [bn_node("bn", "conv_out", "t_out")], "then", [], [vi("t_out", [1, c, 3, 3])]
    )
    else_g = helper.make_graph(
        [helper.make_node("Identity", ["conv_out"], ["e_out"], name="else_id")],
        "else",
        [],
        [vi("e_out", [1, c, 3, 3])],
    )
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["conv_out"], name="conv"),
        helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g),
    ]
    return make(
        nodes, [vi("cond", [], BOOL), vi("x", [1, 3, 5, 5])], [vi("y", [1, c, 3, 3])], inits
    )
