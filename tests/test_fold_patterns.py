"""Every fold pattern of docs/fold.md, as a table: the model, the reason each BN gets, the BNs left.

For each row three specifications are checked separately:
- the folded model computes what the original computes (ORT DISABLE_ALL, or onnx.reference);
- each BN gets its reason code;
- the folded model holds the expected number of BatchNormalization nodes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import models as m
import numpy as np
import onnx
import pytest

import bnsurgery

FOLDED = ("folded", "folded-backward")


@dataclass(frozen=True)
class Case:
    build: Callable[[], onnx.ModelProto]
    reasons: dict[str, str | tuple[str, ...]]  # BN node -> reason (or the allowed reasons)
    bns_after: int


CASES: dict[str, Case] = {
    # forward: Conv of every rank, with and without bias, grouped and depthwise
    "conv1d-bn": Case(lambda: m.conv_bn(1), {"bn": "folded"}, 0),
    "conv2d-bn": Case(lambda: m.conv_bn(2), {"bn": "folded"}, 0),
    "conv3d-bn": Case(lambda: m.conv_bn(3, size=5), {"bn": "folded"}, 0),
    "conv2d-nobias-bn": Case(lambda: m.conv_bn(2, bias=False), {"bn": "folded"}, 0),
    "conv1d-nobias-bn": Case(lambda: m.conv_bn(1, bias=False), {"bn": "folded"}, 0),
    "conv3d-nobias-bn": Case(lambda: m.conv_bn(3, bias=False, size=5), {"bn": "folded"}, 0),
    "conv-grouped-bn": Case(lambda: m.conv_bn(2, group=2), {"bn": "folded"}, 0),
    "conv-grouped-nobias-bn": Case(
        lambda: m.conv_bn(2, group=3, bias=False, cin=6, cout=9, k=1, pad=0), {"bn": "folded"}, 0
    ),
    "conv-depthwise-bn": Case(lambda: m.depthwise_conv_bn(6), {"bn": "folded"}, 0),
    "conv1d-depthwise-bn": Case(lambda: m.depthwise_conv_bn(5, dims=1), {"bn": "folded"}, 0),
    "conv-strided-dilated-bn": Case(
        lambda: m.conv_bn(2, stride=2, dilation=2, size=9), {"bn": "folded"}, 0
    ),
    "conv-eps-1e-3-bn": Case(lambda: m.conv_bn(2, eps=1e-3), {"bn": "folded"}, 0),
    # forward: ConvTranspose, grouped, with and without bias
    "convt-bn": Case(lambda: m.conv_transpose_bn(), {"bn": "folded"}, 0),
    "convt-nobias-bn": Case(lambda: m.conv_transpose_bn(bias=False), {"bn": "folded"}, 0),
    "convt-grouped-bn": Case(lambda: m.conv_transpose_bn(group=2), {"bn": "folded"}, 0),
    "convt-grouped-nobias-bn": Case(
        lambda: m.conv_transpose_bn(group=2, bias=False), {"bn": "folded"}, 0
    ),
    "convt-depthwise-bn": Case(
        lambda: m.conv_transpose_bn(group=4, cin=4, cout=8), {"bn": "folded"}, 0
    ),
    "convt1d-grouped-bn": Case(lambda: m.conv_transpose_bn(1, group=2), {"bn": "folded"}, 0),
    # forward: Gemm
    "gemm-bn": Case(lambda: m.gemm_bn(), {"bn": "folded"}, 0),
    "gemm-transB-bn": Case(lambda: m.gemm_bn(trans_b=1), {"bn": "folded"}, 0),
    "gemm-transA-bn": Case(lambda: m.gemm_bn(trans_a=1), {"bn": "folded"}, 0),
    "gemm-alpha-beta-bn": Case(
        lambda: m.gemm_bn(trans_b=0, alpha=0.7, beta=1.3), {"bn": "folded"}, 0
    ),
    "gemm-transB-alpha-beta-bn": Case(
        lambda: m.gemm_bn(trans_b=1, alpha=1.9, beta=0.4), {"bn": "folded"}, 0
    ),
    "gemm-C-1xN-bn": Case(lambda: m.gemm_bn(c_shape="1N", beta=2.0), {"bn": "folded"}, 0),
    "gemm-C-scalar-bn": Case(lambda: m.gemm_bn(c_shape="scalar", beta=0.5), {"bn": "folded"}, 0),
    "gemm-C-MxN-bn": Case(lambda: m.gemm_bn(c_shape="MN", beta=0.5), {"bn": "folded"}, 0),
    "gemm-noC-bn": Case(lambda: m.gemm_bn(c_shape=None, alpha=0.3), {"bn": "folded"}, 0),
    # forward: MatMul (+ constant Add) with a 2-D output; not on [B, T, F]
    "matmul-bn": Case(lambda: m.matmul_bn(), {"bn": "folded"}, 0),
    "matmul-add-bn": Case(lambda: m.matmul_bn(add_bias=True), {"bn": "folded"}, 0),
    "matmul-3d-bn": Case(m.matmul_3d_bn, {"bn": "channel-axis-mismatch"}, 1),
    # backward: into unpadded Conv, Gemm, MatMul, through Flatten/Reshape
    "bn-conv1x1": Case(lambda: m.bn_conv(k=1), {"bn": "folded-backward"}, 0),
    "bn-conv1x1-nobias": Case(lambda: m.bn_conv(k=1, bias=False), {"bn": "folded-backward"}, 0),
    "bn-conv3x3-valid": Case(lambda: m.bn_conv(k=3, pad=0), {"bn": "folded-backward"}, 0),
    "bn-conv3x3-autopad-valid": Case(
        lambda: m.bn_conv(k=3, auto_pad="VALID"), {"bn": "folded-backward"}, 0
    ),
    "bn-conv1x1-stride2": Case(lambda: m.bn_conv(k=1, stride=2), {"bn": "folded-backward"}, 0),
    "bn-conv1x1-grouped": Case(lambda: m.bn_conv(k=1, group=2), {"bn": "folded-backward"}, 0),
    "bn-conv3x3-depthwise": Case(
        lambda: m.bn_conv(k=3, group=4, cout=8), {"bn": "folded-backward"}, 0
    ),
    "bn-conv1d": Case(lambda: m.bn_conv(k=3, dims=1), {"bn": "folded-backward"}, 0),
    "bn-conv3x3-padded": Case(
        lambda: m.bn_conv(k=3, pad=1), {"bn": "padding-breaks-backward-fold"}, 1
    ),
    "bn-conv3x3-same-upper": Case(
        lambda: m.bn_conv(k=3, auto_pad="SAME_UPPER"), {"bn": "padding-breaks-backward-fold"}, 1
    ),
    "bn-gemm": Case(lambda: m.bn_gemm(), {"bn": "folded-backward"}, 0),
    "bn-gemm-transB0-alpha-beta": Case(
        lambda: m.bn_gemm(trans_b=0, alpha=0.6, beta=1.7), {"bn": "folded-backward"}, 0
    ),
    "bn-gemm-noC-alpha": Case(lambda: m.bn_gemm(c=False, alpha=2.5), {"bn": "folded-backward"}, 0),
    "bn-flatten-gemm": Case(m.bn_flatten_gemm, {"bn": "folded-backward"}, 0),
    "gap-bn-flatten-gemm": Case(m.gap_bn_flatten_gemm, {"bn": "folded-backward"}, 0),
    "bn-reshape-matmul": Case(m.bn_reshape_matmul, {"bn": "folded-backward"}, 0),
    "conv-bn-conv": Case(m.conv_bn_conv, {"bn": FOLDED}, 0),
    # chains
    "conv-bn-bn": Case(m.conv_bn_bn, {"bn1": "folded", "bn2": "folded"}, 0),
    "bn-bn": Case(m.bn_bn, {"bn1": "no-linear-neighbour", "bn2": "folded"}, 1),
    # producers and consumers
    "shared-weights": Case(m.shared_weights, {"bn": "folded"}, 0),
    "conv-two-consumers": Case(m.conv_two_consumers, {"bn": "producer-has-other-consumers"}, 1),
    "conv-graph-output": Case(m.conv_graph_output, {"bn": "producer-is-graph-output"}, 1),
    "relu-between": Case(m.relu_between, {"bn": "nonlinear-between"}, 1),
    "bn-relu": Case(m.bn_relu, {"bn": "no-linear-neighbour"}, 1),
    "conv-bn-relu": Case(m.conv_bn_relu, {"bn": "folded"}, 0),
    # where the parameters come from
    "params-from-constants": Case(m.params_from_constants, {"bn": "folded"}, 0),
    "params-graph-inputs": Case(m.params_graph_inputs, {"bn": "not-constant"}, 1),
    "params-overridable-initializers": Case(m.params_overridable, {"bn": "not-constant"}, 1),
    # BN modes across opsets
    "training-mode-15": Case(m.training_mode_bn, {"bn": "training-mode"}, 1),
    "extra-outputs-9": Case(lambda: m.bn_extra_outputs(9), {"bn": "training-mode"}, 1),
    "extra-outputs-13": Case(lambda: m.bn_extra_outputs(13), {"bn": "training-mode"}, 1),
    "spatial0-7": Case(m.spatial0_bn, {"bn": "per-activation-stats"}, 1),
    "opset6-is-test": Case(m.opset6_bn, {"bn": "folded"}, 0),
    # dtypes
    "fp16": Case(lambda: m.conv_bn_typed(m.F16), {"bn": "folded"}, 0),
    "fp16-tiny-var": Case(m.fp16_tiny_var, {"bn": "folded"}, 0),
    "fp16-conv-fp32-params-15": Case(m.fp16_conv_fp32_params, {"bn": "folded"}, 0),
    "fp64": Case(lambda: m.conv_bn_typed(m.F64), {"bn": "folded"}, 0),
    "bf16": Case(lambda: m.conv_bn_typed(m.BF16), {"bn": "folded"}, 0),
    "fp16-overflow-weight": Case(lambda: m.fp16_overflow("weight"), {"bn": "overflow"}, 1),
    "fp16-overflow-bias": Case(lambda: m.fp16_overflow("bias"), {"bn": "overflow"}, 1),
    "nan-var": Case(lambda: m.bad_statistics("nan-var"), {"bn": "bad-statistics"}, 1),
    "inf-var": Case(lambda: m.bad_statistics("inf-var"), {"bn": "bad-statistics"}, 1),
    "negative-var": Case(lambda: m.bad_statistics("negative-var"), {"bn": "bad-statistics"}, 1),
    "nan-scale": Case(lambda: m.bad_statistics("nan-scale"), {"bn": "bad-statistics"}, 1),
    "inf-mean": Case(lambda: m.bad_statistics("inf-mean"), {"bn": "bad-statistics"}, 1),
    # subgraphs and functions
    "if-branches": Case(m.if_bn, {"then_bn": "folded", "else_bn": "folded"}, 0),
    "loop-body": Case(m.loop_bn, {"body_bn": "folded"}, 0),
    "local-function": Case(m.function_bn, {"bn": "folded"}, 0),
    "local-function-param-inputs": Case(
        lambda: m.function_bn(constant_params=False), {"bn": "not-constant"}, 1
    ),
}

IDS = list(CASES)


@pytest.fixture(scope="module")
def folded() -> dict[str, tuple[onnx.ModelProto, bnsurgery.passes.PassResult]]:
    """Each model and its fold, computed once per module (lazily)."""
    return {}


def _fold(name: str, cache: dict) -> tuple[onnx.ModelProto, object]:
    if name not in cache:
        model = CASES[name].build()
        cache[name] = (model, bnsurgery.fold(model))
    return cache[name]


@pytest.mark.parametrize("name", IDS)
def test_fold_computes_what_the_original_computes(name: str, folded: dict) -> None:
    model, result = _fold(name, folded)
    m.assert_equivalent(model, result.model)


@pytest.mark.parametrize("name", IDS)
def test_each_bn_gets_its_reason(name: str, folded: dict) -> None:
    _, result = _fold(name, folded)
    expected = CASES[name].reasons
    got = {bn: result.report.decision(bn).reason for bn in expected}
    matches = {
        bn: got[bn] in (want if isinstance(want, tuple) else (want,))
        for bn, want in expected.items()
    }
    assert all(matches.values()), f"reasons {got}, expected {expected}"


@pytest.mark.parametrize("name", IDS)
def test_bns_left_after_fold(name: str, folded: dict) -> None:
    _, result = _fold(name, folded)
    assert m.count_op(result.model) == CASES[name].bns_after


@pytest.mark.parametrize("name", IDS)
def test_folded_model_passes_the_checker(name: str, folded: dict) -> None:
    _, result = _fold(name, folded)
    onnx.checker.check_model(result.model, full_check=True)


def test_if_else_branch_is_equivalent_too() -> None:
    model = m.if_bn()
    feeds = m.random_feeds(model, cond=np.array(False))
    m.assert_equivalent(model, bnsurgery.fold(model).model, feeds)


def test_params_graph_inputs_stay_inputs_that_work_with_any_value() -> None:
    model = m.params_graph_inputs()
    feeds = m.random_feeds(model, seed=7)
    m.assert_equivalent(model, bnsurgery.fold(model).model, feeds)


def test_overridable_initializers_can_still_be_overridden() -> None:
    model = m.params_overridable()
    r = m.rng(99)
    feeds = m.random_feeds(
        model,
        **{
            "bn.scale": r.uniform(2, 3, 4).astype("float32"),
            "bn.B": r.normal(0, 1, 4).astype("float32"),
            "bn.mean": r.normal(0, 1, 4).astype("float32"),
            "bn.var": r.uniform(3, 4, 4).astype("float32"),
        },
    )
    m.assert_equivalent(model, bnsurgery.fold(model).model, feeds)


def test_loop_runs_the_folded_body_every_iteration() -> None:
    model = m.loop_bn(trips=5)
    m.assert_equivalent(model, bnsurgery.fold(model).model, m.random_feeds(model, seed=3))


# -- --no-backward ------------------------------------------------------------------------------
def test_no_backward_keeps_a_bn_that_only_folds_backward() -> None:
    result = bnsurgery.fold(m.bn_conv(k=1), backward=False)
    assert m.count_op(result.model) == 1


def test_no_backward_reason() -> None:
    report = bnsurgery.fold(m.bn_conv(k=1), backward=False).report
    assert report.decision("bn").reason == "backward-disabled"


def test_no_backward_still_folds_forward() -> None:
    result = bnsurgery.fold(m.conv_bn(2), backward=False)
    assert m.count_op(result.model) == 0
