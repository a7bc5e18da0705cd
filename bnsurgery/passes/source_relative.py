"""Source-relative adaptation: move a BN's stored statistics by the change from SOURCE to TARGET.

Plain re-estimation (AdaBN) replaces a BN's stored statistics, which describe the model's own
training data, with those of the user's data. When the user's data is itself another domain
than the training data (even clean), that gap is mixed in with the shift to be corrected.
Source-relative adaptation measures each BN's input on the user's clean data S and on the
shifted data T, and composes the map "bring T's statistics to S's" into the stored BN:

    x' = (x - m_T) * r + m_S,   r = sqrt(v_S + eps) / sqrt(v_T + eps)
    BN(x') = scale * (x' - m0) / sqrt(v0 + eps) + B
           = scale * (x - mean) / sqrt(var + eps) + B   with
    mean = m_T - (m_S - m0) / r,   var = (v0 + eps) / r**2 - eps

(docs/adaptation.md has the derivation). The same data as S and T gives r = 1 and back the
stored (m0, v0). `var + eps` is always positive, but `var` itself goes negative, or to a
rounding residue, where v_S >> v_T (a channel the shift silenced). A variance below
`TINY_VAR` x eps (1e-6 of eps: below what float32 `var + eps` resolves) is never written: the
channel gets var = 0 and its scale is multiplied by sqrt(eps / (var + eps)), which keeps the
BN's function exactly; the report counts these channels (`clamped_channels`).

With a prior N (Schneider et al. 2020), the target moments are first blended towards the
source moments with lambda = N / (N + n): N = 0 is full adaptation, N -> inf no change.

Source moments are measured on the *unchanged* model, every BN in one pass (exact mode; the
fold -> insert -> calibrate route measures them the same way), or with batch statistics in
batch mode. They are kept with the target moments in the statistics file (`--save-stats`),
so shards merge and apply with `reestimate --stats`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bnsurgery.errors import DataError, UsageError
from bnsurgery.measure.engine import measure
from bnsurgery.measure.feeds import Feeds, check_samples, open_data
from bnsurgery.measure.runner import MeasureRunner, RunStats
from bnsurgery.measure.targets import BnTarget
from bnsurgery.stats import FORMAT, Moments, StatsSet

logger = logging.getLogger(__name__)

TINY_VAR = 1e-6  # times eps: a composed variance below it is clamped to 0 (scale compensated)


@dataclass
class Composed:
    """The values to write into one BN: mean, var, and the scale where a channel was clamped."""

    mean: np.ndarray
    var: np.ndarray
    scale: np.ndarray | None  # None when no channel needed its scale changed
    clamped: int


def compose(
    stored_mean: np.ndarray,
    stored_var: np.ndarray,
    stored_scale: np.ndarray,
    epsilon: float,
    source: Moments,
    target: Moments,
    prior: float | None = None,
    samples: int = 0,
) -> Composed:
    """The BN statistics that map `target`'s moments onto `source`'s before the stored BN."""
    m_s, v_s = source.mean, source.var
    m_t, v_t = target.mean, target.var
    if prior is not None and prior > 0:
        lam = prior / (prior + samples)
        m_t = lam * m_s + (1 - lam) * m_t
        v_t = lam * v_s + (1 - lam) * v_t
    eps = float(epsilon)
    m0 = np.asarray(stored_mean, dtype=np.float64)
    v0 = np.asarray(stored_var, dtype=np.float64)
    r = np.sqrt(v_s + eps) / np.sqrt(v_t + eps)
    mean = m_t - (m_s - m0) / r
    denominator = (v0 + eps) / (r * r)  # the new var + eps: always > 0
    var = denominator - eps
    negative = var < TINY_VAR * eps
    scale = None
    if negative.any():
        # var 0 and a larger scale give scale' / sqrt(0 + eps) == scale / sqrt(denominator)
        scale = np.asarray(stored_scale, dtype=np.float64).copy()
        scale = np.broadcast_to(scale, var.shape).copy()
        scale[negative] *= np.sqrt(eps / denominator[negative])
        var = np.where(negative, 0.0, var)
    return Composed(mean, var, scale, int(negative.sum()))


def is_stats_file(source: Any) -> bool:
    """Whether SOURCE names a bnsurgery statistics file rather than DATA."""
    if not isinstance(source, str | Path):
        return False
    path = Path(source)
    if path.suffix.lower() != ".npz" or not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as data:
            return "format" in data.files and str(data["format"]) == FORMAT
    except (OSError, ValueError):
        return False


def saved_source(source: StatsSet | str | Path, mode: str, expected: dict[str, int]) -> StatsSet:
    """Source moments from a StatsSet or a statistics file (its source part), checked against
    the BNs to adapt and the measuring mode."""
    label = str(source) if not isinstance(source, StatsSet) else "the source statistics"
    saved = source if isinstance(source, StatsSet) else StatsSet.load(source)
    if saved.source is not None:
        saved = saved.source
    elif not isinstance(source, StatsSet):  # a file of plain statistics
        raise DataError(
            f"{label} holds no source statistics (write them with "
            "reestimate --source DATA --data DATA --save-stats FILE)"
        )
    if saved.mode != mode:
        raise DataError(f"{label}: source statistics measured in '{saved.mode}' mode, not '{mode}'")
    subset = StatsSet(
        saved.mode, {k: saved.entries[k] for k in expected if k in saved.entries}, saved.samples
    )
    subset.check_against(expected)
    return subset


def measure_source(
    model: onnx.ModelProto,
    targets: list[BnTarget],
    feeds: Feeds,
    mode: str,
    runner: MeasureRunner,
    memory_budget: int,
) -> tuple[StatsSet, RunStats]:
    """Every target BN's input moments on SOURCE, with the model as it is: one pass (exact
    mode: stored statistics everywhere; batch mode: batch statistics everywhere)."""
    stats = RunStats()
    measured = measure(
        model,
        targets,
        feeds,
        lambda wave, moments: None,
        mode=mode,
        runner=runner,
        memory_budget=memory_budget,
        single_wave=True,
        stats=stats,
    )
    check_samples(feeds.seen_samples)
    logger.info("source: %d BN(s) measured on %d sample(s)", len(measured), feeds.seen_samples)
    return StatsSet(mode, measured, feeds.seen_samples), stats


def resolve_source(
    options: Any,
    mode: str,
    expected: dict[str, int],
    saved: StatsSet | None,
    work: onnx.ModelProto | None,
    targets: list[BnTarget] | None,
) -> tuple[StatsSet | None, str | None]:
    """(source moments, description) for a ReestimatePass: its `source` option (DATA, measured
    on `work` as it is; a StatsSet; a statistics file), else those saved with the applied
    statistics."""
    source = options.source
    if source is None:
        return saved, None
    if isinstance(source, StatsSet) or is_stats_file(source):
        label = None if isinstance(source, StatsSet) else str(source)
        return saved_source(source, mode, expected), label
    if work is None or targets is None:
        raise UsageError(
            "source DATA is measured together with target DATA, not with {option}",
            option="stats",
        )
    feeds = open_data(
        source, work, samples=options.samples, batch_size=options.batch_size, shapes=options.shapes
    )
    measured, _ = measure_source(work, targets, feeds, mode, options.runner, options.memory_budget)
    return measured, feeds.description


def source_summary(source: StatsSet, description: str | None, clamped: dict[str, int]) -> dict:
    """The `source_relative` section of a report."""
    return {
        "source": description,
        "source_samples": source.samples,
        "clamped_channels": int(sum(clamped.values())),
        "clamped_bns": {k: v for k, v in clamped.items() if v},
    }
