"""One Conv -> BN across opsets and dtypes: training mode, extra outputs, spatial=0, opset 6
with is_test, fp16 with tiny variances, mixed fp16/fp32, and every float dtype."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .build import (
    BF16,
    F16,
    F32,
    Stats,
    _conv_bn_w,
    bn_inits,
    bn_node,
    bn_stats,
    init,
    make,
    rng,
    vi,
    weight,
)


def training_mode_bn(c: int = 4) -> onnx.ModelProto:
    """Opset 15, training_mode=1 (running statistics as extra outputs)."""
    r = rng(22)
    inits = [init("W", weight(r, [c, 3, 3, 3])), *bn_inits("bn", bn_stats(r, c))]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["conv_out"], name="conv"),
        bn_node("bn", "conv_out", "y", outputs=["running_mean", "running_var"], training_mode=1),
    ]
    return make(
        nodes,
        [vi("x", [2, 3, 5, 5])],
        [vi("y", [2, c, 3, 3]), vi("running_mean", [c]), vi("running_var", [c])],
        inits,
        opset=15,
        name="training_mode",
    )


def bn_extra_outputs(opset: int = 9, c: int = 4) -> onnx.ModelProto:
    """Opsets 9..13: a BN whose extra outputs (mean, var, saved mean/var) are used."""
    r = rng(23)
    inits = [init("W", weight(r, [c, 3, 3, 3])), *bn_inits("bn", bn_stats(r, c))]
    extra = ["mean_out", "var_out", "saved_mean", "saved_var"]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["conv_out"], name="conv"),
        bn_node("bn", "conv_out", "y", outputs=extra),
    ]
    return make(
        nodes,
        [vi("x", [2, 3, 5, 5])],
        [vi("y", [2, c, 3, 3]), vi("mean_out", [c]), vi("var_out", [c])],
        inits,
        opset=opset,
        name="extra_outputs",
    )


def spatial0_bn(c: int = 4, size: int = 3) -> onnx.ModelProto:
    """Opset 7, spatial=0: per-activation statistics of shape [C, H, W]."""
    r = rng(24)
    inits = [init("W", weight(r, [c, 3, 3, 3])), *bn_inits("bn", bn_stats(r, [c, size, size]))]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["conv_out"], name="conv"),
        bn_node("bn", "conv_out", "y", spatial=0),
    ]
    return make(
        nodes,
        [vi("x", [2, 3, size + 2, size + 2])],
        [vi("y", [2, c, size, size])],
        inits,
        opset=7,
        ir_version=4,
        name="spatial0",
    )


def opset6_bn(c: int = 4, is_test: int = 1) -> onnx.ModelProto:
    """Opset 6, IR 3 (initializers listed as graph inputs too), is_test=1."""
    r = rng(25)
    inits = [
        init("W", weight(r, [c, 3, 3, 3])),
        init("b", r.normal(0, 0.5, c)),
        *bn_inits("bn", bn_stats(r, c)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W", "b"], ["conv_out"], name="conv"),
        bn_node("bn", "conv_out", "y", is_test=is_test),
    ]
    inputs = [vi("x", [2, 3, 5, 5])] + [vi(t.name, list(t.dims)) for t in inits]
    return make(nodes, inputs, [vi("y", [2, c, 3, 3])], inits, opset=6, ir_version=3, name="opset6")


def fp16_tiny_var(c: int = 4) -> onnx.ModelProto:
    """fp16 Conv -> BN whose variances are tiny (1e-6..1e-4) and whose activations match them."""
    r = rng(26)
    spread = np.sqrt(r.uniform(1e-6, 1e-4, c))
    w = weight(r, [c, 3, 3, 3]) * spread[:, None, None, None]
    stats = Stats(
        scale=r.uniform(0.5, 1.5, c),
        bias=r.normal(0, 0.5, c),
        mean=r.normal(0, 1, c) * spread,
        var=spread**2,
    )
    return _conv_bn_w(w, stats, F16, name="fp16_tiny_var")


def fp16_conv_fp32_params(c: int = 4) -> onnx.ModelProto:
    """Opset 15 mixed dtypes: fp16 X/W, fp32 scale/B/mean/var."""
    r = rng(27)
    return _conv_bn_w(
        weight(r, [c, 3, 3, 3]), bn_stats(r, c), F16, param_dtype=F32, opset=15, name="mixed"
    )


def conv_bn_typed(dtype: int, c: int = 4, seed: int = 28) -> onnx.ModelProto:
    """Conv -> BN entirely in one dtype (fp64, bf16, fp16, fp32); bf16 Conv needs opset 22."""
    r = rng(seed)
    opset = 22 if dtype == BF16 else 13
    return _conv_bn_w(
        weight(r, [c, 3, 3, 3]),
        bn_stats(r, c),
        dtype,
        bias=r.normal(0, 0.5, c),
        opset=opset,
        name="typed",
    )
