"""BN insertion: exact identity, channel counts and dtypes, opset attributes, names, skips,
calibration (identity on DATA's distribution), the CLI and its bad inputs."""

from __future__ import annotations

import json

import bn_reference as ref
import models
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import SAMPLES, sha256
from onnx import helper, numpy_helper

import bnsurgery
from bnsurgery.errors import BadInputError, UsageError
from bnsurgery.passes import Pipeline
from bnsurgery.passes.insert import insert
from bnsurgery.passes.reestimate import reestimate
from bnsurgery.pipeline.config import parse_pipeline, run_pipeline
from bnsurgery.pipeline.registry import make_pass
from bnsurgery.stats import relative_error


def strip_bn(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every BN removed (its producer writes the BN's output name)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    for bn in [n for n in graph.node if n.op_type == "BatchNormalization"]:
        x, y = bn.input[0], bn.output[0]
        for node in graph.node:
            for i, name in enumerate(node.output):
                if name == x:
                    node.output[i] = y
            for i, name in enumerate(node.input):
                if name == x:
                    node.input[i] = y
        graph.node.remove(bn)
        params = set(bn.input[1:])
        kept = [t for t in graph.initializer if t.name not in params]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        inputs = [v for v in graph.input if v.name not in params]
        del graph.input[:]
        graph.input.extend(inputs)
    onnx.checker.check_model(out)
    return out


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
    return session.run(None, feeds)


def feeds_for(model: onnx.ModelProto, n: int | None = None, seed: int = 0) -> dict:
    r = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.input:
        if value.name in {t.name for t in model.graph.initializer}:
            continue
        dims = [d.dim_value or 2 for d in value.type.tensor_type.shape.dim]
        if n is not None:
            dims[0] = n
        dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        feeds[value.name] = r.normal(0.5, 2.0, dims).astype(dtype)
    return feeds


def bns(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "BatchNormalization"]


CASES = {
    "conv": lambda: models.conv_bn(),
    "conv1d_no_bias": lambda: models.conv_bn(1, bias=False),
    "conv3d_grouped": lambda: models.conv_bn(3, group=2, size=4),
    "depthwise": lambda: models.depthwise_conv_bn(),
    "conv_transpose_grouped": lambda: models.conv_transpose_bn(group=2),
    "gemm": lambda: models.gemm_bn(),
    "gemm_transB": lambda: models.gemm_bn(trans_b=1, c_shape=None),
    "matmul": lambda: models.matmul_bn(),
    "matmul_bias": lambda: models.matmul_bn(add_bias=True),
}
CHANNELS = {
    "conv": 6,
    "conv1d_no_bias": 6,
    "conv3d_grouped": 6,
    "depthwise": 6,
    "conv_transpose_grouped": 6,
    "gemm": 6,
    "gemm_transB": 6,
    "matmul": 6,
    "matmul_bias": 6,
}


@pytest.mark.parametrize("case", list(CASES))
def test_identity_insertion_is_exact(case):
    model = strip_bn(CASES[case]())
    result = insert(model, include_outputs=True)
    (bn,) = bns(result.model)
    onnx.checker.check_model(result.model, full_check=True)
    feeds = feeds_for(model)
    for a, b in zip(run(model, feeds), run(result.model, feeds), strict=True):
        np.testing.assert_array_equal(a, b)
    scale, bias, mean, var = (
        numpy_helper.to_array(t)
        for name in bn.input[1:]
        for t in result.model.graph.initializer
        if t.name == name
    )
    assert scale.shape == (CHANNELS[case],)
    np.testing.assert_array_equal(scale, 1)
    np.testing.assert_array_equal(bias, 0)
    np.testing.assert_array_equal(mean, 0)
    np.testing.assert_array_equal(var, np.float32(1 - 1e-5))


def test_matmul_with_bias_gets_its_bn_after_the_add():
    result = insert(strip_bn(models.matmul_bn(add_bias=True)), include_outputs=True)
    entry = result.report.inserted[0]
    assert entry["after"] == "add" and entry["op"] == "MatMul"
    (bn,) = bns(result.model)
    producer = next(n for n in result.model.graph.node if bn.input[0] in n.output)
    assert producer.op_type == "Add"


@pytest.mark.parametrize("opset", [7, 9, 13, 14, 18])
def test_opset_appropriate_attributes_and_exact_identity(opset):
    model = strip_bn(models.conv_bn(opset=opset))
    result = insert(model, include_outputs=True)
    (bn,) = bns(result.model)
    attrs = {a.name: helper.get_attribute_value(a) for a in bn.attribute}
    assert attrs == {"epsilon": pytest.approx(1e-5)}
    onnx.checker.check_model(result.model, full_check=True)
    feeds = feeds_for(model)
    np.testing.assert_array_equal(run(model, feeds)[0], run(result.model, feeds)[0])


def test_opset6_bn_is_in_test_mode():
    # ONNX Runtime has no BatchNormalization-6 kernel: check the node, not a run
    model = strip_bn(models.opset6_bn())
    result = insert(model, include_outputs=True)
    (bn,) = bns(result.model)
    attrs = {a.name: helper.get_attribute_value(a) for a in bn.attribute}
    assert attrs == {"epsilon": pytest.approx(1e-5), "is_test": 1}
    onnx.checker.check_model(result.model, full_check=True)


def test_fp16_model_gets_fp16_parameters():
    model = strip_bn(models.conv_bn_typed(models.F16))
    result = insert(model, include_outputs=True)
    (bn,) = bns(result.model)
    types = {t.name: t.data_type for t in result.model.graph.initializer}
    assert {types[n] for n in bn.input[1:]} == {models.F16}
    feeds = feeds_for(model)
    np.testing.assert_allclose(run(model, feeds)[0], run(result.model, feeds)[0], rtol=1e-3)


def test_output_names_are_kept_and_new_names_are_unique():
    model = strip_bn(models.conv_bn())
    # a tensor that already has the name the BN would get
    model.graph.node[0].name = "conv"
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(1), "conv/BatchNormalization"))
    result = insert(model, include_outputs=True)
    (bn,) = bns(result.model)
    assert bn.name != "conv/BatchNormalization"
    assert [o.name for o in result.model.graph.output] == ["y"]
    assert bn.output[0] == "y"
    names = [n.name for n in result.model.graph.node]
    assert len(names) == len(set(names))


def test_skips_are_reported_with_reasons():
    kept = insert(models.conv_bn(), include_outputs=True).report
    assert kept.skipped == [{"node": "conv", "op": "Conv", "reason": "followed-by-bn"}]
    out = insert(strip_bn(models.conv_bn())).report
    assert out.skipped[0]["reason"] == "produces-graph-output" and not out.inserted
    three_d = insert(strip_bn(models.matmul_3d_bn()), include_outputs=True).report
    assert three_d.skipped[0]["reason"] == "channel-axis-mismatch"


def test_inserting_twice_adds_nothing_the_second_time():
    once = insert(strip_bn(models.conv_bn()), include_outputs=True).model
    twice = insert(once, include_outputs=True)
    assert not twice.report.inserted and len(bns(twice.model)) == 1


def test_after_and_nodes_select_the_candidates():
    model = strip_bn(ref.conv_net())
    only_gemm = insert(model, after="Gemm")
    assert [e["node"] for e in only_gemm.report.inserted] == ["fc"]
    branch = insert(model, nodes="^conv_(a|b)$")
    assert sorted(e["node"] for e in branch.report.inserted) == ["conv_a", "conv_b"]


def test_sample_model_with_folded_bn():
    model = onnx.load(SAMPLES / "digits_cnn_nobn.onnx")
    result = insert(model)
    assert [e["op"] for e in result.report.inserted] == ["Conv", "Conv", "Conv", "Gemm"]
    assert [e["channels"] for e in result.report.inserted] == [16, 32, 32, 32]
    assert result.report.skipped == [
        {"node": "node_linear_1", "op": "Gemm", "reason": "produces-graph-output"}
    ]
    x = {"input": np.load(SAMPLES / "digits_test.npz")["input"][:64]}
    np.testing.assert_array_equal(run(model, x)[0], run(result.model, x)[0])


# -- calibration ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stripped() -> onnx.ModelProto:
    return strip_bn(ref.conv_net())


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return ref.image_data(40, seed=3)


def test_calibration_sets_the_identity_on_the_data_distribution(stripped, data):
    result = insert(stripped, calibrate={"x": data}, batch_size=16)
    # the BN inputs are the stripped model's tensors, measured before any BN existed
    probe = onnx.ModelProto()
    probe.CopyFrom(stripped)
    names = {e["bn"]: e["tensor"] for e in result.report.inserted}
    params = ref.bn_params(result.model)
    for bn in bns(result.model):
        pre = bn.input[0]
        probe.graph.output.append(onnx.ValueInfoProto(name=names[bn.name]))
        del probe.graph.output[:-1]
        from onnx.reference import ReferenceEvaluator

        act = ReferenceEvaluator(ref.to_float64(probe)).run(None, {"x": data.astype(np.float64)})
        act = act[0]
        axes = ref.channel_axes(act)
        mu, var = act.mean(axis=axes), act.var(axis=axes)
        scale, bias, mean, v = params[bn.name]
        assert relative_error(mean, mu) < 1e-6 and relative_error(v, var) < 1e-6, pre
        assert relative_error(bias, mu) < 1e-6
        assert relative_error(scale, np.sqrt(var + 1e-5)) < 1e-6
    assert result.report.calibration.run.passes == 1


def test_calibrated_bns_are_still_the_identity(stripped, data):
    result = insert(stripped, calibrate={"x": data}, batch_size=16)
    feeds = {"x": ref.image_data(16, seed=11, shift=2.0)}  # other data: still the identity
    a, b = run(stripped, feeds)[0], run(result.model, feeds)[0]
    assert relative_error(b, a) < 1e-5


def test_reestimating_on_the_calibration_data_changes_nothing(stripped, data):
    calibrated = insert(stripped, calibrate={"x": data}, batch_size=16).model
    again = reestimate(calibrated, {"x": data}, batch_size=16)
    before, after = ref.bn_params(calibrated), ref.bn_params(again.model)
    for name in before:
        assert relative_error(after[name][2], before[name][2]) < 1e-5
        assert relative_error(after[name][3], before[name][3]) < 1e-5


def test_normalised_values_have_zero_mean_unit_variance_on_data(stripped, data):
    calibrated = insert(stripped, nodes="^conv0$", calibrate={"x": data}).model
    (bn,) = bns(calibrated)
    _scale, _bias, mean, var = ref.bn_params(calibrated)[bn.name]
    act = run(_with_output(calibrated, bn.input[0]), {"x": data})[0].astype(np.float64)
    z = (act - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-5)
    assert np.abs(z.mean(axis=(0, 2, 3))).max() < 1e-5
    assert np.abs(z.var(axis=(0, 2, 3)) - var / (var + 1e-5)).max() < 1e-5


# -- one insert: the API function, the registered pass and a pipeline step --------------------
def test_the_registered_pass_calibrates_byte_for_byte_like_insert(stripped, data):
    options = {"calibrate": {"x": data}, "batch_size": 16, "nodes": "conv"}
    by_api = insert(stripped, **options)
    by_pass = make_pass("insert", **options)(stripped)
    in_pipeline = Pipeline([make_pass("insert", **options)]).run(stripped)
    expected = by_api.model.SerializeToString()
    assert by_api.report.calibration is not None
    assert by_pass.model.SerializeToString() == expected
    assert in_pipeline.model.SerializeToString() == expected
    assert bnsurgery.insert(stripped, **options).model.SerializeToString() == expected
    assert by_pass.report.calibration.to_dict()["bns"] == by_api.report.calibration.to_dict()["bns"]


def test_a_toml_insert_step_calibrates_like_the_api(stripped, data, tmp_path):
    np.savez(tmp_path / "calib.npz", x=data)
    spec = parse_pipeline(
        f'[[step]]\npass = "insert"\ncalibrate = "{tmp_path / "calib.npz"}"\nbatch_size = 16\n'
    )
    stepped = run_pipeline(spec, stripped)
    direct = insert(stripped, calibrate=str(tmp_path / "calib.npz"), batch_size=16)
    assert stepped.model.SerializeToString() == direct.model.SerializeToString()
    assert stepped.report.steps[0].report.calibration.samples == 40


def test_insert_logs_each_decision(stripped, caplog):
    with caplog.at_level("INFO", logger="bnsurgery.passes.insert"):
        result = insert(stripped, include_outputs=False)
    logged = [r.getMessage() for r in caplog.records if r.name == "bnsurgery.passes.insert"]
    for entry in result.report.inserted:
        assert any(f"BN '{entry['bn']}' after {entry['op']}" in m for m in logged)
    for entry in result.report.skipped:
        assert any(f"no BN after {entry['op']} '{entry['node']}'" in m for m in logged)


def _with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.output[:]
    out.graph.output.append(onnx.ValueInfoProto(name=name))
    return out


# -- bad input ------------------------------------------------------------------------------------
def test_nodes_matching_nothing_is_refused(stripped):
    with pytest.raises(BadInputError, match="matches no") as exc:
        insert(stripped, nodes="^zzz$")
    assert exc.value.option == "nodes"


def test_no_candidate_and_no_bn_is_refused():
    relu = models.make(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        [models.vi("x", [2, 3])],
        [models.vi("y", [2, 3])],
    )
    with pytest.raises(BadInputError, match="no BatchNormalization either"):
        insert(relu)


def test_unknown_after_op_is_a_usage_error(stripped):
    with pytest.raises(UsageError, match="BN can follow only") as exc:
        insert(stripped, after="Conv,Relu")
    assert exc.value.option == "after"
    with pytest.raises(UsageError) as exc:
        insert(stripped, epsilon=0)
    assert exc.value.option == "epsilon"


def test_calibration_data_that_does_not_fit_is_refused(stripped):
    from bnsurgery.errors import DataError

    with pytest.raises(DataError):
        insert(stripped, calibrate={"x": np.zeros((4, 3, 5), np.float32)})
    with pytest.raises(DataError, match="at least 2"):
        insert(stripped, calibrate={"x": ref.image_data(1)})


# -- CLI ------------------------------------------------------------------------------------------
def test_cli_default_output_json_and_input_untouched(cli, write_model, tmp_path, stripped, data):
    model = write_model(stripped)
    np.savez(tmp_path / "d.npz", x=data)
    digest = sha256(model)
    code, out, err = cli("insert", model, "--calibrate", tmp_path / "d.npz", "--json")
    assert code == 0, err
    payload = json.loads(out)
    assert payload["output"] == str(tmp_path / "net.inserted.onnx")
    assert len(payload["inserted"]) == 4 and payload["calibration"]["samples"] == 40
    assert sha256(model) == digest
    assert len(bns(onnx.load(tmp_path / "net.inserted.onnx"))) == 4


def test_cli_text(cli, write_model, stripped):
    model = write_model(stripped)
    code, out, err = cli("insert", model, "--after", "Conv")
    assert code == 0, err
    assert "inserted 3 BatchNormalization node(s)" in out and "identity BNs" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nodes", "^zzz$"], "matches no"),
        (["--after", "Relu"], "BN can follow only"),
        (["--calibrate", "{bad}"], "expects"),
        (["--calibrate", "missing.npz"], "no such file"),
    ],
)
def test_cli_bad_input_exits_2(cli, write_model, tmp_path, stripped, args, message):
    model = write_model(stripped)
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 3, 5), np.float32))
    digest = sha256(model)
    code, _, err = cli("insert", model, *[a.format(bad=tmp_path / "bad.npz") for a in args])
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1
    assert sha256(model) == digest and not (tmp_path / "net.inserted.onnx").exists()


def test_help_ends_with_an_example(cli):
    code, out, _ = cli("insert", "--help")
    assert code == 0 and "Example:" in out
    assert "bnsurgery insert" in out.rstrip().splitlines()[-2]
