"""Convert a float32 model to float16, keeping its float32 interface, and say what overflowed.

The conversion (what onnxconverter-common's `keep_io_types=True` does, in a few rules):

- float32 initializers, Constant values, ConstantOfShape values become float16; values beyond
  float16's range become ±inf (counted as overflow), non-zero values below its smallest
  subnormal become 0 (counted as flushed);
- Cast(to=FLOAT) becomes Cast(to=FLOAT16);
- a float32 graph input is cast to float16 right after it, a float32 graph output is cast back
  from float16 right before it, so callers feed and read float32 as before;
- inputs whose schema admits only tensor(float) (Resize scales, for instance) stay float32: a
  constant keeps its float32 value, a computed tensor is cast back to float32 before the node;
- subgraphs (If/Loop/Scan bodies) get the same treatment, their float32 declarations included.

On the CPU provider, ONNX Runtime computes nodes that lack a float16 kernel in float32 (its
InsertCastTransformer): the measured error then comes from float16 storage between nodes and
understates what float16 arithmetic on a GPU would do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

FLOAT = onnx.TensorProto.FLOAT
FLOAT16 = onnx.TensorProto.FLOAT16
FP16_MAX = float(np.finfo(np.float16).max)
FP16_SMALLEST = float(np.finfo(np.float16).smallest_subnormal)


@dataclass
class Fp16Conversion:
    """The float16 model and what its weights lost on the way."""

    model: onnx.ModelProto
    converted_tensors: int = 0
    overflow: dict[str, int] = field(default_factory=dict)  # tensor -> values that became inf
    flushed: dict[str, int] = field(default_factory=dict)  # tensor -> non-zero values -> 0
    kept_float32: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "converted_tensors": self.converted_tensors,
            "weights_overflowing_to_inf": self.overflow,
            "weights_flushed_to_zero": self.flushed,
            "kept_float32": self.kept_float32,
        }


def convert_to_float16(model: onnx.ModelProto) -> Fp16Conversion:
    """A float16 copy of `model` with its float32 inputs and outputs kept (see module doc)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    result = Fp16Conversion(copy)
    opset = _default_opset(copy)
    graph = copy.graph
    needs_fp32 = _float32_only_inputs(graph, opset)
    _convert_graph(graph, result, needs_fp32, opset, top=True)
    _wrap_interface(graph)
    _repair_float32_inputs(copy, opset)
    return result


def _default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 1


def _formal_types(op_type: str, domain: str, opset: int) -> list[tuple[set[str], bool]] | None:
    """Per formal input: the allowed type strings, and whether it is variadic."""
    if domain not in ("", "ai.onnx"):
        return None
    try:
        schema = onnx.defs.get_schema(op_type, opset, domain)
    except Exception:
        return None
    constraints = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    formal = []
    for param in schema.inputs:
        allowed = constraints.get(param.type_str, {param.type_str})
        variadic = param.option == onnx.defs.OpSchema.FormalParameterOption.Variadic
        formal.append((allowed, variadic))
    return formal


def _allowed(formal: list[tuple[set[str], bool]], index: int) -> set[str] | None:
    if index < len(formal):
        return formal[index][0]
    if formal and formal[-1][1]:
        return formal[-1][0]
    return None


def _float32_only_inputs(graph: onnx.GraphProto, opset: int) -> set[str]:
    """Names that feed an input slot which admits tensor(float) but not tensor(float16)."""
    names: set[str] = set()
    for node in graph.node:
        formal = _formal_types(node.op_type, node.domain, opset)
        if formal is None:
            continue
        for index, name in enumerate(node.input):
            allowed = _allowed(formal, index)
            if name and allowed and "tensor(float16)" not in allowed:
                names.add(name)
    return names


def _to_half(tensor: onnx.TensorProto, result: Fp16Conversion) -> onnx.TensorProto:
    values = numpy_helper.to_array(tensor).astype(np.float64)
    with np.errstate(over="ignore"):
        half = values.astype(np.float16)
    finite = np.isfinite(values)
    overflow = int((finite & np.isinf(half)).sum())
    flushed = int(((values != 0) & (half == 0) & finite).sum())
    label = tensor.name or "<constant>"
    if overflow:
        result.overflow[label] = result.overflow.get(label, 0) + overflow
    if flushed:
        result.flushed[label] = result.flushed.get(label, 0) + flushed
    result.converted_tensors += 1
    return numpy_helper.from_array(half, tensor.name)


def _convert_graph(
    graph: onnx.GraphProto, result: Fp16Conversion, keep: set[str], opset: int, top: bool
) -> None:
    for i, tensor in enumerate(graph.initializer):
        if tensor.data_type == FLOAT:
            if tensor.name in keep:
                result.kept_float32.append(tensor.name)
                continue
            graph.initializer[i].CopyFrom(_to_half(tensor, result))
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            if any(o in keep for o in node.output):
                result.kept_float32.extend(o for o in node.output if o)
                continue
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == FLOAT:
                    half = _to_half(attr.t, result)
                    half.name = attr.t.name
                    attr.t.CopyFrom(half)
                elif attr.name in ("value_float", "value_floats"):
                    values = onnx.helper.get_attribute_value(attr)
                    array = np.asarray(values, dtype=np.float32)
                    tensor = numpy_helper.from_array(array, node.output[0])
                    node.attribute.remove(attr)
                    node.attribute.append(
                        onnx.helper.make_attribute("value", _to_half(tensor, result))
                    )
                    break
        elif node.op_type == "ConstantOfShape":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == FLOAT:
                    attr.t.CopyFrom(_to_half(attr.t, result))
        elif node.op_type == "Cast" and not any(o in keep for o in node.output):
            for attr in node.attribute:
                if attr.name == "to" and attr.i == FLOAT:
                    attr.i = FLOAT16
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _convert_subgraph(attr.g, result, opset)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _convert_subgraph(sub, result, opset)
    # stale types: the converted graph's intermediate float32 declarations are wrong now
    if top:
        del graph.value_info[:]


def _convert_subgraph(graph: onnx.GraphProto, result: Fp16Conversion, opset: int) -> None:
    _convert_graph(graph, result, _float32_only_inputs(graph, opset), opset, top=False)
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.tensor_type.elem_type == FLOAT:
            value.type.tensor_type.elem_type = FLOAT16


def _unique(graph: onnx.GraphProto, base: str) -> str:
    taken = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    for node in graph.node:
        taken.update(node.output)
        taken.update(node.input)
    name, n = base, 0
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    return name


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                shadowed = {v.name for v in sub.input} | {t.name for t in sub.initializer}
                if old not in shadowed:
                    _rename_uses(sub, old, new)
                    for out in sub.output:
                        if out.name == old:
                            out.name = new


def _wrap_interface(graph: onnx.GraphProto) -> None:
    initializers = {t.name for t in graph.initializer}
    casts_in = []
    for value in graph.input:
        if value.name in initializers or value.type.tensor_type.elem_type != FLOAT:
            continue
        half = _unique(graph, f"{value.name}_fp16")
        _rename_uses(graph, value.name, half)
        casts_in.append(onnx.helper.make_node("Cast", [value.name], [half], to=FLOAT16))
    for node in reversed(casts_in):
        graph.node.insert(0, node)
    for value in graph.output:
        if value.type.tensor_type.elem_type != FLOAT:
            continue
        half = _unique(graph, f"{value.name}_fp16")
        for node in graph.node:
            for i, name in enumerate(node.output):
                if name == value.name:
                    node.output[i] = half
        _rename_uses(graph, value.name, half)
        graph.node.append(onnx.helper.make_node("Cast", [half], [value.name], to=FLOAT))


def _repair_float32_inputs(model: onnx.ModelProto, opset: int) -> None:
    """Cast float16 tensors back to float32 before slots that admit only tensor(float)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:
        return
    graph = inferred.graph
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in [*graph.value_info, *graph.input, *graph.output]
    }
    types.update({t.name: t.data_type for t in model.graph.initializer})
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        formal = _formal_types(node.op_type, node.domain, opset)
        for index, name in enumerate(node.input if formal is not None else ()):
            allowed = _allowed(formal, index)  # type: ignore[arg-type]
            if (
                name
                and allowed
                and "tensor(float16)" not in allowed
                and "tensor(float)" in allowed
                and types.get(name) == FLOAT16
            ):
                cast_name = _unique(model.graph, f"{name}_fp32")
                nodes.append(onnx.helper.make_node("Cast", [name], [cast_name], to=FLOAT))
                node.input[index] = cast_name
        nodes.append(node)
    if len(nodes) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(nodes)
