"""`compare --stability`: perturbation suite, determinism, float16 conversion and overflow."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import SAMPLES
from models import init, make, vi
from onnx import helper

import bnsurgery
from bnsurgery.harness.fp16 import convert_to_float16
from bnsurgery.harness.stability import blur, perturb, perturbations

SUITE = ["noise-0.05", "noise-0.1", "noise-0.25", "scale-0.5", "scale-2", "brightness",
         "contrast", "blur"]  # fmt: skip


@pytest.fixture(scope="module")
def digits_small(tmp_path_factory: pytest.TempPathFactory):
    data = np.load(SAMPLES / "digits_test.npz")
    path = tmp_path_factory.mktemp("data") / "digits200.npz"
    np.savez(path, input=data["input"][:200], label=data["label"][:200])
    return path


@pytest.fixture(scope="module")
def digits_report(digits_small):
    folded = bnsurgery.fold(SAMPLES / "digits_cnn.onnx").model
    return bnsurgery.compare(
        SAMPLES / "digits_cnn.onnx", folded, data=str(digits_small), stability=True
    )


def test_perturbation_suite_on_digits_reports_accuracy_per_perturbation(digits_report):
    st = digits_report.stability
    assert [ms.model for ms in st.perturbation] == ["reference", "candidate"]
    ref = st.perturbation[0]
    assert [p.name for p in ref.perturbations] == SUITE
    assert ref.clean_accuracy > 0.95
    for p in ref.perturbations:
        assert p.applied and p.samples == 200
        assert 0.0 <= p.accuracy <= 1.0 and 0.0 <= p.flip_rate <= 1.0
        assert p.mean_abs_change > 0
    by_name = {p.name: p for p in ref.perturbations}
    # more noise, more change: the suite measures what it says
    assert (
        by_name["noise-0.05"].mean_abs_change
        < by_name["noise-0.1"].mean_abs_change
        < by_name["noise-0.25"].mean_abs_change
    )
    assert by_name["contrast"].accuracy < ref.clean_accuracy  # a real covariate shift hurts


def test_folded_model_reacts_to_shift_like_the_original(digits_report):
    ref, cand = digits_report.stability.perturbation
    for a, b in zip(ref.perturbations, cand.perturbations, strict=True):
        assert a.accuracy == pytest.approx(b.accuracy, abs=0.01), a.name


def test_determinism_per_provider(digits_report):
    runs = digits_report.stability.determinism
    assert {(d.model, d.provider) for d in runs} == {("reference", "cpu"), ("candidate", "cpu")}
    assert all(d.bitwise_equal for d in runs)


def test_fp16_error_is_measured_and_no_overflow_on_digits(digits_report):
    fp16 = digits_report.stability.fp16[0]
    assert fp16.error == "" and fp16.outputs
    assert 0 < fp16.outputs[0].max_abs < 0.1
    assert fp16.output_inf == 0 and fp16.first_overflow is None


def test_stability_in_json_and_text(cli, digits_small):
    code, out, _ = cli(
        "compare", SAMPLES / "digits_mlp.onnx", "--stability", "--data", "random:16", "--json"
    )
    assert code == 0
    st = json.loads(out)["stability"]
    (ms,) = st["perturbation"]
    blur_row = next(p for p in ms["perturbations"] if p["name"] == "blur")
    assert blur_row["applied"] is False  # [N, 64] is not an image
    assert ms["clean_accuracy"] is None and st["determinism"][0]["bitwise_equal"] is True
    code, out, _ = cli(
        "compare", SAMPLES / "digits_cnn.onnx", "--stability", "--data", digits_small
    )
    assert code == 0 and "contrast" in out and "two runs bitwise equal" in out
    assert "result: nothing compared (stability only)" in out


def overflowing_model() -> onnx.ModelProto:
    """x [N,2] -> Mul by 1e5 (fp16 max is 65504) -> y; and a weight of 1e6 that overflows."""
    return make(
        [
            helper.make_node("Mul", ["x", "k"], ["big"], name="scale"),
            helper.make_node("Add", ["big", "huge"], ["y"], name="shift"),
        ],
        [vi("x", ["N", 2])],
        [vi("y", ["N", 2])],
        [init("k", np.array([1e5, 1.0])), init("huge", np.array([0.0, 1e6]))],
    )


def test_fp16_conversion_keeps_float32_io_and_counts_overflowing_weights():
    conversion = convert_to_float16(overflowing_model())
    assert conversion.overflow == {"k": 1, "huge": 1}
    model = conversion.model
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": np.ones((1, 2), np.float32)})
    assert y.dtype == np.float32 and np.isinf(y).all()


def test_fp16_overflow_reported_through_compare(cli, write_model):
    code, out, _ = cli("compare", write_model(overflowing_model()), "--stability", "--json")
    assert code == 0
    (fp16,) = json.loads(out)["stability"]["fp16"]
    assert fp16["passed"] is False and fp16["output_inf"] == 8  # 4 samples x 2
    assert fp16["first_overflow"] == "big"
    assert fp16["conversion"]["weights_overflowing_to_inf"] == {"k": 1, "huge": 1}


def test_fp16_resnet_runs_in_ort():
    conversion = convert_to_float16(onnx.load(SAMPLES / "resnet_small.onnx"))
    session = ort.InferenceSession(
        conversion.model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    assert np.isfinite(session.run(None, {"input": x})[0]).all()


def test_blur_is_a_normalised_3x3_smoothing_over_h_and_w():
    x = np.zeros((1, 1, 5, 5))
    x[0, 0, 2, 2] = 16.0
    y = blur(x)
    assert y.sum() == pytest.approx(16.0)
    np.testing.assert_allclose(y[0, 0, 1:4, 1:4], [[1, 2, 1], [2, 4, 2], [1, 2, 1]])


def test_perturbations_leave_integer_inputs_alone():
    feeds = {"ids": np.arange(4).reshape(2, 2), "x": np.ones((2, 3), np.float32)}
    scale = next(p for p in perturbations() if p.name == "scale-2")
    out = perturb(feeds, scale, np.random.default_rng(0))
    np.testing.assert_array_equal(out["ids"], feeds["ids"])
    assert out["x"].dtype == np.float32 and (out["x"] == 2).all()
