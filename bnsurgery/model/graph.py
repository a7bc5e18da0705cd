"""GraphIndex: producers, consumers and constants of one graph scope, and the walk over scopes.

A *scope* is a list of nodes with its own names: the main graph, a subgraph held by an
If/Loop/Scan attribute, or a model-local function. Names a subgraph uses but does not define
come from the enclosing scopes, so the index of a subgraph has a parent. The node that holds a
subgraph counts as a consumer of every outer name the subgraph uses.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx

from bnsurgery.onnxio import tensor_to_array

# Ops evaluated at rewrite time when all their inputs are constant (exporters emit these to
# build weights and shapes). Anything else with constant inputs stays a runtime op.
FOLDABLE_OPS = frozenset(
    {
        "Identity", "Cast", "CastLike", "Reshape", "Flatten", "Squeeze", "Unsqueeze",
        "Transpose", "ConstantOfShape", "Expand", "Concat", "Gather", "Slice", "Neg", "Abs",
        "Sqrt", "Reciprocal", "Add", "Sub", "Mul", "Div", "Pow", "Range", "Tile",
    }
)  # fmt: skip
MAX_FOLD_ELEMENTS = 1 << 24  # "small enough to evaluate": 16M elements per constant input


def default_opset(opset_imports: Iterator[onnx.OperatorSetIdProto] | list) -> int:
    for entry in opset_imports:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 1


def subgraphs_of(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """The (attribute name, graph) pairs a node holds (If branches, Loop/Scan bodies)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.name, attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for i, g in enumerate(attr.graphs):
                yield f"{attr.name}[{i}]", g


def free_names(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from its enclosing scopes."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.name for t in graph.sparse_initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(n for n in node.input if n)
        for _, sub in subgraphs_of(node):
            used |= free_names(sub)
        defined.update(n for n in node.output if n)
    used.update(o.name for o in graph.output)
    return used - defined


def node_inputs_with_implicit(node: onnx.NodeProto) -> list[str]:
    """Explicit inputs plus the outer-scope names the node's subgraphs read."""
    names = [n for n in node.input if n]
    for _, sub in subgraphs_of(node):
        names.extend(sorted(free_names(sub)))
    return names


class NameGenerator:
    """Model-wide unique names for new tensors and nodes."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self._taken: set[str] = set()
        for scope in iter_scopes(model):
            self._taken |= scope.defined_names()
            for node in scope.nodes:
                self._taken.add(node.name)
                self._taken.update(node.input)

    def __call__(self, base: str) -> str:
        if base not in self._taken:
            self._taken.add(base)
            return base
        for i in itertools.count(1):
            candidate = f"{base}_{i}"
            if candidate not in self._taken:
                self._taken.add(candidate)
                return candidate
        raise AssertionError("unreachable")


@dataclass
class Scope:
    """A container of nodes: the main graph, a subgraph or a model-local function."""

    path: str
    opset: int
    graph: onnx.GraphProto | None = None
    function: onnx.FunctionProto | None = None
    parent: Scope | None = None
    ir_version: int = 8
    children: list[Scope] = field(default_factory=list)

    @property
    def nodes(self):  # RepeatedCompositeFieldContainer[NodeProto]
        return self.graph.node if self.graph is not None else self.function.node  # type: ignore[union-attr]

    @property
    def is_function(self) -> bool:
        return self.function is not None

    def input_names(self) -> list[str]:
        if self.graph is not None:
            return [i.name for i in self.graph.input]
        return list(self.function.input)  # type: ignore[union-attr]

    def output_names(self) -> list[str]:
        if self.graph is not None:
            return [o.name for o in self.graph.output]
        return list(self.function.output)  # type: ignore[union-attr]

    def defined_names(self) -> set[str]:
        names = set(self.input_names()) | set(self.output_names())
        if self.graph is not None:
            names |= {t.name for t in self.graph.initializer}
        for node in self.nodes:
            names.update(n for n in node.output if n)
        return names


def iter_scopes(model: onnx.ModelProto) -> Iterator[Scope]:
    """Every scope of a model, enclosing scopes before the subgraphs they hold."""
    opset = default_opset(model.opset_import)
    main = Scope(path="", opset=opset, graph=model.graph, ir_version=model.ir_version)
    yield from _walk(main)
    for function in model.functions:
        f_opset = default_opset(function.opset_import) if function.opset_import else opset
        scope = Scope(
            path=f"function:{function.domain}::{function.name}",
            opset=f_opset,
            function=function,
            ir_version=model.ir_version,
        )
        yield from _walk(scope)


def _walk(scope: Scope) -> Iterator[Scope]:
    yield scope
    for node in scope.nodes:
        for attr_name, sub in subgraphs_of(node):
            label = node.name or node.op_type
            child = Scope(
                path=f"{scope.path}/{label}.{attr_name}" if scope.path else f"{label}.{attr_name}",
                opset=scope.opset,
                graph=sub,
                parent=scope,
                ir_version=scope.ir_version,
            )
            scope.children.append(child)
            yield from _walk(child)


def index_scopes(model: onnx.ModelProto) -> list[GraphIndex]:
    """One GraphIndex per scope, in iter_scopes order (enclosing scopes first); the index of a
    subgraph has its enclosing scope's index as parent, so outer constants resolve inside it."""
    built: dict[int, GraphIndex] = {}
    for scope in iter_scopes(model):
        parent = built.get(id(scope.parent)) if scope.parent is not None else None
        built[id(scope)] = GraphIndex(scope, parent)
    return list(built.values())


class GraphIndex:
    """Producers, consumers and constants of one scope, kept current through its edit methods."""

    def __init__(self, scope: Scope, parent: GraphIndex | None = None) -> None:
        self.scope = scope
        self.parent = parent
        self.producers: dict[str, tuple[onnx.NodeProto, int]] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self.initializers: dict[str, onnx.TensorProto] = {}
        self._constant_cache: dict[str, np.ndarray | None] = {}
        if scope.graph is not None:
            self.initializers = {t.name: t for t in scope.graph.initializer}
        self.inputs = set(scope.input_names())
        self.outputs = set(scope.output_names())
        for node in scope.nodes:
            self._add_node(node)

    # -- structure -----------------------------------------------------------------------
    def _add_node(self, node: onnx.NodeProto) -> None:
        for i, name in enumerate(node.output):
            if name:
                self.producers[name] = (node, i)
        for name in node_inputs_with_implicit(node):
            self.consumers.setdefault(name, []).append(node)

    def producer(self, name: str) -> onnx.NodeProto | None:
        entry = self.producers.get(name)
        return entry[0] if entry else None

    def consumers_of(self, name: str) -> list[onnx.NodeProto]:
        return self.consumers.get(name, [])

    def is_graph_output(self, name: str) -> bool:
        return name in self.outputs

    def use_count(self, name: str) -> int:
        """How many node inputs and graph outputs read this name, in this scope."""
        return len(self.consumers_of(name)) + (1 if name in self.outputs else 0)

    # -- constants -----------------------------------------------------------------------
    def is_overridable_input(self, name: str) -> bool:
        """A graph input that an initializer only defaults (IR >= 4) can be fed at run time."""
        return name in self.inputs and self.scope.ir_version >= 4

    def constant(self, name: str) -> np.ndarray | None:
        """The value of `name` if it is a constant (initializer, Constant or foldable node)."""
        if name in self._constant_cache:
            return self._constant_cache[name]
        value = self._resolve_constant(name, depth=0)
        self._constant_cache[name] = value
        return value

    def _resolve_constant(self, name: str, depth: int) -> np.ndarray | None:
        if not name or depth > 64:
            return None
        if name in self.initializers:
            if self.is_overridable_input(name):
                return None
            return tensor_to_array(self.initializers[name])
        producer = self.producer(name)
        if producer is None:
            if name in self.inputs:
                return None
            return self.parent.constant(name) if self.parent is not None else None
        if producer.domain not in ("", "ai.onnx"):
            return None
        if producer.op_type == "Constant":
            return _constant_node_value(producer)
        if producer.op_type not in FOLDABLE_OPS:
            return None
        inputs = []
        for inp in producer.input:
            if not inp:
                inputs.append(None)
                continue
            value = self.constant(inp)
            if value is None or value.size > MAX_FOLD_ELEMENTS:
                return None
            inputs.append(value)
        if producer.op_type == "Unsqueeze":
            return _unsqueeze(producer, inputs, self.scope.opset)
        return _evaluate_node(producer, inputs, self.scope.opset, name)

    def forget_constant(self, name: str) -> None:
        self._constant_cache.pop(name, None)

    def tensor_dtype(self, name: str) -> int | None:
        """The ONNX element type of an initializer or Constant-produced tensor, if known."""
        if name in self.initializers:
            return self.initializers[name].data_type
        producer = self.producer(name)
        if producer is not None and producer.op_type == "Constant":
            for attr in producer.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    return attr.t.data_type
        if producer is None and self.parent is not None:
            return self.parent.tensor_dtype(name)
        return None

    # -- edits (keep the maps current) ---------------------------------------------------
    def remove_node(self, node: onnx.NodeProto) -> None:
        nodes = self.scope.nodes
        for i, candidate in enumerate(nodes):
            if candidate is node:
                del nodes[i]
                break
        else:
            raise KeyError(f"node {node.name!r} is not in scope {self.scope.path!r}")
        for name in node.output:
            if self.producers.get(name, (None,))[0] is node:
                del self.producers[name]
            self._constant_cache.pop(name, None)
        for name in node_inputs_with_implicit(node):
            users = self.consumers.get(name, [])
            self.consumers[name] = [u for u in users if u is not node]

    def set_input(self, node: onnx.NodeProto, index: int, name: str) -> None:
        old = node.input[index]
        if old:
            users = self.consumers.get(old, [])
            for i, user in enumerate(users):
                if user is node:
                    del users[i]
                    break
        node.input[index] = name
        self.consumers.setdefault(name, []).append(node)

    def set_output(self, node: onnx.NodeProto, index: int, name: str) -> None:
        old = node.output[index]
        if self.producers.get(old, (None,))[0] is node:
            del self.producers[old]
        self._constant_cache.pop(old, None)
        node.output[index] = name
        self.producers[name] = (node, index)
        self._constant_cache.pop(name, None)


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.ref_attr_name:  # a function attribute reference: depends on the call site
            return None
        if attr.name == "value":
            return tensor_to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None


def _unsqueeze(
    node: onnx.NodeProto, inputs: list[np.ndarray | None], opset: int
) -> np.ndarray | None:
    """Unsqueeze evaluated here, not by onnx.reference: its Unsqueeze-11 puts negative axes in
    the wrong place (axes [-2, -1] on a [C] vector give [1, C, 1], not [C, 1, 1]). Axes count
    from the end of the output; None for axes that are repeated or out of range."""
    data = inputs[0] if inputs else None
    if opset >= 13:
        axes_value = inputs[1] if len(inputs) > 1 else None
        axes = None if axes_value is None else [int(a) for a in np.ravel(axes_value)]
    else:
        axes = next(
            (list(onnx.helper.get_attribute_value(a)) for a in node.attribute if a.name == "axes"),
            None,
        )
    if data is None or not axes:
        return None
    rank = data.ndim + len(axes)
    normalised = sorted(a + rank if a < 0 else a for a in axes)
    if len(set(normalised)) != len(normalised) or not all(0 <= a < rank for a in normalised):
        return None
    value = np.asarray(data)
    for axis in normalised:  # ascending, so each axis is already its place in the output
        value = np.expand_dims(value, axis)
    return value


def _evaluate_node(
    node: onnx.NodeProto, inputs: list[np.ndarray | None], opset: int, wanted: str
) -> np.ndarray | None:
    """Evaluate one node with onnx.reference; None if it cannot be evaluated."""
    from onnx.reference import ReferenceEvaluator

    if any(attr.ref_attr_name for attr in node.attribute):
        return None
    feeds = {}
    graph_inputs = []
    for i, (name, value) in enumerate(zip(node.input, inputs, strict=True)):
        if not name or value is None:
            continue
        feed_name = f"in{i}"
        feeds[feed_name] = value
        graph_inputs.append(
            onnx.helper.make_tensor_value_info(
                feed_name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype), value.shape
            )
        )
    renamed = onnx.NodeProto()
    renamed.CopyFrom(node)
    for i, name in enumerate(node.input):
        if name:
            renamed.input[i] = f"in{i}"
    outputs = [
        onnx.helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None)
        for o in node.output
        if o
    ]
    graph = onnx.helper.make_graph([renamed], "fold", graph_inputs, outputs)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    try:
        results = ReferenceEvaluator(model).run([wanted], feeds)
    except Exception:  # an op the reference cannot evaluate: leave it a runtime op
        return None
    return np.asarray(results[0])
