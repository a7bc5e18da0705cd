"""Pure float64 arithmetic of folding a per-channel affine y = s*x + t into a linear op.

Every function takes and returns numpy arrays (no protos); inputs are promoted to float64 and
the caller casts results back to the stored dtype (see `cast_checked`). Forward folds apply the
affine to the op's output channels, backward folds to its input channels (docs/design.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnsurgery.model import dtypes
from bnsurgery.model.dtypes import NATIVE_FLOATS as _NATIVE_FLOATS
from bnsurgery.model.dtypes import dtype_max


def _f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _scaled(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float64(w) * scale in one pass (no float64 copy of w first); the same numbers."""
    if w.dtype in _NATIVE_FLOATS:
        return np.multiply(w, scale, dtype=np.float64)
    return _f64(w) * scale


_CHUNK = 1 << 16  # elements per block of a fused scale-and-cast: the float64 block stays in cache


@dataclass(frozen=True)
class Scaled:
    """float64(w) * scale, not computed yet (scale has w's rank, size 1 except along axis 0).

    cast_checked computes it block by block straight into the stored dtype, so a large weight
    never has a full float64 copy; the numbers are those of `compute()` cast, exactly.
    """

    w: np.ndarray
    scale: np.ndarray

    def compute(self) -> np.ndarray:
        return _scaled(self.w, self.scale)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:  # array-like for any other caller
        value = self.compute()
        return value if dtype is None else value.astype(dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.w.shape


def _cast_scaled(value: Scaled, dtype: np.dtype) -> np.ndarray | None:
    w = value.w
    if w.ndim == 0 or w.dtype not in _NATIVE_FLOATS or dtype not in _NATIVE_FLOATS:
        return cast_checked(value.compute(), dtype)
    rows = w.shape[0]
    w2 = w.reshape(rows, -1)
    s2 = np.broadcast_to(value.scale.reshape(-1, 1), (rows, 1))
    out = np.empty(w.shape, dtype)
    o2 = out.reshape(rows, -1)
    limit = dtype_max(dtype)
    step = max(1, _CHUNK // max(1, w2.shape[1]))
    for a in range(0, rows, step):
        w_rows, s_rows, cast = w2[a : a + step], s2[a : a + step], o2[a : a + step]
        # One ufunc pass: the product in float64 (the loop's dtype), rounded once into the
        # stored dtype as it is written; no float64 block is materialised.
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported as None
            np.multiply(w_rows, s_rows, out=cast, dtype=np.float64, casting="unsafe")
        if cast.size == 0:
            continue
        lo, hi = float(np.min(cast)), float(np.max(cast))
        if not (np.isfinite(lo) and np.isfinite(hi)):
            return None
        if hi >= limit or lo <= -limit:  # rare: test the float64 values exactly
            if (np.abs(np.multiply(w_rows, s_rows, dtype=np.float64)) > limit).any():
                return None
    return out


def cast_checked(value: np.ndarray | Scaled, dtype: np.dtype) -> np.ndarray | None:
    """Cast float64 results to the stored dtype; None if anything is non-finite or out of range
    (model.dtypes.cast_checked). A Scaled weight is scaled and cast block by block."""
    dtype = np.dtype(dtype)
    if isinstance(value, Scaled):
        return _cast_scaled(value, dtype)
    return dtypes.cast_checked(value, dtype)


def _channel_shape(axis: int, ndim: int, n: int) -> tuple[int, ...]:
    shape = [1] * ndim
    shape[axis] = n
    return tuple(shape)


# -- forward: the affine follows the op ----------------------------------------------------------


def conv_forward(
    w: np.ndarray, b: np.ndarray | None, s: np.ndarray, t: np.ndarray
) -> tuple[Scaled, np.ndarray]:
    """Conv W [M, C/g, k...]: W'[o] = W[o]*s[o], b'[o] = b[o]*s[o] + t[o].

    W' comes back as a Scaled (array-like: np.asarray gives the float64 values), so that
    cast_checked can scale and cast it block by block without a float64 copy of the weight.
    """
    scaled = Scaled(w, s.reshape(_channel_shape(0, w.ndim, s.size)))
    b64 = (_f64(b) if b is not None else np.zeros_like(s)) * s + t
    return scaled, b64


def conv_transpose_forward(
    w: np.ndarray, b: np.ndarray | None, s: np.ndarray, t: np.ndarray, group: int
) -> tuple[np.ndarray, np.ndarray]:
    """ConvTranspose W [Cin, Cout/g, k...]: output channel gi*(Cout/g)+j scales W[gi-block, j]."""
    cin, cout_g = w.shape[0], w.shape[1]
    kernel = w.shape[2:]
    grouped = _f64(w).reshape(group, cin // group, cout_g, *kernel)
    scale = s.reshape(group, 1, cout_g, *([1] * len(kernel)))
    w64 = (grouped * scale).reshape(w.shape)
    b64 = (_f64(b) if b is not None else np.zeros_like(s)) * s + t
    return w64, b64


def gemm_forward(
    b_mat: np.ndarray,
    c: np.ndarray | None,
    s: np.ndarray,
    t: np.ndarray,
    *,
    trans_b: bool,
    beta: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Gemm: scale the N axis of B; C' = s*(beta*C) + t (the new Gemm uses beta = 1)."""
    axis = 0 if trans_b else 1
    b64 = _f64(b_mat) * s.reshape(_channel_shape(axis, 2, s.size))
    c64 = s * (beta * _f64(c)) + t if c is not None else t.copy()
    return b64, c64


def matmul_forward(
    b_mat: np.ndarray, bias: np.ndarray | None, s: np.ndarray, t: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """MatMul B [K, N] (+ bias broadcast to N): B' = B*s, bias' = bias*s + t."""
    b64 = _f64(b_mat) * s.reshape(1, s.size)
    bias64 = _f64(bias) * s + t if bias is not None else t.copy()
    return b64, bias64


def affine_forward(
    gamma: np.ndarray, beta: np.ndarray, s: np.ndarray, t: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """An affine gamma*xhat + beta (a BN) followed by s*x + t: gamma*s and beta*s + t."""
    return _f64(gamma) * s, _f64(beta) * s + t


# -- backward: the affine precedes the op --------------------------------------------------------


def conv_backward(
    w: np.ndarray, b: np.ndarray | None, s: np.ndarray, t: np.ndarray, group: int
) -> tuple[np.ndarray, np.ndarray]:
    """Conv without padding: W'[o, i] = W[o, i]*s[c], b'[o] = b[o] + sum_{i,k} W[o,i,k]*t[c],
    where c = group(o)*Cin/g + i is the global input channel of local channel i."""
    m, cin_g = w.shape[0], w.shape[1]
    kernel_axes = tuple(range(2, w.ndim))
    out_group = np.arange(m) // (m // group)
    channel = out_group[:, None] * cin_g + np.arange(cin_g)[None, :]  # [M, Cin/g]
    s_oi, t_oi = s[channel], t[channel]
    w64 = _f64(w)
    expand = (slice(None), slice(None)) + (None,) * len(kernel_axes)
    new_w = w64 * s_oi[expand]
    shift = (w64.sum(axis=kernel_axes) * t_oi).sum(axis=1) if kernel_axes else (w64 * t_oi).sum(1)
    new_b = (_f64(b) if b is not None else np.zeros(m)) + shift
    return new_w, new_b


def gemm_backward(
    b_mat: np.ndarray,
    c: np.ndarray | None,
    s: np.ndarray,
    t: np.ndarray,
    *,
    trans_b: bool,
    alpha: float,
    beta: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Gemm on A' = A*s + t: op(B)'[k] = s[k]*op(B)[k], C' = beta*C + alpha*(t @ op(B))."""
    op_b = _f64(b_mat).T if trans_b else _f64(b_mat)  # [K, N]
    new_op_b = op_b * s[:, None]
    shift = alpha * (t @ op_b)
    new_c = beta * _f64(c) + shift if c is not None else shift
    return (new_op_b.T if trans_b else new_op_b), new_c


def matmul_backward(
    b_mat: np.ndarray, bias: np.ndarray | None, s: np.ndarray, t: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """MatMul on A' = A*s + t: B'[k] = s[k]*B[k], bias' = bias + t @ B."""
    b64 = _f64(b_mat)
    shift = t @ b64
    return b64 * s[:, None], (_f64(bias) + shift if bias is not None else shift)


def expand_to_features(
    s: np.ndarray, t: np.ndarray, features: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (s, t) of an [N, C, ...] tensor, mapped to the features of its flattening."""
    per_channel = features // s.size
    return np.repeat(s, per_channel), np.repeat(t, per_channel)
