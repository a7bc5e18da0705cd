"""The one judge, right both ways: every correct fold of the deep corpus passes `fold` and
`compare`, every kind of wrong fold fails on deep float32 models, and fold, compare and the API
judge the same pair the same way (docs/verification.md)."""

from __future__ import annotations

import json
from pathlib import Path

import deep_models as deep
import numpy as np
import onnx
import pytest
import wrong_folds as wf
from conftest import SAMPLES
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import bnsurgery
from bnsurgery.harness.metrics import NOISE_LIMIT, compare_arrays
from bnsurgery.harness.noise import rounding_noise_copy
from bnsurgery.passes.fold import FoldPass
from bnsurgery.passes.fold.verify import verify_equivalent

FP32_DEEP = ["resnet50", "mobilenetv2", "efficientnet_b0_trained", "regnetx", "densenet"]


@pytest.fixture(scope="module")
def folds() -> dict[str, tuple[onnx.ModelProto, onnx.ModelProto]]:
    """Every corpus model with its correct fold (built once for the module)."""
    out = {}
    for name, build in deep.CORPUS.items():
        original = build()
        out[name] = (original, FoldPass()(original).model)
    return out


# -- no false rejects ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(deep.CORPUS))
def test_correct_fold_passes(name: str, folds) -> None:
    original, folded = folds[name]
    outcome = verify_equivalent(original, folded)
    assert outcome["ok"], outcome["outputs"]
    assert outcome["ratio"] < NOISE_LIMIT


def test_corpus_is_deep_and_wide_enough() -> None:
    """The bar: no correct fold refused on at least 8 deep models."""
    assert len(deep.CORPUS) >= 8


@pytest.mark.parametrize("name", ["resnet50", "detection_head", "fp16_deep", "bn15_mixed"])
def test_fold_cli_verifies_and_compare_agrees(name: str, cli, write_model, tmp_path) -> None:
    path = write_model(deep.CORPUS[name](), f"{name}.onnx")
    out = tmp_path / f"{name}.folded.onnx"
    code, stdout, err = cli("fold", path, "-o", out, "--json")
    assert code == 0, err
    verification = json.loads(stdout)["verification"]
    assert verification["ok"] and verification["rule"] == "rounding-noise"
    code, stdout, err = cli("compare", path, out, "--json")
    assert code == 0, err
    compared = json.loads(stdout)["comparisons"][0]["outputs"]
    # the same defaults and the same rule: the very same numbers
    assert [o["ratio"] for o in compared] == [o["ratio"] for o in verification["outputs"].values()]


def test_deep_output_in_the_hundreds_passes(folds) -> None:
    """The case the fixed atol got wrong: outputs reaching hundreds, float32 rounding of 1e-4
    on the elements near zero."""
    original, folded = folds["resnet50"]
    outcome = verify_equivalent(original, folded)
    (metrics,) = outcome["outputs"].values()
    assert metrics["scale"] > 100 and metrics["max_abs"] > 1e-5  # allclose's atol would refuse
    assert outcome["ok"]


# -- power against wrong folds -------------------------------------------------------------------
WRONG_FOLDS = {
    "epsilon x100": lambda m: FoldPass()(wf.scale_epsilons(m, 100.0)).model,
    "one channel's gamma x1.01": lambda m: FoldPass()(wf.nudge_gamma(m, 1.01)).model,
    "one channel's mean +0.5 sd": lambda m: FoldPass()(wf.shift_mean(m, 0.5)).model,
    "weights through float16": lambda m: wf.round_weights_through_fp16(FoldPass()(m).model),
}


@pytest.mark.parametrize("kind", list(WRONG_FOLDS))
@pytest.mark.parametrize("name", FP32_DEEP[:3])
def test_wrong_fold_fails(kind: str, name: str, folds) -> None:
    original, _ = folds[name]
    outcome = verify_equivalent(original, WRONG_FOLDS[kind](original))
    assert not outcome["ok"]
    assert outcome["ratio"] > NOISE_LIMIT


def test_wrong_fold_is_exit_1_and_writes_nothing(cli, write_model, tmp_path) -> None:
    original = deep.resnet50()
    wrong = write_model(WRONG_FOLDS["one channel's gamma x1.01"](original), "wrong.onnx")
    path = write_model(original, "resnet50.onnx")
    code, stdout, _ = cli("compare", path, wrong)
    assert code == 1
    assert "the rounding noise (limit 8x)" in stdout and "FAIL" in stdout


def test_fold_api_raises_on_a_wrong_fold_and_verifies_by_default() -> None:
    model = deep.mlp_bn()
    assert bnsurgery.fold(model).report.verification["ok"]  # type: ignore[attr-defined]
    assert bnsurgery.fold(model, verify=False).report.verification is None  # type: ignore[attr-defined]


def test_fold_file_verifies_by_default(tmp_path: Path) -> None:
    report = bnsurgery.fold_file(SAMPLES / "digits_cnn.onnx", tmp_path / "o.onnx")
    assert report.verification is not None and report.verification["ok"]


# -- explicit tolerances -------------------------------------------------------------------------
def test_atol_overrides_the_noise_rule(cli, write_model, tmp_path) -> None:
    original = deep.resnet50()
    path = write_model(original, "r.onnx")
    folded = write_model(FoldPass()(original).model, "f.onnx")
    code, stdout, _ = cli("compare", path, folded, "--atol", "1e-9", "--rtol", "0", "--json")
    (metrics,) = json.loads(stdout)["comparisons"][0]["outputs"]
    assert code == 1 and metrics["rule"] == "tolerance" and metrics["atol"] == 1e-9
    code, stdout, _ = cli("compare", path, folded, "--json")
    (metrics,) = json.loads(stdout)["comparisons"][0]["outputs"]
    assert code == 0 and metrics["rule"] == "noise" and metrics["atol"] is None


# -- the noise run -------------------------------------------------------------------------------
def test_noise_copy_rounds_each_weight_once_and_leaves_the_model_alone() -> None:
    model = deep.mlp_bn()
    before = model.SerializeToString()
    noisy = rounding_noise_copy(model, seed=3)
    assert model.SerializeToString() == before
    assert rounding_noise_copy(model, seed=3).SerializeToString() == noisy.SerializeToString()
    changed = 0
    for a, b in zip(model.graph.initializer, noisy.graph.initializer, strict=True):
        x, y = numpy_helper.to_array(a), numpy_helper.to_array(b)
        if x.dtype == np.float32:
            # at most one unit roundoff (2^-24) of the value, plus the final rounding
            assert np.all(np.abs(y.astype(np.float64) - x) <= 2.0**-23 * np.abs(x))
            changed += int((x != y).sum())
    assert changed > 0


def test_noise_copy_keeps_floats_that_select_shapes() -> None:
    scales = numpy_helper.from_array(np.array([1, 1, 1.7, 1.7], np.float32), "scales")
    exponent = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    weight = numpy_helper.from_array(np.full((2, 2, 1, 1), 0.3, np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"]),
            helper.make_node("Resize", ["c", "", "scales"], ["r"]),
            helper.make_node("Pow", ["r", "two"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 3, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [scales, exponent, weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    noisy = {t.name: numpy_helper.to_array(t) for t in rounding_noise_copy(model).graph.initializer}
    assert noisy["scales"].tolist() == [1, 1, np.float32(1.7), np.float32(1.7)]
    assert noisy["two"] == 2.0
    assert not np.array_equal(noisy["w"], numpy_helper.to_array(weight))


# -- the rule's arithmetic -----------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(st.integers(-20, 20), st.integers(0, 2**32 - 1))
def test_ratio_does_not_depend_on_the_output_scale(exponent: int, seed: int) -> None:
    r = np.random.default_rng(seed)
    ref = r.normal(0, 1, (4, 10))
    cand = ref + r.normal(0, 1e-6, ref.shape)
    noise = ref + r.normal(0, 1e-6, ref.shape)
    base = compare_arrays(ref, cand, noise=noise).ratio
    k = 2.0**exponent  # exact in binary: the same numbers, another scale
    scaled = compare_arrays(ref * k, cand * k, noise=noise * k).ratio
    assert scaled == pytest.approx(base, rel=1e-9)


def test_identical_candidate_is_ratio_zero_and_nan_must_match() -> None:
    ref = np.array([[1.0, np.nan, 3.0]], np.float32)
    assert compare_arrays(ref, ref.copy(), noise=ref.copy()).ratio == 0.0
    bad = compare_arrays(ref, np.array([[1.0, 2.0, 3.0]], np.float32), noise=ref.copy())
    assert not bad.passed and "NaN/Inf" in bad.note


def test_integer_outputs_count_differing_elements() -> None:
    ref = np.array([1, 2, 3, 4])
    assert compare_arrays(ref, ref.copy(), noise=ref.copy()).passed
    assert not compare_arrays(ref, np.array([1, 2, 3, 5]), noise=ref.copy()).passed


def test_an_output_no_weight_moves_is_judged_against_its_dtype() -> None:
    ref = np.full((2, 3), 1000.0, np.float32)
    one_ulp = np.nextafter(ref, np.float32(np.inf))
    assert compare_arrays(ref, one_ulp, noise=ref.copy()).passed  # 1 ulp: rounding
    assert not compare_arrays(ref, ref * np.float32(1.001), noise=ref.copy()).passed


# -- engines: a crash, a rejection, a missing kernel ---------------------------------------------
def test_an_onnx_runtime_crash_is_one_line_and_exit_2(cli, write_model, tmp_path) -> None:
    import models

    path = write_model(models.ort_crashing_bn(), "crash.onnx")
    before = path.read_bytes()
    out = tmp_path / "out.onnx"
    code, _, err = cli("fold", path, "-o", out)
    assert code == 2 and f"ONNX Runtime crashed (signal 11, SIGSEGV) running {path}" in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists() and path.read_bytes() == before
    code, _, err = cli("compare", path, path)
    assert code == 2 and "ONNX Runtime crashed (signal 11, SIGSEGV)" in err


def test_a_model_onnx_runtime_rejects_is_exit_2_not_a_reference_verdict(
    cli, write_model, tmp_path
) -> None:
    """ORT's INVALID_ARGUMENT (BN parameters that do not fit) is no missing kernel:
    onnx.reference, which broadcasts them silently, must not be asked instead."""
    import ort_fusion_models

    path = write_model(ort_fusion_models.matmul_transpose_bn_mismatched(), "bad.onnx")
    out = tmp_path / "out.onnx"
    code, _, err = cli("fold", path, "-o", out)
    assert code == 2 and err.startswith("bnsurgery: error: ONNX Runtime cannot run the model:")
    assert not out.exists()


def test_a_missing_kernel_is_judged_on_onnx_reference_by_the_same_rule() -> None:
    import models

    model = models.conv_bn_typed(models.F64)  # ORT has no float64 Conv
    outcome = bnsurgery.fold(model).report.verification  # type: ignore[attr-defined]
    assert outcome["ok"] and outcome["engines"][0].startswith("onnx.reference")
    assert outcome["rule"] == "rounding-noise" and outcome["ratio"] < NOISE_LIMIT


# -- dynamic dimensions and non-finite originals -------------------------------------------------
def _dynamic_hw(model: onnx.ModelProto) -> onnx.ModelProto:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for i, name in ((2, "H"), (3, "W")):
        dims[i].Clear()
        dims[i].dim_param = name
    del model.graph.output[0].type.tensor_type.shape.dim[:]
    return model


def test_fold_and_compare_pick_the_same_shapes_for_dynamic_dimensions(
    cli, write_model, tmp_path
) -> None:
    import models

    path = write_model(_dynamic_hw(models.conv_bn()), "dyn.onnx")
    out = tmp_path / "dyn.folded.onnx"
    code, stdout, err = cli("fold", path, "-o", out, "--json")
    assert code == 0, err
    verification = json.loads(stdout)["verification"]
    code, stdout, err = cli("compare", path, out, "--json")
    assert code == 0, err
    data = json.loads(stdout)["data"]
    assert data["input_shapes"] == verification["input_shapes"]
    (note,) = [n for n in data["notes"] if "dynamic dimensions" in n]
    assert note in verification["notes"] and "--shape x:" in note
    code, stdout, _ = cli("compare", path, out)
    assert "random data uses" in stdout  # said in the text too
    code, stdout, _ = cli("compare", path, out, "--shape", "x:1x4x9x9", "--json")
    assert json.loads(stdout)["data"]["input_shapes"]["x"] == [2, 4, 9, 9]  # the static batch of 2
    # a --shape that does not fit: one line naming the input and what the model expects
    code, _, err = cli("fold", path, "-o", tmp_path / "o2.onnx", "--shape", "x:1x3x9x9")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--shape x: axis 1 is 3, the model says 4" in err and "np.int64" not in err


@pytest.fixture
def negative_variance(write_model) -> Path:
    """digits_cnn with one running_var of its second BN set to -1: every output is NaN."""
    model = onnx.load(SAMPLES / "digits_cnn.onnx")
    bn2 = [n for n in model.graph.node if n.op_type == "BatchNormalization"][1]
    for tensor in model.graph.initializer:
        if tensor.name == bn2.input[4]:
            var = numpy_helper.to_array(tensor).copy()
            var[0] = -1.0
            tensor.CopyFrom(numpy_helper.from_array(var, tensor.name))
    return write_model(model, "negvar.onnx")


def test_nan_outputs_from_a_kept_bn_still_verify_each_fold(cli, negative_variance, tmp_path):
    out = tmp_path / "o.onnx"
    code, stdout, err = cli("fold", negative_variance, "-o", out)
    assert code == 0 and out.exists(), err
    (line,) = [x for x in stdout.splitlines() if x.startswith("verification:")]
    assert "1 of 3 folds verified on their own tensors" in line
    assert "kept BN '/bn2/BatchNormalization' has bad statistics" in line
    assert "2 could not be checked (its tensor is NaN/Inf in the original)" in line
    code, stdout, _ = cli("compare", negative_variance, out)
    assert code == 0 and "every value is NaN/Inf on both sides" in stdout


def test_a_wrong_fold_beside_a_nan_output_is_still_caught(negative_variance) -> None:
    original = onnx.load(negative_variance)
    mutated = onnx.ModelProto()
    mutated.CopyFrom(original)
    bn1 = next(n for n in mutated.graph.node if n.op_type == "BatchNormalization")
    for tensor in mutated.graph.initializer:  # bn1 comes before the NaN: its fold is checkable
        if tensor.name == bn1.input[1]:
            gamma = numpy_helper.to_array(tensor) * np.float32(1.5)
            tensor.CopyFrom(numpy_helper.from_array(gamma, tensor.name))
    honest = FoldPass()(original)
    outcome = verify_equivalent(original, FoldPass()(mutated).model, fold_report=honest.report)
    assert not outcome["ok"]
    assert outcome["per_fold"]["failed"] >= 1


def test_compare_help_says_what_top5_means_and_which_rule_judges(cli) -> None:
    code, stdout, _ = cli("compare", "--help")
    assert code == 0
    text = " ".join(stdout.split())
    assert '"top-5 set" the share whose five highest classes are the same set' in text
    assert "8x the reference's rounding noise" in text
