"""The report of a re-estimation (or of insert's calibration): what was measured, on which
data, what each BN's statistics were before and after, and what the measuring cost."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bnsurgery.measure.cache import DEFAULT_MEMORY_BUDGET
from bnsurgery.measure.runner import RunStats
from bnsurgery.stats import StatsSet


@dataclass
class BnChange:
    """One BN's statistics before and after, as summary numbers."""

    name: str
    channels: int
    wave: int
    count: int
    old_mean: np.ndarray
    new_mean: np.ndarray
    old_var: np.ndarray
    new_var: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        ratio = self.new_var / np.maximum(self.old_var, np.finfo(np.float64).tiny)
        mean_change = np.abs(self.new_mean - self.old_mean).max()
        return {
            "name": self.name,
            "channels": self.channels,
            "wave": self.wave,
            "values_per_channel": self.count,
            "mean": {
                "old_avg": float(self.old_mean.mean()),
                "new_avg": float(self.new_mean.mean()),
                "max_abs_change": float(mean_change),
            },
            "var": {
                "old_avg": float(self.old_var.mean()),
                "new_avg": float(self.new_var.mean()),
                "min_ratio": float(ratio.min()),
                "max_ratio": float(ratio.max()),
            },
        }


@dataclass
class ReestimateReport:
    """What re-estimation did: per-BN changes, the data used, passes and time."""

    mode: str
    data: str | None = None
    data_notes: list[str] = field(default_factory=list)  # what DATA's reading noted
    samples: int = 0
    batches: int = 0
    batch_size: int | None = None
    prior: float | None = None
    waves: int = 0
    seconds: float = 0.0
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    run: RunStats = field(default_factory=RunStats)
    bns: list[BnChange] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    stats_file: str | None = None
    session: dict[str, Any] | None = None
    stats: StatsSet | None = None  # the measured moments (for --save-stats), not in to_dict
    extras: dict[str, Any] = field(default_factory=dict)  # sections other modules add

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "data": self.data,
            "data_notes": list(self.data_notes),
            "stats_file": self.stats_file,
            "samples": self.samples,
            "batches": self.batches,
            "batch_size": self.batch_size,
            "prior": self.prior,
            "waves": self.waves,
            **self.run.to_dict(),
            "memory_budget": self.memory_budget,
            "seconds": round(self.seconds, 4),
            "session": self.session,
            "bns": [b.to_dict() for b in self.bns],
            "skipped": list(self.skipped),
            **self.extras,
        }
