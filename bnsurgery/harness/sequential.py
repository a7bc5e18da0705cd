"""An output comparison that holds one ONNX Runtime session at a time.

Every session owns its weights and its own arena of activations, so the reference, its
rounding-noise copy and each (model, provider) pair held together cost the sum of them: on
ResNet-50 with batches of 32, twice the memory of one session. Here the reference runs over
every batch first and its outputs are kept (outputs only, a few numbers per sample for a
classifier), then the noise copy, then each pair in turn, judged batch by batch against the
kept outputs; each session is released before the next is made. The peak is one session plus
the kept outputs. The verdicts are the same as running the sessions side by side: the same
batches (a DataSource is re-iterable: files are read again, random data is seeded, a script's
load_data() is called again) go through the same accumulators in the same order.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bnsurgery.errors import DataError
from bnsurgery.harness.metrics import ErrorAccumulator
from bnsurgery.runtime.isolation import _release_free_heap
from bnsurgery.runtime.providers import SessionInfo
from bnsurgery.runtime.runner import Runner, progress


@dataclass
class SequentialRun:
    """What the passes over the data produced, besides the accumulated metrics."""

    reference: SessionInfo
    pairs: list[SessionInfo] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    samples: int = 0
    batches: int = 0
    with_labels: int = 0
    input_shapes: dict[str, list[int]] = field(default_factory=dict)


def run_one_at_a_time(
    source: Any,
    reference: Runner,
    noise: Callable[[], Runner] | None,
    pairs: list[Runner],
    accumulators: list[dict[str, ErrorAccumulator]],
    *,
    show_progress: bool | None = None,
) -> SequentialRun:
    """Run the reference, then the noise copy (made by `noise()`), then each pair, one session
    alive at a time; every pair's outputs go into its accumulators against the reference's."""
    names = list(accumulators[0]) if accumulators else []
    kept: list[dict[str, Any]] = []
    labels: list[np.ndarray | None] = []
    run = SequentialRun(reference=reference.activate())

    def keep(index: int, batch: Any, out: dict[str, Any]) -> None:
        kept.append(_own(out, names))
        labels.append(batch.labels)
        run.input_shapes = run.input_shapes or {
            k: list(np.shape(v)) for k, v in batch.feeds.items()
        }
        run.samples += batch.size
        run.with_labels += batch.labels is not None

    _one_pass(source, reference, None, keep, show_progress)
    run.batches = len(kept)
    noise_out: list[dict[str, Any]] = [{} for _ in kept]
    if noise is not None:
        noise_out = []

        def note_noise(index: int, batch: Any, out: dict[str, Any]) -> None:
            noise_out.append(_own(out, names))

        _one_pass(source, noise(), run.batches, note_noise, show_progress)
    for runner, accs in zip(pairs, accumulators, strict=True):

        def judge(index: int, batch: Any, out: dict[str, Any], accs: Any = accs) -> None:
            for name, acc in accs.items():
                acc.update(kept[index][name], out[name], labels[index], noise_out[index].get(name))

        run.pairs.append(runner.activate())
        run.seconds.append(_one_pass(source, runner, run.batches, judge, show_progress))
    return run


def _one_pass(
    source: Any,
    runner: Runner,
    expected: int | None,
    each: Callable[[int, Any, dict[str, Any]], None],
    show_progress: bool | None,
) -> float:
    """Every batch through `runner`, `each(index, batch, outputs)` on what it gives; then the
    session is released (nothing of its outputs outlives this call). The seconds in run()."""
    runner.activate()
    spent = 0.0
    seen = 0
    out: Any = None
    batch: Any = None
    with progress(source.batches(), length=source.num_batches, label=runner.label,
                  enabled=show_progress) as stream:  # fmt: skip
        for index, batch in enumerate(stream):
            if expected is not None:
                _check_same_pass(index, expected)
            started = time.perf_counter()
            out = runner.infer(batch.feeds)
            spent += time.perf_counter() - started
            each(index, batch, out)
            seen += 1
    if expected is not None:
        _check_same_pass(expected - 1, seen)
    out = batch = stream = None  # no output of this session outlives it
    runner.deactivate()
    release_free_heap()  # the session's pages back to the system before the next one
    return spent


def release_free_heap() -> None:
    """Collect garbage and hand the heap's free pages back to the system (glibc's
    malloc_trim), so that memory one phase freed is not counted again in the next."""
    gc.collect()
    _release_free_heap()


def _own(outputs: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Copies of the outputs kept: an array ONNX Runtime returns can hold on to memory of the
    session that made it (its arena stays alive with it), and the session must go."""
    return {n: np.array(outputs[n], copy=True) if isinstance(outputs[n], np.ndarray)
            else outputs[n] for n in names}  # fmt: skip


def _check_same_pass(index: int, expected: int) -> None:
    """Batch `index` of a later pass exists in the first one (and, called with the first
    pass's last index and a later pass's count, the later pass had every batch)."""
    if index >= expected:
        raise DataError(
            "DATA gave a different number of batches on another pass; a load_data() script "
            "must yield the same data every time it is called"
        )
