"""bnsurgery passes as onnx-ir passes, every API function taking an onnx_ir.Model, and the
torch.onnx.export(..., dynamo=True) route: fold and validate before the model is saved."""

from __future__ import annotations

import models as M
import numpy as np
import pytest
from conftest import SAMPLES

ir = pytest.importorskip("onnx_ir")

import bnsurgery  # noqa: E402
from bnsurgery.integrations.onnx_ir import (  # noqa: E402
    AdaptPass,
    FoldPass,
    InsertPass,
    IrPassResult,
    ReestimatePass,
    RegisteredPass,
    ValidatePass,
)
from bnsurgery.integrations.testing import assert_bn_healthy, assert_fold_equivalent  # noqa: E402
from bnsurgery.validation.gate import ValidationFailed  # noqa: E402


def ops(model) -> list[str]:
    return [node.op_type for node in model.graph]


def test_passes_subclass_onnx_ir_base_classes_with_their_semantics():
    for cls in (FoldPass, InsertPass, ReestimatePass, AdaptPass):
        assert issubclass(cls, ir.passes.FunctionalPass)
    validate = ValidatePass()
    assert isinstance(validate, ir.passes.PassBase)
    assert (validate.in_place, validate.changes_input) == (True, False)


def test_one_adapter_wraps_every_registered_pass_by_its_declaration():
    model = ir.load(str(SAMPLES / "digits_cnn.onnx"))
    gate = RegisteredPass("validate", plugins=False)  # an AnalysisPass: side-effect only
    assert (gate.in_place, gate.changes_input) == (True, False)
    assert gate(model).model is model
    fold = RegisteredPass("fold", in_place=True)  # in place on its own copy: functional here
    assert (fold.in_place, fold.changes_input) == (False, False)
    folded = fold(model)
    assert folded.model is not model and "BatchNormalization" in ops(model)
    with pytest.raises(KeyError, match="unknown pass 'nope'"):
        RegisteredPass("nope")


def test_adapt_pass_equals_the_api_call():
    model = ir.load(str(SAMPLES / "digits_cnn_nobn.onnx"))
    target, source = str(SAMPLES / "digits_test.npz"), str(SAMPLES / "digits_train.npz")
    result = AdaptPass(target=target, source=source, samples=64)(model)
    direct = bnsurgery.adapt(model, target, source=source, samples=64)
    # the round trip through onnx_ir adds value_info; the nodes and weights are the API's
    got = ir.serde.serialize_model(result.model)
    assert got.graph.node == direct.model.graph.node
    assert sorted(t.SerializeToString() for t in got.graph.initializer) == sorted(
        t.SerializeToString() for t in direct.model.graph.initializer
    )
    assert result.report.folded and "BatchNormalization" not in ops(result.model)


def test_fold_pass_is_functional():
    model = ir.load(str(SAMPLES / "digits_cnn.onnx"))
    result = FoldPass()(model)
    assert isinstance(result, IrPassResult) and result.modified
    assert result.model is not model
    assert ops(model).count("BatchNormalization") == 4  # the input is untouched
    assert "BatchNormalization" not in ops(result.model)
    assert result.report.bns_after == 0


def test_validate_pass_returns_the_same_model_and_raises_on_findings():
    model = ir.serde.deserialize_model(M.bad_statistics("nan-var"))
    with pytest.raises(ValidationFailed, match="bn-nonfinite-params"):
        ValidatePass(plugins=False)(model)
    gate = ValidatePass(raise_on_failure=False, plugins=False)
    result = gate(model)
    assert result.model is model and not result.modified
    assert not result.report.ok and gate.last_report is result.report


def test_insert_and_reestimate_passes():
    model = ir.load(str(SAMPLES / "digits_cnn_nobn.onnx"))
    inserted = InsertPass()(model)
    assert ops(inserted.model).count("BatchNormalization") == 4
    adapted = ReestimatePass(data=str(SAMPLES / "digits_train.npz"), samples=64)(inserted.model)
    assert adapted.modified and len(adapted.report.to_dict()["bns"]) == 4


def test_passes_run_in_an_onnx_ir_pass_manager():
    model = ir.load(str(SAMPLES / "resnet_small.onnx"))
    manager = ir.passes.PassManager(
        [ValidatePass(plugins=False), FoldPass(), ValidatePass(fail_on="warning", plugins=False)]
    )
    result = manager(model)
    assert "BatchNormalization" not in ops(result.model)


def test_bad_options_fail_when_the_pass_is_built():
    with pytest.raises(bnsurgery.errors.BnSurgeryError, match="needs DATA"):
        ReestimatePass()


def test_every_api_function_accepts_an_onnx_ir_model():
    model = ir.load(str(SAMPLES / "digits_mlp.onnx"))
    assert bnsurgery.load_model(model).graph.node
    assert bnsurgery.fold(model, verify=True).report.bns_after == 0
    assert bnsurgery.info(model).bns_before == 2
    assert bnsurgery.validate(model, plugins=False).ok
    assert bnsurgery.compare(model, model, data="random:4").passed
    assert bnsurgery.insert(model).report.to_dict()["inserted"] == []
    data = {"input": np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)}
    assert bnsurgery.reestimate(model, data).modified
    assert bnsurgery.Pipeline([bnsurgery.passes.fold.FoldPass()]).run(model).modified
    assert_bn_healthy(model)
    assert_fold_equivalent(model, expect_folded=2)


# -- torch.onnx.export(..., dynamo=True) -------------------------------------------------------
@pytest.fixture(scope="module")
def exported():
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)
            self.bn = torch.nn.BatchNorm2d(8)
            self.fc = torch.nn.Linear(8, 4)
            self.bn1 = torch.nn.BatchNorm1d(4)

        def forward(self, x):
            y = torch.relu(self.bn(self.conv(x)))
            return self.bn1(self.fc(y.mean(dim=(2, 3))))

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        for bn in (net.bn, net.bn1):
            bn.running_mean.normal_(0, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.5)
    net.eval()
    x = torch.randn(2, 3, 8, 8)
    # optimize=False: the exporter's own optimizer would fold the BNs before we see them.
    program = torch.onnx.export(net, (x,), dynamo=True, optimize=False, verbose=False)
    with torch.no_grad():
        expected = net(x).numpy()
    return program, x.numpy(), expected


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch export internals
def test_fold_and_validate_a_dynamo_export_before_it_is_saved(exported, tmp_path):
    import onnxruntime as ort

    program, x, expected = exported
    assert ops(program.model).count("BatchNormalization") == 2
    gate = ValidatePass(fail_on="warning", plugins=False)
    fold = FoldPass()
    result = ir.passes.PassManager([gate, fold, gate])(program.model)
    assert gate.last_report.ok and fold.last_report.bns_after == 0
    program.model = result.model
    path = tmp_path / "net.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    [got] = session.run(None, {session.get_inputs()[0].name: x})
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4)
    assert "BatchNormalization" not in [n.op_type for n in bnsurgery.load_model(path).graph.node]
