"""The fold report and the contract around the rewrite: names, immutability, counts, scopes."""

from __future__ import annotations

import json

import models as m
import numpy as np
import pytest
from onnx import numpy_helper

import bnsurgery

EVERY_REASON = {
    "folded", "folded-backward", "training-mode", "not-constant", "producer-has-other-consumers",
    "producer-is-graph-output", "no-linear-neighbour", "nonlinear-between",
    "padding-breaks-backward-fold", "channel-axis-mismatch", "per-activation-stats", "overflow",
    "unsupported-dtype", "bad-statistics", "backward-disabled",
}  # fmt: skip

MIXED = [
    m.conv_bn,
    m.if_bn,
    m.loop_bn,
    m.function_bn,
    m.conv_bn_bn,
    m.bn_bn,
    m.conv_two_consumers,
    m.spatial0_bn,
    m.training_mode_bn,
]


# -- the report names every BN ------------------------------------------------------------------
@pytest.mark.parametrize("build", MIXED, ids=lambda b: b.__name__)
def test_report_has_one_entry_per_bn_node(build) -> None:
    model = build()
    report = bnsurgery.fold(model).report
    assert sorted(e.node for e in report.entries) == sorted(
        n.name for n in m.all_nodes(model) if n.op_type == "BatchNormalization"
    )


@pytest.mark.parametrize("build", MIXED, ids=lambda b: b.__name__)
def test_every_reason_is_a_documented_code(build) -> None:
    report = bnsurgery.fold(build()).report
    assert {e.reason for e in report.entries} <= EVERY_REASON


@pytest.mark.parametrize("build", MIXED, ids=lambda b: b.__name__)
def test_bns_after_counts_the_bns_of_the_folded_model(build) -> None:
    result = bnsurgery.fold(build())
    assert result.report.bns_after == m.count_op(result.model)


@pytest.mark.parametrize("build", MIXED, ids=lambda b: b.__name__)
def test_bns_before_counts_the_bns_of_the_original(build) -> None:
    model = build()
    assert bnsurgery.fold(model).report.bns_before == m.count_op(model)


@pytest.mark.parametrize("build", MIXED, ids=lambda b: b.__name__)
def test_nodes_after_counts_every_scope(build) -> None:
    result = bnsurgery.fold(build())
    assert result.report.nodes_after == len(m.all_nodes(result.model))


@pytest.mark.parametrize("build", MIXED, ids=lambda b: b.__name__)
def test_action_agrees_with_reason(build) -> None:
    entries = bnsurgery.fold(build()).report.entries
    assert all((e.action == "folded") == e.reason.startswith("folded") for e in entries)


def test_scope_of_then_branch() -> None:
    assert bnsurgery.fold(m.if_bn()).report.decision("then_bn").scope == "if.then_branch"


def test_scope_of_else_branch() -> None:
    assert bnsurgery.fold(m.if_bn()).report.decision("else_bn").scope == "if.else_branch"


def test_scope_of_loop_body() -> None:
    assert bnsurgery.fold(m.loop_bn()).report.decision("body_bn").scope == "loop.body"


def test_scope_of_local_function() -> None:
    report = bnsurgery.fold(m.function_bn()).report
    assert report.decision("bn").scope == "function:custom::ConvBn"


def test_scope_of_main_graph_is_empty() -> None:
    assert bnsurgery.fold(m.conv_bn()).report.decision("bn").scope == ""


# -- what a decision says -----------------------------------------------------------------------
def test_forward_decision_names_its_target() -> None:
    d = bnsurgery.fold(m.conv_bn()).report.decision("bn")
    assert (d.action, d.direction, d.target, d.target_op) == ("folded", "forward", "conv", "Conv")


def test_backward_decision_names_its_target() -> None:
    d = bnsurgery.fold(m.bn_gemm()).report.decision("bn")
    assert (d.direction, d.target, d.target_op) == ("backward", "gemm", "Gemm")


def test_chained_bn_is_merged_into_the_previous_bn() -> None:
    d = bnsurgery.fold(m.bn_bn()).report.decision("bn2")
    assert (d.target, d.target_op) == ("bn1", "BatchNormalization")


def test_kept_bn_has_no_direction_nor_target() -> None:
    d = bnsurgery.fold(m.relu_between()).report.decision("bn")
    assert (d.action, d.direction, d.target) == ("kept", None, None)


def test_unknown_bn_name_raises_key_error() -> None:
    with pytest.raises(KeyError):
        bnsurgery.fold(m.conv_bn()).report.decision("no_such_bn")


def test_to_dict_is_one_json_document_with_the_agreed_keys() -> None:
    data = json.loads(json.dumps(bnsurgery.fold(m.if_bn()).report.to_dict()))
    assert {"entries", "summary", "tensor_map"} <= set(data)


def test_to_dict_summary_counts() -> None:
    summary = bnsurgery.fold(m.conv_bn_bn()).report.to_dict()["summary"]
    assert (summary["bns_before"], summary["bns_after"]) == (2, 0)


# -- names --------------------------------------------------------------------------------------
def test_bn_output_name_survives_for_its_consumer() -> None:
    folded = bnsurgery.fold(m.conv_bn_relu()).model
    assert list(m.node_named(folded, "relu").input) == ["bn_out"]


def test_bn_output_name_survives_as_graph_output() -> None:
    folded = bnsurgery.fold(m.conv_bn()).model
    assert m.node_named(folded, "conv").output[0] == "y"


def test_backward_fold_rewires_consumer_to_the_bn_input() -> None:
    folded = bnsurgery.fold(m.bn_conv(k=1)).model
    assert m.node_named(folded, "conv").input[0] == "x"


def test_node_names_are_kept() -> None:
    folded = bnsurgery.fold(m.conv_bn_relu()).model
    assert [n.name for n in folded.graph.node] == ["conv", "relu"]


def test_opsets_ir_version_doc_string_are_kept() -> None:
    model = m.function_bn()
    folded = bnsurgery.fold(model).model
    kept = (folded.ir_version, list(folded.opset_import), folded.doc_string)
    assert kept == (model.ir_version, list(model.opset_import), model.doc_string)


def test_metadata_is_kept() -> None:
    model = m.conv_bn()
    model.metadata_props.add(key="author", value="bnsurgery tests")
    folded = bnsurgery.fold(model).model
    assert {p.key: p.value for p in folded.metadata_props} == {"author": "bnsurgery tests"}


def test_tensor_map_marks_the_vanished_pre_bn_tensor() -> None:
    report = bnsurgery.fold(m.conv_bn_relu()).report
    assert "conv_out" in report.tensor_map and report.tensor_map["conv_out"] is None


def test_tensor_map_never_maps_a_surviving_name_to_none() -> None:
    result = bnsurgery.fold(m.conv_bn_relu())
    surviving = {o for n in result.model.graph.node for o in n.output}
    assert not {k for k, v in result.report.tensor_map.items() if v is None} & surviving


def test_stale_value_info_is_dropped() -> None:
    model = m.conv_bn_relu()
    model.graph.value_info.append(m.vi("conv_out", [1, 4, 3, 3]))
    folded = bnsurgery.fold(model).model
    assert "conv_out" not in {v.name for v in folded.graph.value_info}


# -- the input is never mutated, the output is a new model --------------------------------------
@pytest.mark.parametrize("build", [m.conv_bn, m.if_bn, m.function_bn, m.shared_weights, m.bn_gemm])
def test_input_model_is_not_mutated(build) -> None:
    model = build()
    before = model.SerializeToString()
    bnsurgery.fold(model)
    assert model.SerializeToString() == before


def test_result_model_is_a_new_object() -> None:
    model = m.conv_bn()
    assert bnsurgery.fold(model).model is not model


def test_fold_accepts_bytes() -> None:
    result = bnsurgery.fold(m.conv_bn().SerializeToString())
    assert m.count_op(result.model) == 0


def test_fold_accepts_a_path(tmp_path) -> None:
    path = tmp_path / "net.onnx"
    path.write_bytes(m.conv_bn().SerializeToString())
    assert m.count_op(bnsurgery.fold(str(path)).model) == 0


def test_fold_is_idempotent() -> None:
    once = bnsurgery.fold(m.conv_bn_bn()).model
    twice = bnsurgery.fold(once).model
    assert twice.SerializeToString() == once.SerializeToString()


# -- weights ------------------------------------------------------------------------------------
def test_shared_weight_keeps_its_original_values_for_the_other_user() -> None:
    model = m.shared_weights()
    folded = bnsurgery.fold(model).model
    conv_b_w = m.node_named(folded, "conv_b").input[1]
    np.testing.assert_array_equal(m.initializer(folded, conv_b_w), m.initializer(model, "W"))


def test_shared_weight_is_cloned_for_the_folded_conv() -> None:
    folded = bnsurgery.fold(m.shared_weights()).model
    names = (m.node_named(folded, "conv_a").input[1], m.node_named(folded, "conv_b").input[1])
    assert names[0] != names[1]


def test_shared_bias_keeps_its_original_values_for_the_other_user() -> None:
    model = m.shared_weights()
    folded = bnsurgery.fold(model).model
    conv_b_b = m.node_named(folded, "conv_b").input[2]
    np.testing.assert_array_equal(m.initializer(folded, conv_b_b), m.initializer(model, "b"))


def test_dangling_constant_producers_are_removed() -> None:
    folded = bnsurgery.fold(m.params_from_constants()).model
    assert [n.op_type for n in folded.graph.node] == ["Conv"]


def test_no_bn_initializer_is_left_dangling() -> None:
    folded = bnsurgery.fold(m.conv_bn()).model
    assert [t.name for t in folded.graph.initializer if t.name.startswith("bn.")] == []


def test_conv_without_bias_gains_one() -> None:
    folded = bnsurgery.fold(m.conv_bn(bias=False)).model
    assert len(m.node_named(folded, "conv").input) == 3


def test_forward_fold_matches_the_design_arithmetic() -> None:
    """W'[o] = W[o] * s[o], b'[o] = b[o] * s[o] + t[o] (docs/design.md), checked in float64."""
    model = m.conv_bn_typed(m.F64)
    folded = bnsurgery.fold(model).model
    conv = m.node_named(folded, "conv")
    stats = m.Stats(*(m.initializer(model, f"bn.{p}") for p in ("scale", "B", "mean", "var")))
    s, t = stats.affine()
    w, b = m.initializer(model, "W"), m.initializer(model, "b")
    expected = np.concatenate([(w * s[:, None, None, None]).ravel(), b * s + t])
    got = np.concatenate(
        [m.initializer(folded, conv.input[1]).ravel(), m.initializer(folded, conv.input[2])]
    )
    np.testing.assert_allclose(got, expected, rtol=1e-14, atol=0)


def test_subgraph_folds_do_not_touch_outer_weights_used_elsewhere() -> None:
    """else_branch reads its weights from the main graph; they are only used there."""
    model = m.if_bn()
    folded = bnsurgery.fold(model).model
    assert not any(t.name.startswith("else_bn.") for t in folded.graph.initializer)


# -- info: the dry run --------------------------------------------------------------------------
@pytest.mark.parametrize("build", MIXED, ids=lambda b: b.__name__)
def test_info_reports_what_fold_does(build) -> None:
    model = build()
    planned = {(e.node, e.reason) for e in bnsurgery.info(model).entries}
    assert planned == {(e.node, e.reason) for e in bnsurgery.fold(model).report.entries}


def test_info_does_not_mutate_the_model() -> None:
    model = m.conv_bn_bn()
    before = model.SerializeToString()
    bnsurgery.info(model)
    assert model.SerializeToString() == before


def test_weights_keep_their_dtype_after_fold() -> None:
    model = m.conv_bn_typed(m.F16)
    folded = bnsurgery.fold(model).model
    assert {t.data_type for t in folded.graph.initializer} == {m.F16}


def test_mixed_bn15_keeps_conv_weights_fp16() -> None:
    folded = bnsurgery.fold(m.fp16_conv_fp32_params()).model
    conv = m.node_named(folded, "conv")
    dtypes = {t.data_type for t in folded.graph.initializer if t.name in conv.input}
    assert dtypes == {m.F16}


def test_overflow_leaves_no_infinite_weight() -> None:
    folded = bnsurgery.fold(m.fp16_overflow("weight")).model
    assert all(
        np.isfinite(numpy_helper.to_array(t).astype(np.float64)).all()
        for t in folded.graph.initializer
    )


def test_overflow_leaves_the_model_unchanged() -> None:
    model = m.fp16_overflow("bias")
    folded = bnsurgery.fold(model).model
    assert folded.graph.SerializeToString() == model.graph.SerializeToString()


def test_bf16_fold_arithmetic() -> None:
    """bf16 weights: W' is W*s rounded once to bf16 (8 significant bits)."""
    model = m.conv_bn_typed(m.BF16)
    folded = bnsurgery.fold(model).model
    stats = m.Stats(
        *(m.initializer(model, f"bn.{p}").astype(np.float64) for p in ("scale", "B", "mean", "var"))
    )
    s, _ = stats.affine()
    w = m.initializer(model, "W").astype(np.float64)
    got = m.initializer(folded, m.node_named(folded, "conv").input[1]).astype(np.float64)
    np.testing.assert_allclose(got, w * s[:, None, None, None], rtol=2**-8, atol=0)


def test_bf16_fold_keeps_bf16() -> None:
    folded = bnsurgery.fold(m.conv_bn_typed(m.BF16)).model
    assert {t.data_type for t in folded.graph.initializer} == {m.BF16}


# -- verify=True in the API ---------------------------------------------------------------------
def test_api_verify_records_the_outcome() -> None:
    assert bnsurgery.fold(m.conv_bn(), verify=True).report.verification["ok"] is True


def test_api_verify_raises_check_failed_on_a_wrong_fold(monkeypatch) -> None:
    from bnsurgery.errors import CheckFailed
    from bnsurgery.passes.fold import arithmetic as fold_math

    real = fold_math.conv_forward
    monkeypatch.setattr(fold_math, "conv_forward", lambda w, b, s, t: real(w, b, s * 1.01, t))
    with pytest.raises(CheckFailed):
        bnsurgery.fold(m.conv_bn(), verify=True)


def test_api_verifies_by_default_like_the_cli() -> None:
    assert bnsurgery.fold(m.conv_bn()).report.verification["ok"] is True
    assert bnsurgery.fold(m.conv_bn(), verify=False).report.verification is None
