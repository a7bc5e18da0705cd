"""Floating-point dtypes of weights and BN parameters, and the one range-checked cast every
rewrite writes its float64 results with.

bfloat16 has a numpy dtype through ml_dtypes (which onnx brings). `cast_checked` rounds
float64 values once into a stored dtype and refuses the result (None) when any value is NaN,
infinite or beyond the dtype's largest finite value: no rewrite ever writes an infinity.
"""

from __future__ import annotations

import numpy as np

try:  # ml_dtypes ships with onnx and gives bfloat16 a numpy dtype
    import ml_dtypes

    BFLOAT16: np.dtype | None = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - onnx always brings it today
    ml_dtypes = None
    BFLOAT16 = None

NATIVE_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def is_float_array(value: np.ndarray) -> bool:
    """Floating point, bfloat16 included: a dtype BN parameters and weights may have."""
    return value.dtype.kind == "f" or (BFLOAT16 is not None and value.dtype == BFLOAT16)


def dtype_max(dtype: np.dtype) -> float:
    """The largest finite value of a floating-point dtype (ValueError for any other)."""
    if BFLOAT16 is not None and dtype == BFLOAT16:
        return float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
    return float(np.finfo(dtype).max)


def cast_checked(value: np.ndarray, dtype: np.dtype) -> np.ndarray | None:
    """float64 `value` rounded once to `dtype`; None if anything is non-finite or out of range.

    The checks run on the cast (min/max reductions, no temporaries): a NaN, an infinity or a
    value past the dtype's range shows up there as NaN or inf. Only when a value sits at the
    dtype's max after the cast (it may have been rounded down onto it) is the float64 input
    tested exactly against the range. ValueError when `dtype` is not floating point.
    """
    dtype = np.dtype(dtype)
    value = np.asarray(value, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported as None
        cast = value.astype(dtype)
    if cast.size == 0:
        return cast
    check = cast if dtype in NATIVE_FLOATS else cast.astype(np.float32)
    lo, hi = float(np.min(check)), float(np.max(check))  # NaN propagates through min/max
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return None
    limit = dtype_max(dtype)
    if (hi >= limit or lo <= -limit) and (np.abs(value) > limit).any():
        return None
    return cast
