"""Error and agreement metrics between a reference tensor and a candidate tensor.

Everything is computed in float64 and accumulated batch by batch (`ErrorAccumulator.update`), so
a comparison never holds more than one batch. Per output:

- max abs error, max relative error |a-b| / (|ref| + TINY), mean abs error;
- cosine similarity of the flattened tensors;
- top-1 and top-5 agreement for 2-D [N, C] float outputs;
- accuracy of each side against labels when given;
- NaN / Inf counts on each side;
- the smallest atol that passes at the given rtol, and the smallest rtol at the given atol.

Two pass rules (docs/verification.md):

- **rounding noise** (the default): the candidate's deviation from the reference, as max abs
  and as RMS, divided by the deviation of a *noise run* (the reference with every weight rounded
  once more in its dtype, bnsurgery.harness.noise) must stay within `limit` (8x). The larger of
  the two ratios is the verdict's number. Each noise figure is at least the output dtype's
  machine epsilon times the output's own scale, so an output that no weight moves is judged
  against its dtype's rounding. Integer and bool outputs: differing elements, against the noise
  run's.
- **tolerance** (when atol or rtol is given for the output): numpy's allclose,
  |cand - ref| <= atol + rtol * |ref| for every element.

Under both, a NaN passes only where the reference has a NaN too, and an infinity only where the
reference has the same infinity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from bnsurgery.harness.tolerances import (
    DEFAULT_TOLERANCES,
    NOISE_LIMIT,
    ToleranceSpec,
    default_tolerance,
    machine_epsilon,
)

TINY = 1e-12  # the relative error's guard against division by zero
TOP_K = 5


@dataclass
class ErrorMetrics:
    """The comparison of one tensor (an output or an intermediate) over all batches.

    `rule` is "noise" (the default rule: `ratio` = deviation / rounding noise, at most `limit`)
    or "tolerance" (allclose with `atol`/`rtol`, which are None under the noise rule)."""

    name: str
    dtype: str
    shape: list[int]  # of the reference over all batches (axis 0 = samples)
    count: int
    atol: float | None
    rtol: float | None
    passed: bool
    max_abs: float
    max_rel: float
    mean_abs: float
    cosine: float | None
    min_atol: float  # the smallest atol that passes at this rtol (at rtol 0 under the noise rule)
    min_rtol: float  # the smallest rtol that passes at this atol (inf: impossible at this atol)
    mismatched: int  # elements beyond tolerance, or NaN/Inf disagreements under the noise rule
    reference_nan: int = 0
    reference_inf: int = 0
    candidate_nan: int = 0
    candidate_inf: int = 0
    top1_agreement: float | None = None
    top5_agreement: float | None = None
    reference_accuracy: float | None = None
    candidate_accuracy: float | None = None
    worst_index: list[int] | None = None
    note: str = ""
    rule: str = "tolerance"
    ratio: float | None = None  # deviation / rounding noise (noise rule)
    limit: float | None = None
    rms: float = 0.0  # RMS of the deviation over finite elements
    noise_max_abs: float | None = None  # the noise run's max abs deviation (floored)
    noise_rms: float | None = None  # the noise run's RMS deviation (floored)
    finite: int = 0  # elements finite on both sides (the ones the numbers describe)
    scale: float = 0.0  # max |reference| over those elements

    @property
    def nothing_finite(self) -> bool:
        """Every compared value was NaN or Inf on both sides: no number was compared."""
        return self.count > 0 and self.finite == 0 and self.mismatched == 0

    def verdict(self) -> str:
        """The verdict as a person reads it: "deviation 0.8x the rounding noise (limit 8x)"."""
        if self.nothing_finite:
            return "every value is NaN/Inf on both sides: nothing numeric compared"
        if self.rule == "noise":
            if self.ratio is None or not math.isfinite(self.ratio):
                return f"deviation beyond the rounding noise (limit {self.limit:g}x)"
            return f"deviation {ratio_text(self.ratio)} the rounding noise (limit {self.limit:g}x)"
        return (
            f"{self.mismatched} of {self.count} elements beyond atol {self.atol:g} + "
            f"rtol {self.rtol:g}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": self.shape,
            "elements": self.count,
            "rule": self.rule,
            "ratio": _finite_or_str(self.ratio),
            "limit": self.limit,
            "noise_max_abs": _finite_or_str(self.noise_max_abs),
            "noise_rms": _finite_or_str(self.noise_rms),
            "rms": _finite_or_str(self.rms),
            "atol": self.atol,
            "rtol": self.rtol,
            "passed": self.passed,
            "max_abs": _finite_or_str(self.max_abs),
            "max_rel": _finite_or_str(self.max_rel),
            "mean_abs": _finite_or_str(self.mean_abs),
            "cosine": _finite_or_str(self.cosine),
            "min_atol": _finite_or_str(self.min_atol),
            "min_rtol": _finite_or_str(self.min_rtol),
            "mismatched": self.mismatched,
            "finite": self.finite,
            "scale": self.scale,
            "nan": {"reference": self.reference_nan, "candidate": self.candidate_nan},
            "inf": {"reference": self.reference_inf, "candidate": self.candidate_inf},
            "top1_agreement": self.top1_agreement,
            "top5_agreement": self.top5_agreement,
            "accuracy": (
                None
                if self.reference_accuracy is None
                else {"reference": self.reference_accuracy, "candidate": self.candidate_accuracy}
            ),
            "worst_index": self.worst_index,
            "verdict": self.verdict(),
            "note": self.note,
        }


def ratio_text(ratio: float) -> str:
    """A verdict's ratio as the text prints it: 0.97x, 1,234x, 1.7e+06x, inf."""
    if not math.isfinite(ratio):
        return "inf"
    if ratio < 10:
        return f"{ratio:.2g}x"
    return f"{ratio:,.0f}x" if ratio < 1e5 else f"{ratio:.2g}x"


def _finite_or_str(value: float | None) -> float | str | None:
    """JSON has no inf/nan: write them as the strings "inf", "-inf", "nan"."""
    if value is None:
        return None
    value = float(value)
    if math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def is_classification(array: np.ndarray) -> bool:
    """A 2-D [N, C] float output with at least two classes: top-k and accuracy apply."""
    return array.ndim == 2 and array.shape[1] >= 2 and np.issubdtype(array.dtype, np.floating)


def _is_float(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"


class _NoiseTally:
    """The noise run's deviation from the reference: max abs and sum of squares over the
    elements finite on both sides, or, for integer outputs, the count of differing elements."""

    def __init__(self) -> None:
        self.max_abs = 0.0
        self.sum_sq = 0.0
        self.count = 0
        self.differing = 0

    def update(self, ref: np.ndarray, noise: np.ndarray, is_float: bool) -> None:
        """ref: the reference's values, flattened to float64; noise: the noise run's."""
        noise = noise.astype(np.float64, copy=False).ravel()
        if noise.shape != ref.shape:
            raise ValueError(f"noise run has {noise.size} values, the reference {ref.size}")
        if not is_float:
            self.differing += int((ref != noise).sum())
            return
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.abs(noise - ref)
        diff = diff[np.isfinite(diff)]
        if diff.size:
            self.max_abs = max(self.max_abs, float(diff.max()))
            self.sum_sq += float(np.einsum("i,i->", diff, diff))
            self.count += diff.size


class ErrorAccumulator:
    """Streams (reference, candidate[, noise]) batch triples of one tensor into ErrorMetrics.

    With atol and rtol both None the rounding-noise rule judges (every update must then carry
    the noise run's values); otherwise allclose with the given atol/rtol."""

    def __init__(
        self,
        name: str,
        atol: float | None = None,
        rtol: float | None = None,
        *,
        limit: float = NOISE_LIMIT,
    ) -> None:
        self.name = name
        self.rule = "noise" if atol is None and rtol is None else "tolerance"
        self.atol = 0.0 if atol is None else atol
        self.rtol = 0.0 if rtol is None else rtol
        self.limit = limit
        self.noise = _NoiseTally()
        self.dtype = ""
        self.is_float = True
        self.shape: list[int] = []
        self.count = self.mismatched = self.samples = 0
        self.max_abs = self.max_rel = self.min_atol = self.min_rtol = 0.0
        self.sum_abs = self.sum_sq = self.dot = self.ref_sq = self.cand_sq = 0.0
        self.ref_max = 0.0
        self.differing = 0  # integer outputs: elements that differ
        self.finite = 0
        self.nan = [0, 0]
        self.inf = [0, 0]
        self.top1 = self.top5 = 0
        self.classified = 0
        self.correct = [0, 0]
        self.labelled = 0
        self.worst_index: list[int] | None = None
        self.offset = 0
        self.nonfinite_mismatches = 0
        self.note = ""

    def update(
        self,
        reference: np.ndarray,
        candidate: np.ndarray,
        labels: np.ndarray | None = None,
        noise: np.ndarray | None = None,
    ) -> None:
        reference, candidate = np.asarray(reference), np.asarray(candidate)
        if not self.dtype:
            self.dtype = reference.dtype.name
            self.shape = list(reference.shape)
            self.is_float = _is_float(reference)
        if reference.shape != candidate.shape:
            self.note = (
                f"shape mismatch: reference {list(reference.shape)}, "
                f"candidate {list(candidate.shape)}"
            )
            self.mismatched += max(reference.size, candidate.size)
            self.max_abs = self.max_rel = self.min_atol = self.min_rtol = math.inf
            return
        if self.rule == "noise" and noise is None:
            raise ValueError(f"'{self.name}': the rounding-noise rule needs the noise run")
        ref = reference.astype(np.float64, copy=False).ravel()
        cand = candidate.astype(np.float64, copy=False).ravel()
        if noise is not None:
            self.noise.update(ref, np.asarray(noise), self.is_float)
        if not self.is_float:
            self.differing += int((ref != cand).sum())
        self.count += ref.size
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.abs(cand - ref)  # finite exactly where both sides are finite
        both_finite = np.isfinite(diff)
        bad_special = 0
        bad_mask = None
        if not both_finite.all():  # the slow path, only for tensors with NaN or Inf
            ref_nan, cand_nan = np.isnan(ref), np.isnan(cand)
            ref_inf, cand_inf = np.isinf(ref), np.isinf(cand)
            self.nan[0] += int(ref_nan.sum())
            self.nan[1] += int(cand_nan.sum())
            self.inf[0] += int(ref_inf.sum())
            self.inf[1] += int(cand_inf.sum())
            # non-finite elements pass only where both sides agree (NaN with NaN, +inf with +inf)
            special_ok = (ref_nan & cand_nan) | (ref_inf & cand_inf & (ref == cand))
            bad_mask = ~both_finite & ~special_ok
            bad_special = int(bad_mask.sum())
            diff = np.where(both_finite, diff, 0.0)
            ref = np.where(both_finite, ref, 0.0)
            cand = np.where(both_finite, cand, 0.0)
            self.finite += int(both_finite.sum())
        else:
            self.finite += ref.size
        mag = np.abs(ref)
        if diff.size:
            flat_worst = int(np.argmax(diff))
            worst = float(diff[flat_worst])
            if self.worst_index is None or worst > self.max_abs:
                self.worst_index = self._index(flat_worst, reference.shape)
            self.max_abs = max(self.max_abs, worst)
            self.ref_max = max(self.ref_max, float(mag.max()))
            self.max_rel = max(self.max_rel, float((diff / (mag + TINY)).max()))
            excess = diff - self.rtol * mag
            self.min_atol = max(self.min_atol, float(excess.max()))
            if self.rule == "tolerance":
                self.mismatched += int((excess > self.atol).sum())
            beyond = diff > self.atol
            if beyond.any():  # rtol needed where atol alone is not enough; inf where ref is 0
                with np.errstate(divide="ignore"):
                    need = (diff[beyond] - self.atol) / mag[beyond]
                self.min_rtol = max(self.min_rtol, float(need.max()))
            self.sum_abs += float(diff.sum())
            # einsum, not BLAS dot: no thread pool spun up for a reduction this small
            self.sum_sq += float(np.einsum("i,i->", diff, diff))
            self.dot += float(np.einsum("i,i->", ref, cand))
            self.ref_sq += float(np.einsum("i,i->", ref, ref))
            self.cand_sq += float(np.einsum("i,i->", cand, cand))
        if bad_special:
            self.mismatched += bad_special
            if math.isfinite(self.max_abs):
                assert bad_mask is not None
                self.worst_index = self._index(int(np.argmax(bad_mask)), reference.shape)
            self.max_abs = self.max_rel = self.min_atol = self.min_rtol = math.inf
            self.nonfinite_mismatches += bad_special
            self.note = (
                f"{self.nonfinite_mismatches} NaN/Inf element(s) where the other side differs"
            )
        if is_classification(reference):
            self._update_topk(reference.astype(np.float64), candidate.astype(np.float64), labels)
        self.offset += reference.shape[0] if reference.ndim else 1

    def _index(self, flat: int, shape: tuple[int, ...]) -> list[int]:
        """A flat position in this batch -> an index whose axis 0 counts over all batches."""
        index = [int(i) for i in np.unravel_index(flat, shape)] if shape else []
        if index:
            index[0] += self.offset
        return index

    def _update_topk(self, ref: np.ndarray, cand: np.ndarray, labels: np.ndarray | None) -> None:
        n, classes = ref.shape
        ref_clean = np.nan_to_num(ref, nan=-np.inf)
        cand_clean = np.nan_to_num(cand, nan=-np.inf)
        ref_top1, cand_top1 = ref_clean.argmax(axis=1), cand_clean.argmax(axis=1)
        self.top1 += int((ref_top1 == cand_top1).sum())
        if classes > TOP_K:
            ref_top = np.sort(np.argsort(-ref_clean, axis=1, kind="stable")[:, :TOP_K], axis=1)
            cand_top = np.sort(np.argsort(-cand_clean, axis=1, kind="stable")[:, :TOP_K], axis=1)
            self.top5 += int((ref_top == cand_top).all(axis=1).sum())
        self.classified += n
        if labels is not None and len(labels) == n:
            self.correct[0] += int((ref_top1 == labels).sum())
            self.correct[1] += int((cand_top1 == labels).sum())
            self.labelled += n

    def _noise_verdict(self) -> tuple[float, float | None, float | None, bool]:
        """(ratio, noise max abs, noise RMS, passed) under the rounding-noise rule."""
        if not self.dtype or self.mismatched:  # a shape mismatch or NaN/Inf disagreement
            return math.inf, None, None, False
        if not self.is_float:
            noise = self.noise.differing
            ratio = 0.0 if self.differing == 0 else (self.differing / noise if noise else math.inf)
            return ratio, float(noise), None, ratio <= self.limit
        eps = machine_epsilon(self.dtype)
        rms_ref = math.sqrt(self.ref_sq / self.finite) if self.finite else 0.0
        noise_max = max(self.noise.max_abs, eps * self.ref_max)
        noise_rms = max(
            math.sqrt(self.noise.sum_sq / self.noise.count) if self.noise.count else 0.0,
            eps * rms_ref,
        )
        rms = math.sqrt(self.sum_sq / self.finite) if self.finite else 0.0
        ratio = max(_over(self.max_abs, noise_max), _over(rms, noise_rms))
        return ratio, noise_max, noise_rms, ratio <= self.limit

    def result(self) -> ErrorMetrics:
        cosine: float | None = None
        if self.finite:
            if self.ref_sq == 0 and self.cand_sq == 0:
                cosine = 1.0
            elif self.ref_sq == 0 or self.cand_sq == 0:
                cosine = 0.0
            else:
                cosine = self.dot / math.sqrt(self.ref_sq * self.cand_sq)
        classes = self.shape[1] if len(self.shape) == 2 else 0
        ratio = noise_max = noise_rms = None
        if self.rule == "noise":
            ratio, noise_max, noise_rms, passed = self._noise_verdict()
        else:
            passed = self.mismatched == 0
        return ErrorMetrics(
            name=self.name,
            dtype=self.dtype,
            shape=[self.offset, *self.shape[1:]] if self.shape else [],
            count=self.count,
            atol=self.atol if self.rule == "tolerance" else None,
            rtol=self.rtol if self.rule == "tolerance" else None,
            passed=passed,
            max_abs=self.max_abs,
            max_rel=self.max_rel,
            mean_abs=self.sum_abs / self.finite if self.finite else 0.0,
            cosine=cosine,
            min_atol=max(self.min_atol, 0.0),
            min_rtol=max(self.min_rtol, 0.0),
            mismatched=self.mismatched,
            reference_nan=self.nan[0],
            reference_inf=self.inf[0],
            candidate_nan=self.nan[1],
            candidate_inf=self.inf[1],
            top1_agreement=self.top1 / self.classified if self.classified else None,
            top5_agreement=(
                self.top5 / self.classified if self.classified and classes > TOP_K else None
            ),
            reference_accuracy=self.correct[0] / self.labelled if self.labelled else None,
            candidate_accuracy=self.correct[1] / self.labelled if self.labelled else None,
            worst_index=self.worst_index,
            note=self.note,
            rule=self.rule,
            ratio=ratio,
            limit=self.limit if self.rule == "noise" else None,
            rms=math.sqrt(self.sum_sq / self.finite) if self.finite else 0.0,
            noise_max_abs=noise_max,
            noise_rms=noise_rms,
            finite=self.finite,
            scale=self.ref_max,
        )


def _over(deviation: float, noise: float) -> float:
    """deviation / noise, with 0/0 = 0 (nothing moved) and x/0 = inf."""
    if deviation == 0:
        return 0.0
    return deviation / noise if noise > 0 else math.inf


def compare_arrays(
    reference: np.ndarray,
    candidate: np.ndarray,
    *,
    name: str = "output",
    atol: float | None = None,
    rtol: float | None = None,
    labels: np.ndarray | None = None,
    noise: np.ndarray | None = None,
    limit: float = NOISE_LIMIT,
) -> ErrorMetrics:
    """All metrics of one pair of whole arrays (the one-shot form of ErrorAccumulator): the
    rounding-noise rule when `noise` (the noise run's values) is given and atol/rtol are not,
    else allclose with atol/rtol (each defaulting by dtype)."""
    if noise is not None and atol is None and rtol is None:
        acc = ErrorAccumulator(name, limit=limit)
    else:
        default_atol, default_rtol = default_tolerance(np.asarray(reference).dtype)
        acc = ErrorAccumulator(
            name, default_atol if atol is None else atol, default_rtol if rtol is None else rtol
        )
    acc.update(reference, candidate, labels, noise)
    return acc.result()


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of [N, C] scores against integer labels."""
    return float((np.asarray(logits).argmax(axis=1) == np.asarray(labels)).mean())


__all__ = [
    "DEFAULT_TOLERANCES",
    "NOISE_LIMIT",
    "ErrorAccumulator",
    "ErrorMetrics",
    "ToleranceSpec",
    "accuracy",
    "compare_arrays",
    "default_tolerance",
    "is_classification",
]
