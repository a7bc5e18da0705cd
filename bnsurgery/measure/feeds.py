"""DATA as the measuring engines read it: a re-iterable stream of feed dicts that counts.

Exact mode reads DATA once per wave that runs from the model inputs, so the stream must give
the same batches every time; the engines check that against the first pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from bnsurgery.data import load_data
from bnsurgery.errors import BadInputError, DataError

MIN_SAMPLES = 2  # a variance needs two values

# progress(advance, total): `advance` more batches done of `total` planned (None if unknown)
Progress = Callable[[int, int | None], None]


@dataclass
class Feeds:
    """A re-iterable stream of feed dicts, limited to `samples`, that counts what it gave."""

    source: Any  # bnsurgery.data.DataSource
    samples: int | None = None
    seen_samples: int = 0
    seen_batches: int = 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        samples = batches = 0
        for batch in self.source.batches():
            feeds = batch.feeds
            n = batch.size
            if self.samples is not None:
                left = self.samples - samples
                if left <= 0:
                    break
                if n > left:
                    feeds = {k: v[:left] for k, v in feeds.items()}
                    n = left
            samples += n
            batches += 1
            yield feeds
        self.seen_samples, self.seen_batches = samples, batches

    @property
    def description(self) -> str:
        return str(getattr(self.source, "description", "<data>"))

    @property
    def notes(self) -> list[str]:
        return list(getattr(self.source, "notes", []))

    @property
    def batch_size(self) -> int | None:
        return getattr(self.source, "batch_size", None)

    @property
    def expected_batches(self) -> int | None:
        total = getattr(self.source, "samples", None)
        size = self.batch_size
        if total is None or not size:
            return None
        if self.samples is not None:
            total = min(total, self.samples)
        return -(-total // size)


def feed_size(feeds: Mapping[str, np.ndarray]) -> int:
    """The samples in one feed dict (its arrays' first dimension)."""
    return int(next(iter(feeds.values())).shape[0]) if feeds else 0


def check_sample_limit(samples: int | None) -> None:
    """A `samples` limit below MIN_SAMPLES is bad input."""
    if samples is not None and samples < MIN_SAMPLES:
        raise BadInputError(f"{{option}} must be >= {MIN_SAMPLES}, got {samples}", option="samples")


def open_data(
    data: Any,
    model: onnx.ModelProto,
    *,
    samples: int | None = None,
    batch_size: int | None = None,
    shapes: Mapping[str, list[int]] | None = None,
) -> Feeds:
    """DATA (docs/design.md) as Feeds, through bnsurgery.data.load_data."""
    check_sample_limit(samples)
    source = load_data(data, model, batch_size=batch_size, shapes=shapes)
    return Feeds(source, samples)


def check_samples(samples: int) -> None:
    """DATA gave enough samples for a variance."""
    if samples < MIN_SAMPLES:
        raise DataError(
            f"DATA has {samples} sample(s); re-estimation needs at least {MIN_SAMPLES} "
            "(one sample has no variance across the batch)"
        )
