"""Which candidate tensor means the same as a reference tensor (for layer-wise comparison).

A tensor name is not a meaning. After `bnsurgery fold`, the Conv's output carries the BN's old
output name (so `bn_out` still means "after BN"), and the Conv's old output name is gone: that
tensor, "before BN", no longer exists anywhere. Another tool may keep the Conv's name for the
folded output instead. Matching by name alone then reports false divergence, or hides one.

The rule, for every non-constant tensor produced by a node of the reference's main graph:

1. **Map.** A fold report's `tensor_map` (reference name -> candidate name, or None when the
   tensor no longer exists) is authoritative for the names it lists.
2. **Structure.** Each tensor gets a structural key: a hash of its producer's op type, domain
   and attributes and of the keys of its non-constant inputs, recursively from the graph inputs.
   Constants (weights) don't enter the key, so a fold that rewrites weights keeps the key.
   BatchNormalization, Identity, and Mul/Add (or Sub/Div by a constant) with one constant operand
   are *transparent*: their output has their input's key, since a fold may absorb them. Tensors
   with equal keys form a group ("x, then x after BN"); within a group:
   a. a candidate tensor of the same name pairs with that name (the fold convention,
      docs/design.md: the BN's output name survives);
   b. the rest pair in order when the candidate kept as many; when it kept fewer (something was
      folded away), the survivors mean the *last* members if the group starts at a linear op
      (Conv, ConvTranspose, Gemm, MatMul: a forward fold), else the *first* ones (a backward
      fold into the consumer); the others have no counterpart.
3. **Name.** Otherwise a candidate tensor of the same name matches when its producer is
   plausibly the same operation: the same op type, or a linear op standing in for a transparent
   one.
4. Otherwise the tensor has no counterpart, and is left out of the layer-wise comparison.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

import onnx

from bnsurgery.errors import BadInputError

LINEAR_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
AFFINE_OPS = frozenset({"Mul", "Add", "Sub", "Div"})
# attributes a fold rewrites without changing what the op computes structurally
IGNORED_ATTRIBUTES = {"Gemm": {"alpha", "beta"}}


@dataclass(frozen=True)
class TensorMatch:
    """One reference tensor and its counterpart (None: no counterpart) and how it was found."""

    reference: str
    candidate: str | None
    how: str  # "map" | "name" | "structure" | "none"
    reference_node: str
    reference_op: str
    candidate_node: str = ""
    candidate_op: str = ""


@dataclass(frozen=True)
class _Tensor:
    name: str
    key: str
    node: onnx.NodeProto
    position: int


def constant_names(graph: onnx.GraphProto) -> set[str]:
    """Initializers and everything computed only from them (Constant nodes included)."""
    # Initializers count as constants even when also listed as graph inputs (old exporters).
    constants = {t.name for t in graph.initializer} | {t.name for t in graph.sparse_initializer}
    for node in graph.node:
        inputs = [n for n in node.input if n]
        if node.op_type == "Constant" or (
            inputs and all(n in constants for n in inputs) and not _has_subgraph(node)
        ):
            constants.update(o for o in node.output if o)
    return constants


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute
    )


def _attribute_signature(node: onnx.NodeProto) -> str:
    """The node's attributes, without those at their default value (exporters differ in which
    defaults they spell out) and without those a fold rewrites."""
    ignored = IGNORED_ATTRIBUTES.get(node.op_type, set())
    defaults = _schema_defaults(node.op_type, node.domain)
    parts = []
    for attr in sorted(node.attribute, key=lambda a: a.name):
        if attr.name in ignored or attr.type in (
            onnx.AttributeProto.GRAPH,
            onnx.AttributeProto.GRAPHS,
            onnx.AttributeProto.TENSOR,
            onnx.AttributeProto.TENSORS,
        ):
            continue
        value = onnx.helper.get_attribute_value(attr)
        if (
            isinstance(value, list)
            and attr.name in IMPLICIT_ALL
            and all(v == IMPLICIT_ALL[attr.name] for v in value)
        ):
            continue
        if attr.name in defaults and defaults[attr.name] == value:
            continue
        parts.append(f"{attr.name}={value!r}")
    return ",".join(parts)


# list attributes whose absence means "this value on every axis"
IMPLICIT_ALL = {"strides": 1, "dilations": 1, "pads": 0}


@functools.lru_cache(maxsize=256)
def _schema_defaults(op_type: str, domain: str) -> dict[str, object]:
    try:
        schema = onnx.defs.get_schema(op_type, domain=domain or "")
    except Exception:  # custom domains and unknown ops have no schema
        return {}
    defaults = {}
    for name, attr in schema.attributes.items():
        if attr.default_value is not None and attr.default_value.type:
            defaults[name] = onnx.helper.get_attribute_value(attr.default_value)
    return defaults


def _is_transparent(node: onnx.NodeProto, dynamic: list[str], constants: set[str]) -> bool:
    if len(dynamic) != 1 or len([o for o in node.output if o]) < 1:
        return False
    if node.op_type in ("BatchNormalization", "Identity"):
        return node.input[0] == dynamic[0]
    if node.op_type in AFFINE_OPS and len(node.input) == 2:
        other = node.input[1] if node.input[0] == dynamic[0] else node.input[0]
        if other not in constants:
            return False
        # c - x and c / x are not an affine of x that a fold absorbs as is
        return node.op_type in ("Mul", "Add") or node.input[0] == dynamic[0]
    return False


def structural_tensors(model: onnx.ModelProto) -> list[_Tensor]:
    """Every non-constant node output of the main graph with its structural key, in order."""
    graph = model.graph
    constants = constant_names(graph)
    keys: dict[str, str] = {i.name: f"input:{i.name}" for i in graph.input}
    tensors: list[_Tensor] = []
    for node in graph.node:
        outputs = [o for o in node.output if o]
        if all(o in constants for o in outputs):
            continue
        dynamic = [n for n in node.input if n and n not in constants]
        if _is_transparent(node, dynamic, constants):
            key = keys.get(dynamic[0], f"unknown:{dynamic[0]}")
            for name in outputs[:1]:
                keys[name] = key
                tensors.append(_Tensor(name, key, node, len(tensors)))
            continue
        base = "|".join(
            [node.domain or "ai.onnx", node.op_type, _attribute_signature(node)]
            + [keys.get(n, f"unknown:{n}") for n in dynamic]
        )
        for index, name in enumerate(node.output):
            if not name:
                continue
            key = hashlib.sha1(f"{base}#{index}".encode()).hexdigest()[:16]
            keys[name] = key
            tensors.append(_Tensor(name, key, node, len(tensors)))
    return tensors


def _head_op(group: list[_Tensor]) -> str:
    return group[0].node.op_type


def match_tensors(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    tensor_map: Mapping[str, str | None] | None = None,
) -> list[TensorMatch]:
    """The counterpart of every non-constant reference node output, in reference order."""
    ref_tensors = structural_tensors(reference)
    cand_tensors = structural_tensors(candidate)
    cand_by_name = {t.name: t for t in cand_tensors}
    chosen: dict[str, tuple[str | None, str]] = {}
    claimed: set[str] = set()

    if tensor_map:
        for ref_name, cand_name in tensor_map.items():
            if cand_name is not None and cand_name not in cand_by_name:
                known_inputs = {i.name for i in candidate.graph.input}
                if cand_name in known_inputs:
                    continue  # a graph input is not compared layer-wise
                raise BadInputError(
                    f"the tensor map sends '{ref_name}' to '{cand_name}', which no node of "
                    "the candidate produces (is the map from another model?)",
                    option="tensor_map",
                )
            chosen[ref_name] = (cand_name, "map")
            if cand_name is not None:
                claimed.add(cand_name)

    groups: dict[str, list[_Tensor]] = {}
    for tensor in ref_tensors:
        groups.setdefault(tensor.key, []).append(tensor)
    cand_groups: dict[str, list[_Tensor]] = {}
    for tensor in cand_tensors:
        cand_groups.setdefault(tensor.key, []).append(tensor)

    for key, group in groups.items():
        refs = [t for t in group if t.name not in chosen]
        cands = [t for t in cand_groups.get(key, []) if t.name not in claimed]
        if not refs or not cands:
            continue
        cand_names = {t.name for t in cands}
        rest_refs = []
        for tensor in refs:
            if tensor.name in cand_names:
                chosen[tensor.name] = (tensor.name, "structure")
                claimed.add(tensor.name)
            else:
                rest_refs.append(tensor)
        rest_cands = [t for t in cands if t.name not in claimed]
        if not rest_refs or not rest_cands:
            continue
        if len(rest_cands) < len(rest_refs):
            if _head_op(group) in LINEAR_OPS:
                rest_refs = rest_refs[len(rest_refs) - len(rest_cands) :]
            else:
                rest_refs = rest_refs[: len(rest_cands)]
        for ref_t, cand_t in zip(rest_refs, rest_cands, strict=False):
            chosen[ref_t.name] = (cand_t.name, "structure")
            claimed.add(cand_t.name)

    for tensor in ref_tensors:
        if tensor.name in chosen:
            continue
        other = cand_by_name.get(tensor.name)
        if other is not None and other.name not in claimed and _plausible(tensor, other):
            chosen[tensor.name] = (other.name, "name")
            claimed.add(other.name)

    matches = []
    for tensor in ref_tensors:
        cand_name, how = chosen.get(tensor.name, (None, "none"))
        if cand_name is None:
            how = "map" if how == "map" else "none"
        cand = cand_by_name.get(cand_name) if cand_name else None
        matches.append(
            TensorMatch(
                reference=tensor.name,
                candidate=cand_name,
                how=how,
                reference_node=tensor.node.name,
                reference_op=tensor.node.op_type,
                candidate_node=cand.node.name if cand else "",
                candidate_op=cand.node.op_type if cand else "",
            )
        )
    return matches


def _plausible(ref: _Tensor, cand: _Tensor) -> bool:
    a, b = ref.node.op_type, cand.node.op_type
    if a == b:
        return True
    transparent = {"BatchNormalization", "Identity", *AFFINE_OPS}
    return a in transparent and (b in LINEAR_OPS or b in transparent)


def identity_matches(model: onnx.ModelProto) -> list[TensorMatch]:
    """Every non-constant node output matched to itself (one model on two providers)."""
    matches = []
    for t in structural_tensors(model):
        node, op = t.node.name, t.node.op_type
        matches.append(TensorMatch(t.name, t.name, "name", node, op, node, op))
    return matches


def load_tensor_map(path: str) -> dict[str, str | None]:
    """The `tensor_map` of a `bnsurgery fold --json` report (or a bare {ref: cand} object)."""
    try:
        with open(path, encoding="utf-8") as fh:
            document = json.load(fh)
    except OSError as exc:
        raise BadInputError(
            f"{{option}} {path}: cannot read ({exc.strerror})", option="tensor_map"
        ) from None
    except json.JSONDecodeError as exc:
        raise BadInputError(
            f"{{option}} {path}: not JSON ({exc.msg} at line {exc.lineno})", option="tensor_map"
        ) from None
    mapping = _find_tensor_map(document)
    if mapping is None or not all(
        isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in mapping.items()
    ):
        raise BadInputError(
            f"{{option}} {path}: expected a fold report with a 'tensor_map' object of "
            "{reference_tensor: candidate_tensor or null}",
            option="tensor_map",
        )
    return dict(mapping)


def _find_tensor_map(document: object) -> dict | None:
    """`tensor_map` at the top level, one level down (a wrapped report), or a bare mapping."""
    if not isinstance(document, dict):
        return None
    if isinstance(document.get("tensor_map"), dict):
        return document["tensor_map"]
    for value in document.values():
        if isinstance(value, dict) and isinstance(value.get("tensor_map"), dict):
            return value["tensor_map"]
    if document and all(v is None or isinstance(v, str) for v in document.values()):
        return document
    return None
