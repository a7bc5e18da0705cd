"""Layer-wise tensor matching: by the fold report's map, by structure, by name (docs/compare.md)."""

from __future__ import annotations

import json

import models
import onnx
import pytest
from conftest import SAMPLES
from models import make, vi
from onnx import helper

import bnsurgery
from bnsurgery.errors import BadInputError
from bnsurgery.harness.matching import load_tensor_map, match_tensors


def two_input_model() -> onnx.ModelProto:
    """a [N,4], b [N,4] -> Add -> y."""
    return make(
        [helper.make_node("Add", ["a", "b"], ["y"], name="add")],
        [vi("a", ["N", 4]), vi("b", ["N", 4])],
        [vi("y", ["N", 4])],
    )


def pairs(reference, candidate, tensor_map=None):
    return {m.reference: m.candidate for m in match_tensors(reference, candidate, tensor_map)}


def rename_all(model: onnx.ModelProto, prefix: str = "t_") -> onnx.ModelProto:
    """Every intermediate tensor renamed, as another exporter might: only structure is left."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    keep = {i.name for i in copy.graph.input} | {o.name for o in copy.graph.output}
    keep |= {t.name for t in copy.graph.initializer}
    for node in copy.graph.node:
        node.input[:] = [n if n in keep or not n else prefix + n for n in node.input]
        node.output[:] = [n if n in keep else prefix + n for n in node.output]
        node.name = prefix + node.name
    return copy


def test_forward_fold_keeps_the_bn_output_and_drops_the_conv_output():
    original = models.conv_bn_relu()
    folded = bnsurgery.fold(original)
    got = pairs(original, folded.model)
    assert got == {"conv_out": None, "bn_out": "bn_out", "y": "y"}
    assert got == pairs(original, folded.model, folded.report.tensor_map)


def test_backward_fold_keeps_the_input_side_tensor():
    original = models.bn_conv(k=1, pad=0)
    folded = bnsurgery.fold(original).model
    assert pairs(original, folded) == {"bn_out": None, "y": "y"}


def test_structure_alone_maps_a_fold_whose_names_all_changed():
    original = models.conv_bn_relu()
    other = rename_all(bnsurgery.fold(original).model)
    got = match_tensors(original, other)
    assert {m.reference: m.candidate for m in got} == {
        "conv_out": None,
        "bn_out": "t_bn_out",
        "y": "y",
    }
    assert next(m for m in got if m.reference == "bn_out").how == "structure"


def test_exporters_that_spell_out_default_attributes_still_match():
    """digits_cnn (legacy exporter, BN kept) vs digits_cnn_nobn (dynamo exporter, BN folded)."""
    got = pairs(onnx.load(SAMPLES / "digits_cnn.onnx"), onnx.load(SAMPLES / "digits_cnn_nobn.onnx"))
    assert got["/bn1/BatchNormalization_output_0"] == "getitem"
    assert got["/Relu_1_output_0"] == "relu_1"
    assert got["/conv1/Conv_output_0"] is None


def test_same_model_matches_every_tensor_to_itself():
    model = onnx.load(SAMPLES / "resnet_small.onnx")
    assert all(ref == cand for ref, cand in pairs(model, model).items())


def test_a_name_whose_producer_changed_op_is_not_trusted():
    """y is Relu(x) in the reference and Sigmoid(x) in the candidate: same name, no match."""
    ref = make([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [1, 4])], [vi("y", [1, 4])])
    cand = make([helper.make_node("Sigmoid", ["x"], ["y"])], [vi("x", [1, 4])], [vi("y", [1, 4])])
    assert pairs(ref, cand) == {"y": None}


def test_the_map_wins_and_must_name_real_tensors():
    original = models.conv_bn_relu()
    folded = bnsurgery.fold(original).model
    assert pairs(original, folded, {"bn_out": None})["bn_out"] is None
    with pytest.raises(BadInputError, match="no node of the candidate produces"):
        match_tensors(original, folded, {"bn_out": "nowhere"})


def test_load_tensor_map_reads_a_fold_report_or_a_bare_mapping(tmp_path):
    report = {"summary": {}, "tensor_map": {"conv_out": None}}
    (tmp_path / "r.json").write_text(json.dumps(report))
    assert load_tensor_map(str(tmp_path / "r.json")) == {"conv_out": None}
    (tmp_path / "m.json").write_text(json.dumps({"a": "b"}))
    assert load_tensor_map(str(tmp_path / "m.json")) == {"a": "b"}
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(BadInputError, match="not JSON"):
        load_tensor_map(str(tmp_path / "bad.json"))
