"""Which BatchNormalization nodes are measured, and their current parameters.

A target is a BN of the main graph in inference mode whose four parameters are constants
(initializers, overridable ones included, or constant expressions). BNs inside functions or
subgraphs, and BNs whose parameters are computed at run time, are reported as skipped with a
reason. A BN's key, its name in reports and statistics files, is its node name, or its output
when the node is unnamed or its name is not unique.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from bnsurgery.errors import BadInputError
from bnsurgery.model.bn import BatchNormView, BnParams, check_param_shapes
from bnsurgery.model.graph import GraphIndex, iter_scopes

logger = logging.getLogger(__name__)


@dataclass
class BnTarget:
    """One BatchNormalization of the main graph whose statistics are (re)measured."""

    key: str
    node: onnx.NodeProto
    view: BatchNormView
    params: BnParams
    dtypes: tuple[int, int, int, int]
    wave: int = 0  # set by the plan: 1 + the newest wave upstream of it

    @property
    def x(self) -> str:
        return self.node.input[0]

    @property
    def channels(self) -> int:
        return self.params.channels


def bn_key(node: onnx.NodeProto, name_counts: Mapping[str, int]) -> str:
    """A BN's name in reports and stats files: its node name, or its output when unnamed."""
    if node.name and name_counts.get(node.name, 0) == 1:
        return node.name
    return node.output[0]


@dataclass(frozen=True)
class ExactNames:
    """A `nodes` selection by exact names (what adapt hands on from its insert step)."""

    names: frozenset[str]

    def search(self, name: str) -> bool:
        return name in self.names


def compile_nodes(nodes: str | Iterable[str] | None) -> re.Pattern[str] | ExactNames | None:
    """The `nodes` regular expression, compiled (None: every node); a bad one is exit 2. A
    collection of names instead of a string selects exactly those names."""
    if nodes is None:
        return None
    if not isinstance(nodes, str):
        return ExactNames(frozenset(nodes))
    try:
        return re.compile(nodes)
    except re.error as exc:
        raise BadInputError(
            f"{{option}} '{nodes}' is not a valid regular expression ({exc})", option="nodes"
        ) from None


def find_batchnorms(
    model: onnx.ModelProto, nodes: str | Iterable[str] | None = None
) -> tuple[list[BnTarget], list[dict[str, str]]]:
    """The main-graph BNs to re-estimate (selected by the `nodes` regex), and those skipped.

    Raises BadInputError when the model has no BN, when `nodes` matches none, or when a BN is
    in training mode.
    """
    pattern = compile_nodes(nodes)
    scopes = list(iter_scopes(model))
    main = scopes[0]
    counts: dict[str, int] = {}
    for node in main.nodes:
        if _is_bn(node):
            counts[node.name] = counts.get(node.name, 0) + 1
    index = GraphIndex(main)
    targets: list[BnTarget] = []
    skipped: list[dict[str, str]] = []
    seen_any = matched_any = False
    for scope in scopes:
        for node in scope.nodes:
            if not _is_bn(node):
                continue
            seen_any = True
            key = bn_key(node, counts) if scope is main else (node.name or node.output[0])
            if pattern is not None and not pattern.search(key):
                continue
            matched_any = True
            view = BatchNormView.of(node, scope.opset)
            if view.training_mode:
                where = f" in {scope.path}" if scope.path else ""
                raise BadInputError(
                    f"BatchNormalization '{key}'{where} is in training mode; re-estimation "
                    "works on inference-mode BNs (export the model in eval mode)"
                )
            if scope is not main:
                reason = "in-function" if scope.is_function else "in-subgraph"
                skipped.append({"name": key, "reason": reason})
                continue
            target = _target(index, node, key, view)
            if isinstance(target, str):
                skipped.append({"name": key, "reason": target})
            else:
                targets.append(target)
    if not seen_any:
        raise BadInputError(
            "the model has no BatchNormalization node to re-estimate; insert some first "
            "(bnsurgery insert, or bnsurgery adapt for the whole workflow)"
        )
    if not matched_any:
        raise BadInputError(
            f"{{option}} '{nodes}' matches no BatchNormalization node", option="nodes"
        )
    if not targets:
        reasons = ", ".join(sorted({s["reason"] for s in skipped}))
        raise BadInputError(f"no BatchNormalization can be re-estimated (all skipped: {reasons})")
    logger.debug(
        "targets: %d BN(s) of %d selected; skipped %s",
        len(targets), len(targets) + len(skipped), skipped or "none",
    )  # fmt: skip
    return targets, skipped


def _is_bn(node: onnx.NodeProto) -> bool:
    return node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")


def _read_param(index: GraphIndex, name: str) -> tuple[np.ndarray | None, int | None]:
    """(value, ONNX dtype) of a BN parameter: an initializer (even an overridable one) or a
    constant expression; (None, None) when it is computed at run time."""
    if name in index.initializers:
        tensor = index.initializers[name]
        return numpy_helper.to_array(tensor), tensor.data_type
    value = index.constant(name)
    if value is None:
        return None, None
    return value, onnx.helper.np_dtype_to_tensor_dtype(value.dtype)


def _target(
    index: GraphIndex, node: onnx.NodeProto, key: str, view: BatchNormView
) -> BnTarget | str:
    """The target, or why the BN cannot be one ("not-constant")."""
    values, dtypes = [], []
    for name in view.param_names:
        value, dtype = _read_param(index, name)
        if value is None:
            return "not-constant"
        array = np.asarray(value, dtype=np.float64)
        values.append(array if view.spatial else array.reshape(-1))
        dtypes.append(dtype)
    if view.spatial:
        check_param_shapes(key, *values)
    elif len({v.shape for v in values}) != 1:
        raise BadInputError(f"BatchNormalization '{key}' has parameters of different sizes")
    return BnTarget(key, node, view, BnParams(*values), tuple(dtypes))  # type: ignore[arg-type]
