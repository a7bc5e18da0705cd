"""ONNX Runtime's BN fusion test graphs, rebuilt from their shapes with onnx.helper.

ONNX Runtime tests its Conv+BN, MatMul+BN and Conv+BN+Mul+Add fusions on small models
(testdata/transform/fusion/fuse-conv-bn-*.onnx, fuse-matmul-bn-*.onnx). These builders make
graphs of the same shape: the same ops in the same order, the same IR-version quirks (IR 3 with
initializers that are not graph inputs, nodes out of topological order), constants fed through
Unsqueeze with positive or negative axes, MatMul -> Reshape/Transpose -> BN chains. Sizes and
values are ours (seeded), chosen so that every model is valid and runs on ONNX Runtime with
optimizations off, except `matmul_transpose_bn_mismatched`, which is broken on purpose.

ORT_FUSION_GRAPHS names every builder of a valid graph; bench/fold_node_counts.py measures
them all against ONNX Runtime's BASIC level.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from models import F32, bn_inits, bn_node, bn_stats, init, make, rng, vi, weight
from onnx import helper, numpy_helper


def _ir3(model: onnx.ModelProto) -> onnx.ModelProto:
    """IR 3 with the initializers left out of the graph inputs: the checker refuses this,
    ONNX Runtime runs it (several of its test models are stored that way)."""
    model.ir_version = 3
    return model


def fuse_conv_bn_no_bias(c: int = 4) -> onnx.ModelProto:
    """Conv without a bias -> BN (opset 7), IR 3, initializers not listed as inputs."""
    r = rng(60)
    nodes = [
        helper.make_node("Conv", ["X", "W"], ["conv_out"], name="conv", pads=[1, 1, 1, 1]),
        bn_node("bn", "conv_out", "Y", epsilon=1e-5),
    ]
    inits = [init("W", weight(r, (c, 3, 3, 3))), *bn_inits("bn", bn_stats(r, c))]
    model = make(
        nodes, [vi("X", [1, 3, 6, 6])], [vi("Y", [1, c, 6, 6])], inits, opset=7, check=False
    )
    return _ir3(model)


def fuse_conv_bn_mul_add_unsqueeze(variant: str = "plain", c: int = 4) -> onnx.ModelProto:
    """Conv -> BN -> Mul -> Add, the Mul and Add constants [C] unsqueezed to [C, 1, 1].

    variant "plain": opset 9, axes [1, 2]; "negative_axes": opset 11, axes [-2, -1];
    "no_bias": the Conv has no bias, IR 3 with initializers not listed as inputs, and the
    nodes stored out of topological order (Add first).
    """
    r = rng(61)
    opset = 11 if variant == "negative_axes" else 9
    axes = [-2, -1] if variant == "negative_axes" else [1, 2]
    conv_inputs = ["X", "W"] if variant == "no_bias" else ["X", "W", "B"]
    nodes = [
        helper.make_node("Conv", conv_inputs, ["conv_out"], name="conv", pads=[1, 1, 1, 1]),
        bn_node("bn", "conv_out", "bn_out", epsilon=1e-5),
        helper.make_node("Unsqueeze", ["mul_c"], ["mul_c3"], name="unsqueeze_mul", axes=axes),
        helper.make_node("Mul", ["bn_out", "mul_c3"], ["mul_out"], name="mul"),
        helper.make_node("Unsqueeze", ["add_c"], ["add_c3"], name="unsqueeze_add", axes=axes),
        helper.make_node("Add", ["mul_out", "add_c3"], ["Y"], name="add"),
    ]
    inits = [init("W", weight(r, (c, 3, 3, 3))), *bn_inits("bn", bn_stats(r, c))]
    if variant != "no_bias":
        inits.append(init("B", r.normal(0.0, 0.5, c)))
    inits += [init("mul_c", r.uniform(0.5, 1.5, c)), init("add_c", r.normal(0.0, 0.5, c))]
    if variant == "no_bias":
        nodes = [nodes[5], nodes[0], nodes[3], nodes[1], nodes[4], nodes[2]]
    model = make(
        nodes, [vi("X", [1, 3, 6, 6])], [vi("Y", [1, c, 6, 6])], inits, opset=opset, check=False
    )
    if variant == "no_bias":
        return _ir3(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def _matmul_chain(
    name: str,
    a_shape: list,
    n: int,
    steps: list[tuple[str, list[int]]],
    bn_channels: int,
    y_shape: list | None,
    k: int = 4,
) -> onnx.ModelProto:
    """A [.., K] MatMul W [K, N] -> each step (Reshape to a constant target, or Transpose
    with a perm) -> BN of bn_channels channels -> Y."""
    r = rng(62)
    nodes = [helper.make_node("MatMul", ["A", "W"], ["mm_out"], name="matmul")]
    inits = [init("W", weight(r, (k, n)))]
    previous = "mm_out"
    for i, (op, value) in enumerate(steps):
        out = f"{op.lower()}{i}_out"
        if op == "Reshape":
            inits.append(numpy_helper.from_array(np.array(value, dtype=np.int64), f"shape{i}"))
            nodes.append(helper.make_node(op, [previous, f"shape{i}"], [out], name=f"reshape{i}"))
        else:
            nodes.append(helper.make_node(op, [previous], [out], name=f"transpose{i}", perm=value))
        previous = out
    nodes.append(bn_node("bn", previous, "Y", epsilon=1e-5))
    inits += bn_inits("bn", bn_stats(r, bn_channels))
    check = y_shape is not None
    return make(
        nodes, [vi("A", a_shape)], [vi("Y", y_shape)], inits, opset=14, name=name, check=check
    )


def fuse_matmul_bn_directly() -> onnx.ModelProto:
    """MatMul [batch, 4] x [4, 5] -> BN(5)."""
    return _matmul_chain("matmul_bn_directly", ["batch", 4], 5, [], 5, ["batch", 5])


def fuse_matmul_bn_only_reshape() -> onnx.ModelProto:
    """MatMul [batch, 4] x [4, 5] -> Reshape [-1, 5, 1, 1] -> BN(5)."""
    steps = [("Reshape", [-1, 5, 1, 1])]
    return _matmul_chain("matmul_bn_only_reshape", ["batch", 4], 5, steps, 5, ["batch", 5, 1, 1])


def fuse_matmul_bn_with_reshape() -> onnx.ModelProto:
    """MatMul [6, 4] x [4, 5] -> Reshape [2, 3, 5] -> Transpose [0, 2, 1] -> BN(5)."""
    steps = [("Reshape", [2, 3, 5]), ("Transpose", [0, 2, 1])]
    return _matmul_chain("matmul_bn_with_reshape", [6, 4], 5, steps, 5, [2, 5, 3])


def fuse_matmul_bn_reshape_reshape() -> onnx.ModelProto:
    """MatMul [batch, 4] x [4, 5] -> Reshape [0, 5, 1] -> Reshape [0, 5, 1, 1] -> BN(5)."""
    steps = [("Reshape", [0, 5, 1]), ("Reshape", [0, 5, 1, 1])]
    name = "matmul_bn_reshape_reshape"
    return _matmul_chain(name, ["batch", 4], 5, steps, 5, ["batch", 5, 1, 1])


def fuse_matmul_bn_transpose_reshape() -> onnx.ModelProto:
    """MatMul [3, 4] x [4, 5] -> Transpose -> [5, 3] -> Reshape [1, 5, 3] -> BN(5)."""
    steps = [("Transpose", [1, 0]), ("Reshape", [1, 5, 3])]
    return _matmul_chain("matmul_bn_transpose_reshape", [3, 4], 5, steps, 5, [1, 5, 3])


def matmul_transpose_bn_mismatched() -> onnx.ModelProto:
    """Broken on purpose, like ONNX Runtime's MatMul+BN test models: the BN's parameters have
    the MatMul's channel count (MatMul [batch, 4] x [4, 1] -> [batch, 1]), but a Transpose
    puts `batch` on the BN's channel axis ([1, batch]). Shape inference cannot see it (batch
    is dynamic). ONNX Runtime refuses it at run time for any batch but 1 (INVALID_ARGUMENT);
    onnx.reference broadcasts the 1-element parameters over every channel and runs it."""
    steps = [("Transpose", [1, 0])]
    y_shape = [1, "batch"]
    return _matmul_chain("matmul_transpose_bn_mismatched", ["batch", 4], 1, steps, 1, y_shape)


def conv_identity_bn(c: int = 4) -> onnx.ModelProto:
    """Conv -> Identity -> BN: ONNX Runtime drops the Identity, then fuses Conv+BN."""
    r = rng(63)
    nodes = [
        helper.make_node("Conv", ["X", "W", "B"], ["conv_out"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Identity", ["conv_out"], ["id_out"], name="identity"),
        bn_node("bn", "id_out", "Y"),
    ]
    inits = [init("W", weight(r, (c, 3, 3, 3))), init("B", r.normal(0.0, 0.5, c))]
    inits += bn_inits("bn", bn_stats(r, c))
    return make(nodes, [vi("X", [1, 3, 6, 6])], [vi("Y", [1, c, 6, 6])], inits, opset=13)


def densenet_bn_mul_add_relu_conv(c: int = 4) -> onnx.ModelProto:
    """DenseNet's pre-activation layer as some exporters write it: Concat -> BN -> Mul -> Add
    -> Relu -> Conv (1x1). No fold is exact here (the Relu stands between BN and Conv)."""
    r = rng(64)
    nodes = [
        helper.make_node("Concat", ["X1", "X2"], ["cat"], name="concat", axis=1),
        bn_node("bn", "cat", "bn_out"),
        helper.make_node("Mul", ["bn_out", "mul_c"], ["mul_out"], name="mul"),
        helper.make_node("Add", ["mul_out", "add_c"], ["add_out"], name="add"),
        helper.make_node("Relu", ["add_out"], ["relu_out"], name="relu"),
        helper.make_node("Conv", ["relu_out", "W"], ["Y"], name="conv"),
    ]
    inits = [
        *bn_inits("bn", bn_stats(r, c)),
        init("mul_c", r.uniform(0.5, 1.5, (c, 1, 1))),
        init("add_c", r.normal(0.0, 0.5, (c, 1, 1))),
        init("W", weight(r, (3, c, 1, 1))),
    ]
    half = c // 2
    inputs = [vi("X1", [1, half, 4, 4]), vi("X2", [1, c - half, 4, 4])]
    return make(nodes, inputs, [vi("Y", [1, 3, 4, 4])], inits, opset=13)


def shapeless_output(c: int = 4) -> onnx.ModelProto:
    """Conv -> BN whose graph output declares its type but no shape (ONNX Runtime runs it)."""
    r = rng(65)
    nodes = [
        helper.make_node("Conv", ["X", "W"], ["conv_out"], name="conv"),
        bn_node("bn", "conv_out", "Y"),
    ]
    inits = [init("W", weight(r, (c, 3, 1, 1))), *bn_inits("bn", bn_stats(r, c))]
    return make(nodes, [vi("X", [1, 3, 4, 4])], [vi("Y", None, F32)], inits, check=False)


# Every valid graph of ONNX Runtime's BN fusion tests rebuilt here, by the name of its model.
ORT_FUSION_GRAPHS: dict[str, Callable[[], onnx.ModelProto]] = {
    "fuse-conv-bn-no-bias": fuse_conv_bn_no_bias,
    "fuse-conv-bn-mul-add-unsqueeze": lambda: fuse_conv_bn_mul_add_unsqueeze("plain"),
    "fuse-conv-bn-mul-add-unsqueeze.negative_axes": (
        lambda: fuse_conv_bn_mul_add_unsqueeze("negative_axes")
    ),
    "fuse-conv-bn-mul-add-unsqueeze-no-bias": lambda: fuse_conv_bn_mul_add_unsqueeze("no_bias"),
    "fuse-matmul-bn-directly": fuse_matmul_bn_directly,
    "fuse-matmul-bn-only-reshape": fuse_matmul_bn_only_reshape,
    "fuse-matmul-bn-with-reshape": fuse_matmul_bn_with_reshape,
    "fuse-matmul-bn-reshape-reshape": fuse_matmul_bn_reshape_reshape,
    "fuse-matmul-bn-transpose-reshape": fuse_matmul_bn_transpose_reshape,
    "conv-identity-bn": conv_identity_bn,
}
