"""Float64 numpy references for BN re-estimation, and the small models its tests use.

The references run the model through onnx.reference.ReferenceEvaluator after casting every
float tensor to float64, so they share no code with bnsurgery's engines (ONNX Runtime,
sub-models, waves, Chan merges):

- `reference_exact`: AdaBN by its definition. BNs in graph order, each measured over all the
  data (np.mean / np.var, population) with every earlier BN already updated.
- `reference_batch`: every BN normalises with its batch's mean and biased variance (torch's
  train-mode forward); each BN's stored statistics are np.mean / np.var of its inputs over
  all batches concatenated.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)


def to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with every float initializer, value type and Cast target in float64."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    for i, tensor in enumerate(graph.initializer):
        if tensor.data_type in FLOATS:
            value = numpy_helper.to_array(tensor).astype(np.float64)
            graph.initializer[i].CopyFrom(numpy_helper.from_array(value, tensor.name))
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.tensor_type.elem_type in FLOATS:
            value.type.tensor_type.elem_type = TensorProto.DOUBLE
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i in FLOATS:
                attr.i = TensorProto.DOUBLE
    return out


def bn_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "BatchNormalization"]


def channel_axes(x: np.ndarray) -> tuple[int, ...]:
    return (0, *range(2, x.ndim))


def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.output[:]
    out.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    return out


def _set(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for tensor in model.graph.initializer:
        if tensor.name == name:
            tensor.CopyFrom(numpy_helper.from_array(np.asarray(value, np.float64), name))
            return
    raise KeyError(name)


def _as64(batches: Sequence[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    return [{k: v.astype(np.float64) for k, v in b.items()} for b in batches]


def reference_exact(
    model: onnx.ModelProto, batches: Sequence[dict[str, np.ndarray]], prior: float | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{BN name: (mean, var)} after sequential AdaBN in float64 (optionally blended)."""
    m64 = to_float64(model)
    data = _as64(batches)
    samples = sum(next(iter(b.values())).shape[0] for b in data)
    result = {}
    for node in bn_nodes(m64):
        session = ReferenceEvaluator(_with_outputs(m64, [node.input[0]]))
        xs = [session.run(None, b)[0] for b in data]
        x = np.concatenate(xs)
        mean, var = x.mean(axis=channel_axes(x)), x.var(axis=channel_axes(x))
        if prior is not None:
            old_mean = _init(m64, node.input[3])
            old_var = _init(m64, node.input[4])
            lam = prior / (prior + samples)
            mean = lam * old_mean + (1 - lam) * mean
            var = lam * old_var + (1 - lam) * var
        _set(m64, node.input[3], mean)
        _set(m64, node.input[4], var)
        result[node.name] = (mean, var)
    return result


def _init(model: onnx.ModelProto, name: str) -> np.ndarray:
    for tensor in model.graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor).astype(np.float64)
    raise KeyError(name)


class _BatchStatsBN(OpRun):
    """BatchNormalization normalising with the batch's statistics (records its inputs)."""

    op_domain = ""
    seen: dict[str, list[np.ndarray]] = {}  # noqa: RUF012

    def _run(self, x, scale, bias, mean, var, epsilon=None, momentum=None, training_mode=None):
        eps = 1e-5 if epsilon is None else epsilon
        _BatchStatsBN.seen.setdefault(self.onnx_node.name, []).append(x)
        axes = channel_axes(x)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        m, v = x.mean(axis=axes), x.var(axis=axes)
        y = (x - m.reshape(shape)) / np.sqrt(v.reshape(shape) + eps)
        return (y * scale.reshape(shape) + bias.reshape(shape),)


_BatchStatsBN.__name__ = "BatchNormalization"


def reference_batch(
    model: onnx.ModelProto, batches: Sequence[dict[str, np.ndarray]]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{BN name: (mean, var)}: pooled population moments of each BN's input in batch mode."""
    m64 = to_float64(model)
    _BatchStatsBN.seen = {}
    session = ReferenceEvaluator(m64, new_ops=[_BatchStatsBN])
    for b in _as64(batches):
        session.run(None, b)
    result = {}
    for node in bn_nodes(m64):
        x = np.concatenate(_BatchStatsBN.seen[node.name])
        result[node.name] = (x.mean(axis=channel_axes(x)), x.var(axis=channel_axes(x)))
    return result


def bn_params(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, ...]]:
    """{BN name: (scale, B, mean, var)} as float64 arrays."""
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    return {n.name: tuple(inits[i] for i in n.input[1:5]) for n in bn_nodes(model)}


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|: the relative error the tests bound."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))


def split(x: np.ndarray, size: int, name: str = "x") -> list[dict[str, np.ndarray]]:
    return [{name: x[i : i + size]} for i in range(0, len(x), size)]


# -- models -------------------------------------------------------------------------------------
def _init_f32(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def _bn(name: str, x: str, y: str, c: int, r: np.random.Generator, opset: int):
    inits = [
        _init_f32(f"{name}.scale", r.uniform(0.5, 1.5, c)),
        _init_f32(f"{name}.B", r.normal(0, 0.5, c)),
        _init_f32(f"{name}.mean", r.normal(0, 0.5, c)),
        _init_f32(f"{name}.var", r.uniform(0.5, 2.0, c)),
    ]
    node = helper.make_node(
        "BatchNormalization",
        [x, *(t.name for t in inits)],
        [y],
        name=name,
        epsilon=1e-3,
    )
    return node, inits


def conv_net(c: int = 4, size: int = 6, opset: int = 14, seed: int = 0) -> onnx.ModelProto:
    """Conv-BN-Relu, then two branches from the same tensor, each Conv-BN (one wave), summed,
    then BN -> GlobalAveragePool -> Flatten -> Gemm-BN(2-D) -> Relu -> Gemm.

    Waves: bn0 (1), bn_a and bn_b (2), bn_sum (3), bn_fc (4).
    """
    r = np.random.default_rng(seed)
    nodes, inits = [], []

    def conv(name: str, x: str, y: str, cin: int, cout: int) -> None:
        w = r.normal(0, 1 / np.sqrt(cin * 9), (cout, cin, 3, 3))
        inits.extend([_init_f32(f"{name}.W", w), _init_f32(f"{name}.b", r.normal(0.3, 0.2, cout))])
        nodes.append(
            helper.make_node(
                "Conv",
                [x, f"{name}.W", f"{name}.b"],
                [y],
                name=name,
                kernel_shape=[3, 3],
                pads=[1, 1, 1, 1],
            )
        )

    def bn(name: str, x: str, y: str, channels: int) -> None:
        node, tensors = _bn(name, x, y, channels, r, opset)
        nodes.append(node)
        inits.extend(tensors)

    conv("conv0", "x", "c0", 3, c)
    bn("bn0", "c0", "b0", c)
    nodes.append(helper.make_node("Relu", ["b0"], ["r0"], name="relu0"))
    conv("conv_a", "r0", "ca", c, c)
    bn("bn_a", "ca", "ba", c)
    conv("conv_b", "r0", "cb", c, c)
    bn("bn_b", "cb", "bb", c)
    nodes.append(helper.make_node("Add", ["ba", "bb"], ["s"], name="add"))
    bn("bn_sum", "s", "bs", c)
    nodes.append(helper.make_node("Relu", ["bs"], ["rs"], name="relu1"))
    nodes.append(helper.make_node("GlobalAveragePool", ["rs"], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"))
    w = r.normal(0, 1 / np.sqrt(c), (c, 5))
    inits.extend([_init_f32("fc.W", w), _init_f32("fc.b", r.normal(0, 0.1, 5))])
    nodes.append(helper.make_node("Gemm", ["flat", "fc.W", "fc.b"], ["fc"], name="fc"))
    bn("bn_fc", "fc", "bfc", 5)
    nodes.append(helper.make_node("Relu", ["bfc"], ["rfc"], name="relu2"))
    w2 = r.normal(0, 1 / np.sqrt(5), (5, 3))
    inits.append(_init_f32("out.W", w2))
    nodes.append(helper.make_node("MatMul", ["rfc", "out.W"], ["y"], name="out"))
    graph = helper.make_graph(
        nodes,
        "conv_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def bottleneck_net(c: int = 4, size: int = 8, seed: int = 2) -> onnx.ModelProto:
    """One ResNet-50-style bottleneck: a narrow main path (c channels, then 4c) and a wide
    shortcut (4c), added, then Conv-BN to c channels -> GlobalAveragePool.

    Waves: bn0 (1); bn1 and bn_s (2); bn2 (3); bn3 (4). Stage 2 keeps two 4c tensors for the
    Add (bn2's input c2 and the shortcut's output bs) from c-channel and 4c-channel inputs.
    """
    r = np.random.default_rng(seed)
    nodes, inits = [], []

    def conv(name: str, x: str, cin: int, cout: int) -> str:
        w = r.normal(0, 1 / np.sqrt(cin * 9), (cout, cin, 3, 3))
        inits.append(_init_f32(f"{name}.W", w))
        nodes.append(
            helper.make_node(
                "Conv", [x, f"{name}.W"], [name], name=name, kernel_shape=[3, 3], pads=[1, 1, 1, 1]
            )
        )
        return name

    def bn(name: str, x: str, channels: int) -> str:
        node, tensors = _bn(name, x, f"{name}_out", channels, r, 14)
        nodes.append(node)
        inits.extend(tensors)
        return f"{name}_out"

    def relu(x: str) -> str:
        nodes.append(helper.make_node("Relu", [x], [f"{x}_relu"], name=f"{x}_relu"))
        return f"{x}_relu"

    r0 = relu(bn("bn0", conv("c0", "x", 3, c), c))
    main = relu(bn("bn1", conv("c1", r0, c, c), c))
    main = bn("bn2", conv("c2", main, c, 4 * c), 4 * c)
    shortcut = bn("bn_s", conv("cs", r0, c, 4 * c), 4 * c)
    nodes.append(helper.make_node("Add", [main, shortcut], ["sum"], name="add"))
    out = bn("bn3", conv("c3", relu("sum"), 4 * c, c), c)
    nodes.append(helper.make_node("GlobalAveragePool", [out], ["y"], name="gap"))
    graph = helper.make_graph(
        nodes,
        "bottleneck_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 1, 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def mlp(features: int = 6, hidden: int = 8, opset: int = 14, seed: int = 1) -> onnx.ModelProto:
    """Gemm-BN-Relu-Gemm-BN-Relu-Gemm on [N, features]: two waves, 2-D BNs."""
    r = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    for i, (cin, cout) in enumerate(((features, hidden), (hidden, hidden))):
        inits += [
            _init_f32(f"fc{i}.W", r.normal(0, 1 / np.sqrt(cin), (cin, cout))),
            _init_f32(f"fc{i}.b", r.normal(0.2, 0.3, cout)),
        ]
        nodes.append(
            helper.make_node("Gemm", [x, f"fc{i}.W", f"fc{i}.b"], [f"g{i}"], name=f"fc{i}")
        )
        node, tensors = _bn(f"bn{i}", f"g{i}", f"n{i}", cout, r, opset)
        nodes.append(node)
        inits += tensors
        nodes.append(helper.make_node("Relu", [f"n{i}"], [f"r{i}"], name=f"relu{i}"))
        x = f"r{i}"
    inits.append(_init_f32("head.W", r.normal(0, 1 / np.sqrt(hidden), (hidden, 2))))
    nodes.append(helper.make_node("Gemm", [x, "head.W"], ["y"], name="head"))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def image_data(n: int = 48, size: int = 6, seed: int = 5, shift: float = 0.0) -> np.ndarray:
    r = np.random.default_rng(seed)
    return (r.normal(0.5 + shift, 1.0, (n, 3, size, size))).astype(np.float32)
