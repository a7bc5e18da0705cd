"""bnsurgery.integrations.testing: the assertions a project puts in its own CI tests."""

from __future__ import annotations

import models as M
import onnx
import pytest
from conftest import SAMPLES

from bnsurgery.integrations.testing import HEALTH_CHECKS, assert_bn_healthy, assert_fold_equivalent


@pytest.mark.parametrize("name", ["digits_cnn", "digits_mlp", "resnet_small"])
def test_sample_models_are_healthy_and_fold_equivalently(name):
    path = SAMPLES / f"{name}.onnx"
    assert_bn_healthy(path)
    result = assert_fold_equivalent(path, expect_folded=M.count_op(onnx.load(str(path))))
    assert result.report.bns_after == 0


def test_unhealthy_bn_fails_with_every_problem_listed():
    with pytest.raises(AssertionError) as info:
        assert_bn_healthy(M.training_mode_bn())
    assert "bn-training-mode [bn]" in str(info.value)
    with pytest.raises(AssertionError, match="bn-nonfinite-params"):
        assert_bn_healthy(M.bad_statistics("nan-var"))


def test_warnings_fail_by_default_and_can_be_ignored_or_tolerated():
    tiny = M.fp16_tiny_var()
    with pytest.raises(AssertionError, match="bn-small-epsilon"):
        assert_bn_healthy(tiny)
    assert_bn_healthy(tiny, fail_on="error")
    assert_bn_healthy(tiny, ignore=["bn-small-epsilon", "bn-dead-channels"])


def test_unknown_ignored_check_is_a_usage_error():
    with pytest.raises(ValueError, match="unknown BN check"):
        assert_bn_healthy(M.conv_bn(), ignore=["provider-parity"])
    assert "provider-parity" not in HEALTH_CHECKS


def test_fold_equivalence_fails_on_a_wrong_fold(monkeypatch):
    import numpy as np
    import onnx

    from bnsurgery.passes.fold import FoldPass

    real = FoldPass.__call__

    def wrong_fold(self, model):
        result = real(self, model)
        b = result.model.graph.initializer
        for tensor in b:
            if tensor.name == "b":
                value = onnx.numpy_helper.to_array(tensor) + np.float32(0.01)
                tensor.CopyFrom(onnx.numpy_helper.from_array(value, "b"))
        return result

    monkeypatch.setattr(FoldPass, "__call__", wrong_fold)
    with pytest.raises(
        AssertionError,
        match=r"output 'y': deviation [\d,]+x the rounding noise \(limit 8x\) \(max abs 0\.01",
    ):
        assert_fold_equivalent(M.conv_bn())


def test_fold_equivalence_checks_the_folded_count():
    with pytest.raises(AssertionError, match=r"expected 1 BN\(s\) folded, got 0; kept: bn"):
        assert_fold_equivalent(M.bn_relu(), expect_folded=1)


def test_fold_equivalence_uses_data_and_tolerances():
    result = assert_fold_equivalent(
        SAMPLES / "digits_cnn.onnx", data=SAMPLES / "digits_test.npz", atol=1e-4, rtol=1e-3
    )
    assert result.report.bns_after == 0
