"""Backward fold patterns: a BN (or a per-channel affine op) before the linear op that reads
it, through Flatten, Reshape and GlobalAveragePool, with one consumer or several."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .build import bn_inits, bn_node, bn_stats, conv_out_size, init, make, rng, vi, weight


def bn_conv(
    *,
    k: int = 1,
    pad: int = 0,
    auto_pad: str | None = None,
    group: int = 1,
    stride: int = 1,
    bias: bool = True,
    cin: int = 4,
    cout: int = 6,
    size: int = 6,
    dims: int = 2,
    seed: int = 5,
) -> onnx.ModelProto:
    """x -> BN -> Conv: exact as a backward fold only when the Conv adds no padding."""
    r = rng(seed)
    inits = [
        *bn_inits("bn", bn_stats(r, cin)),
        init("W", weight(r, [cout, cin // group] + [k] * dims)),
    ]
    conv_inputs = ["bn_out", "W"]
    if bias:
        inits.append(init("b", r.normal(0, 0.5, cout)))
        conv_inputs.append("b")
    attrs: dict = {"group": group, "kernel_shape": [k] * dims, "strides": [stride] * dims}
    if auto_pad is not None:
        attrs["auto_pad"] = auto_pad
    else:
        attrs["pads"] = [pad] * (2 * dims)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        out = -(-size // stride)
    else:
        out = conv_out_size(size, k, stride, pad)
    nodes = [
        bn_node("bn", "x", "bn_out"),
        helper.make_node("Conv", conv_inputs, ["y"], name="conv", **attrs),
    ]
    return make(
        nodes,
        [vi("x", [2, cin] + [size] * dims)],
        [vi("y", [2, cout] + [out] * dims)],
        inits,
        name="bn_conv",
    )


def bn_gemm(
    *,
    trans_b: int = 1,
    alpha: float = 1.0,
    beta: float = 1.0,
    c: bool = True,
    m: int = 3,
    k: int = 5,
    n: int = 4,
) -> onnx.ModelProto:
    """x[M,K] -> BN over K -> Gemm -> y."""
    r = rng(6)
    inits = [
        *bn_inits("bn", bn_stats(r, k)),
        init("B", weight(r, [n, k] if trans_b else [k, n], fan_in=k)),
    ]
    inputs = ["bn_out", "B"]
    if c:
        inits.append(init("C", r.normal(0, 0.5, n)))
        inputs.append("C")
    gemm = helper.make_node(
        "Gemm", inputs, ["y"], name="gemm", transB=trans_b, alpha=alpha, beta=beta
    )
    return make(
        [bn_node("bn", "x", "bn_out"), gemm],
        [vi("x", [m, k])],
        [vi("y", [m, n])],
        inits,
        name="bn_gemm",
    )


def bn_flatten_gemm(c: int = 3, hw: int = 2, n: int = 5) -> onnx.ModelProto:
    """x[B,C,H,W] -> BN -> Flatten -> Gemm: feature f of the Gemm is channel f // (H*W)."""
    r = rng(7)
    k = c * hw * hw
    inits = [
        *bn_inits("bn", bn_stats(r, c)),
        init("W", weight(r, [n, k], fan_in=k)),
        init("C", r.normal(0, 0.5, n)),
    ]
    nodes = [
        bn_node("bn", "x", "bn_out"),
        helper.make_node("Flatten", ["bn_out"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "W", "C"], ["y"], name="gemm", transB=1),
    ]
    return make(nodes, [vi("x", [2, c, hw, hw])], [vi("y", [2, n])], inits, name="bn_flatten_gemm")


def gap_bn_flatten_gemm(c: int = 4, size: int = 5, n: int = 3) -> onnx.ModelProto:
    """x -> GlobalAveragePool -> BN -> Flatten -> Gemm (a classifier head)."""
    r = rng(8)
    inits = [
        *bn_inits("bn", bn_stats(r, c)),
        init("W", weight(r, [n, c], fan_in=c)),
        init("C", r.normal(0, 0.5, n)),
    ]
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["gap_out"], name="gap"),
        bn_node("bn", "gap_out", "bn_out"),
        helper.make_node("Flatten", ["bn_out"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "W", "C"], ["y"], name="gemm", transB=1),
    ]
    return make(
        nodes, [vi("x", [2, c, size, size])], [vi("y", [2, n])], inits, name="gap_bn_flatten_gemm"
    )


def bn_reshape_matmul(c: int = 3, hw: int = 2, n: int = 5) -> onnx.ModelProto:
    """x[B,C,H,W] -> BN -> Reshape([0, -1]) -> MatMul W[C*H*W, N]."""
    r = rng(9)
    k = c * hw * hw
    inits = [
        *bn_inits("bn", bn_stats(r, c)),
        numpy_helper.from_array(np.array([0, -1], dtype=np.int64), "shape"),
        init("W", weight(r, [k, n], fan_in=k)),
    ]
    nodes = [
        bn_node("bn", "x", "bn_out"),
        helper.make_node("Reshape", ["bn_out", "shape"], ["flat"], name="reshape"),
        helper.make_node("MatMul", ["flat", "W"], ["y"], name="matmul"),
    ]
    return make(
        nodes, [vi("x", [2, c, hw, hw])], [vi("y", [2, n])], inits, name="bn_reshape_matmul"
    )


def bn_reshape_rows_matmul(target: Sequence[int] = (4, 6)) -> onnx.ModelProto:
    """x[2,3,2,2] -> BN -> Reshape(target) -> MatMul W[6,5]: with target [4, 6] (or [-1, 6]) a
    row holds parts of two samples and two channels' features differ per row, so feature f is
    NOT channel f // (features / C)."""
    r = rng(40)
    k = target[1]
    rows = 24 // k
    inits = [
        *bn_inits("bn", bn_stats(r, 3)),
        numpy_helper.from_array(np.array(target, dtype=np.int64), "shape"),
        init("W", weight(r, [k, 5], fan_in=k)),
    ]
    nodes = [
        bn_node("bn", "x", "bn_out"),
        helper.make_node("Reshape", ["bn_out", "shape"], ["flat"], name="reshape"),
        helper.make_node("MatMul", ["flat", "W"], ["y"], name="matmul"),
    ]
    return make(nodes, [vi("x", [2, 3, 2, 2])], [vi("y", [rows, 5])], inits, name="reshape_rows")


def conv_bn_conv(c: int = 4) -> onnx.ModelProto:
    """x -> Conv -> BN -> Conv 1x1: the BN can go either way; it must go somewhere."""
    r = rng(10)
    inits = [
        init("W1", weight(r, [c, c, 3, 3])),
        init("b1", r.normal(0, 0.5, c)),
        *bn_inits("bn", bn_stats(r, c)),
        init("W2", weight(r, [c, c, 1, 1])),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        bn_node("bn", "c1", "bn_out"),
        helper.make_node("Conv", ["bn_out", "W2"], ["y"], name="conv2"),
    ]
    return make(nodes, [vi("x", [1, c, 5, 5])], [vi("y", [1, c, 5, 5])], inits, name="conv_bn_conv")


def bn_two_convs(c: int = 4) -> onnx.ModelProto:
    """x -> BN -> two unpadded 1x1 Convs."""
    r = rng(48)
    inits = [
        *bn_inits("bn", bn_stats(r, c)),
        init("Wa", weight(r, [5, c, 1, 1])),
        init("Wb", weight(r, [3, c, 1, 1])),
    ]
    nodes = [
        bn_node("bn", "x", "bn_out"),
        helper.make_node("Conv", ["bn_out", "Wa"], ["ya"], name="conv_a"),
        helper.make_node("Conv", ["bn_out", "Wb"], ["yb"], name="conv_b"),
    ]
    return make(
        nodes,
        [vi("x", [1, c, 3, 3])],
        [vi("ya", [1, 5, 3, 3]), vi("yb", [1, 3, 3, 3])],
        inits,
        name="bn_two_convs",
    )


def backward_shared_weight(gemm: bool = False, c: int = 4) -> onnx.ModelProto:
    """x -> BN -> Conv_a(W) (or Gemm_a(B)); x2 -> Conv_b(W): the backward fold must clone W."""
    r = rng(44)
    if gemm:
        inits = [*bn_inits("bn", bn_stats(r, c)), init("W", weight(r, [c, 5], fan_in=c))]
        op, x_shape, y_shape = "Gemm", [3, c], [3, 5]
    else:
        inits = [*bn_inits("bn", bn_stats(r, c)), init("W", weight(r, [6, c, 1, 1]))]
        op, x_shape, y_shape = "Conv", [1, c, 3, 3], [1, 6, 3, 3]
    nodes = [
        bn_node("bn", "x", "bn_out"),
        helper.make_node(op, ["bn_out", "W"], ["y1"], name="a"),
        helper.make_node(op, ["x2", "W"], ["y2"], name="b"),
    ]
    return make(
        nodes,
        [vi("x", x_shape), vi("x2", x_shape)],
        [vi("y1", y_shape), vi("y2", y_shape)],
        inits,
        name="backward_shared",
    )


def affine_before_conv(op: str = "Mul", pad: int = 0, c: int = 4) -> onnx.ModelProto:
    """x -> Mul/Add(per-channel constant) -> Conv 3x3 with `pad`: a backward affine fold."""
    r = rng(50)
    value = r.uniform(0.5, 1.5, [c, 1, 1]) if op == "Mul" else r.normal(0, 0.5, [c, 1, 1])
    inits = [init("k", value), init("W", weight(r, [6, c, 3, 3])), init("b", r.normal(0, 0.5, 6))]
    out = 5 - 3 + 1 + 2 * pad
    nodes = [
        helper.make_node(op, ["x", "k"], ["scaled"], name=op.lower()),
        helper.make_node("Conv", ["scaled", "W", "b"], ["y"], name="conv", pads=[pad] * 4),
    ]
    return make(nodes, [vi("x", [1, c, 5, 5])], [vi("y", [1, 6, out, out])], inits, name="aff_bw")
