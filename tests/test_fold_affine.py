"""Per-channel constant Mul/Add/Sub/Div next to Conv/ConvTranspose/Gemm fold like a BN."""

from __future__ import annotations

import models as m
import pytest

import bnsurgery

FOLDABLE = {
    "conv-mul-add": lambda: m.conv_affine(("Mul", "Add")),
    "conv-sub-div": lambda: m.conv_affine(("Sub", "Div")),
    "conv-add-mul-sub": lambda: m.conv_affine(("Add", "Mul", "Sub")),
    "gemm-mul-add": m.gemm_affine,
    "convt-mul": m.convt_affine,
}
NOT_PER_CHANNEL = {
    "conv-spatial-mul": lambda: m.conv_affine(("Mul",), per="spatial"),
    "conv-spatial-add": lambda: m.conv_affine(("Add",), per="spatial"),
    "const-div-by-conv": lambda: m.conv_const_first("Div"),
}


@pytest.mark.parametrize("name", list(FOLDABLE))
def test_affine_fold_is_equivalent(name: str) -> None:
    model = FOLDABLE[name]()
    m.assert_equivalent(model, bnsurgery.fold(model).model)


@pytest.mark.parametrize("name", list(FOLDABLE))
def test_affine_ops_disappear(name: str) -> None:
    folded = bnsurgery.fold(FOLDABLE[name]()).model
    assert len(folded.graph.node) == 1


@pytest.mark.parametrize("name", list(FOLDABLE))
def test_affine_fold_reported_in_node_counts(name: str) -> None:
    model = FOLDABLE[name]()
    report = bnsurgery.fold(model).report
    assert (report.nodes_before, report.nodes_after) == (len(model.graph.node), 1)


@pytest.mark.parametrize("name", list(FOLDABLE))
def test_no_affine_keeps_them(name: str) -> None:
    model = FOLDABLE[name]()
    folded = bnsurgery.fold(model, affine=False).model
    assert len(folded.graph.node) == len(model.graph.node)


@pytest.mark.parametrize("name", list(NOT_PER_CHANNEL))
def test_non_channel_constant_is_not_folded(name: str) -> None:
    model = NOT_PER_CHANNEL[name]()
    assert len(bnsurgery.fold(model).model.graph.node) == len(model.graph.node)


@pytest.mark.parametrize("name", list(NOT_PER_CHANNEL))
def test_non_channel_constant_stays_equivalent(name: str) -> None:
    model = NOT_PER_CHANNEL[name]()
    m.assert_equivalent(model, bnsurgery.fold(model).model)


def test_constant_minus_conv_is_equivalent() -> None:
    """Sub(c, conv) is the affine s = -1, t = c: folding it must keep the sign right."""
    model = m.conv_const_first("Sub")
    m.assert_equivalent(model, bnsurgery.fold(model).model)


def test_affine_ops_do_not_appear_as_bn_entries() -> None:
    assert bnsurgery.fold(m.conv_affine()).report.entries == []
