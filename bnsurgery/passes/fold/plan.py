"""The vocabulary every fold rule speaks: the affine being folded (`Site`), a fold checked and
computed but not yet applied (`Plan`, `Write`), the one exception a rule refuses with
(`Refusal`), the op families, and node attribute access.

Every skip condition is one named check raising `Refusal(reason)`, so each BN left in the model
carries a stable reason code (report.REASONS).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

LINEAR_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
AFFINE_OPS = frozenset({"Mul", "Add", "Sub", "Div"})
AFFINE_TARGETS = frozenset({"Conv", "ConvTranspose", "Gemm"})
NONLINEAR_OPS = frozenset(
    {
        "Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Clip", "Elu", "Selu", "Celu",
        "HardSigmoid", "HardSwish", "Softplus", "Softsign", "Gelu", "Mish", "ThresholdedRelu",
        "Swish", "Softmax", "LogSoftmax", "MaxPool", "Abs", "Exp", "Log", "Sqrt", "Pow",
    }
)  # fmt: skip
FLATTENING_OPS = frozenset({"Flatten", "Reshape"})


class Refusal(Exception):
    """One named reason not to fold, raised by the check that found it."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Site:
    """A per-channel affine y = s*x + t standing at one node (a BN, or an elementwise op)."""

    node: onnx.NodeProto
    x: str
    y: str
    s: np.ndarray
    t: np.ndarray

    def channels(self, n: int, what: str) -> tuple[np.ndarray, np.ndarray]:
        """(s, t) as n-channel vectors; a uniform affine (size 1) broadcasts."""
        if self.s.size == 1:
            return np.full(n, self.s.item()), np.full(n, self.t.item())
        if self.s.size != n:
            raise Refusal("channel-axis-mismatch", f"{self.s.size} channels here but {n} in {what}")
        return self.s, self.t


@dataclass
class Write:
    """A staged replacement of one node input by a new constant (applied only once all pass)."""

    node: onnx.NodeProto
    index: int
    value: np.ndarray  # already cast to the stored dtype
    hint: str


@dataclass
class Plan:
    """A complete fold, checked and computed, not yet applied."""

    target: onnx.NodeProto
    writes: list[Write] = field(default_factory=list)
    attributes: dict[str, float] = field(default_factory=dict)  # attributes of target to set
    become_gemm: bool = False  # MatMul -> Gemm(A, B', C')
    rewire: onnx.NodeProto | None = None  # backward: the node whose input becomes site.x
    # forward through Identity/Reshape/Transpose/Flatten: those nodes, upstream first
    chain: list[onnx.NodeProto] = field(default_factory=list)


def attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def set_float_attr(node: onnx.NodeProto, name: str, value: float) -> None:
    for attribute in node.attribute:
        if attribute.name == name:
            attribute.f = value
            return
    node.attribute.append(onnx.helper.make_attribute(name, value))
