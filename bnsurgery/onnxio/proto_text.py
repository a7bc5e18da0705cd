"""Refuse a model whose names are not text.

protobuf's string fields must hold UTF-8, but nothing enforces it on parsing: upb hands back
`bytes` for a proto2 string field that is not valid UTF-8, and the ONNX checker accepts it. Every
name then breaks the first str operation on it (a report table, a dict of tensors), so the
loader checks the names the passes use, once, and turns a damaged one into bad input.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx

_GRAPH_ATTRIBUTES = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def _graph_names(graph: onnx.GraphProto, where: str) -> Iterator[tuple[str, object]]:
    yield f"{where} name", graph.name
    for kind, values in (
        ("input", graph.input),
        ("output", graph.output),
        ("value_info", graph.value_info),
        ("initializer", graph.initializer),
    ):
        for i, value in enumerate(values):
            yield f"{where} {kind} {i} name", value.name
    yield from _node_names(graph.node, where)


def _node_names(nodes, where: str) -> Iterator[tuple[str, object]]:
    for i, node in enumerate(nodes):
        label = f"{where} node {i}"
        yield f"{label} name", node.name
        yield f"{label} op_type", node.op_type
        yield f"{label} domain", node.domain
        for value in (*node.input, *node.output):
            yield f"{label} input/output", value
        for attr in node.attribute:
            yield f"{label} attribute name", attr.name
            if attr.type in _GRAPH_ATTRIBUTES:
                for sub in (attr.g, *attr.graphs):
                    yield from _graph_names(sub, f"{label} attribute {attr.name!r}")


def _model_names(model: onnx.ModelProto) -> Iterator[tuple[str, object]]:
    for opset in model.opset_import:
        yield "opset_import domain", opset.domain
    yield from _graph_names(model.graph, "graph")
    for i, function in enumerate(model.functions):
        where = f"function {i}"
        yield f"{where} name", function.name
        yield f"{where} domain", function.domain
        for value in (*function.input, *function.output):
            yield f"{where} input/output", value
        yield from _node_names(function.node, where)


def first_non_text_name(model: onnx.ModelProto) -> str | None:
    """Where the first name that is not UTF-8 text sits, or None when all are text."""
    return next((label for label, value in _model_names(model) if not isinstance(value, str)), None)
