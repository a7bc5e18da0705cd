"""Loading accepts what ONNX Runtime accepts: IR-3 initializers that are not graph inputs,
nodes out of topological order and graph outputs without a shape are normalised (one note on
stderr), while a model the checker accepts is loaded untouched and a model no engine can run
is still bad input."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import SAMPLES, sha256
from models import checker_failing, max_error, run_ort
from ort_fusion_models import fuse_conv_bn_mul_add_unsqueeze, fuse_conv_bn_no_bias, shapeless_output

import bnsurgery
from bnsurgery.errors import BadInputError
from bnsurgery.onnxio import load_model


def _refused_by_checker(model: onnx.ModelProto) -> str:
    with pytest.raises(onnx.checker.ValidationError) as caught:
        onnx.checker.check_model(model)
    return str(caught.value)


def test_ir3_initializers_missing_from_the_inputs_are_listed_and_the_ir_version_kept(caplog):
    model = fuse_conv_bn_no_bias()
    assert "not in graph input" in _refused_by_checker(model)
    with caplog.at_level(logging.WARNING, logger="bnsurgery"):
        loaded = load_model(model)
    assert loaded.ir_version == 3
    listed = {i.name for i in loaded.graph.input}
    assert {t.name for t in loaded.graph.initializer} <= listed
    assert [i.name for i in model.graph.input] == ["X"], "the caller's model is not modified"
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and "listed 5 initializers as graph inputs" in notes[0]
    onnx.checker.check_model(loaded)


def test_unsorted_nodes_are_sorted_stably_and_said_so(caplog):
    model = fuse_conv_bn_mul_add_unsqueeze("no_bias")
    with caplog.at_level(logging.WARNING, logger="bnsurgery"):
        loaded = load_model(model.SerializeToString())
    # stored as add, conv, mul, bn, unsqueeze_add, unsqueeze_mul: the earliest ready node first
    assert [n.name for n in loaded.graph.node] == [
        "conv", "bn", "unsqueeze_add", "unsqueeze_mul", "mul", "add",
    ]  # fmt: skip
    (note,) = [r.getMessage() for r in caplog.records]
    assert "sorted 6 nodes into topological order" in note
    assert "listed 7 initializers" in note


def test_a_graph_output_without_a_shape_is_accepted_and_kept_as_declared(caplog):
    model = shapeless_output()
    assert "shape" in _refused_by_checker(model)
    with caplog.at_level(logging.WARNING, logger="bnsurgery"):
        loaded = load_model(model)
    assert not loaded.graph.output[0].type.tensor_type.HasField("shape")
    assert "accepted graph output 'Y' without a declared shape" in caplog.records[0].getMessage()


def test_a_model_the_checker_accepts_loads_untouched_and_silently(caplog):
    path = SAMPLES / "resnet_small.onnx"
    with caplog.at_level(logging.DEBUG, logger="bnsurgery"):
        loaded = load_model(path)
    assert loaded.SerializeToString() == path.read_bytes()
    assert not caplog.records


def test_what_normalising_cannot_fix_stays_bad_input_with_the_checkers_message():
    with pytest.raises(BadInputError, match="W_missing"):
        load_model(checker_failing())


def test_a_cycle_is_not_sorted_away():
    model = fuse_conv_bn_no_bias()
    model.graph.node[0].input[0] = "Y"  # conv reads the BN's output: a cycle
    with pytest.raises(BadInputError, match="checker"):
        load_model(model)


def test_ir3_after_normalising_a_remaining_error_is_the_one_reported():
    model = fuse_conv_bn_no_bias()
    model.graph.node[1].input[1] = "nowhere"
    with pytest.raises(BadInputError, match="nowhere"):
        load_model(model)


@pytest.mark.parametrize("builder", [fuse_conv_bn_no_bias, shapeless_output])
def test_fold_cli_folds_a_normalised_model_notes_it_once_and_leaves_the_input(
    cli, write_model, tmp_path: Path, builder
):
    model = builder()
    path = write_model(model)
    before = sha256(path)
    out = tmp_path / "out.onnx"
    code, _, stderr = cli("fold", path, "-o", out)
    assert code == 0, stderr
    notes = [line for line in stderr.splitlines() if line.startswith("note:")]
    assert notes == stderr.strip().splitlines() and len(notes) == 1, stderr
    assert "normalised on load" in stderr
    assert sha256(path) == before
    folded = onnx.load(out)
    assert not [n for n in folded.graph.node if n.op_type == "BatchNormalization"]
    assert max_error(model, folded) <= 1.0


def test_quiet_silences_the_note(cli, write_model, tmp_path: Path):
    path = write_model(fuse_conv_bn_no_bias())
    code, _, stderr = cli("-q", "fold", path, "-o", tmp_path / "out.onnx")
    assert code == 0 and stderr == ""


def test_an_ir3_model_with_large_weights_loads_lazily_and_folds_to_the_same_bytes(
    write_model, tmp_path: Path
):
    """The lazy path (weights left in the file) normalises like the plain one, and the
    streamed fold writes what folding and saving the whole model writes."""
    model = fuse_conv_bn_no_bias(c=640)
    weight = next(t for t in model.graph.initializer if t.name == "W")
    assert len(weight.raw_data) >= 64 << 10
    path = write_model(model)
    streamed = tmp_path / "streamed.onnx"
    report = bnsurgery.fold_file(path, streamed, verify=True)
    assert report.bns_after == 0
    whole = tmp_path / "whole.onnx"
    bnsurgery.save_model(bnsurgery.fold(path).model, whole)
    assert streamed.read_bytes() == whole.read_bytes()
    feeds = {"X": np.random.default_rng(0).standard_normal((1, 3, 6, 6)).astype(np.float32)}
    np.testing.assert_allclose(
        run_ort(onnx.load(streamed), feeds)[0], run_ort(model, feeds)[0], rtol=1e-4, atol=1e-5
    )
