"""The fold's fast paths compute exactly what the plain code computes.

`fold_math.Scaled` + `cast_checked` (a block-by-block scale and cast) must give the same bits
and the same overflow decisions as casting `float64(W) * s`; `replace_tensor_value` must leave
the same TensorProto as `CopyFrom(from_array(value))`.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bnsurgery.model.edit import replace_tensor_value
from bnsurgery.passes.fold import arithmetic as fm


def plain_cast(w: np.ndarray, scale: np.ndarray, dtype: np.dtype) -> np.ndarray | None:
    return fm.cast_checked(np.asarray(w, np.float64) * scale, dtype)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(7, 3, 3, 3), (300, 256, 1, 1), (1, 5), (4,)])
def test_scaled_cast_is_bit_identical(dtype, shape) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape).astype(dtype)
    scale = rng.uniform(0.1, 3.0, shape[0]).reshape((-1,) + (1,) * (len(shape) - 1))
    fast = fm.cast_checked(fm.Scaled(w, scale), np.dtype(dtype))
    slow = plain_cast(w, scale, np.dtype(dtype))
    assert fast is not None and slow is not None and fast.tobytes() == slow.tobytes()


@pytest.mark.parametrize("factor", [np.inf, np.nan, 1e6, 65504 / 3.0, 65520 / 3.0])
def test_scaled_cast_overflow_decision_matches(factor) -> None:
    """fp16: past the range, NaN, inf, and values that round onto or past the maximum."""
    w = np.full((70000 // 9 + 3, 1, 3, 3), 3.0, np.float16)
    scale = np.ones((w.shape[0], 1, 1, 1))
    scale[-1] = factor
    fast = fm.cast_checked(fm.Scaled(w, scale), np.dtype(np.float16))
    slow = plain_cast(w, scale, np.dtype(np.float16))
    assert (fast is None) == (slow is None)


def test_conv_forward_weight_is_float64_w_times_s() -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    s, t = rng.uniform(0.5, 2, 8), rng.normal(size=8)
    scaled, _ = fm.conv_forward(w, None, s, t)
    expected = w.astype(np.float64) * s[:, None, None, None]
    assert np.array_equal(np.asarray(scaled), expected)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_replace_tensor_value_equals_copy_from(dtype) -> None:
    value = np.random.default_rng(2).standard_normal((3, 4, 2)).astype(dtype)
    original = numpy_helper.from_array(np.zeros(5, np.float32), "w")
    original.doc_string = "replaced too, as CopyFrom does"
    expected, actual = onnx.TensorProto(), onnx.TensorProto()
    expected.CopyFrom(original)
    actual.CopyFrom(original)
    expected.CopyFrom(numpy_helper.from_array(value, "w"))
    replace_tensor_value(actual, value)
    assert actual.SerializeToString() == expected.SerializeToString()
