"""Edits of a graph's constants, written once for every pass that rewrites weights.

- `add_initializer`: IR 3 requires every initializer to be listed among the graph inputs as
  well (there an initializer is a constant, never an input fed at run time), IR 4 and later
  must not list it (a listed one becomes an input whose value the caller may override).
- `remove_initializers`: drops initializers and, for IR 3 models, their graph-input entries.
- `drop_dead_constants`: after an edit, the constants it stopped reading (initializers,
  Constant nodes and constant-foldable chains) that nothing reads any more.
- `replace_tensor_value`: rewrites a stored tensor in place, keeping its name.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from bnsurgery.model.graph import FOLDABLE_OPS, GraphIndex


def add_initializer(
    graph: onnx.GraphProto, tensor: onnx.TensorProto, *, ir_version: int
) -> onnx.TensorProto:
    """Append `tensor` to the graph's initializers (and, below IR 4, to its inputs); returns
    the stored proto (protobuf appends a copy)."""
    graph.initializer.append(tensor)
    if ir_version < 4:
        graph.input.append(
            onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
        )
    return graph.initializer[-1]


def remove_initializers(graph: onnx.GraphProto, names: Iterable[str]) -> None:
    """Remove the named initializers, and the graph inputs of the same names (IR < 4 lists
    every initializer as an input too). The order of what stays is kept."""
    dead = set(names)
    if not dead:
        return
    for i in reversed(range(len(graph.initializer))):
        if graph.initializer[i].name in dead:
            del graph.initializer[i]
    for i in reversed(range(len(graph.input))):
        if graph.input[i].name in dead:
            del graph.input[i]


def drop_dead_constants(index: GraphIndex, candidates: Iterable[str]) -> None:
    """Remove, among `candidates`, the initializers and constant-producing nodes that nothing
    in the index's scope reads, following each removed node's inputs upstream.

    An initializer that is also an overridable graph input (IR >= 4) stays: it is part of the
    model's interface. Constants that were unread before the edit are not candidates, so a
    model's own dead weight is left as it was.
    """
    dead_initializers: set[str] = set()
    pending = [n for n in candidates if n]
    while pending:
        name = pending.pop()
        if index.use_count(name) or name in dead_initializers:
            continue
        if name in index.initializers:
            if not index.is_overridable_input(name):
                dead_initializers.add(name)
            continue
        producer = index.producer(name)
        if producer is None or not is_constant_producer(producer, index):
            continue
        if any(index.use_count(o) for o in producer.output if o):
            continue
        index.remove_node(producer)
        pending.extend(n for n in producer.input if n)
    if index.scope.graph is not None:
        remove_initializers(index.scope.graph, dead_initializers)


def is_constant_producer(node: onnx.NodeProto, index: GraphIndex) -> bool:
    """A Constant node, or a foldable op (model.graph.FOLDABLE_OPS) of constant inputs."""
    if node.op_type == "Constant":
        return True
    if node.op_type not in FOLDABLE_OPS or node.domain not in ("", "ai.onnx"):
        return False
    return all(index.constant(n) is not None for n in node.input if n)


_RAW_TYPES = {
    np.dtype("<f2"): onnx.TensorProto.FLOAT16,
    np.dtype("<f4"): onnx.TensorProto.FLOAT,
    np.dtype("<f8"): onnx.TensorProto.DOUBLE,
}


def replace_tensor_value(tensor: onnx.TensorProto, value: np.ndarray) -> None:
    """Make `tensor` hold `value`, keeping its name: what CopyFrom(from_array(value)) does, with
    one copy of the data fewer (weights are the bulk of a model, so this is worth the lines)."""
    data_type = _RAW_TYPES.get(value.dtype) if np.little_endian else None
    if data_type is None:  # bfloat16 and anything unusual: onnx's own conversion
        new = numpy_helper.from_array(value, tensor.name)
        tensor.CopyFrom(new)
        return
    name = tensor.name
    tensor.Clear()
    tensor.name = name
    tensor.data_type = data_type
    tensor.dims.extend(value.shape)
    tensor.raw_data = np.ascontiguousarray(value).tobytes()
