"""One view of BatchNormalization across opsets 6..15+, and its per-channel affine in float64.

BN computes y = gamma * (x - mean) / sqrt(var + eps) + beta along axis 1, which is the affine
y = s * x + t with s = gamma / sqrt(var + eps) and t = beta - mean * s.

Opset differences this view absorbs:
- 6: `is_test` (0, the default, means training) and `spatial`; up to five outputs.
- 7-8: `spatial` (0 means per-activation statistics); extra outputs mean training.
- 9-13: no `spatial`; extra outputs still mean training.
- 14+: `training_mode`; 15 lets scale/bias (T1) and mean/var (T2) differ in dtype from X.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from bnsurgery.errors import BadInputError

# The schema's default is a float attribute, so ONNX Runtime and onnx.reference use 1e-5 as a
# float32 (9.99999974737875e-06); fold arithmetic in float64 must use that very value, or a
# float64 model's fold is off by 2.5e-13 relative (found by the rounding-noise judge).
DEFAULT_EPSILON = float(np.float32(1e-5))
FLOAT_TYPES = frozenset(
    {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.BFLOAT16,
        onnx.TensorProto.DOUBLE,
    }
)


def _attr(node: onnx.NodeProto, name: str, default: float | int | None) -> float | int | None:
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


@dataclass(frozen=True)
class BatchNormView:
    """Attributes and wiring of one BatchNormalization node, normalised over opsets."""

    node: onnx.NodeProto
    opset: int
    epsilon: float
    momentum: float
    training_mode: bool
    spatial: bool

    @classmethod
    def of(cls, node: onnx.NodeProto, opset: int) -> BatchNormView:
        if node.op_type != "BatchNormalization":
            raise ValueError(f"{node.name}: not a BatchNormalization node")
        if len(node.input) < 5:
            raise BadInputError(f"BatchNormalization {node.name!r} has fewer than 5 inputs")
        eps = float(_attr(node, "epsilon", DEFAULT_EPSILON))  # type: ignore[arg-type]
        momentum = float(_attr(node, "momentum", 0.9))  # type: ignore[arg-type]
        extra_outputs = any(name for name in node.output[1:])
        if opset < 7:
            training = int(_attr(node, "is_test", 0)) == 0 or extra_outputs  # type: ignore[arg-type]
        elif opset < 14:
            training = extra_outputs
        else:
            training = int(_attr(node, "training_mode", 0)) == 1  # type: ignore[arg-type]
        spatial = True if opset >= 9 else int(_attr(node, "spatial", 1)) == 1  # type: ignore[arg-type]
        return cls(node, opset, eps, momentum, training, spatial)

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def x(self) -> str:
        return self.node.input[0]

    @property
    def y(self) -> str:
        return self.node.output[0]

    @property
    def param_names(self) -> tuple[str, str, str, str]:
        """(scale, bias, mean, var) input names."""
        scale, bias, mean, var = self.node.input[1:5]
        return scale, bias, mean, var

    def extra_outputs_used(self, is_used) -> bool:  # is_used: Callable[[str], bool]
        return any(name and is_used(name) for name in self.node.output[1:])


@dataclass(frozen=True)
class BnParams:
    """Constant BN parameters, as float64 arrays."""

    scale: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    var: np.ndarray

    @property
    def channels(self) -> int:
        return int(self.scale.shape[0])


def check_param_shapes(
    name: str, scale: np.ndarray, bias: np.ndarray, mean: np.ndarray, var: np.ndarray
) -> None:
    """All four parameters must be 1-D vectors of the same length (spatial BN)."""
    shapes = [p.shape for p in (scale, bias, mean, var)]
    if any(len(s) != 1 for s in shapes) or len(set(shapes)) != 1:
        labels = ("scale", "B", "mean", "var")
        described = ", ".join(f"{lab}{list(s)}" for lab, s in zip(labels, shapes, strict=True))
        raise BadInputError(
            f"BatchNormalization {name!r} has wrongly shaped parameters: {described} "
            "(expected four vectors of the channel count)"
        )


def statistics_problem(params: BnParams, epsilon: float) -> str | None:
    """Why these statistics cannot be folded (NaN/Inf, negative variance), or None."""
    for label, value in (("scale", params.scale), ("B", params.bias), ("mean", params.mean),
                         ("var", params.var)):  # fmt: skip
        bad = ~np.isfinite(value)
        if bad.any():
            return f"{label} has {int(bad.sum())} non-finite value(s)"
    negative = params.var < 0
    if negative.any():
        return f"var has {int(negative.sum())} negative value(s)"
    if (params.var + epsilon <= 0).any():
        return "var + epsilon is not positive"
    return None


def affine(params: BnParams, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel (s, t) of y = s * x + t, in float64."""
    s = params.scale / np.sqrt(params.var + np.float64(epsilon))
    t = params.bias - params.mean * s
    return s, t
