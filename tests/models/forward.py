"""Forward fold patterns: a linear op (Conv, ConvTranspose, Gemm, MatMul) followed by a BN,
chains of BNs, and a linear op followed by per-channel Mul/Add/Sub/Div constants."""

from __future__ import annotations

from collections.abc import Sequence

import onnx
from onnx import helper

from .build import (
    F32,
    Stats,
    bn_inits,
    bn_node,
    bn_stats,
    conv_out_size,
    init,
    make,
    rng,
    vi,
    weight,
)


def conv_bn(
    dims: int = 2,
    *,
    bias: bool = True,
    group: int = 1,
    cin: int = 4,
    cout: int = 6,
    k: int = 3,
    stride: int = 1,
    pad: int = 1,
    dilation: int = 1,
    size: int = 7,
    dtype: int = F32,
    opset: int = 13,
    eps: float | None = None,
    stats: Stats | None = None,
    seed: int = 0,
) -> onnx.ModelProto:
    """x -> Conv (any rank, group, bias or not) -> BN -> y."""
    r = rng(seed)
    w = weight(r, [cout, cin // group] + [k] * dims)
    st = stats or bn_stats(r, cout)
    inits = [init("W", w, dtype), *bn_inits("bn", st, dtype)]
    conv_inputs = ["x", "W"]
    if bias:
        inits.append(init("b", r.normal(0, 0.5, cout), dtype))
        conv_inputs.append("b")
    conv = helper.make_node(
        "Conv",
        conv_inputs,
        ["conv_out"],
        name="conv",
        group=group,
        kernel_shape=[k] * dims,
        strides=[stride] * dims,
        pads=[pad] * (2 * dims),
        dilations=[dilation] * dims,
    )
    attrs = {} if eps is None else {"epsilon": eps}
    bn = bn_node("bn", "conv_out", "y", **attrs)
    out = conv_out_size(size, k, stride, pad, dilation)
    return make(
        [conv, bn],
        [vi("x", [2, cin] + [size] * dims, dtype)],
        [vi("y", [2, cout] + [out] * dims, dtype)],
        inits,
        opset=opset,
        name="conv_bn",
    )


def depthwise_conv_bn(channels: int = 6, dims: int = 2) -> onnx.ModelProto:
    return conv_bn(dims, group=channels, cin=channels, cout=channels)


def conv_transpose_bn(
    dims: int = 2,
    *,
    bias: bool = True,
    group: int = 1,
    cin: int = 4,
    cout: int = 6,
    k: int = 3,
    stride: int = 2,
    size: int = 4,
    seed: int = 1,
) -> onnx.ModelProto:
    """x -> ConvTranspose (W is [Cin, Cout/g, k...]) -> BN -> y."""
    r = rng(seed)
    w = weight(r, [cin, cout // group] + [k] * dims)
    inits = [init("W", w), *bn_inits("bn", bn_stats(r, cout))]
    inputs = ["x", "W"]
    if bias:
        inits.append(init("b", r.normal(0, 0.5, cout)))
        inputs.append("b")
    convt = helper.make_node(
        "ConvTranspose",
        inputs,
        ["convt_out"],
        name="convt",
        group=group,
        kernel_shape=[k] * dims,
        strides=[stride] * dims,
    )
    out = (size - 1) * stride + k
    return make(
        [convt, bn_node("bn", "convt_out", "y")],
        [vi("x", [2, cin] + [size] * dims)],
        [vi("y", [2, cout] + [out] * dims)],
        inits,
        name="conv_transpose_bn",
    )


def gemm_bn(
    *,
    trans_a: int = 0,
    trans_b: int = 0,
    alpha: float = 1.0,
    beta: float = 1.0,
    c_shape: str | None = "N",
    m: int = 3,
    k: int = 5,
    n: int = 6,
    seed: int = 2,
) -> onnx.ModelProto:
    """a -> Gemm(alpha, beta, transA, transB, C of shape [N], [1,N], scalar or none) -> BN -> y."""
    r = rng(seed)
    b = weight(r, [n, k] if trans_b else [k, n], fan_in=k)
    inits = [init("B", b), *bn_inits("bn", bn_stats(r, n))]
    inputs = ["a", "B"]
    if c_shape is not None:
        shape = {"N": (n,), "1N": (1, n), "scalar": (), "MN": (m, n)}[c_shape]
        inits.append(init("C", r.normal(0, 0.5, shape)))
        inputs.append("C")
    attrs = {"alpha": alpha, "beta": beta, "transA": trans_a, "transB": trans_b}
    gemm = helper.make_node("Gemm", inputs, ["gemm_out"], name="gemm", **attrs)
    return make(
        [gemm, bn_node("bn", "gemm_out", "y")],
        [vi("a", [k, m] if trans_a else [m, k])],
        [vi("y", [m, n])],
        inits,
        name="gemm_bn",
    )


def matmul_bn(*, add_bias: bool = False, m: int = 3, k: int = 5, n: int = 6) -> onnx.ModelProto:
    """a[M,K] -> MatMul W[K,N] (-> Add const [N]) -> BN over N -> y."""
    r = rng(3)
    inits = [init("W", weight(r, [k, n], fan_in=k)), *bn_inits("bn", bn_stats(r, n))]
    nodes = [helper.make_node("MatMul", ["a", "W"], ["mm_out"], name="matmul")]
    bn_in = "mm_out"
    if add_bias:
        inits.append(init("bias", r.normal(0, 0.5, n)))
        nodes.append(helper.make_node("Add", ["mm_out", "bias"], ["add_out"], name="add"))
        bn_in = "add_out"
    nodes.append(bn_node("bn", bn_in, "y"))
    return make(nodes, [vi("a", [m, k])], [vi("y", [m, n])], inits, name="matmul_bn")


def matmul_3d_bn(b: int = 2, t: int = 4, f: int = 5, n: int = 6) -> onnx.ModelProto:
    """x[B,T,F] -> MatMul W[F,N] -> BN: the BN channel axis is T, not the MatMul's N axis."""
    r = rng(4)
    inits = [init("W", weight(r, [f, n], fan_in=f)), *bn_inits("bn", bn_stats(r, t))]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["mm_out"], name="matmul"),
        bn_node("bn", "mm_out", "y"),
    ]
    return make(nodes, [vi("x", [b, t, f])], [vi("y", [b, t, n])], inits, name="matmul_3d_bn")


def matmul_add_full_bias_bn(m_: int = 3, k: int = 5, n: int = 6) -> onnx.ModelProto:
    """a[M,K] -> MatMul -> Add(constant [M, N], not a per-feature bias) -> BN."""
    r = rng(49)
    inits = [
        init("W", weight(r, [k, n], fan_in=k)),
        init("full", r.normal(0, 0.5, (m_, n))),
        *bn_inits("bn", bn_stats(r, n)),
    ]
    nodes = [
        helper.make_node("MatMul", ["a", "W"], ["mm"], name="matmul"),
        helper.make_node("Add", ["mm", "full"], ["added"], name="add"),
        bn_node("bn", "added", "y"),
    ]
    return make(nodes, [vi("a", [m_, k])], [vi("y", [m_, n])], inits, name="mm_full_add")


def conv_bn_bn(c: int = 4) -> onnx.ModelProto:
    """x -> Conv -> BN -> BN -> y."""
    r = rng(11)
    inits = [
        init("W", weight(r, [c, 3, 3, 3])),
        init("b", r.normal(0, 0.5, c)),
        *bn_inits("bn1", bn_stats(r, c)),
        *bn_inits("bn2", bn_stats(r, c)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W", "b"], ["conv_out"], name="conv"),
        bn_node("bn1", "conv_out", "bn1_out"),
        bn_node("bn2", "bn1_out", "y"),
    ]
    return make(nodes, [vi("x", [1, 3, 6, 6])], [vi("y", [1, c, 4, 4])], inits, name="conv_bn_bn")


def bn_bn(c: int = 4) -> onnx.ModelProto:
    """x -> BN -> BN -> y, no linear op anywhere: the two BNs merge into one."""
    r = rng(12)
    inits = [*bn_inits("bn1", bn_stats(r, c)), *bn_inits("bn2", bn_stats(r, c))]
    nodes = [bn_node("bn1", "x", "bn1_out"), bn_node("bn2", "bn1_out", "y")]
    return make(nodes, [vi("x", [2, c, 3, 3])], [vi("y", [2, c, 3, 3])], inits, name="bn_bn")


def bn_bn_first_is_output(c: int = 4) -> onnx.ModelProto:
    """Conv -> BN1 -> BN2, and BN1's output is a graph output too."""
    r = rng(47)
    inits = [
        init("W", weight(r, [c, 3, 3, 3])),
        *bn_inits("bn1", bn_stats(r, c)),
        *bn_inits("bn2", bn_stats(r, c)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["conv_out"], name="conv"),
        bn_node("bn1", "conv_out", "h"),
        bn_node("bn2", "h", "y"),
    ]
    return make(
        nodes,
        [vi("x", [1, 3, 5, 5])],
        [vi("y", [1, c, 3, 3]), vi("h", [1, c, 3, 3])],
        inits,
        name="bn_bn_output",
    )


def conv_affine(
    ops: Sequence[str] = ("Mul", "Add"), c: int = 4, per: str = "channel"
) -> onnx.ModelProto:
    """x -> Conv -> Mul/Add/Sub/Div by constants -> y.

    per="channel": constants of shape [C,1,1] or [1,C,1,1] (foldable);
    per="spatial": shape [1,1,H,W] (varies over space: not an affine of the channel)."""
    r = rng(34)
    inits = [init("W", weight(r, [c, 3, 3, 3])), init("b", r.normal(0, 0.5, c))]
    nodes = [helper.make_node("Conv", ["x", "W", "b"], ["t0"], name="conv")]
    for i, op in enumerate(ops):
        shape = ([c, 1, 1] if i % 2 == 0 else [1, c, 1, 1]) if per == "channel" else [1, 1, 3, 3]
        value = r.uniform(0.5, 1.5, shape) if op in ("Mul", "Div") else r.normal(0, 0.5, shape)
        inits.append(init(f"k{i}", value))
        out = "y" if i == len(ops) - 1 else f"t{i + 1}"
        nodes.append(helper.make_node(op, [f"t{i}", f"k{i}"], [out], name=f"{op.lower()}{i}"))
    return make(nodes, [vi("x", [1, 3, 5, 5])], [vi("y", [1, c, 3, 3])], inits, name="conv_affine")


def conv_const_first(op: str, c: int = 4) -> onnx.ModelProto:
    """x -> Conv -> op(constant, conv_out): Sub is affine (s = -1); Div is not (reciprocal)."""
    r = rng(35)
    inits = [
        init("W", weight(r, [c, 3, 3, 3])),
        init("k", r.uniform(2.0, 3.0, [c, 1, 1])),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["conv_out"], name="conv"),
        helper.make_node(op, ["k", "conv_out"], ["y"], name=op.lower()),
    ]
    return make(nodes, [vi("x", [1, 3, 5, 5])], [vi("y", [1, c, 3, 3])], inits, name="const_first")


def gemm_affine(n: int = 5) -> onnx.ModelProto:
    """a -> Gemm -> Mul([N]) -> Add([N]) -> y."""
    r = rng(36)
    inits = [
        init("B", weight(r, [4, n], fan_in=4)),
        init("C", r.normal(0, 0.5, n)),
        init("m", r.uniform(0.5, 1.5, n)),
        init("a0", r.normal(0, 0.5, n)),
    ]
    nodes = [
        helper.make_node("Gemm", ["a", "B", "C"], ["g"], name="gemm"),
        helper.make_node("Mul", ["g", "m"], ["gm"], name="mul"),
        helper.make_node("Add", ["gm", "a0"], ["y"], name="add"),
    ]
    return make(nodes, [vi("a", [3, 4])], [vi("y", [3, n])], inits, name="gemm_affine")


def convt_affine(c: int = 6) -> onnx.ModelProto:
    """x -> ConvTranspose(group 2) -> Mul([C,1,1]) -> y."""
    r = rng(37)
    inits = [init("W", weight(r, [4, c // 2, 3, 3])), init("m", r.uniform(0.5, 1.5, [c, 1, 1]))]
    nodes = [
        helper.make_node("ConvTranspose", ["x", "W"], ["t"], name="convt", group=2, strides=[2, 2]),
        helper.make_node("Mul", ["t", "m"], ["y"], name="mul"),
    ]
    return make(nodes, [vi("x", [1, 4, 3, 3])], [vi("y", [1, c, 7, 7])], inits, name="convt_affine")
