"""Which BatchNormalization nodes are measured, and their current parameters.

A target is a BN of the main graph in inference mode whose four parameters are constants
(initializers, overridable ones included, or constant expressions). BNs inside functions or
subgraphs, and BNs whose parameters are computed at run time, are reported as skipped with a
reason. A BN's key, its name in reports and statistics files, is model.sites.stats_key: its node
name, or its output when the node is unnamed or its name is not unique. BN sites and their
parameters are read through model.sites, as fold and validate read them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

import onnx

from bnsurgery.errors import BadInputError
from bnsurgery.model.bn import BatchNormView, BnParams
from bnsurgery.model.graph import index_scopes
from bnsurgery.model.sites import float64_params, main_graph_name_counts, sites_of, stats_key

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
    indexes = index_scopes(model)
    main = indexes[0]
    counts = main_graph_name_counts(model)
    targets: list[BnTarget] = []
    skipped: list[dict[str, str]] = []
    seen_any = matched_any = False
    for site in sites_of(indexes):
        seen_any = True
        node, scope = site.node, site.index.scope
        key = stats_key(node, counts) if site.index is main else (node.name or node.output[0])
        if pattern is not None and not pattern.search(key):
            continue
        matched_any = True
        view = site.view()
        if view.training_mode:
            where = f" in {scope.path}" if scope.path else ""
            raise BadInputError(
                f"BatchNormalization '{key}'{where} is in training mode; re-estimation "
                "works on inference-mode BNs (export the model in eval mode)"
            )
        if site.index is not main:
            reason = "in-function" if scope.is_function else "in-subgraph"
            skipped.append({"name": key, "reason": reason})
            continue
        # Overridable initializers count: re-estimation rewrites their stored values.
        values = site.param_values(view, overridable=True)
        if any(value is None for value in values):
            skipped.append({"name": key, "reason": "not-constant"})
            continue
        dtypes = tuple(site.param_types(view, values))
        params = float64_params(view, values, name=key)
        targets.append(BnTarget(key, node, view, params, dtypes))  # type: ignore[arg-type]
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
