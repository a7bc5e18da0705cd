"""Adaptation with evidence: the guarded run behind `reestimate` and `adapt`, and `--auto`.

`guarded(...)` reads TARGET (and SOURCE) into memory, holds out part of a labelled TARGET,
adapts on the rest, and measures the original and adapted models (bnsurgery.passes.adapt_guard).
With `auto`, it holds out half of TARGET (`AUTO_HOLDOUT`), tries a few candidates on the same
split and keeps the best:

- `plain`: AdaBN, the stored statistics replaced by TARGET's;
- `plain, prior n`: blended with the stored statistics, lambda = N / (N + n) with N = n (0.5);
- `first k BNs`: plain re-estimation of only the first half of the BNs in graph order (early
  layers see the input shift most directly, late ones carry the classes);
- with SOURCE: `source-relative`, and the same with prior N = n and on the first half of the BNs.

The score is the held-out accuracy when TARGET has labels, else minus the mean prediction
entropy on the held-out target. The original model is a candidate too (`none`). A candidate
counts only when it beats the original *measurably* on the held-out samples, paired sample by
sample: with labels, an exact one-sided sign test on the samples it fixes against those it
breaks; without, a one-sided paired test of the per-sample entropy decrease; both at
`SIGNIFICANCE` (adapt_guard.better_p). A gain of one or two samples out of a few hundred is
selection noise, not a reason to write an adapted model. When no candidate counts, nothing is
written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx

from bnsurgery.measure.targets import find_batchnorms
from bnsurgery.passes import PassResult
from bnsurgery.passes.adapt_guard import (
    DEFAULT_MAX_DROP,
    HOLDOUT,
    SIGNIFICANCE,
    Arrays,
    Evidence,
    better_p,
    evaluate,
    predictions,
    read_all,
    score,
    split,
)

# --auto holds out half of TARGET, not a quarter: BN statistics are stable from a few hundred
# samples, while the paired test's power grows with every held-out sample (at 1,000 samples a
# quarter could not show a 2-point gain: document orientation under noise, p = 0.09)
AUTO_HOLDOUT = 0.5

# The BNs to adapt: a regex, exact names, or None for all of them.
Nodes = str | Sequence[str] | None
# run(data, source, prior, nodes) -> PassResult: one adaptation of the model
RunAdaptation = Callable[[Any, Any, float | None, Nodes], PassResult]


@dataclass
class Candidate:
    label: str
    relative: bool = False
    prior_factor: float | None = None  # prior = factor x adaptation samples
    first: int | None = None  # only the first k BNs (graph order)


@dataclass
class Outcome:
    """The result to write (None: nothing beats the original), its evidence, and the tried
    candidates when `auto` ran."""

    result: PassResult | None
    evidence: Evidence
    chosen: str | None = None
    reason: str = ""
    tried: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"evidence": self.evidence.to_dict()}
        if self.tried:
            out["auto"] = {"chosen": self.chosen, "reason": self.reason, "tried": self.tried}
        return out


def bn_names(model: onnx.ModelProto, nodes: Nodes = None) -> list[str]:
    targets, _ = find_batchnorms(model, nodes)
    return [t.key for t in targets]


def candidates(model: onnx.ModelProto, with_source: bool, nodes: Nodes) -> list[Candidate]:
    count = len(bn_names(model, nodes))
    firsts = [count // 2] if 0 < count // 2 < count else []
    out = [Candidate("plain"), Candidate("plain, prior n", prior_factor=1.0)]
    out += [Candidate(f"plain, first {k} BNs", first=k) for k in firsts]
    if with_source:
        out += [Candidate("source-relative", relative=True)]
        out.append(Candidate("source-relative, prior n", relative=True, prior_factor=1.0))
        if firsts:
            k = firsts[-1]
            out.append(Candidate(f"source-relative, first {k} BNs", relative=True, first=k))
    return out


def _selection(model: onnx.ModelProto, nodes: Nodes, first: int | None) -> Nodes:
    """The BNs a candidate re-estimates: `nodes`, or the first `first` of them by name."""
    if first is None:
        return nodes
    return bn_names(model, nodes)[:first]


def guarded(
    model: onnx.ModelProto,
    run: RunAdaptation,
    target: Any,
    *,
    source: Any = None,
    source_is_data: bool = True,
    prior: float | None = None,
    nodes: Nodes = None,
    auto: bool = False,
    max_drop: float = DEFAULT_MAX_DROP,
    samples: int | None = None,
    batch_size: int | None = None,
    shapes: Any = None,
) -> Outcome:
    """Adapt (or, with `auto`, choose how) with a held-out check; see the module docstring."""
    target_all = read_all(target, model, samples=samples, batch_size=batch_size, shapes=shapes)
    source_all = (
        read_all(source, model, samples=samples, batch_size=batch_size, shapes=shapes)
        if source is not None and source_is_data
        else None
    )
    labelled = target_all.labels is not None
    if labelled or auto:
        adapt_part, held_out = split(target_all, AUTO_HOLDOUT if auto else HOLDOUT)
    else:
        adapt_part, held_out = target_all, None
    adapt_data = _as_data(adapt_part)
    source_data = _as_data(source_all) if source_all is not None else source
    if not auto:
        result = run(adapt_data, source_data, prior, nodes)
        _describe(result, target_all, adapt_part, source_all)
        evidence = evaluate(model, result.model, held_out, target_all, source_all, max_drop)
        if labelled:
            evidence.notes.append(
                f"TARGET has labels: {held_out.size} of {target_all.size} samples held out "  # type: ignore[union-attr]
                "to measure accuracy, the rest adapted on"
            )
        return Outcome(result, evidence)
    return _choose(model, run, adapt_part, held_out, source_all, source_data, nodes, max_drop)


def _choose(model, run, adapt_part, held_out, source_all, source_data, nodes, max_drop) -> Outcome:
    labelled = held_out.labels is not None
    measure = "held-out accuracy (%)" if labelled else "minus held-out mean entropy (nats)"
    original = predictions(model, held_out)
    base_score = score(original, held_out.labels)
    best_label, best_score, best, best_p = "none", base_score, None, 1.0
    tried: list[dict[str, Any]] = [{"candidate": "none", "score": round(best_score, 4)}]
    runner_up: tuple[str, float, float] | None = None  # the best one that was not measurable
    adapt_data = _as_data(adapt_part)
    for c in candidates(model, source_data is not None, nodes):
        prior = None if c.prior_factor is None else c.prior_factor * adapt_part.size
        result = run(
            adapt_data,
            source_data if c.relative else None,
            prior,
            _selection(model, nodes, c.first),
        )
        test = better_p(original, predictions(result.model, held_out), held_out.labels)
        tried.append(
            {
                "candidate": c.label,
                "prior": prior,
                "score": round(test.score_after, 4),
                "p_value": round(test.p_value, 4),
            }
        )
        if test.p_value >= SIGNIFICANCE:
            if runner_up is None or test.score_after > runner_up[1]:
                runner_up = (c.label, test.score_after, test.p_value)
            continue
        if test.score_after > best_score:
            best_label, best_score, best, best_p = c.label, test.score_after, result, test.p_value
    if best is None:
        reason = (
            f"no candidate beats the original measurably (one-sided p < {SIGNIFICANCE:g}) on "
            f"{held_out.size} held-out samples; {measure}: original {tried[0]['score']:.4g}"
        )
        if runner_up is not None and runner_up[1] > base_score:
            label, value, p_value = runner_up
            reason += f", best {label} {value:.4g} at p = {p_value:.2g}"
        evidence = Evidence(held_out=held_out.size, max_drop=max_drop, refused=True)
        return Outcome(None, evidence, best_label, reason, tried)
    reason = (
        f"best {measure} on {held_out.size} held-out target samples: {best_score:.4g} "
        f"(original {tried[0]['score']:.4g}; one-sided p = {best_p:.2g} < {SIGNIFICANCE:g})"
    )
    _describe(best, None, adapt_part, source_all)
    evidence = evaluate(model, best.model, held_out, held_out, source_all, max_drop)
    return Outcome(best, evidence, best_label, reason, tried)


def _as_data(arrays: Arrays) -> dict[str, Any]:
    return dict(arrays.feeds)


def _describe(
    result: PassResult, whole: Arrays | None, part: Arrays, source: Arrays | None
) -> None:
    """Name the DATA the reports used (the adaptation part of it, when held out), with what
    reading it noted: the passes saw it as arrays in memory."""
    report = getattr(result.report, "reestimate", None) or result.report
    if whole is None or part.size != whole.size:
        report.data = f"{part.description} ({part.size} samples, the rest held out)"
    else:
        report.data = part.description
    report.data_notes = list(part.notes)
    calibration = getattr(getattr(result.report, "inserted", None), "calibration", None)
    if calibration is not None and source is not None:
        calibration.data, calibration.data_notes = source.description, list(source.notes)
    relative = getattr(report, "extras", {}).get("source_relative")
    if relative is not None and source is not None:
        relative["source"] = source.description
