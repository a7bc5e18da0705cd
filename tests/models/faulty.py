"""Models a tool must refuse or survive: NaN/Inf/negative statistics, folds that overflow
fp16, parameters of the wrong shape, a model the checker rejects, and a valid BN that crashes
ONNX Runtime's CPU kernel."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .build import F16, F32, _conv_bn_w, bn_inits, bn_node, bn_stats, init, make, rng, vi, weight


def bad_statistics(kind: str, c: int = 4) -> onnx.ModelProto:
    """Conv -> BN whose channel 1 has a NaN/Inf parameter or a negative variance."""
    r = rng(29)
    st = bn_stats(r, c)
    if kind == "nan-var":
        st.var[1] = np.nan
    elif kind == "inf-var":
        st.var[1] = np.inf
    elif kind == "negative-var":
        st.var[1] = -0.5
    elif kind == "nan-scale":
        st.scale[1] = np.nan
    elif kind == "inf-mean":
        st.mean[1] = -np.inf
    else:
        raise ValueError(kind)
    return _conv_bn_w(weight(r, [c, 3, 3, 3]), st, F32, name=f"bad_{kind}")


def fp16_overflow(where: str = "weight", c: int = 4) -> onnx.ModelProto:
    """fp16 Conv -> BN whose folded weight (or bias) exceeds fp16's 65504."""
    r = rng(30)
    w = weight(r, [c, 3, 3, 3])
    st = bn_stats(r, c)
    if where == "weight":
        w[0, 0, 0, 0] = 4.0
        st.var[0] = 0.0
        st.scale[0] = 8.0  # s = 8 / sqrt(1e-8) = 8e4, so W'[0,0,0,0] = 3.2e5 > 65504
    elif where == "bias":
        st.var[0] = 0.0
        st.scale[0] = 1.0  # s = 1 / sqrt(1e-8) = 1e4, W' stays small
        st.mean[0] = 30.0  # t = beta - 30 * 1e4 = -3e5 < -65504
    else:
        raise ValueError(where)
    return _conv_bn_w(w, st, F16, eps=1e-8, name=f"overflow_{where}")


def wrong_shape_params(which: str = "scale", c: int = 4) -> onnx.ModelProto:
    """Conv -> BN whose `which` parameter has C+1 entries (or shape [C, 1] for 'mean-2d')."""
    r = rng(38)
    st = bn_stats(r, c)
    if which == "scale":
        st.scale = r.uniform(0.5, 1.5, c + 1)
    elif which == "mean-2d":
        st.mean = st.mean.reshape(c, 1)
    else:
        raise ValueError(which)
    return _conv_bn_w(weight(r, [c, 3, 3, 3]), st, F32, name="wrong_shape")


def checker_failing() -> onnx.ModelProto:
    """A Conv reading a tensor no one produces: onnx.checker rejects it."""
    r = rng(39)
    nodes = [helper.make_node("Conv", ["x", "W_missing"], ["y"], name="conv")]
    return make(
        nodes,
        [vi("x", [1, 3, 5, 5])],
        [vi("y", [1, 4, 3, 3])],
        [init("W", weight(r, [4, 3, 3, 3]))],
        check=False,
    )


def ort_crashing_bn(opset: int = 13, c: int = 4) -> onnx.ModelProto:
    """A BN (opsets 9..13, no training_mode attribute) that declares its optional outputs but
    leaves running mean and var unnamed: Y, "", "", saved_mean, saved_var. A valid model (the
    ONNX checker passes it), yet ONNX Runtime's CPU kernel takes the extra outputs for training
    mode and writes the running statistics it was not given: session creation succeeds and
    the first run dies with SIGSEGV, with graph optimizations off or on. Seen crashing with
    onnxruntime 1.19.2, 1.22.1, 1.26.0, 1.30.0 and 1.32.0 (CPU, Linux x86-64)."""
    r = rng(23)
    inits = [init("W", weight(r, [c, 3, 3, 3])), *bn_inits("bn", bn_stats(r, c))]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["conv_out"], name="conv"),
        bn_node("bn", "conv_out", "y", outputs=["", "", "saved_mean", "saved_var"]),
    ]
    return make(
        nodes,
        [vi("x", [2, 3, 5, 5])],
        [vi("y", [2, c, 3, 3])],
        inits,
        opset=opset,
        name="ort_crash",
    )
