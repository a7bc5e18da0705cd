"""BatchNormView across opsets 6..15+, and the per-channel affine (s, t) in float64."""

from __future__ import annotations

import models as m
import numpy as np
import pytest
from onnx import helper

from bnsurgery.errors import BadInputError
from bnsurgery.model.bn import (
    BatchNormView,
    BnParams,
    affine,
    check_param_shapes,
    statistics_problem,
)

INPUTS = ["x", "s", "b", "mu", "v"]


def view(opset: int, outputs=("y",), inputs=INPUTS, **attrs) -> BatchNormView:
    node = helper.make_node("BatchNormalization", list(inputs), list(outputs), name="bn", **attrs)
    return BatchNormView.of(node, opset)


def params(c: int = 5, seed: int = 0) -> BnParams:
    st = m.bn_stats(m.rng(seed), c)
    return BnParams(st.scale, st.bias, st.mean, st.var)


# -- attributes ---------------------------------------------------------------------------------
def test_epsilon_defaults_to_the_schemas_float32_1e_5() -> None:
    """The default is a float attribute: 1e-5 rounded to float32, as the runtimes use it."""
    assert view(15).epsilon == float(np.float32(1e-5)) != 1e-5


def test_epsilon_attribute_is_read() -> None:
    assert view(15, epsilon=1e-3).epsilon == pytest.approx(1e-3)


def test_momentum_defaults_to_0_9() -> None:
    assert view(15).momentum == pytest.approx(0.9)


@pytest.mark.parametrize("opset", [9, 13, 14, 15])
def test_single_output_inference_is_not_training(opset: int) -> None:
    assert view(opset).training_mode is False


@pytest.mark.parametrize("opset", [14, 15])
def test_training_mode_attribute(opset: int) -> None:
    assert view(opset, training_mode=1).training_mode is True


@pytest.mark.parametrize("opset", [7, 9, 13])
def test_extra_outputs_mean_training_before_14(opset: int) -> None:
    assert view(opset, outputs=("y", "mean", "var")).training_mode is True


def test_opset6_is_test_default_means_training() -> None:
    assert view(6).training_mode is True


def test_opset6_is_test_1_is_inference() -> None:
    assert view(6, is_test=1).training_mode is False


@pytest.mark.parametrize("opset", [6, 7])
def test_spatial_0_before_9(opset: int) -> None:
    assert view(opset, spatial=0).spatial is False


def test_spatial_defaults_to_1() -> None:
    assert view(7).spatial is True


def test_wiring() -> None:
    v = view(15)
    assert (v.x, v.y, v.param_names, v.name) == ("x", "y", ("s", "b", "mu", "v"), "bn")


def test_extra_outputs_used_asks_about_each_extra_output() -> None:
    v = view(15, outputs=("y", "", "rv"), training_mode=1)
    assert (v.extra_outputs_used(lambda n: n == "rv"), v.extra_outputs_used(lambda n: False)) == (
        True,
        False,
    )


def test_fewer_than_five_inputs_is_bad_input() -> None:
    with pytest.raises(BadInputError):
        view(15, inputs=["x", "s", "b", "mu"])


def test_not_a_bn_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        BatchNormView.of(helper.make_node("Relu", ["x"], ["y"]), 15)


# -- the affine ---------------------------------------------------------------------------------
def test_affine_is_the_bn_formula() -> None:
    """s*x + t equals gamma*(x - mean)/sqrt(var + eps) + beta, for random x, in float64."""
    p = params()
    x = m.rng(1).normal(0, 2, (7, p.channels))
    s, t = affine(p, 1e-5)
    bn = p.scale * (x - p.mean) / np.sqrt(p.var + 1e-5) + p.bias
    np.testing.assert_allclose(s * x + t, bn, rtol=1e-13, atol=1e-13)


def test_affine_uses_epsilon() -> None:
    p = BnParams(np.ones(1), np.zeros(1), np.zeros(1), np.zeros(1))
    s, _ = affine(p, 0.25)
    assert s[0] == pytest.approx(2.0)


def test_channels() -> None:
    assert params(c=7).channels == 7


# -- statistics checks --------------------------------------------------------------------------
def test_clean_statistics_have_no_problem() -> None:
    assert statistics_problem(params(), 1e-5) is None


@pytest.mark.parametrize(
    ("field", "value"),
    [("var", np.nan), ("var", np.inf), ("scale", np.nan), ("bias", -np.inf), ("mean", np.nan)],
)
def test_non_finite_statistics_are_a_problem(field: str, value: float) -> None:
    p = params()
    getattr(p, field)[2] = value
    assert statistics_problem(p, 1e-5) is not None


def test_negative_variance_is_a_problem() -> None:
    p = params()
    p.var[0] = -1e-3
    assert "negative" in statistics_problem(p, 1e-5)


def test_zero_variance_is_fine() -> None:
    p = params()
    p.var[0] = 0.0
    assert statistics_problem(p, 1e-5) is None


# -- parameter shapes ---------------------------------------------------------------------------
def test_matching_vectors_pass() -> None:
    v = np.ones(4)
    check_param_shapes("bn", v, v, v, v)


@pytest.mark.parametrize(
    "shapes",
    [((5,), (4,), (4,), (4,)), ((4,), (4,), (4, 1), (4,)), ((), (), (), ()), ((4, 2),) * 4],
    ids=["scale-longer", "mean-2d", "scalars", "all-2d"],
)
def test_mismatched_shapes_are_bad_input(shapes) -> None:
    with pytest.raises(BadInputError, match="'bn'"):
        check_param_shapes("bn", *(np.ones(s) for s in shapes))
