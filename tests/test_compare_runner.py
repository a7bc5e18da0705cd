"""The runner: streaming a model over DATA, intermediate tensors, progress only on a TTY."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from conftest import SAMPLES

from bnsurgery.errors import BadInputError
from bnsurgery.runtime import runner as R
from bnsurgery.runtime.providers import ProviderConfig
from bnsurgery.runtime.runner import run_model, with_outputs

DIGITS = SAMPLES / "digits_test.npz"
CONV1 = "/conv1/Conv_output_0"


def test_run_model_streams_batches_and_concatenates_outputs_and_labels():
    model = onnx.load(SAMPLES / "digits_cnn.onnx")
    result = run_model(model, str(DIGITS), ProviderConfig("cpu"))
    assert result.outputs["logits"].shape == (540, 10)
    assert result.samples == 540 and result.batches == 9
    assert (result.outputs["logits"].argmax(1) == result.labels).mean() > 0.95
    assert result.session.ran_on == "CPUExecutionProvider"


def test_intermediate_tensors_come_back_as_extra_outputs_of_a_copy():
    model = onnx.load(SAMPLES / "digits_cnn.onnx")
    before = model.SerializeToString()
    result = run_model(model, "random:4", intermediates=[CONV1])
    assert result.intermediates[CONV1].shape == (4, 16, 8, 8)
    assert model.SerializeToString() == before  # the caller's model is untouched


def test_outputs_are_typed_from_shape_inference_or_left_untyped():
    model = onnx.load(SAMPLES / "digits_cnn.onnx")
    typed = with_outputs(model, [CONV1])
    assert typed.graph.output[-1].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_untyped_outputs_still_run(monkeypatch):
    monkeypatch.setattr(R, "_inferred_types", lambda model: {})
    model = onnx.load(SAMPLES / "digits_cnn.onnx")
    assert not with_outputs(model, [CONV1]).graph.output[-1].HasField("type")
    result = run_model(model, "random:2", intermediates=[CONV1])
    assert result.intermediates[CONV1].shape == (2, 16, 8, 8)


def test_unknown_intermediate_is_bad_input():
    with pytest.raises(BadInputError, match="no tensor named 'nope'"):
        with_outputs(onnx.load(SAMPLES / "digits_mlp.onnx"), ["nope"])


def test_progress_bar_only_when_stderr_is_a_terminal(monkeypatch, capsys):
    model = onnx.load(SAMPLES / "digits_mlp.onnx")
    run_model(model, "random:8")
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    run_model(model, "random:8")
    assert "running cpu" in capsys.readouterr().err


def test_cli_compare_prints_nothing_on_stderr_when_all_is_well(cli, tmp_path):
    np.savez(tmp_path / "d.npz", input=np.load(DIGITS)["input"][:32])
    code, out, err = cli(
        "compare", SAMPLES / "digits_cnn.onnx", "--opt-level", "all", "--data", tmp_path / "d.npz"
    )
    assert code == 0 and err == "" and "result: PASS" in out
