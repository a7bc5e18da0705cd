"""A layer-by-layer builder of deep ONNX models laid out and named the way torch's exporter does it.

Every layer is evaluated in numpy (float64) on a small calibration batch as it is added. That
running evaluation is what gives a BN "trained" statistics consistent with the activations that
really reach it, and what lets a conv be scaled to a chosen output spread (fp16 models whose BN
variances are tiny). The evaluation only shapes the parameters; the tests run the finished model
with ONNX Runtime.

Naming follows the TorchScript exporter: module "layer1.0.conv1" gives the node
"/layer1/layer1.0/conv1/Conv", its output "/layer1/layer1.0/conv1/Conv_output_0" and the weight
"layer1.0.conv1.weight"; a BN's parameters are "<module>.weight/.bias/.running_mean/.running_var".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from models import F32, I64, NP_DTYPE, init, make, rng, vi
from numpy.lib.stride_tricks import sliding_window_view
from onnx import helper, numpy_helper

STATS = ("default", "trained")


def torch_scope(module: str) -> str:
    """'features.1.conv.0.0' -> '/features/features.1/conv/conv.0/conv.0.0' (an index names its
    scope together with its parent, as torch does)."""
    parts: list[str] = []
    for part in module.split(".") if module else []:
        parts.append(f"{parts[-1]}.{part}" if part.isdigit() and parts else part)
    return "".join(f"/{p}" for p in parts)


# -- numpy evaluation of the layers (NCHW, float64) ----------------------------------------------
def conv2d(
    x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: int, pad: int, group: int
) -> np.ndarray:
    """One matmul per kernel tap (cheaper than im2col at calibration-batch sizes)."""
    n, _, h, wd = x.shape
    cout, cg, kh, kw = w.shape
    ho, wo = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    xg = xp.reshape(n, group, cg, *xp.shape[2:]).transpose(1, 2, 0, 3, 4)  # g, c, n, H, W
    wg = w.reshape(group, cout // group, cg, kh, kw)
    y = np.zeros((group, cout // group, n * ho * wo))
    for i in range(kh):
        for j in range(kw):
            patch = xg[
                ..., i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride
            ]
            patch = patch.reshape(group, cg, -1)
            if cg == 1 and cout == group:  # depthwise: a per-channel product
                y += wg[:, :, 0, i, j][:, :, None] * patch
            else:
                y += wg[:, :, :, i, j] @ patch
    y = y.reshape(cout, n, ho, wo).transpose(1, 0, 2, 3)
    return y if b is None else y + b[None, :, None, None]


def pool2d(x: np.ndarray, k: int, stride: int, pad: int, kind: str, ceil_mode: bool) -> np.ndarray:
    size = x.shape[2]
    span = size + 2 * pad - k
    out = -(-span // stride) + 1 if ceil_mode else span // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:  # a window may not start in the padding
        out -= 1
    extra = (out - 1) * stride + k - (size + 2 * pad)
    fill = -np.inf if kind == "max" else 0.0
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad + extra), (pad, pad + extra)), constant_values=fill)
    win = sliding_window_view(xp, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    return win.max(axis=(4, 5)) if kind == "max" else win.mean(axis=(4, 5))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# -- the builder ----------------------------------------------------------------------------------
class DeepNet:
    """Accumulates nodes and initializers, and the calibration value of every tensor."""

    def __init__(
        self,
        name: str,
        input_shape: Sequence[int],
        *,
        stats: str = "default",
        seed: int = 0,
        dtype: int = F32,
        param_dtype: int | None = None,
        opset: int = 13,
        calibration_batch: int | None = None,
    ) -> None:
        if stats not in STATS:
            raise ValueError(f"stats must be one of {STATS}, not {stats!r}")
        self.name = name
        self.stats = stats
        self.dtype = dtype
        self.param_dtype = param_dtype or dtype
        self.opset = opset
        self.r = rng(seed)
        self.input_shape = tuple(input_shape)
        # Trained statistics are measured on 64 samples (fewer leave the 1x1 late stages of a
        # 32x32 network badly estimated); default statistics need the evaluation only for shapes.
        batch = calibration_batch or (64 if stats == "trained" else 1)
        self.values: dict[str, np.ndarray] = {
            "input": self.r.standard_normal((batch, *input_shape))
        }
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._names: set[str] = set()
        self._params: set[str] = set()

    # bookkeeping
    def _node(self, op: str, module: str, inputs: Sequence[str], value: np.ndarray, **attrs) -> str:
        base = f"{torch_scope(module)}/{op}"
        name, k = base, 0
        while name in self._names:  # torch numbers a repeated op within one scope: Add, Add_1
            k += 1
            name = f"{base}_{k}"
        self._names.add(name)
        out = f"{name}_output_0"
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=name, **attrs))
        self.values[out] = value
        return out

    def param(self, name: str, value: np.ndarray, dtype: int | None = None) -> str:
        """An initializer (once per name: shared constants such as Clip's bounds)."""
        if name not in self._params:
            self._params.add(name)
            dtype = dtype or self.dtype
            tensor = (
                numpy_helper.from_array(np.asarray(value, dtype=np.int64), name)
                if dtype == I64
                else init(name, value, dtype)
            )
            self.inits.append(tensor)
        return name

    def channels(self, x: str) -> int:
        return self.values[x].shape[1]

    # layers
    def conv(
        self,
        x: str,
        module: str,
        cout: int,
        k: int,
        *,
        stride: int = 1,
        pad: int | None = None,
        group: int = 1,
        bias: bool = False,
        out_std: np.ndarray | None = None,
    ) -> str:
        """He-normal Conv; with out_std, each output channel's weights are scaled so that the
        channel's spread on the calibration batch is out_std."""
        xv = self.values[x]
        cin = xv.shape[1]
        pad = k // 2 if pad is None else pad
        fan_in = cin // group * k * k
        w = self.r.normal(0.0, np.sqrt(2.0 / fan_in), (cout, cin // group, k, k))
        b = self.r.uniform(-1.0, 1.0, cout) / np.sqrt(fan_in) if bias else None
        y = conv2d(xv, w, b, stride, pad, group)
        if out_std is not None:
            factor = out_std / np.maximum(y.std(axis=(0, 2, 3)), 1e-30)
            w = w * factor[:, None, None, None]
            b = None if b is None else b * factor
            y = y * factor[None, :, None, None]
        inputs = [x, self.param(f"{module}.weight", w)]
        if b is not None:
            inputs.append(self.param(f"{module}.bias", b))
        attrs = dict(dilations=[1, 1], group=group, kernel_shape=[k, k], pads=[pad] * 4)
        return self._node("Conv", module, inputs, y, strides=[stride, stride], **attrs)

    def bn(self, x: str, module: str, *, eps: float = 1e-5) -> str:
        xv = self.values[x]
        c = xv.shape[1]
        axes = tuple(i for i in range(xv.ndim) if i != 1)
        if self.stats == "default":  # an untrained torch module, exported as is
            gamma, beta, mean, var = np.ones(c), np.zeros(c), np.zeros(c), np.ones(c)
        else:  # running statistics of the activations that reach this BN, as training leaves them
            mean, var = xv.mean(axis=axes), xv.var(axis=axes)
            var = np.maximum(var, 1e-3 * np.median(var) + 1e-30)
            mean = mean + self.r.normal(0.0, 0.05, c) * np.sqrt(var)
            var = var * self.r.uniform(0.8, 1.25, c)
            gamma, beta = self.r.uniform(0.5, 1.5, c), self.r.normal(0.0, 0.2, c)
        shape = [1, c] + [1] * (xv.ndim - 2)
        y = (xv - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
        y = y * gamma.reshape(shape) + beta.reshape(shape)
        params = {"weight": gamma, "bias": beta, "running_mean": mean, "running_var": var}
        names = [self.param(f"{module}.{p}", v, self.param_dtype) for p, v in params.items()]
        return self._node("BatchNormalization", module, [x, *names], y, epsilon=eps, momentum=0.9)

    def relu(self, x: str, module: str) -> str:
        return self._node("Relu", module, [x], np.maximum(self.values[x], 0.0))

    def relu6(self, x: str, module: str) -> str:
        bounds = [self.param("relu6.min", np.array(0.0)), self.param("relu6.max", np.array(6.0))]
        return self._node("Clip", module, [x, *bounds], np.clip(self.values[x], 0.0, 6.0))

    def sigmoid(self, x: str, module: str) -> str:
        return self._node("Sigmoid", module, [x], sigmoid(self.values[x]))

    def mul(self, a: str, b: str, module: str) -> str:
        return self._node("Mul", module, [a, b], self.values[a] * self.values[b])

    def add(self, a: str, b: str, module: str) -> str:
        return self._node("Add", module, [a, b], self.values[a] + self.values[b])

    def silu(self, x: str, module: str) -> str:
        """torch.nn.SiLU exported at opset 13: Sigmoid then Mul."""
        return self.mul(x, self.sigmoid(x, module), module)

    def conv_bn_act(
        self, x: str, module: str, cout: int, k: int, act: str | None = "relu", *,
        conv: str = "0", bn: str = "1", act_name: str = "2", **conv_args,
    ) -> str:  # fmt: skip
        """torchvision's Conv2dNormActivation: submodules .0 conv, .1 BN, .2 activation."""
        y = self.bn(self.conv(x, f"{module}.{conv}", cout, k, **conv_args), f"{module}.{bn}")
        return getattr(self, act)(y, f"{module}.{act_name}") if act else y

    def max_pool(
        self, x: str, module: str, k: int, stride: int, pad: int = 0, ceil_mode: bool = False
    ) -> str:
        y = pool2d(self.values[x], k, stride, pad, "max", ceil_mode)
        attrs = dict(kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4)
        return self._node("MaxPool", module, [x], y, ceil_mode=int(ceil_mode), **attrs)

    def avg_pool(self, x: str, module: str, k: int, stride: int) -> str:
        y = pool2d(self.values[x], k, stride, 0, "avg", False)
        attrs = dict(kernel_shape=[k, k], strides=[stride, stride], pads=[0] * 4)
        return self._node("AveragePool", module, [x], y, ceil_mode=0, count_include_pad=0, **attrs)

    def global_avg_pool(self, x: str, module: str) -> str:
        y = self.values[x].mean(axis=(2, 3), keepdims=True)
        return self._node("GlobalAveragePool", module, [x], y)

    def flatten(self, x: str, module: str = "") -> str:
        xv = self.values[x]
        return self._node("Flatten", module, [x], xv.reshape(xv.shape[0], -1), axis=1)

    def gemm(self, x: str, module: str, cout: int) -> str:
        """torch.nn.Linear: He-normal weight [out, in] used transposed, uniform bias."""
        cin = self.values[x].shape[1]
        w = self.r.normal(0.0, np.sqrt(2.0 / cin), (cout, cin))
        b = self.r.uniform(-1.0, 1.0, cout) / np.sqrt(cin)
        inputs = [x, self.param(f"{module}.weight", w), self.param(f"{module}.bias", b)]
        y = self.values[x] @ w.T + b
        return self._node("Gemm", module, inputs, y, alpha=1.0, beta=1.0, transB=1)

    def concat(self, xs: Sequence[str], module: str, axis: int = 1) -> str:
        y = np.concatenate([self.values[x] for x in xs], axis=axis)
        return self._node("Concat", module, xs, y, axis=axis)

    def reshape(self, x: str, module: str, shape: Sequence[int]) -> str:
        """Reshape to a constant shape whose leading -1 is the batch."""
        const = self.param(f"{torch_scope(module)}/shape_{len(self.inits)}", np.array(shape), I64)
        y = self.values[x].reshape(shape)
        return self._node("Reshape", module, [x, const], y)

    def transpose(self, x: str, module: str, perm: Sequence[int]) -> str:
        y = np.transpose(self.values[x], perm)
        return self._node("Transpose", module, [x], y, perm=list(perm))

    def split_half(self, x: str, module: str) -> tuple[str, str]:
        """torch.chunk(x, 2, dim=1): one Split node with two outputs."""
        xv = self.values[x]
        half = xv.shape[1] // 2
        split = self.param(
            f"{torch_scope(module)}/split_{len(self.inits)}", np.array([half] * 2), I64
        )
        first = self._node("Split", module, [x, split], xv[:, :half], axis=1)
        node = self.nodes[-1]
        second = first.replace("_output_0", "_output_1")
        node.output.append(second)
        self.values[second] = xv[:, half:]
        return first, second

    def reduce_mean(self, x: str, module: str, axes: Sequence[int]) -> str:
        y = self.values[x].mean(axis=tuple(axes))
        return self._node("ReduceMean", module, [x], y, axes=list(axes), keepdims=0)

    def constant(self, name: str, value: np.ndarray) -> str:
        """A constant tensor (anchors, strides), recorded for the calibration evaluation."""
        self.values[name] = np.asarray(value, dtype=np.float64)
        return self.param(name, value)

    # the model
    def finish(self, output: str) -> onnx.ModelProto:
        """Rename `output` to "output" (as torch.onnx.export(output_names=["output"]) does) and
        make the checked model: input "input" [N, ...], IR 8."""
        for node in self.nodes:
            node.input[:] = ["output" if i == output else i for i in node.input]
            node.output[:] = ["output" if o == output else o for o in node.output]
        value = self.values[output]
        return make(
            self.nodes,
            [vi("input", ["N", *self.input_shape], self.dtype)],
            [vi("output", ["N", *value.shape[1:]], self.dtype)],
            self.inits,
            opset=self.opset,
            ir_version=8,
            name=self.name,
        )


def batch_feeds(model: onnx.ModelProto, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded standard-normal values for every graph input, each dynamic dim being `batch`."""
    r = rng(2000 + seed)
    initialized = {t.name for t in model.graph.initializer}
    feeds = {}
    for inp in model.graph.input:
        if inp.name not in initialized:
            ttype = inp.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") else batch for d in ttype.shape.dim]
            feeds[inp.name] = r.standard_normal(shape).astype(NP_DTYPE[ttype.elem_type])
    return feeds
