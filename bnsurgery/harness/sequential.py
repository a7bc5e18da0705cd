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
from bnsurgery.harness.providers import SessionInfo
from bnsurgery.harness.runner import Runner, progress


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
    kept: list[dict[str, np.ndarray]] = []
    labels: list[np.ndarray | None] = []
    run = SequentialRun(reference=reference.activate())
    with progress(source.batches(), length=source.num_batches, label="reference",
                  enabled=show_progress) as stream:  # fmt: skip
        for batch in stream:
            out = reference.infer(batch.feeds)
            kept.append({name: out[name] for name in names})
            labels.append(batch.labels)
            run.input_shapes = run.input_shapes or {
                k: list(np.shape(v)) for k, v in batch.feeds.items()
            }
            run.samples += batch.size
            run.with_labels += batch.labels is not None
    run.batches = len(kept)
    _release(reference)
    noise_out: list[dict[str, np.ndarray]] = [{} for _ in kept]
    if noise is not None:
        runner = noise()
        noise_out = [{n: out[n] for n in names} for out in _outputs(source, runner, len(kept))]
        _release(runner)
        del runner  # the noise copy of the model goes with it
    for runner, accs in zip(pairs, accumulators, strict=True):
        run.pairs.append(runner.activate())
        spent = 0.0
        seen = 0
        with progress(source.batches(), length=source.num_batches, label=runner.label,
                      enabled=show_progress) as stream:  # fmt: skip
            for index, batch in enumerate(stream):
                _check_same_pass(index, len(kept))
                started = time.perf_counter()
                out = runner.infer(batch.feeds)
                spent += time.perf_counter() - started
                for name, acc in accs.items():
                    acc.update(kept[index][name], out[name], labels[index],
                               noise_out[index].get(name))  # fmt: skip
                seen += 1
        _check_same_pass(len(kept) - 1, seen)
        run.seconds.append(spent)
        _release(runner)
    return run


def _outputs(source: Any, runner: Runner, expected: int) -> list[dict[str, np.ndarray]]:
    outputs = []
    for index, batch in enumerate(source.batches()):
        _check_same_pass(index, expected)
        outputs.append(runner.infer(batch.feeds))
    _check_same_pass(expected - 1, len(outputs))
    return outputs


def _check_same_pass(index: int, expected: int) -> None:
    """Batch `index` of a later pass exists in the first one (and, called with the first
    pass's last index and a later pass's count, the later pass had every batch)."""
    if index >= expected:
        raise DataError(
            "DATA gave a different number of batches on another pass; a load_data() script "
            "must yield the same data every time it is called"
        )


def _release(runner: Runner) -> None:
    """Drop the session now, so that its memory is free before the next one is made."""
    runner.deactivate()
    gc.collect()
    _trim()


def _trim() -> None:
    """Hand the heap's free pages back to the system (glibc), so the next session's memory
    is not counted on top of the last one's."""
    from bnsurgery.harness.isolation import _release_free_heap

    _release_free_heap()
