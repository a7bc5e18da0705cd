"""The comparing runner: the reference, its rounding-noise copy and each (model, provider) pair
run over the same DATA, their outputs handed on batch by batch, and nothing judged here.

Polygraphy splits `Comparator.run` (run every runner, return the results) from
`compare_accuracy` (judge them); this is the first half. Outputs are not returned whole but
handed to `observe` one batch at a time (an `Observation`: one pair's outputs on one batch,
beside the reference's and the noise run's), so a comparison holds one batch, not the data
set; harness.judge is the usual observer. What ran, on what, and how long is the `RunRecord`.

The runner works on `Executor`s (runtime.runner): an ONNX Runtime session (runtime.runner.Runner)
or onnx.reference (runtime.reference.ReferenceRunner) alike; which engine runs the models is the
caller's choice (harness.compare's `engine`). Two ways to run them:

- `run_one_at_a_time`, for outputs alone. Every session owns its weights and its own arena of
  activations, so the reference, its noise copy and each pair held together cost the sum of
  them: on ResNet-50 with batches of 32, twice the memory of one session. Here the reference
  runs over every batch first and its outputs are kept (outputs only, a few numbers per sample
  for a classifier), then the noise copy, then each pair in turn, observed batch by batch
  against the kept outputs; each session is released before the next is made. The peak is one
  session plus the kept outputs. The observations are the ones running the sessions side by
  side gives, in the same order per pair: the same batches (a DataSource is re-iterable: files
  are read again, random data is seeded, a script's load_data() is called again).
- `run_side_by_side`, for layer-wise comparisons: every session alive at once, since every
  intermediate tensor of the reference would have to be kept otherwise.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bnsurgery.errors import DataError
from bnsurgery.runtime.isolation import release_free_heap
from bnsurgery.runtime.providers import SessionInfo
from bnsurgery.runtime.runner import Executor, progress

logger = logging.getLogger(__name__)


@dataclass
class Observation:
    """One pair's outputs on one batch, beside the reference's and the noise run's on the same
    batch ({} when there is no noise run). `layers`: these are the intermediate tensors of the
    layer-wise copies (by their names in each model), not the graph outputs."""

    pair: int
    labels: np.ndarray | None
    reference: Mapping[str, Any]
    candidate: Mapping[str, Any]
    noise: Mapping[str, Any]
    layers: bool = False


Observe = Callable[[Observation], None]


@dataclass
class Lineup:
    """What runs: the reference and each pair, and how to make the noise run (called when its
    turn comes, so that only what it needs outlives the making). Layer-wise: one copy of the
    reference, of the noise run and of each pair with the intermediate tensors as outputs."""

    reference: Executor
    pairs: list[Executor]
    output_names: list[str]
    noise: Callable[[], Executor] | None = None
    reference_layers: Executor | None = None
    noise_layers: Callable[[], Executor] | None = None
    pair_layers: list[Executor] = field(default_factory=list)


@dataclass
class RunRecord:
    """What ran: the session behind the reference and each pair, the seconds each pair spent
    in run() over every batch, and what the data held."""

    reference: SessionInfo
    pairs: list[SessionInfo] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    samples: int = 0
    batches: int = 0
    with_labels: int = 0
    input_shapes: dict[str, list[int]] = field(default_factory=dict)

    def note_batch(self, batch: Any) -> None:
        self.input_shapes = self.input_shapes or {
            k: list(np.shape(v)) for k, v in batch.feeds.items()
        }
        self.samples += batch.size
        self.batches += 1
        self.with_labels += batch.labels is not None


def run_one_at_a_time(
    source: Any, lineup: Lineup, observe: Observe, *, show_progress: bool | None = None
) -> RunRecord:
    """Run the reference, then the noise copy, then each pair, one session alive at a time;
    every pair's outputs are observed against the reference's kept ones."""
    names = lineup.output_names
    kept: list[dict[str, Any]] = []
    labels: list[np.ndarray | None] = []
    run = RunRecord(reference=lineup.reference.activate())

    def keep(index: int, batch: Any, out: dict[str, Any]) -> None:
        kept.append(_own(out, names))
        labels.append(batch.labels)
        run.note_batch(batch)

    _one_pass(source, lineup.reference, None, keep, show_progress)
    noise_out: list[dict[str, Any]] = [{} for _ in kept]
    if lineup.noise is not None:
        noise_out = []

        def note_noise(index: int, batch: Any, out: dict[str, Any]) -> None:
            noise_out.append(_own(out, names))

        _one_pass(source, lineup.noise(), run.batches, note_noise, show_progress)
    for pair, executor in enumerate(lineup.pairs):

        def hand_on(index: int, batch: Any, out: dict[str, Any], pair: int = pair) -> None:
            observe(Observation(pair, labels[index], kept[index], out, noise_out[index]))

        run.pairs.append(executor.activate())
        run.seconds.append(_one_pass(source, executor, run.batches, hand_on, show_progress))
    _log_run(lineup, run, "one session at a time")
    return run


def run_side_by_side(
    source: Any, lineup: Lineup, observe: Observe, *, show_progress: bool | None = None
) -> RunRecord:
    """Every session made first, then each batch through all of them: the reference, the noise
    run, each pair (observed), and layer-wise the copies with intermediate outputs."""
    run = RunRecord(reference=lineup.reference.activate())
    run.pairs = [executor.activate() for executor in lineup.pairs]
    run.seconds = [0.0] * len(lineup.pairs)
    for executor in lineup.pair_layers:
        executor.activate()
    noise = lineup.noise() if lineup.noise is not None else None
    noise_layers = lineup.noise_layers() if lineup.noise_layers is not None else None
    for executor in (noise, noise_layers):
        if executor is not None:
            executor.activate()
    with progress(source.batches(), length=source.num_batches, label="comparing",
                  enabled=show_progress) as stream:  # fmt: skip
        for batch in stream:
            ref_out = lineup.reference.infer(batch.feeds)
            noise_out = noise.infer(batch.feeds) if noise is not None else {}
            for pair, executor in enumerate(lineup.pairs):
                started = time.perf_counter()
                out = executor.infer(batch.feeds)
                run.seconds[pair] += time.perf_counter() - started
                observe(Observation(pair, batch.labels, ref_out, out, noise_out))
            if lineup.reference_layers is not None:
                ref_layers = lineup.reference_layers.infer(batch.feeds)
                noise_values = noise_layers.infer(batch.feeds) if noise_layers else {}
                for pair, executor in enumerate(lineup.pair_layers):
                    out = executor.infer(batch.feeds)
                    observe(Observation(pair, None, ref_layers, out, noise_values, layers=True))
            run.note_batch(batch)
    _log_run(lineup, run, "side by side")
    return run


def _log_run(lineup: Lineup, run: RunRecord, how: str) -> None:
    """INFO: what ran, on what, over how much data, and each pair's time in run()."""
    logger.info(
        "ran %d pair(s) against %s on %s, %s: %d sample(s) in %d batch(es)",
        len(lineup.pairs), lineup.reference.label, run.reference.describe(), how, run.samples,
        run.batches,
    )  # fmt: skip
    if lineup.noise is not None:
        logger.info("the rounding-noise copy of the reference ran on the same batches")
    for executor, info, seconds in zip(lineup.pairs, run.pairs, run.seconds, strict=True):
        logger.info("%s on %s: %.3f s in run()", executor.label, info.describe(), seconds)


def _one_pass(
    source: Any,
    executor: Executor,
    expected: int | None,
    each: Callable[[int, Any, dict[str, Any]], None],
    show_progress: bool | None,
) -> float:
    """Every batch through `executor`, `each(index, batch, outputs)` on what it gives; then the
    session is released (nothing of its outputs outlives this call). The seconds in run()."""
    executor.activate()
    spent = 0.0
    seen = 0
    out: Any = None
    batch: Any = None
    with progress(source.batches(), length=source.num_batches, label=executor.label,
                  enabled=show_progress) as stream:  # fmt: skip
        for index, batch in enumerate(stream):
            if expected is not None:
                _check_same_pass(index, expected)
            started = time.perf_counter()
            out = executor.infer(batch.feeds)
            spent += time.perf_counter() - started
            each(index, batch, out)
            seen += 1
    if expected is not None:
        _check_same_pass(expected - 1, seen)
    out = batch = stream = None  # no output of this session outlives it
    executor.deactivate()
    release_memory()  # the session's pages back to the system before the next one
    logger.debug("%s: %d batches, %.3f s in run()", executor.label, seen, spent)
    return spent


def release_memory() -> None:
    """Collect garbage and hand the heap's free pages back to the system, so that memory one
    phase freed is not counted again in the next."""
    gc.collect()
    release_free_heap()


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
