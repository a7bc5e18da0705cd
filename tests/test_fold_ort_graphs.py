"""fold removes at least every BN that ONNX Runtime's BASIC level fuses, on graphs of the shapes
of ONNX Runtime's own fusion tests, and each fold keeps the outputs of the unmodified model
(both run on ONNX Runtime with optimizations off). Also: folds through Reshape/Transpose
chains are exact or refused, and kept BNs carry the truest reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from models import max_error, random_feeds, run_pair
from ort_fusion_models import (
    ORT_FUSION_GRAPHS,
    _matmul_chain,
    densenet_bn_mul_add_relu_conv,
    fuse_conv_bn_mul_add_unsqueeze,
    fuse_matmul_bn_with_reshape,
    matmul_transpose_bn_mismatched,
)

import bnsurgery
from bnsurgery.model.graph import GraphIndex, iter_scopes


def _ort_basic_ops(model: onnx.ModelProto) -> Counter:
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = os.path.join(tmp, "basic.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


@pytest.mark.parametrize("name", sorted(ORT_FUSION_GRAPHS))
def test_every_bn_ort_basic_fuses_is_folded_and_the_outputs_are_kept(name):
    original = ORT_FUSION_GRAPHS[name]()
    basic = _ort_basic_ops(original)
    assert basic["BatchNormalization"] == 0, "ORT BASIC fuses every BN of these graphs"
    folded = bnsurgery.fold(original).model
    ops = _ops(folded)
    assert ops["BatchNormalization"] == 0
    assert sum(ops.values()) <= sum(basic.values())
    engine, _, _ = run_pair(original, folded, random_feeds(original))
    assert engine == "ort"
    assert max_error(original, folded) <= 1.0


@pytest.mark.parametrize("variant", ["plain", "negative_axes", "no_bias"])
def test_conv_bn_mul_add_with_unsqueezed_constants_folds_to_one_conv(variant):
    folded = bnsurgery.fold(fuse_conv_bn_mul_add_unsqueeze(variant)).model
    assert _ops(folded) == Counter({"Conv": 1})


def test_unsqueeze_with_negative_axes_evaluates_to_the_right_shape():
    model = fuse_conv_bn_mul_add_unsqueeze("negative_axes")
    index = GraphIndex(next(iter_scopes(model)))
    assert index.constant("mul_c3").shape == (4, 1, 1)
    np.testing.assert_array_equal(
        index.constant("mul_c3").ravel(), onnx.numpy_helper.to_array(model.graph.initializer[-2])
    )


def test_a_reshape_transpose_chain_folds_into_a_gemm_and_renames_what_changed():
    original = fuse_matmul_bn_with_reshape()
    result = bnsurgery.fold(original)
    decision = result.report.decision("bn")
    assert (decision.action, decision.target, decision.target_op) == ("folded", "matmul", "Gemm")
    assert [n.op_type for n in result.model.graph.node] == ["Gemm", "Reshape", "Transpose"]
    assert result.model.graph.node[-1].output[0] == "Y"
    # the values of the chain's tensors changed, so their old names are gone
    for name in ("mm_out", "reshape0_out", "transpose1_out"):
        assert result.report.tensor_map[name] is None


def test_a_reshape_that_splits_each_op_channel_over_one_bn_channel_folds():
    """MatMul [3, 6] -> Reshape [3, 3, 2] -> BN(3): op channel j lands on BN channel j // 2.
    ORT BASIC leaves this BN; the fold is exact."""
    original = _matmul_chain("split", [3, 4], 6, [("Reshape", [3, 3, 2])], 3, [3, 3, 2])
    folded = bnsurgery.fold(original).model
    assert _ops(folded)["BatchNormalization"] == 0
    assert max_error(original, folded) <= 1.0


def test_a_reshape_that_spreads_an_op_channel_over_bn_channels_is_refused():
    """MatMul [2, 3] -> Reshape [3, 2] -> BN(2): element (i, j) lands on channel (3i + j) % 2."""
    original = _matmul_chain("mix", [2, 4], 3, [("Reshape", [3, 2])], 2, [3, 2])
    result = bnsurgery.fold(original)
    decision = result.report.decision("bn")
    assert decision.reason == "channel-axis-mismatch"
    assert "several BN channels" in decision.detail


def test_a_transpose_that_moves_the_dynamic_batch_onto_the_channels_is_refused():
    # verify=False: ONNX Runtime cannot run this model at all (tests/test_judge.py)
    result = bnsurgery.fold(matmul_transpose_bn_mismatched(), verify=False)
    decision = result.report.decision("bn")
    assert decision.reason == "channel-axis-mismatch"
    assert "dynamic batch" in decision.detail


def test_densenet_bn_before_mul_add_relu_conv_is_kept_for_the_nonlinearity():
    decision = bnsurgery.info(densenet_bn_mul_add_relu_conv()).decision("bn")
    assert decision.action == "kept"
    assert decision.reason == "nonlinear-between"
    assert "Mul -> Add -> Relu" in decision.detail


_SHAPES = {12: [[3, 4], [2, 6], [12, 1], [2, 2, 3], [3, 2, 2], [1, 12]], 8: [[2, 4], [4, 2]]}


@settings(max_examples=40, deadline=None)
@given(
    m=st.sampled_from([2, 3]),
    n=st.sampled_from([4, 6]),
    target_index=st.integers(0, 5),
    transpose=st.booleans(),
)
def test_any_layout_chain_either_folds_exactly_or_is_refused(m, n, target_index, transpose):
    """MatMul [m, n] -> Reshape to a shape of m*n elements (-> Transpose of the last two axes)
    -> BN on the result's axis 1: whenever fold folds, the outputs are unchanged."""
    targets = _SHAPES.get(m * n, [[m, n], [n, m], [1, m, n]])
    target = targets[target_index % len(targets)]
    steps: list = [("Reshape", target)]
    final = list(target)
    if transpose and len(final) >= 2:
        perm = list(range(len(final)))
        perm[-2], perm[-1] = perm[-1], perm[-2]
        steps.append(("Transpose", perm))
        final = [final[p] for p in perm]
    if len(final) < 2:
        return
    original = _matmul_chain("prop", [m, 4], n, steps, final[1], final)
    result = bnsurgery.fold(original)
    decision = result.report.decision("bn")
    if decision.action == "folded":
        assert max_error(original, result.model) <= 1.0
    else:
        assert decision.reason == "channel-axis-mismatch"


def test_the_node_count_benchmark_leaves_no_bn_that_ort_basic_fuses(tmp_path):
    """bench/fold_node_counts.py (the docs/fold.md table) writes to the --out it is given, and
    on every measured model bnsurgery keeps no more BNs and no more nodes than ORT BASIC."""
    out = tmp_path / "counts.json"
    script = Path(__file__).resolve().parents[1] / "bench" / "fold_node_counts.py"
    done = subprocess.run(
        [sys.executable, str(script), "--out", str(out)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    rows = {k: v for k, v in json.loads(out.read_text()).items() if isinstance(v, dict)}
    assert {f"ORT {name}" for name in ORT_FUSION_GRAPHS} <= set(rows)
    for name, row in rows.items():
        ours, basic = row["bnsurgery_fold"], row["onnxruntime_basic"]
        assert ours["BatchNormalization"] <= basic["BatchNormalization"], name
        assert ours["nodes"] <= basic["nodes"], name
    assert "| ORT conv-identity-bn | 3 (1) | 1 (0) | 1 (0) |" in done.stdout
