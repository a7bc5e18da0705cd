"""What a comparison found, as data: each (model, provider) pair's verdicts, each layer-wise
comparison, and the whole comparison (`ComparisonResults`, which harness.report's CompareReport
gives its three renderings: JSON, text and HTML).

Each part's `to_dict()` is its piece of the `bnsurgery.compare/2` JSON schema (docs/compare.md);
harness.render_json puts the whole document together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bnsurgery.harness.matching import TensorMatch
from bnsurgery.harness.metrics import ErrorMetrics
from bnsurgery.harness.stability import StabilityReport
from bnsurgery.harness.tolerances import ToleranceSpec
from bnsurgery.runtime.providers import SessionInfo


@dataclass
class PairResult:
    """One (model, provider) pair judged against the reference, output by output."""

    model: str  # "reference" | "candidate"
    provider: str  # the alias asked for
    session: SessionInfo
    outputs: list[ErrorMetrics]
    seconds: float = 0.0  # time in session.run over every batch

    @property
    def passed(self) -> bool:
        return all(m.passed for m in self.outputs)

    @property
    def label(self) -> str:
        return f"{self.model} on {self.session.describe()}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "provider": self.provider,
            "passed": self.passed,
            "session": self.session.to_dict(),
            "inference_seconds": self.seconds,
            "outputs": [m.to_dict() for m in self.outputs],
        }


@dataclass
class LayerRecord:
    match: TensorMatch
    metrics: ErrorMetrics

    def to_dict(self) -> dict[str, Any]:
        m = self.metrics
        numbers = m.to_dict()
        return {
            "tensor": self.match.reference,
            "candidate_tensor": self.match.candidate,
            "matched_by": self.match.how,
            "node": self.match.reference_node,
            "op_type": self.match.reference_op,
            "candidate_node": self.match.candidate_node,
            "candidate_op_type": self.match.candidate_op,
            "passed": m.passed,
            "max_abs": numbers["max_abs"],
            "max_rel": numbers["max_rel"],
            "mean_abs": numbers["mean_abs"],
            "cosine": numbers["cosine"],
            "min_atol": numbers["min_atol"],
            "atol": m.atol,
            "rtol": m.rtol,
            "mismatched": m.mismatched,
        }


@dataclass
class LayerwiseResult:
    """The layer-wise comparison of one pair: every matched tensor and the first divergence."""

    model: str
    provider: str
    layers: list[LayerRecord]
    unmatched: list[TensorMatch]

    @property
    def first_divergence(self) -> LayerRecord | None:
        return next((layer for layer in self.layers if not layer.metrics.passed), None)

    def counts(self) -> dict[str, int]:
        counts = {"matched": len(self.layers), "unmatched": len(self.unmatched)}
        for how in ("map", "structure", "name"):
            counts[f"by_{how}"] = sum(1 for layer in self.layers if layer.match.how == how)
        return counts

    def to_dict(self) -> dict[str, Any]:
        first = self.first_divergence
        return {
            "model": self.model,
            "provider": self.provider,
            "mapping": self.counts(),
            "first_divergence": first.to_dict() if first else None,
            "layers": [layer.to_dict() for layer in self.layers],
            "unmatched": [
                {
                    "tensor": u.reference,
                    "node": u.reference_node,
                    "op_type": u.reference_op,
                    "decided_by": u.how,
                }
                for u in self.unmatched
            ],
        }


@dataclass
class ComparisonResults:
    """Everything a comparison found; `passed` is False when any output is beyond tolerance."""

    reference: str
    candidate: str | None
    providers: list[str]
    reference_session: SessionInfo
    data: dict[str, Any]
    tolerances: ToleranceSpec
    pairs: list[PairResult] = field(default_factory=list)
    layerwise: list[LayerwiseResult] = field(default_factory=list)
    stability: StabilityReport | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(p.passed for p in self.pairs)

    @property
    def failures(self) -> list[PairResult]:
        return [p for p in self.pairs if not p.passed]

    @property
    def fallbacks(self) -> list[str]:
        sessions = [self.reference_session, *[p.session for p in self.pairs]]
        seen: list[str] = []
        for session in sessions:
            for note in session.notes:
                if session.fallback and note not in seen:
                    seen.append(note)
        return seen

    def divergence_caveat(self, lw: LayerwiseResult) -> str | None:
        """What a first divergence means when the pair's outputs still agree: most likely two
        tensors paired by name that mean different things, which a tensor map fixes."""
        if lw.first_divergence is None:
            return None
        pair = next(
            (p for p in self.pairs if (p.model, p.provider) == (lw.model, lw.provider)), None
        )
        if pair is None or not pair.passed:
            return None
        return (
            "the outputs agree, so this is most likely no error: the two graphs name their "
            "tensors differently, and this pairs two tensors that mean different things (after "
            "a fold, a tool may keep the Conv's pre-BN name for the post-BN tensor). Give the "
            "correspondence with --map MAP.json (a `bnsurgery fold --json` report, or a JSON "
            "object {reference tensor: candidate tensor})"
        )
