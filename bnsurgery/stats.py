"""Streaming per-channel moments in float64 (count, mean, M2), merged with Chan's formula.

`Moments` holds the statistics of one BatchNormalization input: how many values each channel
has seen, their mean, and M2 (the sum of squared deviations from the mean). Batches are
merged one at a time with Chan et al.'s parallel update, so nothing ever holds the whole data
set, and moments computed on different machines combine exactly (docs/design.md):

    n = na + nb,  delta = mean_b - mean_a,
    mean = mean_a + delta * nb / n,  M2 = M2_a + M2_b + delta**2 * na * nb / n.

`StatsSet` maps BN names to Moments and round-trips through an .npz file. It remembers each
BN's channel count, so statistics measured on another model are refused (exit 2). Statistics of
source-relative adaptation carry a second set, `source` (the BN inputs on the source data), which
is saved in the same file (keys prefixed `source_`) and merged alongside.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bnsurgery.data.npfile import load_npz
from bnsurgery.errors import BadInputError, DataError

logger = logging.getLogger(__name__)

FORMAT = "bnsurgery-stats/1"
MODES = ("exact", "batch", "calibrate")


@dataclass(frozen=True)
class Moments:
    """count, mean and M2 per channel; the population variance is M2 / count."""

    count: int
    mean: np.ndarray
    m2: np.ndarray

    def __post_init__(self) -> None:
        mean = np.asarray(self.mean, dtype=np.float64).reshape(-1)
        m2 = np.asarray(self.m2, dtype=np.float64).reshape(-1)
        if mean.shape != m2.shape:
            raise ValueError(f"mean {mean.shape} and M2 {m2.shape} differ in shape")
        if int(self.count) < 0:
            raise ValueError("count must be >= 0")
        object.__setattr__(self, "count", int(self.count))
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "m2", m2)

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def zeros(cls, channels: int) -> Moments:
        """No values seen yet."""
        return cls(0, np.zeros(channels), np.zeros(channels))

    @classmethod
    def of(cls, x: np.ndarray, axis: int = 1) -> Moments:
        """The moments of one batch along `axis` (two-pass, in float64)."""
        x = np.asarray(x)
        if x.ndim == 0:
            raise ValueError("a scalar has no channel axis")
        axis = axis % x.ndim
        channels = x.shape[axis]
        flat = np.moveaxis(x, axis, 0).reshape(channels, -1).astype(np.float64, copy=False)
        count = flat.shape[1]
        if count == 0:
            return cls.zeros(channels)
        mean = flat.mean(axis=1)
        centred = flat - mean[:, None]
        m2 = np.einsum("ij,ij->i", centred, centred)
        return cls(count, mean, m2)

    @classmethod
    def from_sums(
        cls, count: int, s1: np.ndarray, s2: np.ndarray, shift: np.ndarray | float = 0.0
    ) -> Moments:
        """Moments from shifted sums: s1 = sum(x - shift), s2 = sum((x - shift)**2), in float64.

        With a shift near the mean this is as accurate as two passes; the subtraction below
        only loses digits in proportion to ((mean - shift) / std)**2.
        """
        s1 = np.asarray(s1, dtype=np.float64).reshape(-1)
        s2 = np.asarray(s2, dtype=np.float64).reshape(-1)
        if count <= 0:
            return cls.zeros(s1.shape[0])
        offset = s1 / count
        m2 = np.maximum(s2 - s1 * offset, 0.0)
        mean = np.asarray(shift, dtype=np.float64).reshape(-1) + offset
        return cls(count, np.broadcast_to(mean, s1.shape).copy(), m2)

    # -- the numbers -----------------------------------------------------------------------
    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])

    @property
    def var(self) -> np.ndarray:
        """Population (biased) variance, M2 / count: what ONNX running_var stores."""
        if self.count == 0:
            return np.full(self.channels, np.nan)
        return self.m2 / self.count

    @property
    def sample_var(self) -> np.ndarray:
        """Unbiased variance, M2 / (count - 1)."""
        if self.count < 2:
            return np.full(self.channels, np.nan)
        return self.m2 / (self.count - 1)

    def is_finite(self) -> bool:
        return bool(np.isfinite(self.mean).all() and np.isfinite(self.m2).all())

    # -- combining -------------------------------------------------------------------------
    def merge(self, other: Moments) -> Moments:
        """Chan's parallel merge: the moments of both sets of values together."""
        if other.channels != self.channels:
            raise ValueError(f"cannot merge {self.channels} channels with {other.channels}")
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        wb = other.count / n
        mean = self.mean + delta * wb
        m2 = self.m2 + other.m2 + delta * delta * (self.count * wb)
        return Moments(n, mean, m2)

    __add__ = merge

    def update(self, x: np.ndarray, axis: int = 1) -> Moments:
        """These moments merged with those of one more batch."""
        return self.merge(Moments.of(x, axis))

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean.tolist(), "var": self.var.tolist()}


def merge_all(parts: Iterable[Moments]) -> Moments:
    """All parts merged, pairwise (a balanced tree keeps the rounding error at O(log k))."""
    items = list(parts)
    if not items:
        raise ValueError("nothing to merge")
    while len(items) > 1:
        merged = [items[i].merge(items[i + 1]) for i in range(0, len(items) - 1, 2)]
        if len(items) % 2:
            merged.append(items[-1])
        items = merged
    return items[0]


class RunningMoments:
    """A mutable accumulator: add batches (or Moments), read the merged Moments."""

    def __init__(self, channels: int) -> None:
        self._value = Moments.zeros(channels)

    def add(self, part: Moments) -> None:
        self._value = self._value.merge(part)

    def add_batch(self, x: np.ndarray, axis: int = 1) -> None:
        self.add(Moments.of(x, axis))

    @property
    def value(self) -> Moments:
        return self._value


@dataclass
class StatsSet:
    """Moments per BN (keyed by BN name), the mode they were measured in, and samples seen."""

    mode: str
    entries: dict[str, Moments] = field(default_factory=dict)
    samples: int = 0
    source: StatsSet | None = None  # source-relative adaptation: the source data's moments

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown statistics mode {self.mode!r}")

    @property
    def channels(self) -> dict[str, int]:
        return {name: m.channels for name, m in self.entries.items()}

    def merge(self, other: StatsSet) -> StatsSet:
        """Statistics of two shards together; both must describe the same BNs in one mode."""
        if other.mode != self.mode:
            raise DataError(
                f"cannot merge statistics measured in '{self.mode}' mode with '{other.mode}' mode"
            )
        if self.channels != other.channels:
            raise DataError(_describe_mismatch(self.channels, other.channels, "the other file"))
        entries = {name: self.entries[name].merge(other.entries[name]) for name in self.entries}
        if (self.source is None) != (other.source is None):
            raise DataError(
                "cannot merge source-relative statistics (with source moments) with plain ones"
            )
        source = self.source.merge(other.source) if self.source and other.source else None
        return StatsSet(self.mode, entries, self.samples + other.samples, source)

    def check_against(self, expected: Mapping[str, int]) -> None:
        """Refuse statistics of another model: the BN names and channel counts must match."""
        if dict(self.channels) != dict(expected):
            raise DataError(_describe_mismatch(expected, self.channels, "the statistics file"))

    # -- files -----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write an .npz (atomically: a temporary file beside it, then a rename)."""
        target = Path(path)
        arrays: dict[str, np.ndarray] = {"format": np.array(FORMAT), **self._arrays()}
        if self.source is not None:
            arrays.update({f"source_{k}": v for k, v in self.source._arrays().items()})
        folder = target.parent if str(target.parent) else Path(".")
        if not folder.is_dir():
            raise BadInputError(f"{target}: output folder {folder} does not exist")
        tmp = folder / f".{target.name}.tmp.npz"
        try:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
            os.replace(tmp, target)
        except OSError as exc:
            raise BadInputError(f"{target}: cannot write ({exc.strerror})") from None
        finally:
            if tmp.exists():
                tmp.unlink()
        return target

    def _arrays(self) -> dict[str, np.ndarray]:
        names = list(self.entries)
        arrays: dict[str, np.ndarray] = {
            "mode": np.array(self.mode),
            "samples": np.array(self.samples, dtype=np.int64),
            "names": np.array(names, dtype=np.str_) if names else np.zeros(0, dtype="<U1"),
            "channels": np.array([self.entries[n].channels for n in names], dtype=np.int64),
            "counts": np.array([self.entries[n].count for n in names], dtype=np.int64),
        }
        for i, name in enumerate(names):
            arrays[f"mean_{i}"] = self.entries[name].mean
            arrays[f"m2_{i}"] = self.entries[name].m2
        return arrays

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> StatsSet:
        source = Path(path)
        if not source.is_file():
            raise BadInputError(f"{source}: no such statistics file")
        data = load_npz(source)  # not an .npz at all: says so, naming the file
        try:
            if "format" not in data or str(data["format"]) != FORMAT:
                raise DataError(f"{source}: not a bnsurgery statistics file ({FORMAT})")
            loaded = cls._from_arrays(source, data, "")
            if "source_names" in data:
                loaded.source = cls._from_arrays(source, data, "source_")
            return loaded
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{source}: unreadable statistics file ({exc})") from None

    @classmethod
    def _from_arrays(cls, source: Path, data: Mapping[str, Any], prefix: str) -> StatsSet:
        names = [str(n) for n in data[f"{prefix}names"]]
        channels = data[f"{prefix}channels"]
        counts = data[f"{prefix}counts"]
        if channels.shape != (len(names),) or counts.shape != (len(names),):
            raise DataError(f"{source}: names, channels and counts differ in length")
        entries: dict[str, Moments] = {}
        for i, name in enumerate(names):
            mean, m2 = data[f"{prefix}mean_{i}"], data[f"{prefix}m2_{i}"]
            if mean.shape != (int(channels[i]),) or m2.shape != mean.shape:
                raise DataError(f"{source}: entry {name!r} has inconsistent shapes")
            _check_moments(source, name, mean, m2)
            entries[name] = Moments(int(counts[i]), mean, m2)
        return cls(str(data[f"{prefix}mode"]), entries, int(data[f"{prefix}samples"]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "source_samples": self.source.samples if self.source is not None else None,
            "samples": self.samples,
            "bns": {
                name: {"count": m.count, "channels": m.channels} for name, m in self.entries.items()
            },
        }


def _check_moments(source: Path, name: str, mean: np.ndarray, m2: np.ndarray) -> None:
    """Moments a file may hold: float, finite, and M2 (a sum of squares) never negative; a
    NaN applied as a BN mean would silently break every output."""
    if mean.dtype.kind != "f" or m2.dtype.kind != "f":
        raise DataError(f"{source}: entry {name!r} holds {mean.dtype}/{m2.dtype}, not floats")
    if not (np.isfinite(mean).all() and np.isfinite(m2).all()):
        raise DataError(f"{source}: entry {name!r} has NaN or infinite moments")
    if (m2 < 0).any():
        raise DataError(f"{source}: entry {name!r} has a negative sum of squares (M2)")


def merge_files(paths: Iterable[str | os.PathLike[str]]) -> StatsSet:
    """Load and merge statistics files (shards); all must describe the same BNs."""
    paths = list(paths)
    sets = [StatsSet.load(p) for p in paths]
    if not sets:
        raise BadInputError("no statistics files to merge")
    merged = sets[0]
    for other, path in zip(sets[1:], paths[1:], strict=True):
        try:
            merged = merged.merge(other)
        except DataError as exc:
            raise DataError(f"{path}: {exc}") from None
    if len(sets) > 1:  # re-merge as a balanced tree for the smallest rounding error
        entries = {name: merge_all(s.entries[name] for s in sets) for name in merged.entries}
        source = merged.source
        if source is not None:
            parts = [s.source for s in sets if s.source is not None]
            source = StatsSet(
                source.mode,
                {name: merge_all(p.entries[name] for p in parts) for name in source.entries},
                source.samples,
            )
        merged = StatsSet(merged.mode, entries, merged.samples, source)
    logger.info(
        "merged %d statistics file(s): %d BN(s), %d samples, mode %s",
        len(sets), len(merged.entries), merged.samples, merged.mode,
    )  # fmt: skip
    return merged


def _describe_mismatch(expected: Mapping[str, int], got: Mapping[str, int], label: str) -> str:
    missing = [n for n in expected if n not in got]
    extra = [n for n in got if n not in expected]
    differ = [
        f"{n} ({expected[n]} vs {got[n]} channels)"
        for n in expected
        if n in got and expected[n] != got[n]
    ]
    parts = []
    if missing:
        parts.append(f"missing BN {_short(missing)}")
    if extra:
        parts.append(f"unknown BN {_short(extra)}")
    if differ:
        parts.append(f"channel counts differ: {_short(differ)}")
    detail = "; ".join(parts) or "different BNs"
    return f"statistics do not match the model ({label} is from another model: {detail})"


def _short(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max(|b|, tiny): how the tests compare statistics."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(float(np.max(np.abs(b))) if b.size else 0.0, math.ulp(1.0))
    return float(np.max(np.abs(a - b))) / scale if a.size else 0.0
