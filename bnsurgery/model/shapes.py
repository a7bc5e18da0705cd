"""Shapes and element types of a model's tensors: what the model declares, completed by one
call to ONNX shape inference, made once per view.

Inference is a help to the passes and checks that read it (a proof that a MatMul input is 2-D,
the element type of a BN's input), never a requirement, so it runs the permissive way: not
strict, no type check, no data propagation. A model it rejects, or one of 1 GiB or more (it
serialises the model, and protobuf stops at 2 GiB), simply has no inferred shapes.

Declared information wins over inferred: names keep their declared type. Validate's
`shape-inference` check asks a different question (does strict inference succeed?) and calls
onnx itself.
"""

from __future__ import annotations

import logging

import onnx

logger = logging.getLogger(__name__)

INFERENCE_LIMIT = 1 << 30  # bytes of serialised model, beyond which inference is not tried

Shape = tuple[int | None, ...]  # None for a dimension that is not a known number


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """The model with inferred value_info (onnx.shape_inference, permissive), or None."""
    if model.ByteSize() >= INFERENCE_LIMIT:
        logger.debug("shape inference skipped: the model is 1 GiB or more")
        return None
    try:
        return onnx.shape_inference.infer_shapes(
            model, check_type=False, strict_mode=False, data_prop=False
        )
    except Exception as exc:  # inference is a help, never a requirement
        logger.debug("shape inference failed: %s", exc)
        return None


class TensorShapes:
    """Shapes and element types of the tensors of one model, in every scope.

    Inference runs on first use and once. The view reads the model as it is then; a pass that
    rewrites the model may keep using it for names whose shape the rewrite keeps (fold does:
    every name keeps its meaning and its shape).
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self._shapes: dict[str, Shape] | None = None
        self._types: dict[str, int] | None = None

    def shape(self, name: str) -> Shape | None:
        if self._shapes is None:
            self._collect()
        assert self._shapes is not None
        return self._shapes.get(name)

    def rank(self, name: str) -> int | None:
        shape = self.shape(name)
        return None if shape is None else len(shape)

    def elem_type(self, name: str) -> int | None:
        """The ONNX element type of a tensor, when declared or inferred."""
        if self._types is None:
            self._collect()
        assert self._types is not None
        return self._types.get(name)

    def _collect(self) -> None:
        shapes: dict[str, Shape] = {}
        types: dict[str, int] = {}
        inferred = infer_shapes(self.model)
        if inferred is not None:
            _declared(inferred.graph, shapes, types)
        _declared(self.model.graph, shapes, types)  # declared last: it wins
        self._shapes, self._types = shapes, types


def _declared(graph: onnx.GraphProto, shapes: dict[str, Shape], types: dict[str, int]) -> None:
    for value in [*graph.input, *graph.value_info, *graph.output]:
        if not value.type.HasField("tensor_type"):
            continue
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type:
            types[value.name] = tensor_type.elem_type
        if tensor_type.HasField("shape"):
            shapes[value.name] = tuple(
                d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim
            )
    for init in graph.initializer:
        shapes[init.name] = tuple(init.dims)
        types[init.name] = init.data_type
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _declared(attr.g, shapes, types)
