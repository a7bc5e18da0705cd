"""Evidence that an adaptation helps: the drift warning, the labelled guard and label-free signals.

- **Drift warning** (`drift`, `harm_figure`, `drift_warning`): plain re-estimation replaces
  stored statistics that describe the model's training data. It is flagged as likely to hurt
  when either (a) the new means of the deep BNs (the later half in graph order) move by more
  than one stored standard deviation on at least `FAR_SHARE` of their channels: the user's data
  is far from the training data; or (b) it changes the top class of part of the target without
  making the predictions more informative, measured by the mutual information between input
  and predicted class, I = H(mean p) - mean H(p) (the information-maximisation score of
  test-time adaptation): at least `FLIP_SHARE` of the target flips and I falls, or at least
  `MANY_FLIPS` flips and I rises by less than `INFO_GAIN` (relative). AdaBN that corrects a
  shift turns the original's errors into confident and diverse predictions, so I rises with
  the flips; one that mixes a domain gap into the statistics flips decisions at no gain in I.
  One warning line, suggesting `--source`.
- **Guard** (`split_labelled`, `evaluate`): when DATA carries labels, a held-out part of it
  (`HOLDOUT` of the samples, a fixed-seed draw) is kept out of the adaptation and the original
  and adapted models' accuracies are measured on it; an adaptation that lowers accuracy by
  more than `max_drop` points is refused unless forced.
- **Label-free signals**: the mean prediction entropy of the original and adapted models on the
  target, and their agreement (same top class) on the source.
- **Measurably better** (`better_p`): whether an adapted model beats the original on the same
  samples, paired, with a one-sided p-value; `--auto` keeps a candidate only below
  `SIGNIFICANCE`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

FAR_MOVE = 1.0  # stored standard deviations a channel's mean moves to count as "far"
FAR_SHARE = 0.10  # of the deep BNs' channels, past which plain re-estimation is flagged
FLIP_SHARE = 0.005  # of the target whose top class changes: flips that need I not to fall
MANY_FLIPS = 0.05  # flips that need I to rise by INFO_GAIN
INFO_GAIN = 0.10  # relative rise of I that explains many flips
SIGNIFICANCE = 0.05  # one-sided p below which a candidate beats the original measurably
HOLDOUT = 0.25  # share of labelled DATA held out to measure accuracy
DEFAULT_MAX_DROP = 0.5  # accuracy points
SPLIT_SEED = 0


def drift(bns: Iterable[Any], epsilon: float = 1e-5) -> dict[str, Any]:
    """How far the measured means moved from the stored ones, in stored standard deviations,
    on the deep BNs (the later half in graph order); `warn` applies the stated rule."""
    changes = list(bns)
    deep = changes[len(changes) // 2 :]
    far = channels = 0
    largest, largest_bn = 0.0, None
    for b in deep:
        move = np.abs(b.new_mean - b.old_mean) / np.sqrt(np.maximum(b.old_var, 0.0) + epsilon)
        far += int((move > FAR_MOVE).sum())
        channels += int(move.size)
        if move.size and float(move.max()) > largest:
            largest, largest_bn = float(move.max()), b.name
    share = far / channels if channels else 0.0
    return {
        "rule": f"mean moves > {FAR_MOVE:g} stored std on >= {FAR_SHARE:.0%} of the channels of "
        "the later half of the BNs",
        "deep_bns": len(deep),
        "deep_channels": channels,
        "far_channels": far,
        "far_share": round(share, 4),
        "largest_move": round(largest, 3),
        "largest_move_bn": largest_bn,
        "warn": bool(channels and share >= FAR_SHARE),
    }


def entropy_rise(before: float | None, after: float | None) -> float | None:
    """The relative rise of the mean prediction entropy (None when not measured)."""
    if before is None or after is None:
        return None
    return (after - before) / max(before, 1e-6)


def harm_figure(figure: dict[str, Any], evidence: Evidence | None) -> dict[str, Any]:
    """`drift`'s figure with the label-free prediction signals of rule (b) added and `warn`
    set by both rules; (b) needs the evidence's predictions on the target."""
    out = dict(figure)
    flips = gain = None
    if evidence is not None and evidence.target_agreement is not None:
        flips = 1.0 - evidence.target_agreement / 100.0
        before, after = evidence.information_before, evidence.information_after
        gain = (after - before) / max(before, 1e-6)  # type: ignore[operator]
    rise = entropy_rise(
        getattr(evidence, "entropy_before", None), getattr(evidence, "entropy_after", None)
    )
    out["entropy_rise"] = None if rise is None else round(rise, 4)
    out["target_flips"] = None if flips is None else round(flips, 4)
    out["information_gain"] = None if gain is None else round(gain, 4)
    out["flip_rule"] = (
        f"top class changed on >= {FLIP_SHARE:.0%} of the target while the information "
        f"H(mean p) - mean H(p) fell, or on >= {MANY_FLIPS:.0%} while it rose by < {INFO_GAIN:.0%}"
    )
    unexplained = flips is not None and (
        (flips >= FLIP_SHARE and gain < 0.0) or (flips >= MANY_FLIPS and gain < INFO_GAIN)  # type: ignore[operator]
    )
    out["unexplained_flips"] = bool(unexplained)
    out["warn"] = bool(figure["warn"] or unexplained)
    return out


def drift_warning(figure: Mapping[str, Any]) -> str:
    if figure.get("unexplained_flips"):
        gain = figure["information_gain"]
        why = (
            f"changed the top class of {figure['target_flips']:.1%} of the target without "
            f"making the predictions more informative (information {gain:+.1%})"
        )
    else:
        why = "moved the statistics far"
    return (
        f"warning: plain re-estimation {why}; {figure['far_channels']} of "
        f"{figure['deep_channels']} deep BN channels moved by more than {FAR_MOVE:g} stored std "
        f"(largest {figure['largest_move']:.3g} std, {figure['largest_move_bn']}): this is likely "
        "to hurt; adapt relative to your own clean data with --source CLEAN"
    )


# ---------------------------------------------------------------------------------------------
# Data in memory


@dataclass
class Arrays:
    """Samples in memory: feeds per input, and the labels when DATA has them."""

    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    description: str = "<data>"
    notes: list[str] = field(default_factory=list)  # what reading DATA noted

    @property
    def size(self) -> int:
        return int(next(iter(self.feeds.values())).shape[0])

    def take(self, index: np.ndarray) -> Arrays:
        labels = None if self.labels is None else self.labels[index]
        feeds = {k: v[index] for k, v in self.feeds.items()}
        return Arrays(feeds, labels, self.description, list(self.notes))


def read_all(
    data: Any,
    model: onnx.ModelProto,
    *,
    samples: int | None = None,
    batch_size: int | None = None,
    shapes: Mapping[str, list[int]] | None = None,
) -> Arrays:
    """DATA read into memory (at most `samples`), with its labels when every batch has them."""
    from bnsurgery.data import load_data

    if isinstance(data, Arrays):
        return data
    source = load_data(data, model, batch_size=batch_size, shapes=shapes)
    feeds: dict[str, list[np.ndarray]] = {}
    labels: list[np.ndarray] = []
    seen = 0
    for batch in source.batches():
        n = batch.size if samples is None else min(batch.size, samples - seen)
        if n <= 0:
            break
        for name, value in batch.feeds.items():
            feeds.setdefault(name, []).append(np.asarray(value)[:n])
        if batch.labels is not None:
            labels.append(np.asarray(batch.labels)[:n])
        seen += n
    joined = {k: np.concatenate(v) for k, v in feeds.items()}
    has_labels = source.has_labels or (labels and sum(len(x) for x in labels) == seen)
    return Arrays(
        joined,
        np.concatenate(labels) if has_labels else None,
        source.description,
        list(source.notes),
    )


def split(data: Arrays, holdout: float = HOLDOUT) -> tuple[Arrays, Arrays]:
    """(adaptation part, held-out part): a fixed-seed draw of `holdout` of the samples."""
    n = data.size
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    held = max(1, round(n * holdout))
    return data.take(np.sort(order[held:])), data.take(np.sort(order[:held]))


# ---------------------------------------------------------------------------------------------
# Measuring models


def predictions(model: onnx.ModelProto, data: Arrays, batch: int = 256) -> np.ndarray:
    """The first output of `model` on DATA as (samples, classes) probabilities."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    names = [i.name for i in session.get_inputs()]
    parts = []
    for start in range(0, data.size, batch):
        feed = {n: data.feeds[n][start : start + batch] for n in names}
        parts.append(np.asarray(session.run([session.get_outputs()[0].name], feed)[0]))
    out = np.concatenate(parts).astype(np.float64)
    out = out.reshape(out.shape[0], -1)
    sums = out.sum(axis=1)
    if (out >= 0).all() and np.allclose(sums, 1.0, atol=1e-3):
        return out  # already probabilities (a Softmax at the end)
    shifted = np.exp(out - out.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(axis=1) == labels.reshape(-1)).mean() * 100.0)


def per_sample_entropy(probs: np.ndarray) -> np.ndarray:
    """Each sample's prediction entropy in nats."""
    p = np.clip(probs, 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis=1)


def entropy(probs: np.ndarray) -> float:
    """Mean prediction entropy in nats."""
    return float(per_sample_entropy(probs).mean())


def score(probs: np.ndarray, labels: np.ndarray | None) -> float:
    """What `--auto` maximises: accuracy (%) with labels, else minus the mean entropy."""
    return accuracy(probs, labels) if labels is not None else -entropy(probs)


def agreement(before: np.ndarray, after: np.ndarray) -> float:
    """% of samples whose top class is the same in both."""
    return float((before.argmax(axis=1) == after.argmax(axis=1)).mean() * 100.0)


def information(probs: np.ndarray) -> float:
    """Mutual information between input and predicted class, in nats: the entropy of the mean
    prediction (how diverse) minus the mean prediction entropy (how unsure)."""
    mean = np.clip(probs.mean(axis=0), 1e-12, 1.0)
    return float(-(mean * np.log(mean)).sum()) - entropy(probs)


@dataclass
class Evidence:
    """The before/after numbers of one adaptation."""

    held_out: int = 0
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    entropy_before: float | None = None
    entropy_after: float | None = None
    information_before: float | None = None
    information_after: float | None = None
    target_agreement: float | None = None  # % of the target whose top class is unchanged
    source_agreement: float | None = None
    source_accuracy_before: float | None = None
    source_accuracy_after: float | None = None
    max_drop: float = DEFAULT_MAX_DROP
    refused: bool = False
    forced: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        r = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}
        r["notes"] = list(self.notes)
        return r

    def lines(self) -> list[str]:
        out = []
        if self.accuracy_before is not None:
            out.append(
                f"accuracy on {self.held_out} held-out labelled samples: "
                f"{self.accuracy_before:.2f} % -> {self.accuracy_after:.2f} %"
            )
        if self.entropy_before is not None:
            out.append(
                f"mean prediction entropy on the target: {self.entropy_before:.4f} -> "
                f"{self.entropy_after:.4f} nats"
            )
        if self.target_agreement is not None:
            out.append(
                f"original and adapted agree on {self.target_agreement:.2f} % of the target; "
                f"information of their predictions {self.information_before:.4f} -> "
                f"{self.information_after:.4f} nats"
            )
        if self.source_accuracy_before is not None:
            out.append(
                f"accuracy on the source: {self.source_accuracy_before:.2f} % -> "
                f"{self.source_accuracy_after:.2f} %"
            )
        if self.source_agreement is not None:
            out.append(f"original and adapted agree on {self.source_agreement:.2f} % of the source")
        return out + [f"note: {n}" for n in self.notes]


def evaluate(
    original: onnx.ModelProto,
    adapted: onnx.ModelProto,
    held_out: Arrays | None,
    target: Arrays | None,
    source: Arrays | None,
    max_drop: float = DEFAULT_MAX_DROP,
) -> Evidence:
    """Accuracy on the labelled held-out part (and the refusal rule), else entropy on the
    target; agreement (and accuracy, with labels) on the source."""
    evidence = Evidence(max_drop=max_drop)
    held = None  # the two models' predictions on the held-out part, reused when it is the target
    if held_out is not None and held_out.labels is not None:
        held = predictions(original, held_out), predictions(adapted, held_out)
        evidence.held_out = held_out.size
        evidence.accuracy_before = accuracy(held[0], held_out.labels)
        evidence.accuracy_after = accuracy(held[1], held_out.labels)
        evidence.refused = evidence.accuracy_after < evidence.accuracy_before - max_drop
    if target is not None:
        if held is not None and target is held_out:
            before, after = held
        else:
            before, after = predictions(original, target), predictions(adapted, target)
        evidence.entropy_before, evidence.entropy_after = entropy(before), entropy(after)
        evidence.information_before = information(before)
        evidence.information_after = information(after)
        evidence.target_agreement = agreement(before, after)
    if source is not None:
        before, after = predictions(original, source), predictions(adapted, source)
        evidence.source_agreement = agreement(before, after)
        if source.labels is not None:
            evidence.source_accuracy_before = accuracy(before, source.labels)
            evidence.source_accuracy_after = accuracy(after, source.labels)
    return evidence


@dataclass
class PairedTest:
    """Two models' score on the same samples and how sure it is that the second is better."""

    score_before: float
    score_after: float
    p_value: float


def sign_test_p(wins: int, losses: int) -> float:
    """Exact one-sided sign test: P(at least `wins` of the `wins + losses` samples on which the
    two models disagree go the adapted model's way, were each a fair coin)."""
    n = wins + losses
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2.0**n


def better_p(before: np.ndarray, after: np.ndarray, labels: np.ndarray | None) -> PairedTest:
    """Is `after` (probabilities on the same samples as `before`) better than `before`? With
    labels: accuracy (%), and the sign test on the samples one gets right and the other wrong.
    Without: minus the mean prediction entropy, and a one-sided paired test (normal
    approximation) of the per-sample entropy decrease."""
    scores = score(before, labels), score(after, labels)
    if labels is not None:
        right_before = before.argmax(axis=1) == labels.reshape(-1)
        right_after = after.argmax(axis=1) == labels.reshape(-1)
        wins = int((right_after & ~right_before).sum())
        losses = int((right_before & ~right_after).sum())
        return PairedTest(*scores, sign_test_p(wins, losses))
    decrease = per_sample_entropy(before) - per_sample_entropy(after)
    spread = float(decrease.std(ddof=1)) if decrease.size > 1 else 0.0
    if spread == 0.0:
        p_value = 0.0 if decrease.size > 1 and float(decrease.mean()) > 0 else 1.0
    else:
        z = float(decrease.mean()) / (spread / math.sqrt(decrease.size))
        p_value = 0.5 * math.erfc(z / math.sqrt(2.0))
    return PairedTest(*scores, p_value)
