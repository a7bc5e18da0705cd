"""Building blocks every model family uses: dtype constants, the seeded RNG, realistic BN
statistics, initializers, nodes, and `make`, which assembles and checks a model."""

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


def _const(name: str, value: np.ndarray, dtype: int = F32) -> onnx.NodeProto:
    return helper.make_node(
        "Constant", [], [name], name=f"const_{name}", value=init(name, value, dtype)
    )


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
