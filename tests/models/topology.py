"""Who produces and who consumes: weights, biases and BN parameters shared between nodes,
outputs read twice or exported, activations in between, and BN parameters that come from
Constant nodes or graph inputs instead of initializers."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .build import F32, F64, _const, bn_inits, bn_node, bn_stats, init, make, rng, vi, weight


def shared_weights(c: int = 4) -> onnx.ModelProto:
    """Two Convs read the same W; only conv_a is followed by a BN."""
    r = rng(13)
    inits = [
        init("W", weight(r, [c, 3, 3, 3])),
        init("b", r.normal(0, 0.5, c)),
        *bn_inits("bn", bn_stats(r, c)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W", "b"], ["a_out"], name="conv_a"),
        bn_node("bn", "a_out", "y1"),
        helper.make_node("Conv", ["x", "W", "b"], ["y2"], name="conv_b"),
    ]
    return make(
        nodes,
        [vi("x", [1, 3, 5, 5])],
        [vi("y1", [1, c, 3, 3]), vi("y2", [1, c, 3, 3])],
        inits,
        name="shared",
    )


def conv_two_consumers(c: int = 4) -> onnx.ModelProto:
    """The Conv output feeds the BN and a Relu."""
    r = rng(14)
    inits = [init("W", weight(r, [c, 3, 3, 3])), *bn_inits("bn", bn_stats(r, c))]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["conv_out"], name="conv"),
        bn_node("bn", "conv_out", "y1"),
        helper.make_node("Relu", ["conv_out"], ["y2"], name="relu"),
    ]
    return make(
        nodes,
        [vi("x", [1, 3, 5, 5])],
        [vi("y1", [1, c, 3, 3]), vi("y2", [1, c, 3, 3])],
        inits,
        name="two",
    )


def conv_graph_output(c: int = 4) -> onnx.ModelProto:
    """The Conv output is a graph output and the BN's input."""
    r = rng(15)
    inits = [init("W", weight(r, [c, 3, 3, 3])), *bn_inits("bn", bn_stats(r, c))]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["conv_out"], name="conv"),
        bn_node("bn", "conv_out", "y"),
    ]
    return make(
        nodes,
        [vi("x", [1, 3, 5, 5])],
        [vi("y", [1, c, 3, 3]), vi("conv_out", [1, c, 3, 3])],
        inits,
        name="gout",
    )


def relu_between(c: int = 4) -> onnx.ModelProto:
    """x -> Conv -> Relu -> BN: a nonlinearity separates the BN from the Conv."""
    r = rng(16)
    inits = [init("W", weight(r, [c, 3, 3, 3])), *bn_inits("bn", bn_stats(r, c))]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["conv_out"], name="conv"),
        helper.make_node("Relu", ["conv_out"], ["relu_out"], name="relu"),
        bn_node("bn", "relu_out", "y"),
    ]
    return make(nodes, [vi("x", [1, 3, 5, 5])], [vi("y", [1, c, 3, 3])], inits, name="relu_between")


def bn_relu(c: int = 4) -> onnx.ModelProto:
    """x -> BN -> Relu: no linear op on either side."""
    r = rng(17)
    nodes = [bn_node("bn", "x", "bn_out"), helper.make_node("Relu", ["bn_out"], ["y"], name="relu")]
    return make(
        nodes, [vi("x", [2, c, 3, 3])], [vi("y", [2, c, 3, 3])], bn_inits("bn", bn_stats(r, c))
    )


def conv_bn_relu(c: int = 4) -> onnx.ModelProto:
    """x -> Conv -> BN -> Relu -> y: the BN output name must survive for the Relu."""
    r = rng(18)
    inits = [
        init("W", weight(r, [c, 3, 3, 3])),
        init("b", r.normal(0, 0.5, c)),
        *bn_inits("bn", bn_stats(r, c)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W", "b"], ["conv_out"], name="conv"),
        bn_node("bn", "conv_out", "bn_out"),
        helper.make_node("Relu", ["bn_out"], ["y"], name="relu"),
    ]
    return make(nodes, [vi("x", [1, 3, 5, 5])], [vi("y", [1, c, 3, 3])], inits, name="conv_bn_relu")


def shared_bias(c: int = 4) -> onnx.ModelProto:
    """Two Convs with their own W and one shared bias b; only conv_a is followed by a BN."""
    r = rng(45)
    inits = [
        init("Wa", weight(r, [c, 3, 3, 3])),
        init("Wb", weight(r, [c, 3, 3, 3])),
        init("b", r.normal(0, 0.5, c)),
        *bn_inits("bn", bn_stats(r, c)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "Wa", "b"], ["a_out"], name="conv_a"),
        bn_node("bn", "a_out", "y1"),
        helper.make_node("Conv", ["x", "Wb", "b"], ["y2"], name="conv_b"),
    ]
    return make(
        nodes,
        [vi("x", [1, 3, 5, 5])],
        [vi("y1", [1, c, 3, 3]), vi("y2", [1, c, 3, 3])],
        inits,
        name="shared_bias",
    )


def shared_bn_params(c: int = 4) -> onnx.ModelProto:
    """Two Conv -> BN blocks whose BNs read the same four parameter initializers."""
    r = rng(46)
    inits = [
        init("W1", weight(r, [c, 3, 3, 3])),
        init("W2", weight(r, [c, c, 1, 1])),
        *bn_inits("bn", bn_stats(r, c)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1"),
        bn_node("bn1", "c1", "h", prefix="bn"),
        helper.make_node("Relu", ["h"], ["h_relu"], name="relu"),
        helper.make_node("Conv", ["h_relu", "W2"], ["c2"], name="conv2"),
        bn_node("bn2", "c2", "y", prefix="bn"),
    ]
    return make(nodes, [vi("x", [1, 3, 5, 5])], [vi("y", [1, c, 3, 3])], inits, name="shared_bn")


def params_from_constants(c: int = 4) -> onnx.ModelProto:
    """W from a Constant node; the BN's scale from Cast(Constant fp64), B from value_floats,
    mean from Identity(initializer), var from a Constant: exporter-style constant producers."""
    r = rng(19)
    st = bn_stats(r, c)
    nodes = [
        _const("W", weight(r, [c, 3, 3, 3])),
        _const("scale64", st.scale, F64),
        helper.make_node("Cast", ["scale64"], ["bn.scale"], name="cast_scale", to=F32),
        helper.make_node(
            "Constant",
            [],
            ["bn.B"],
            name="const_B",
            value_floats=st.bias.astype(np.float32).tolist(),
        ),
        helper.make_node("Identity", ["mean_init"], ["bn.mean"], name="identity_mean"),
        _const("bn.var", st.var),
        helper.make_node("Conv", ["x", "W"], ["conv_out"], name="conv"),
        bn_node("bn", "conv_out", "y"),
    ]
    return make(
        nodes,
        [vi("x", [1, 3, 5, 5])],
        [vi("y", [1, c, 3, 3])],
        [init("mean_init", st.mean)],
        name="consts",
    )


def params_graph_inputs(c: int = 4) -> onnx.ModelProto:
    """The BN's scale, B, mean and var are graph inputs: not constant."""
    r = rng(20)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["conv_out"], name="conv"),
        bn_node("bn", "conv_out", "y"),
    ]
    params = [vi(f"bn.{p}", [c]) for p in ("scale", "B", "mean", "var")]
    return make(
        nodes,
        [vi("x", [1, 3, 5, 5]), *params],
        [vi("y", [1, c, 3, 3])],
        [init("W", weight(r, [c, 3, 3, 3]))],
        name="param_inputs",
    )


def params_overridable(c: int = 4) -> onnx.ModelProto:
    """IR >= 4 and the BN's initializers are also graph inputs: a caller may feed other values."""
    r = rng(21)
    st = bn_stats(r, c)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["conv_out"], name="conv"),
        bn_node("bn", "conv_out", "y"),
    ]
    params = [vi(f"bn.{p}", [c]) for p in ("scale", "B", "mean", "var")]
    return make(
        nodes,
        [vi("x", [1, 3, 5, 5]), *params],
        [vi("y", [1, c, 3, 3])],
        [init("W", weight(r, [c, 3, 3, 3])), *bn_inits("bn", st)],
        name="param_overridable",
    )
