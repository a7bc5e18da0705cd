"""Batches, and the DataSource that streams them.

A DataSource is a re-iterable stream of Batch objects (feeds keyed by input name, axis 0 the
batch, and the labels when known): its sources yield chunks of any size, `rebatch` cuts and
joins them into batches of the source's batch size, and each batch is checked against the
model's static batch dimension on the way out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bnsurgery.data.specs import InputSpec
from bnsurgery.errors import DataError


@dataclass
class Batch:
    """One batch: feeds keyed by input name (axis 0 = batch) and, when known, the labels."""

    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    @property
    def size(self) -> int:
        """Samples in the batch: axis 0 of the first batched (rank >= 1) input."""
        batched = [a for a in self.feeds.values() if np.ndim(a) >= 1]
        return int(np.shape(batched[0])[0]) if batched else (1 if self.feeds else 0)


@dataclass
class DataSource:
    """A re-iterable stream of checked batches for one model.

    `description` says where the data came from (it goes in reports); `samples` is the total
    when known ahead (files, random), None for scripts; `has_labels` says whether every batch
    carries labels; `synthetic` is True for random data.
    """

    description: str
    _chunks: Callable[[], Iterator[Batch]]
    specs: list[InputSpec]
    batch_size: int | None
    samples: int | None = None
    has_labels: bool = False
    synthetic: bool = False
    notes: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[Batch]:
        return self.batches()

    def batches(self) -> Iterator[Batch]:
        batches = rebatch(self._chunks(), self.batch_size)
        for index, batch in enumerate(batches):
            self._check_batch(batch, index)
            yield batch

    def feeds(self) -> Iterator[dict[str, np.ndarray]]:
        """Only the feed dicts (Polygraphy's data-loader convention)."""
        for batch in self.batches():
            yield batch.feeds

    @property
    def num_batches(self) -> int | None:
        if self.samples is None or not self.batch_size:
            return None
        return -(-self.samples // self.batch_size)

    def _check_batch(self, batch: Batch, index: int) -> None:
        for spec in self.specs:
            want = spec.static_batch
            feed = batch.feeds[spec.name]
            if want is None or np.ndim(feed) == 0:
                continue
            have = feed.shape[0]
            if have != want:
                raise DataError(
                    f"batch {index}: input '{spec.name}' has a static batch dimension of "
                    f"{want}, got a batch of {have} (the number of samples must be a multiple "
                    f"of {want})"
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.description,
            "samples": self.samples,
            "batch_size": self.batch_size,
            "labels": self.has_labels,
            "synthetic": self.synthetic,
            "notes": list(self.notes),
        }


def rebatch(chunks: Iterator[Batch], batch_size: int | None) -> Iterator[Batch]:
    """Chunks of any size -> batches of `batch_size` (the last may be short); None keeps them."""
    if batch_size is None:
        for chunk in chunks:
            if chunk.size:
                yield chunk
        return
    pending: list[Batch] = []
    count = 0
    for chunk in chunks:
        pending.append(chunk)
        count += chunk.size
        while count >= batch_size:
            merged = _concat(pending)
            yield _slice(merged, 0, batch_size)
            rest = _slice(merged, batch_size, merged.size)
            pending, count = ([rest], rest.size) if rest.size else ([], 0)
    if count:
        yield _concat(pending)


def _concat(batches: list[Batch]) -> Batch:
    if len(batches) == 1:
        return batches[0]
    feeds = {  # a rank-0 input (a flag, a scalar) has no batch axis: it is shared
        k: v if np.ndim(v) == 0 else np.concatenate([b.feeds[k] for b in batches])
        for k, v in batches[0].feeds.items()
    }
    labels = None
    if all(b.labels is not None for b in batches):
        labels = np.concatenate([b.labels for b in batches])  # type: ignore[misc]
    return Batch(feeds, labels)


def _slice(batch: Batch, start: int, stop: int) -> Batch:
    feeds = {k: v if np.ndim(v) == 0 else v[start:stop] for k, v in batch.feeds.items()}
    labels = batch.labels[start:stop] if batch.labels is not None else None
    return Batch(feeds, labels)
