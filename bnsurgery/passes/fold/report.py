"""The fold report: one decision per BatchNormalization node, with a stable reason code.

A BN is named as every report names it (model.sites.bn_label)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Stable reason codes (docs/design.md, the fold arithmetic). Documented in README.md and
# docs/fold.md; tests and reports rely on them.
REASONS: dict[str, str] = {
    "folded": "folded into the linear op (or BN) that produces its input",
    "folded-backward": "folded into the linear op that consumes its output",
    "training-mode": "runs in training mode (training_mode=1, is_test=0 or extra outputs)",
    "not-constant": "a BN parameter or the neighbour's weight/bias is not a constant",
    "producer-has-other-consumers": "the producing op's output has other consumers",
    "producer-is-graph-output": "the producing op's output is a graph output",
    "no-linear-neighbour": "no Conv/ConvTranspose/Gemm/MatMul next to it",
    "nonlinear-between": "a nonlinearity stands between it and the linear op",
    "padding-breaks-backward-fold": "the following Conv pads its input, so a backward fold "
    "would not be exact",
    "channel-axis-mismatch": "the BN channel axis is not the op's channel axis",
    "per-activation-stats": "opset < 9 spatial=0: statistics per activation, not per channel",
    "overflow": "the folded values would not be finite in the stored dtype",
    "unsupported-dtype": "parameters or weights are not floating point",
    "bad-statistics": "NaN/Inf in the parameters, or negative variance",
    "backward-disabled": "only a backward fold was possible and --no-backward was given",
}
FOLDED = ("folded", "folded-backward")


@dataclass
class BnDecision:
    """What fold did with one BN node, and why."""

    node: str
    scope: str
    action: str  # "folded" or "kept"
    reason: str
    direction: str | None = None  # "forward", "backward" or None
    target: str | None = None
    target_op: str | None = None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dry_run_words(entry: BnDecision) -> str:
    """What fold would do with one BN, in the words every dry run uses (validate, docs):
    "would fold forward into conv (Conv)", or "would be kept (reason no-linear-neighbour: ...)".
    The JSON of a dry run carries the entry's own fields (action folded/kept, direction)."""
    if entry.action == "folded":
        return f"would fold {entry.direction} into {entry.target} ({entry.target_op})"
    why = f"{entry.reason}: {entry.detail}" if entry.detail else entry.reason
    return f"would be kept (reason {why})"


@dataclass
class AffineFold:
    """A per-channel constant Mul/Add/Sub/Div folded into a neighbouring linear op."""

    node: str
    op_type: str
    scope: str
    direction: str
    target: str
    target_op: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FoldReport:
    """Every BN the pass looked at, the model's size before and after, and the tensor map.

    tensor_map lists the tensors of the original model that no longer exist (mapped to None);
    every other tensor name keeps its meaning in the folded model (a forward fold renames the
    producer's output to the BN's output name, which is what the BN's output meant).
    """

    entries: list[BnDecision] = field(default_factory=list)
    affine_folds: list[AffineFold] = field(default_factory=list)
    bns_before: int = 0
    bns_after: int = 0
    nodes_before: int = 0
    nodes_after: int = 0
    tensor_map: dict[str, str | None] = field(default_factory=dict)
    verification: dict[str, Any] | None = None
    seconds: float = 0.0

    def decision(self, node: str, scope: str | None = None) -> BnDecision:
        for entry in self.entries:
            if entry.node == node and (scope is None or entry.scope == scope):
                return entry
        raise KeyError(f"no BatchNormalization named {node!r} in the report")

    @property
    def folded(self) -> list[BnDecision]:
        return [e for e in self.entries if e.action == "folded"]

    @property
    def kept(self) -> list[BnDecision]:
        return [e for e in self.entries if e.action != "folded"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "entries": [e.to_dict() for e in self.entries],
            "affine_folds": [a.to_dict() for a in self.affine_folds],
            "summary": {
                "bns_before": self.bns_before,
                "bns_after": self.bns_after,
                "nodes_before": self.nodes_before,
                "nodes_after": self.nodes_after,
                "folded": len(self.folded),
                "kept": len(self.kept),
                "seconds": round(self.seconds, 6),
            },
            "tensor_map": dict(self.tensor_map),
            "verification": self.verification,
        }
