"""Models ONNX Runtime runs that the ONNX checker refuses: what loading normalises, and how.

The checker is stricter than ONNX Runtime in three ways that real models (ONNX Runtime's own
test models among them) run into:

- IR version 3 requires every initializer to be listed as a graph input; ONNX Runtime does not.
  The missing ones are listed as graph inputs, which is what IR 3 means by an initializer (a
  constant; with IR 3 an initializer is never an input fed at run time), so nothing changes
  in what the model computes or in what fold treats as a constant.
- Nodes must be in topological order; ONNX Runtime sorts them itself. They are sorted here
  (stably: a node moves only as far as its inputs require), in every graph and function.
- A graph output must declare a shape; ONNX Runtime does not need one. The model keeps its
  output as declared; only the checker's copy is given an (empty) shape to get past that rule.

`accept` runs only after the checker has refused a model, so a model the checker accepts is
never touched. It returns the model to use and one line saying what was normalised, or raises
the checker's failure of what is still wrong.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator

import onnx


def accept(
    model: onnx.ModelProto, check: Callable[[onnx.ModelProto], None]
) -> tuple[onnx.ModelProto, str] | None:
    """The model normalised as ONNX Runtime would take it, and a note saying what changed;
    None when nothing here applies (the checker's first refusal stands).

    `check` is the checker to run (it raises BadInputError for what is still wrong after
    normalising); `model` is not modified, the returned one is a copy.
    """
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    done = []
    listed = _list_initializers_as_inputs(fixed)
    if listed:
        done.append(f"listed {_count(listed, 'initializer')} as graph inputs (IR 3 requires it)")
    moved = sum(_sort_topologically(nodes) for nodes in _node_lists(fixed))
    if moved:
        done.append(f"sorted {_count(moved, 'node')} into topological order")
    shapeless = [o.name for o in fixed.graph.output if _lacks_shape(o)]
    if shapeless:
        names = ", ".join(repr(n) for n in shapeless)
        done.append(f"accepted graph output {names} without a declared shape")
    if not done:
        return None
    check(_with_output_shapes(fixed) if shapeless else fixed)
    return fixed, "model normalised on load, as ONNX Runtime takes it: " + "; ".join(done)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _list_initializers_as_inputs(model: onnx.ModelProto) -> int:
    """IR 3: list each main-graph initializer that is not a graph input as one (its own type
    and dims). Subgraph inputs are loop-carried values, so subgraphs are left alone."""
    if model.ir_version >= 4:
        return 0
    graph = model.graph
    inputs = {i.name for i in graph.input}
    missing = [t for t in graph.initializer if t.name not in inputs]
    for tensor in missing:
        graph.input.append(
            onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
        )
    return len(missing)


def _node_lists(model: onnx.ModelProto) -> Iterator:
    """The node container of every graph, subgraph and model-local function."""

    def graph_lists(graph: onnx.GraphProto) -> Iterator:
        yield graph.node
        for node in graph.node:
            for attr in node.attribute:
                subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs
                for sub in subgraphs:
                    yield from graph_lists(sub)

    yield from graph_lists(model.graph)
    for function in model.functions:
        yield function.node


def _free_names(node: onnx.NodeProto) -> set[str]:
    """Explicit inputs plus names the node's subgraphs read from outside themselves."""
    names = {n for n in node.input if n}
    for attr in node.attribute:
        subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for sub in subgraphs:
            defined = {i.name for i in sub.input} | {t.name for t in sub.initializer}
            for inner in sub.node:
                names |= _free_names(inner) - defined
                defined.update(o for o in inner.output if o)
            names |= {o.name for o in sub.output} - defined
    return names


def _sort_topologically(nodes) -> int:
    """Reorder `nodes` so each comes after the producers of what it reads; the earliest ready
    node always goes first, so a sorted list is unchanged. Returns how many nodes moved (0 when
    already sorted, or when a cycle makes an order impossible)."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    waits_on: list[set[int]] = []
    for i, node in enumerate(nodes):
        waits_on.append({producer[n] for n in _free_names(node) if n in producer} - {i})
    readers: dict[int, list[int]] = {}
    for i, deps in enumerate(waits_on):
        for d in deps:
            readers.setdefault(d, []).append(i)
    pending = [len(d) for d in waits_on]
    ready = [i for i, p in enumerate(pending) if p == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for r in readers.get(i, []):
            pending[r] -= 1
            if pending[r] == 0:
                heapq.heappush(ready, r)
    if len(order) != len(nodes) or order == list(range(len(nodes))):
        return 0
    copies = [onnx.NodeProto() for _ in order]
    for copy, i in zip(copies, order, strict=True):
        copy.CopyFrom(nodes[i])
    del nodes[:]
    nodes.extend(copies)
    return sum(1 for position, i in enumerate(order) if position != i)


def _lacks_shape(value: onnx.ValueInfoProto) -> bool:
    return value.type.HasField("tensor_type") and not value.type.tensor_type.HasField("shape")


def _with_output_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy for the checker only: each shapeless graph output gets an empty shape."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for output in copy.graph.output:
        if _lacks_shape(output):
            output.type.tensor_type.shape.SetInParent()
    return copy
