"""The yardstick of the default pass rule: a copy of the reference model whose weights carry
one more rounding in their own dtype.

A correct fold computes each new weight in float64 and rounds it once to the stored dtype, so
the folded model differs from the original by (about) one rounding of every weight it rewrote,
plus the rounding of the BN arithmetic it removed. `rounding_noise_copy` gives the reference that
same kind of perturbation: every float weight is multiplied, in float64, by a random factor
within one unit roundoff of 1 (1 +- 2^-24 for float32, 2^-11 for float16, 2^-8 for bfloat16) and
rounded back to its dtype. How far the copy's outputs move from the reference's is the rounding
noise of that model on that data: it grows with depth, width and output scale exactly as a
correct fold's error does (measured in docs/verification.md: a correct fold deviates 0.3-1.4x
this noise, ONNX Runtime's own Conv+BN fusion 0.3-1.3x; wrong folds 100x and more).

Only weights whose consumers are arithmetic on values are perturbed (Conv, Gemm, MatMul, BN,
Mul/Add/...); a float that selects shapes or indices (Resize scales, Range bounds, a Pow
exponent) keeps its exact value, since one ulp there changes a shape or turns a square into NaN.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from bnsurgery.harness.tolerances import machine_epsilon
from bnsurgery.onnxio import lazy_source, tensor_to_array

# Ops whose float inputs are values: one rounding there is what a fold introduces.
_VALUE_OPS = frozenset(
    {
        "Conv",
        "ConvTranspose",
        "Gemm",
        "MatMul",
        "BatchNormalization",
        "InstanceNormalization",
        "LayerNormalization",
        "GroupNormalization",
        "Mul",
        "Add",
        "Sub",
        "Div",
        "Sum",
        "Mean",
        "PRelu",
        "Einsum",
    }
)
_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
}


def _unit_roundoff(elem_type: int) -> float:
    """Half the machine epsilon of a float element type: the most one rounding moves a value."""
    if elem_type == onnx.TensorProto.BFLOAT16:
        return machine_epsilon("bfloat16") / 2
    return machine_epsilon(np.dtype(_FLOAT_TYPES[elem_type]).name) / 2


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of a graph and of its subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _nodes(sub)


def _value_only_names(model: onnx.ModelProto) -> set[str]:
    """Tensor names consumed only by value ops (anywhere, subgraphs included) and not graph
    outputs: the ones one rounding may touch."""
    consumers: dict[str, set[str]] = {}
    for node in _nodes(model.graph):
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    outputs = {o.name for o in model.graph.output}
    return {name for name, ops in consumers.items() if ops <= _VALUE_OPS and name not in outputs}


def _perturbed(tensor: onnx.TensorProto, rng: np.random.Generator) -> onnx.TensorProto | None:
    if tensor.data_type not in _FLOAT_TYPES and tensor.data_type != onnx.TensorProto.BFLOAT16:
        return None
    lazy = lazy_source(tensor) is not None  # left in its file by io's lazy loading: read it
    if (
        not lazy
        and tensor.HasField("data_location")
        and (tensor.data_location == onnx.TensorProto.EXTERNAL)
    ):
        return None  # callers hand in materialised models; an external one is left exact
    values = tensor_to_array(tensor)
    if values.size == 0:
        return None
    u = _unit_roundoff(tensor.data_type)
    factor = rng.uniform(-u, u, values.shape)
    with np.errstate(over="ignore", invalid="ignore"):
        if values.dtype == np.float64:  # no wider float to round from: round by hand
            steps = np.rint(values * factor / np.spacing(np.abs(values)))
            up, down = np.nextafter(values, np.inf), np.nextafter(values, -np.inf)
            rounded = np.where(steps > 0, up, np.where(steps < 0, down, values))
        else:
            rounded = (values.astype(np.float64) * (1.0 + factor)).astype(values.dtype)
    # a weight at the edge of its dtype's range keeps its value rather than become inf
    rounded = np.where(np.isfinite(rounded) | ~np.isfinite(values), rounded, values)
    return numpy_helper.from_array(np.asarray(rounded, values.dtype), tensor.name)


def rounding_noise_copy(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """A copy of `model` whose value weights (main-graph initializers and Constant nodes)
    carry one more rounding in their dtype, seeded; the model itself is not changed."""
    rng = np.random.default_rng([seed, 0x6E6F6973])  # "nois": its own stream, apart from data
    noisy = onnx.ModelProto()
    noisy.CopyFrom(model)
    touchable = _value_only_names(model)
    for i, tensor in enumerate(noisy.graph.initializer):
        if tensor.name in touchable:
            replaced = _perturbed(tensor, rng)
            if replaced is not None:
                noisy.graph.initializer[i].CopyFrom(replaced)
    for node in noisy.graph.node:
        if node.op_type != "Constant" or not node.output or node.output[0] not in touchable:
            continue
        for attr in node.attribute:
            if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                replaced = _perturbed(attr.t, rng)
                if replaced is not None:
                    replaced.name = attr.t.name
                    attr.t.CopyFrom(replaced)
    return noisy
