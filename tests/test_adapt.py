"""adapt: insert -> calibrate -> re-estimate -> fold back recovers accuracy under a shift.

The synthetic task: three Gaussian classes in 8-D; a Gemm -> BN -> Relu -> Gemm classifier
whose BN statistics come from the source data and whose head is fitted by least squares. The
target shift is an input gain and offset, which after the first Gemm is a per-channel affine:
exactly what BN statistics can undo.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import sha256
from onnx import TensorProto, helper, numpy_helper

import bnsurgery
from bnsurgery.errors import BadInputError, UsageError

FEATURES, HIDDEN, CLASSES = 8, 24, 3


def _task(seed: int = 0, n: int = 600):
    centres = np.random.default_rng(100).normal(0, 1.6, (CLASSES, FEATURES))
    r = np.random.default_rng(seed)
    labels = r.integers(0, CLASSES, n)
    x = centres[labels] + r.normal(0, 1, (n, FEATURES))
    return x.astype(np.float32), labels


def _classifier() -> tuple[onnx.ModelProto, dict]:
    x, y = _task(0)
    r = np.random.default_rng(1)
    w1 = r.normal(0, 1 / np.sqrt(FEATURES), (FEATURES, HIDDEN))
    b1 = r.normal(0, 0.2, HIDDEN)
    h = x.astype(np.float64) @ w1 + b1
    mean, var = h.mean(axis=0), h.var(axis=0)
    gamma, beta = r.uniform(0.8, 1.2, HIDDEN), r.normal(0, 0.1, HIDDEN)
    z = np.maximum((h - mean) / np.sqrt(var + 1e-5) * gamma + beta, 0)
    design = np.hstack([z, np.ones((len(z), 1))])
    w2, *_ = np.linalg.lstsq(design, np.eye(CLASSES)[y], rcond=None)

    def t(name, value):
        return numpy_helper.from_array(np.asarray(value, np.float32), name)

    nodes = [
        helper.make_node("Gemm", ["x", "fc1.W", "fc1.b"], ["h"], name="fc1"),
        helper.make_node(
            "BatchNormalization", ["h", "bn.scale", "bn.B", "bn.mean", "bn.var"], ["hn"], name="bn"
        ),
        helper.make_node("Relu", ["hn"], ["z"], name="relu"),
        helper.make_node("Gemm", ["z", "fc2.W", "fc2.b"], ["logits"], name="fc2"),
    ]
    inits = [
        t("fc1.W", w1),
        t("fc1.b", b1),
        t("bn.scale", gamma),
        t("bn.B", beta),
        t("bn.mean", mean),
        t("bn.var", var),
        t("fc2.W", w2[:-1]),
        t("fc2.b", w2[-1]),
    ]
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model, {"x": x}


def _shift(x: np.ndarray) -> np.ndarray:
    return (0.5 * x - 2.0).astype(np.float32)


def _accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return float((session.run(None, {"x": x})[0].argmax(axis=1) == y).mean())


@pytest.fixture(scope="module")
def task():
    model, source = _classifier()
    x_test, y_test = _task(0, 900)[0][600:], _task(0, 900)[1][600:]
    x_target = _shift(_task(7, 400)[0])  # unlabeled, shifted
    return model, source, x_target, x_test, y_test


@pytest.fixture(scope="module")
def folded(task):
    return bnsurgery.fold(task[0]).model


def test_the_shift_costs_accuracy(task):
    model, _, _, x_test, y_test = task
    clean = _accuracy(model, x_test, y_test)
    shifted = _accuracy(model, _shift(x_test), y_test)
    assert clean > 0.85 and shifted < clean - 0.25


@pytest.mark.parametrize("mode", ["exact", "batch"])
def test_adapt_recovers_accuracy_on_a_model_with_bn(task, mode):
    model, _, x_target, x_test, y_test = task
    result = bnsurgery.adapt(model, {"x": x_target}, mode=mode)
    clean = _accuracy(model, x_test, y_test)
    shifted = _accuracy(model, _shift(x_test), y_test)
    adapted = _accuracy(result.model, _shift(x_test), y_test)
    assert adapted >= clean - 0.03 and adapted > shifted + 0.2
    assert len(result.model.graph.node) == len(model.graph.node)
    assert result.report.inserted is None and not result.report.folded


def test_adapt_on_a_folded_model_inserts_calibrates_reestimates_and_folds_back(task, folded):
    _model, source, x_target, x_test, y_test = task
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    result = bnsurgery.adapt(folded, {"x": x_target}, source=source)
    report = result.report
    assert [e["node"] for e in report.inserted.inserted] == ["fc1"]
    assert report.folded and report.bns_after == 0
    assert len(result.model.graph.node) == len(folded.graph.node)
    assert [n.op_type for n in result.model.graph.node] == [n.op_type for n in folded.graph.node]
    clean = _accuracy(folded, x_test, y_test)
    shifted = _accuracy(folded, _shift(x_test), y_test)
    adapted = _accuracy(result.model, _shift(x_test), y_test)
    assert adapted >= clean - 0.03 and adapted > shifted + 0.2


def test_adapt_without_fold_keeps_the_inserted_bns(task, folded):
    _, source, x_target, _, _ = task
    result = bnsurgery.adapt(folded, {"x": x_target}, source=source, fold=False)
    assert result.report.bns_after == 1
    assert len(result.model.graph.node) == len(folded.graph.node) + 1


def test_adapt_with_a_prior_sits_between_source_and_target(task):
    model, _, x_target, _x_test, _y_test = task
    full = bnsurgery.adapt(model, {"x": x_target}).model
    blended = bnsurgery.adapt(model, {"x": x_target}, prior=400).model

    def mean_of(m):
        return next(numpy_helper.to_array(t) for t in m.graph.initializer if t.name == "bn.mean")

    lam = 400 / (400 + 400)
    expected = lam * mean_of(model).astype(np.float64) + (1 - lam) * mean_of(full)
    np.testing.assert_allclose(mean_of(blended), expected, rtol=1e-5, atol=1e-5)


def test_adapt_a_folded_model_needs_a_source(task, folded):
    with pytest.raises(UsageError, match="no BatchNormalization") as exc:
        bnsurgery.adapt(folded, {"x": task[2]})
    assert exc.value.option == "source"


def test_adapt_a_model_without_candidates_is_refused():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    x = {"x": np.ones((4, 4), np.float32)}
    with pytest.raises(BadInputError, match="no BatchNormalization either"):
        bnsurgery.adapt(model, x, source=x)


def test_cli_adapt(cli, write_model, task, folded, tmp_path):
    _, source, x_target, _, _ = task
    path = write_model(folded)
    np.savez(tmp_path / "src.npz", x=source["x"])
    np.savez(tmp_path / "tgt.npz", x=x_target)
    digest = sha256(path)
    code, out, err = cli(
        "adapt", path, "--source", tmp_path / "src.npz", "--target", tmp_path / "tgt.npz", "--json"
    )
    assert code == 0, err
    payload = json.loads(out)
    assert payload["folded"] and payload["nodes_before"] == payload["nodes_after"]
    assert payload["output"] == str(tmp_path / "net.adapted.onnx")
    assert sha256(path) == digest
    code, out, err = cli(
        "adapt",
        path,
        "--source",
        tmp_path / "src.npz",
        "--target",
        tmp_path / "tgt.npz",
        "-o",
        tmp_path / "b.onnx",
    )
    assert code == 0 and "folded back" in out


def test_cli_adapt_bad_input(cli, write_model, folded, tmp_path):
    path = write_model(folded)
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 3), np.float32))
    code, _, err = cli("adapt", path, "--target", tmp_path / "bad.npz")
    assert code == 2 and "--source" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli(
        "adapt", path, "--target", tmp_path / "bad.npz", "--source", tmp_path / "bad.npz"
    )
    assert code == 2 and "expects" in err
    assert not (tmp_path / "net.adapted.onnx").exists()


# -- adapt is one registered pass: the API call, a pipeline step -------------------------------
def test_an_adapt_pipeline_step_equals_the_api_call(task, folded, tmp_path):
    _, source, x_target, _, _ = task
    np.savez(tmp_path / "src.npz", x=source["x"])
    np.savez(tmp_path / "tgt.npz", x=x_target)
    pipeline = tmp_path / "adapt.toml"
    pipeline.write_text(
        f'[[step]]\npass = "adapt"\ntarget = "{tmp_path / "tgt.npz"}"\n'
        f'source = "{tmp_path / "src.npz"}"\nsamples = 256\n'
    )
    stepped = bnsurgery.run_pipeline(pipeline, folded)
    direct = bnsurgery.adapt(
        folded, str(tmp_path / "tgt.npz"), source=str(tmp_path / "src.npz"), samples=256
    )
    assert stepped.model.SerializeToString() == direct.model.SerializeToString()
    [step] = stepped.report.steps
    assert step.name == "adapt" and step.modified
    assert step.report.folded and step.report.to_dict()["nodes_after"] == len(folded.graph.node)


def test_adapt_reestimates_exactly_the_bns_it_inserted(task, folded):
    _, source, x_target, _, _ = task
    result = bnsurgery.adapt(folded, {"x": x_target}, source=source, fold=False)
    inserted = result.report.inserted.bn_names
    assert inserted and [b.name for b in result.report.reestimate.bns] == inserted
    assert result.report.reestimate.skipped == []


def test_reestimate_takes_exact_bn_names_as_well_as_a_regex(task):
    model, _, x_target, _, _ = task
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    bn = next(n for n in renamed.graph.node if n.op_type == "BatchNormalization")
    bn.name = "bn(1)"  # regex metacharacters: a name is not a pattern
    result = bnsurgery.reestimate(renamed, {"x": x_target}, nodes=["bn(1)"])
    assert [b.name for b in result.report.bns] == ["bn(1)"]
    with pytest.raises(BadInputError, match="matches no BatchNormalization"):
        bnsurgery.reestimate(renamed, {"x": x_target}, nodes=["bn"])


def test_adapt_logs_what_it_decided(task, folded, caplog):
    _, source, x_target, _, _ = task
    with caplog.at_level("INFO", logger="bnsurgery"):
        bnsurgery.adapt(folded, {"x": x_target}, source=source)
    logged = " | ".join(r.getMessage() for r in caplog.records)
    assert "adapt: the model has no BN" in logged
    assert "insert: BN 'fc1/BatchNormalization' after Gemm 'fc1'" in logged
    assert "calibrated on" in logged
    assert "adapt: folded back 1 of the 1 inserted BN(s)" in logged


def test_bad_adapt_options_fail_when_the_pass_is_built():
    from bnsurgery.pipeline.registry import make_pass

    with pytest.raises(UsageError, match="unknown mode"):
        make_pass("adapt", target="random:4", mode="fast")
    with pytest.raises(UsageError) as exc:
        make_pass("adapt", target="random:4", after="Relu")
    assert exc.value.option == "after"
