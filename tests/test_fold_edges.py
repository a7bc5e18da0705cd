"""Edge cases around the fold patterns: sharing across scopes and between BNs, implicit
consumers in subgraphs, reshapes that mix samples, Scan bodies, affine ops before a Conv."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import models as m
import numpy as np
import onnx
import pytest

import bnsurgery

ANY_KEPT = ("no-linear-neighbour", "channel-axis-mismatch", "producer-has-other-consumers")


@dataclass(frozen=True)
class Edge:
    build: Callable[[], onnx.ModelProto]
    reasons: dict[str, str | tuple[str, ...]]
    bns_after: int | None  # None: either is acceptable, as long as the numbers agree


EDGES: dict[str, Edge] = {
    "reshape-rows-mix-samples": Edge(
        lambda: m.bn_reshape_rows_matmul((4, 6)), {"bn": "channel-axis-mismatch"}, 1
    ),
    "reshape-minus1-rows-mix-samples": Edge(
        lambda: m.bn_reshape_rows_matmul((-1, 6)), {"bn": "channel-axis-mismatch"}, 1
    ),
    "reshape-explicit-batch": Edge(
        lambda: m.bn_reshape_rows_matmul((2, 12)), {"bn": "folded-backward"}, 0
    ),
    "reshape-minus1-per-sample": Edge(
        lambda: m.bn_reshape_rows_matmul((-1, 12)), {"bn": "folded-backward"}, 0
    ),
    "weight-shared-with-subgraph": Edge(m.weight_shared_with_subgraph, {"bn": "folded"}, 0),
    "conv-out-read-by-subgraph": Edge(
        m.conv_out_read_by_subgraph, {"bn": "producer-has-other-consumers"}, 1
    ),
    "bn-in-branch-after-outer-conv": Edge(m.bn_in_branch_after_outer_conv, {"bn": ANY_KEPT}, 1),
    "backward-shared-conv-weight": Edge(m.backward_shared_weight, {"bn": "folded-backward"}, 0),
    "backward-shared-gemm-weight": Edge(
        lambda: m.backward_shared_weight(gemm=True), {"bn": "folded-backward"}, 0
    ),
    "shared-bias": Edge(m.shared_bias, {"bn": "folded"}, 0),
    "shared-bn-params": Edge(m.shared_bn_params, {"bn1": "folded", "bn2": "folded"}, 0),
    "bn-bn-first-is-graph-output": Edge(
        m.bn_bn_first_is_output, {"bn1": "folded", "bn2": "producer-is-graph-output"}, 1
    ),
    "bn-feeds-two-convs": Edge(m.bn_two_convs, {"bn": (*ANY_KEPT, "folded-backward")}, None),
    "matmul-add-full-matrix-bn": Edge(
        m.matmul_add_full_bias_bn, {"bn": (*ANY_KEPT, "folded")}, None
    ),
    "scan-body": Edge(m.scan_bn, {"scan_bn": "folded"}, 0),
}


def _feeds(model: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    """Random feeds; both branch choices when the model has a `cond` input."""
    if any(i.name == "cond" for i in model.graph.input):
        return [m.random_feeds(model, cond=np.array(c)) for c in (True, False)]
    return [m.random_feeds(model)]


@pytest.mark.parametrize("name", list(EDGES))
def test_edge_fold_computes_what_the_original_computes(name: str) -> None:
    model = EDGES[name].build()
    folded = bnsurgery.fold(model).model
    for feeds in _feeds(model):
        m.assert_equivalent(model, folded, feeds)


@pytest.mark.parametrize("name", list(EDGES))
def test_edge_reason(name: str) -> None:
    report = bnsurgery.fold(EDGES[name].build()).report
    expected = EDGES[name].reasons
    got = {bn: report.decision(bn).reason for bn in expected}
    ok = all(
        got[bn] in (want if isinstance(want, tuple) else (want,)) for bn, want in expected.items()
    )
    assert ok, f"reasons {got}, expected {expected}"


@pytest.mark.parametrize("name", [n for n, e in EDGES.items() if e.bns_after is not None])
def test_edge_bns_left(name: str) -> None:
    assert m.count_op(bnsurgery.fold(EDGES[name].build()).model) == EDGES[name].bns_after


def test_subgraph_still_reads_the_original_shared_weight() -> None:
    model = m.weight_shared_with_subgraph()
    folded = bnsurgery.fold(model).model
    branch_w = m.node_named(folded, "branch_conv").input[1]
    np.testing.assert_array_equal(m.initializer(folded, branch_w), m.initializer(model, "W"))


def test_shared_bn_params_are_kept_while_a_bn_reads_them() -> None:
    """Folding bn1 must not drop parameters bn2 still reads (when bn2 stays)."""
    model = m.shared_bn_params()
    model.graph.node.insert(4, onnx.helper.make_node("Relu", ["c2"], ["c2r"], name="relu2"))
    model.graph.node[5].input[0] = "c2r"  # bn2 now follows a Relu: it stays
    folded = bnsurgery.fold(model).model
    onnx.checker.check_model(folded, full_check=True)
    m.assert_equivalent(model, folded)


# -- per-channel affine before a Conv (backward) -------------------------------------------------
@pytest.mark.parametrize("op", ["Mul", "Add"])
def test_affine_before_unpadded_conv_folds(op: str) -> None:
    assert len(bnsurgery.fold(m.affine_before_conv(op)).model.graph.node) == 1


@pytest.mark.parametrize("op", ["Mul", "Add"])
@pytest.mark.parametrize("pad", [0, 1])
def test_affine_before_conv_is_equivalent(op: str, pad: int) -> None:
    model = m.affine_before_conv(op, pad)
    m.assert_equivalent(model, bnsurgery.fold(model).model)


def test_add_before_padded_conv_stays() -> None:
    """Padding zeros are not shifted by t: an Add before a padded Conv cannot fold."""
    assert len(bnsurgery.fold(m.affine_before_conv("Add", pad=1)).model.graph.node) == 2


def test_no_backward_keeps_affine_before_conv() -> None:
    folded = bnsurgery.fold(m.affine_before_conv("Mul"), backward=False).model
    assert len(folded.graph.node) == 2
