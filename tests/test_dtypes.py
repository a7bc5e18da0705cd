"""model.dtypes.cast_checked: the one cast fold and re-estimation write float64 results with.
It rounds once into the stored dtype, and refuses (None) exactly when a value is not finite or
lies beyond the dtype's largest finite value, bfloat16 included."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bnsurgery.model.dtypes import cast_checked, dtype_max, is_float_array

DTYPES = [np.dtype(np.float16), np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16)]
VALUES = hnp.arrays(
    np.float64,
    st.integers(1, 12),
    elements=st.one_of(
        st.floats(allow_nan=True, allow_infinity=True, width=64),
        st.floats(-70000.0, 70000.0),  # around float16's range
        st.sampled_from([65504.0, 65519.0, 65520.0, -65520.0, 3.4e38, 3.5e38]),
    ),
)


@settings(max_examples=300, deadline=None)
@given(values=VALUES, dtype=st.sampled_from(DTYPES))
def test_refused_exactly_when_a_value_has_no_finite_place_in_the_dtype(
    values: np.ndarray, dtype: np.dtype
) -> None:
    limit = dtype_max(dtype)
    representable = np.isfinite(values).all() and not (np.abs(values) > limit).any()
    with np.errstate(over="ignore", invalid="ignore"):
        expected = values.astype(dtype)
    cast = cast_checked(values, dtype)
    if not representable:
        assert cast is None
    else:
        assert cast is not None and cast.dtype == dtype
        bits = np.uint16 if dtype.itemsize == 2 else np.uint32  # compares -0.0 and 0.0 apart
        assert np.array_equal(cast.view(bits), expected.view(bits))


def test_a_value_rounded_down_onto_the_maximum_is_still_refused() -> None:
    # 65519 rounds to float16's max 65504, but it lies beyond it: no value is clamped silently
    assert cast_checked(np.array([65519.0]), np.dtype(np.float16)) is None
    assert cast_checked(np.array([65504.0]), np.dtype(np.float16)) is not None


def test_integer_dtypes_have_no_range_to_cast_into() -> None:
    with pytest.raises(ValueError):
        cast_checked(np.array([1.0]), np.dtype(np.int64))


def test_bfloat16_counts_as_floating_point() -> None:
    assert is_float_array(np.zeros(2, ml_dtypes.bfloat16))
    assert not is_float_array(np.zeros(2, np.int32))
