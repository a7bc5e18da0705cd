"""BatchNormalization sites: where each BN of a model stands, how reports name it, and its
constant parameters in float64. Fold, validate's checks and re-estimation all start here.

A site is one BatchNormalization node of the default domain, in one scope (the main graph, a
subgraph of an If/Loop/Scan, or a model-local function), with that scope's GraphIndex. Its
parameters are read through the index: initializers, Constant nodes and constant-foldable
chains, a subgraph seeing its enclosing scopes' constants.

Naming. `bn_label` is the one name every report gives a BN: its node name, or
"BatchNormalization(<its output>)" when it has none (fold's and validate's tables and JSON, the
fold-by-fold verification). `stats_key` is the key re-estimation's report and stats files have
always used (the node name when it is unique among the main graph's BNs, else the output
name); it stays as a documented alias so that stats files already written keep their meaning.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from bnsurgery.errors import BadInputError
from bnsurgery.model.bn import BatchNormView, BnParams, check_param_shapes
from bnsurgery.model.dtypes import is_float_array
from bnsurgery.model.graph import GraphIndex, index_scopes
from bnsurgery.onnxio import tensor_to_array

BN_OP = "BatchNormalization"
PARAM_LABELS = ("scale", "B", "mean", "var")


def is_batchnorm(node: onnx.NodeProto) -> bool:
    """A BatchNormalization of the default ONNX domain (a custom-domain op of the same name is
    someone else's)."""
    return node.op_type == BN_OP and node.domain in ("", "ai.onnx")


def bn_label(node: onnx.NodeProto) -> str:
    """How reports name a BatchNormalization node: its name, or BatchNormalization(output)."""
    return node.name or f"{BN_OP}({node.output[0]})"


def main_graph_name_counts(model: onnx.ModelProto) -> dict[str, int]:
    """How many BNs of the main graph carry each node name (what `stats_key` needs)."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if is_batchnorm(node):
            counts[node.name] = counts.get(node.name, 0) + 1
    return counts


def stats_key(node: onnx.NodeProto, name_counts: Mapping[str, int]) -> str:
    """Re-estimation's key for a main-graph BN (its report and stats files): the node name when
    it is unique among the main graph's BNs (`main_graph_name_counts`), else the BN's output.

    An alias of `bn_label` kept for files already written: it differs for an unnamed BN
    ("y" against "BatchNormalization(y)") and for a name several BNs share (the output, which
    is unique, against the shared name)."""
    if node.name and name_counts.get(node.name, 0) == 1:
        return node.name
    return node.output[0]


@dataclass(eq=False)
class BnSite:
    """One BatchNormalization node and the GraphIndex of the scope it stands in."""

    node: onnx.NodeProto
    index: GraphIndex

    @property
    def scope(self) -> str:
        """The scope's path ("" for the main graph), as reports print it."""
        return self.index.scope.path

    @property
    def label(self) -> str:
        return bn_label(self.node)

    def view(self) -> BatchNormView:
        """The node's attributes normalised over opsets (BadInputError: fewer than 5 inputs)."""
        return BatchNormView.of(self.node, self.index.scope.opset)

    def param_values(
        self, view: BatchNormView, *, overridable: bool = False
    ) -> list[np.ndarray | None]:
        """(scale, B, mean, var) as stored, None where one is not a constant.

        overridable=True also reads an initializer that a graph input can override (IR >= 4):
        its stored value, for a pass that rewrites it in place (re-estimation); fold and the
        checks must not treat such a value as fixed."""
        values: list[np.ndarray | None] = []
        for name in view.param_names:
            if overridable and name in self.index.initializers:
                values.append(tensor_to_array(self.index.initializers[name]))
            else:
                values.append(self.index.constant(name))
        return values

    def param_types(
        self, view: BatchNormView, values: Sequence[np.ndarray | None]
    ) -> list[int | None]:
        """ONNX element types of the parameters as stored: the initializer's own type, else
        that of the constant's value; None where a parameter is not a constant."""
        types: list[int | None] = []
        for name, value in zip(view.param_names, values, strict=True):
            if name in self.index.initializers:
                types.append(self.index.initializers[name].data_type)
            elif value is not None:
                types.append(onnx.helper.np_dtype_to_tensor_dtype(value.dtype))
            else:
                types.append(None)
        return types

    @staticmethod
    def param_problem(
        view: BatchNormView, values: Sequence[np.ndarray | None]
    ) -> tuple[str, str] | None:
        """Why the parameters are not usable constants, as fold's (reason, detail): the first
        parameter, in input order, that is not a constant or not floating point; else None."""
        for label, name, value in zip(PARAM_LABELS, view.param_names, values, strict=True):
            if value is None:
                return "not-constant", f"{label} '{name}' is not a constant"
            if not is_float_array(value):
                return "unsupported-dtype", f"{label} '{name}' has dtype {value.dtype}"
        return None


def float64_params(
    view: BatchNormView, values: Sequence[np.ndarray | None], *, name: str
) -> BnParams:
    """The four constant parameters as float64 vectors, shape-checked (BadInputError names
    the BN as `name`): a spatial BN needs four vectors of the channel count, a spatial=0 BN
    (opset < 9) four tensors of one shape, flattened."""
    if any(v is None for v in values):
        raise ValueError("float64_params needs four constant values")
    arrays = [np.asarray(v, dtype=np.float64) for v in values]
    if view.spatial:
        check_param_shapes(name, *arrays)
        return BnParams(*arrays)
    if len({a.shape for a in arrays}) != 1:
        raise BadInputError(
            f"BatchNormalization {name!r} (spatial=0) has parameters of different "
            f"shapes: {', '.join(str(list(a.shape)) for a in arrays)}"
        )
    return BnParams(*(a.reshape(-1) for a in arrays))


def sites_of(indexes: Iterable[GraphIndex]) -> Iterator[BnSite]:
    """Every BN of the given scopes, scope by scope, in node order."""
    for index in indexes:
        for node in index.scope.nodes:
            if is_batchnorm(node):
                yield BnSite(node, index)


def bn_sites(model: onnx.ModelProto) -> list[BnSite]:
    """Every BN of the model, in every scope: enclosing scopes first, then node order (the
    order of fold's report)."""
    return list(sites_of(index_scopes(model)))
