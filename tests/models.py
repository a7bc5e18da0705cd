"""Every graph pattern the tests use, built in one place with onnx.helper, and the runner.

Builders are deterministic (seeded numpy RNG) and return a model that passes
`onnx.checker.check_model(full_check=True)`, unless their name says the model is broken. Nodes
have names ("conv", "bn", ...) so tests can ask the fold report about them. BN statistics are
realistic: var ~ U(0.5, 2), gamma ~ U(0.5, 1.5), beta and mean ~ N(0, 0.5).

The runner executes a model with ONNX Runtime CPU at ORT_DISABLE_ALL, or with
onnx.reference.ReferenceEvaluator when ORT cannot run it (fp64 Conv, bf16, opset 6); a pair of
models is always run by the same engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F16 = TensorProto.FLOAT16
F32 = TensorProto.FLOAT
F64 = TensorProto.DOUBLE
BF16 = TensorProto.BFLOAT16
I64 = TensorProto.INT64
BOOL = TensorProto.BOOL

NP_DTYPE = {F16: np.float16, F32: np.float32, F64: np.float64, BF16: ml_dtypes.bfloat16}

# (atol, rtol) of DESIGN.md §6; fp64 is held to a much tighter bound since the fold is fp64.
TOLERANCE = {F32: (1e-5, 1e-4), F16: (2.5e-3, 1e-3), BF16: (2e-2, 1e-2), F64: (1e-10, 1e-9)}


# -- building blocks ---------------------------------------------------------------------------
def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@dataclass
class Stats:
    """BatchNormalization parameters (scale, B, mean, var), float64."""

    scale: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    var: np.ndarray

    def affine(self, eps: float = float(np.float32(1e-5))) -> tuple[np.ndarray, np.ndarray]:
        """(s, t) of the BN; the default epsilon is the schema's, a float32 attribute."""
        s = self.scale / np.sqrt(self.var + eps)
        return s, self.bias - self.mean * s


def bn_stats(r: np.random.Generator, channels: int | Sequence[int]) -> Stats:
    shape = (channels,) if isinstance(channels, int) else tuple(channels)
    return Stats(
        scale=r.uniform(0.5, 1.5, shape),
        bias=r.normal(0.0, 0.5, shape),
        mean=r.normal(0.0, 0.5, shape),
        var=r.uniform(0.5, 2.0, shape),
    )


def weight(r: np.random.Generator, shape: Sequence[int], fan_in: int | None = None) -> np.ndarray:
    fan = fan_in if fan_in is not None else int(np.prod(shape[1:])) or 1
    return r.normal(0.0, 1.0 / np.sqrt(fan), tuple(shape))


def init(name: str, value: np.ndarray, dtype: int = F32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value).astype(NP_DTYPE.get(dtype, None)), name)


def bn_inits(prefix: str, stats: Stats, dtype: int = F32) -> list[onnx.TensorProto]:
    return [
        init(f"{prefix}.scale", stats.scale, dtype),
        init(f"{prefix}.B", stats.bias, dtype),
        init(f"{prefix}.mean", stats.mean, dtype),
        init(f"{prefix}.var", stats.var, dtype),
    ]


def bn_node(
    name: str, x: str, y: str, prefix: str | None = None, outputs: Sequence[str] = (), **attrs
) -> onnx.NodeProto:
    p = prefix or name
    return helper.make_node(
        "BatchNormalization",
        [x, f"{p}.scale", f"{p}.B", f"{p}.mean", f"{p}.var"],
        [y, *outputs],
        name=name,
        **attrs,
    )


def vi(name: str, shape: Sequence[int | str] | None, dtype: int = F32) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def make(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto] = (),
    *,
    opset: int = 13,
    ir_version: int | None = None,
    functions: Sequence[onnx.FunctionProto] = (),
    extra_opsets: Sequence[tuple[str, int]] = (),
    name: str = "test",
    check: bool = True,
) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs), list(initializers))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    ir = ir_version or max(helper.find_min_ir_version_for(opsets[:1]), 8 if functions else 4)
    model = helper.make_model(
        graph, opset_imports=opsets, ir_version=ir, functions=list(functions), producer_name="t"
    )
    model.doc_string = f"bnsurgery test model {name}"
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def conv_out_size(size: int, k: int, stride: int = 1, pad: int = 0, dilation: int = 1) -> int:
    return (size + 2 * pad - dilation * (k - 1) - 1) // stride + 1


# -- forward patterns: linear op -> BN ----------------------------------------------------------
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


# -- backward patterns: BN -> linear op ---------------------------------------------------------
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


# -- chains -------------------------------------------------------------------------------------
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


# -- producer / consumer situations -------------------------------------------------------------
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


# -- where the parameters come from -------------------------------------------------------------
def _const(name: str, value: np.ndarray, dtype: int = F32) -> onnx.NodeProto:
    return helper.make_node(
        "Constant", [], [name], name=f"const_{name}", value=init(name, value, dtype)
    )


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


# -- BN modes across opsets ---------------------------------------------------------------------
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


# -- dtypes -------------------------------------------------------------------------------------
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


def _conv_bn_w(
    w: np.ndarray,
    stats: Stats,
    dtype: int,
    *,
    param_dtype: int | None = None,
    bias: np.ndarray | None = None,
    opset: int = 13,
    eps: float | None = None,
    name: str = "conv_bn_w",
) -> onnx.ModelProto:
    """x -> Conv(W given) -> BN(stats given) -> y, W/x in `dtype`, BN params in `param_dtype`."""
    cout, cin, kh, kw = w.shape
    inits = [init("W", w, dtype), *bn_inits("bn", stats, param_dtype or dtype)]
    inputs = ["x", "W"]
    if bias is not None:
        inits.append(init("b", bias, dtype))
        inputs.append("b")
    attrs = {} if eps is None else {"epsilon": eps}
    nodes = [
        helper.make_node("Conv", inputs, ["conv_out"], name="conv"),
        bn_node("bn", "conv_out", "y", **attrs),
    ]
    size = 5
    return make(
        nodes,
        [vi("x", [2, cin, size, size], dtype)],
        [vi("y", [2, cout, size - kh + 1, size - kw + 1], dtype)],
        inits,
        opset=opset,
        name=name,
    )


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


# -- subgraphs and functions --------------------------------------------------------------------
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


# -- per-channel affine ops ---------------------------------------------------------------------
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


# -- broken models ------------------------------------------------------------------------------
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


# -- inspection ---------------------------------------------------------------------------------
def all_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Every node of the model: main graph, subgraphs (recursively) and local functions."""
    found: list[onnx.NodeProto] = []

    def walk(nodes) -> None:
        for node in nodes:
            found.append(node)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g.node)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        walk(g.node)

    walk(model.graph.node)
    for f in model.functions:
        walk(f.node)
    return found


def count_op(model: onnx.ModelProto, op_type: str = "BatchNormalization") -> int:
    return sum(1 for n in all_nodes(model) if n.op_type == op_type)


def node_named(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    matches = [n for n in all_nodes(model) if n.name == name]
    assert len(matches) == 1, f"{len(matches)} nodes named {name!r}"
    return matches[0]


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(name)


# -- running ------------------------------------------------------------------------------------
def random_feeds(
    model: onnx.ModelProto, seed: int = 0, **overrides: np.ndarray
) -> dict[str, np.ndarray]:
    """Seeded inputs for every graph input without an initializer; dynamic dims become 1.

    Inputs whose name contains "var" get positive values (they are BN variances)."""
    r = rng(1000 + seed)
    initialized = {t.name for t in model.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for inp in model.graph.input:
        if inp.name in initialized or inp.name in overrides:
            continue
        ttype = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in ttype.shape.dim]
        if ttype.elem_type == BOOL:
            feeds[inp.name] = np.array(True).reshape(shape)
        elif ttype.elem_type == I64:
            feeds[inp.name] = np.zeros(shape, dtype=np.int64)
        elif "var" in inp.name:
            feeds[inp.name] = r.uniform(0.5, 2.0, shape).astype(NP_DTYPE[ttype.elem_type])
        else:
            feeds[inp.name] = r.standard_normal(shape).astype(NP_DTYPE[ttype.elem_type])
    feeds.update(overrides)
    return feeds


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)


def run_reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """onnx.reference with an inference-mode BN in every opset (see bnsurgery.runtime.reference)."""
    from bnsurgery.runtime.reference import run_reference as evaluate

    return list(evaluate(model, feeds).values())


def run_pair(
    original: onnx.ModelProto, candidate: onnx.ModelProto, feeds: dict[str, np.ndarray]
) -> tuple[str, list[np.ndarray], list[np.ndarray]]:
    """Run both models on one engine: ORT when it runs both, else onnx.reference."""
    try:
        return "ort", run_ort(original, feeds), run_ort(candidate, feeds)
    except Exception:  # ORT lacks a kernel (fp64 Conv, bf16, opset 6, mixed BN-15 dtypes)
        return "reference", run_reference(original, feeds), run_reference(candidate, feeds)


def output_dtype(model: onnx.ModelProto) -> int:
    return model.graph.output[0].type.tensor_type.elem_type


def max_error(
    original: onnx.ModelProto,
    candidate: onnx.ModelProto,
    feeds: dict[str, np.ndarray] | None = None,
) -> float:
    """The largest |candidate - original| / (atol + rtol*|original|) over all outputs: <= 1
    means equivalent at the dtype's tolerance."""
    feeds = feeds if feeds is not None else random_feeds(original)
    _, ref, got = run_pair(original, candidate, feeds)
    assert len(ref) == len(got)
    worst = 0.0
    for out, a, b in zip(original.graph.output, ref, got, strict=True):
        atol, rtol = TOLERANCE.get(out.type.tensor_type.elem_type, TOLERANCE[F32])
        a64 = np.asarray(a, dtype=np.float64)
        b64 = np.asarray(b, dtype=np.float64)
        assert a64.shape == b64.shape, f"{out.name}: shape {b64.shape} != {a64.shape}"
        same_nan = np.isnan(a64) & np.isnan(b64)
        same_inf = np.isinf(a64) & (a64 == b64)
        err = np.abs(b64 - a64) / (atol + rtol * np.abs(a64))
        err = np.where(same_nan | same_inf, 0.0, err)
        err = np.where(np.isnan(err), np.inf, err)
        worst = max(worst, float(err.max()) if err.size else 0.0)
    return worst


def assert_equivalent(
    original: onnx.ModelProto,
    candidate: onnx.ModelProto,
    feeds: dict[str, np.ndarray] | None = None,
) -> None:
    """Outputs of candidate equal those of original within the dtype's tolerance (DESIGN §6)."""
    feeds = feeds if feeds is not None else random_feeds(original)
    engine, ref, got = run_pair(original, candidate, feeds)
    assert [o.name for o in candidate.graph.output] == [o.name for o in original.graph.output]
    for out, a, b in zip(original.graph.output, ref, got, strict=True):
        atol, rtol = TOLERANCE.get(out.type.tensor_type.elem_type, TOLERANCE[F32])
        np.testing.assert_allclose(
            np.asarray(b, dtype=np.float64),
            np.asarray(a, dtype=np.float64),
            atol=atol,
            rtol=rtol,
            equal_nan=True,
            err_msg=f"output {out.name!r} differs ({engine})",
        )


# -- edge cases: sharing across scopes, reshapes that mix the batch, Scan -----------------------
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
