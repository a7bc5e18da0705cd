"""The worker side of distributed re-estimation: one Ray actor per worker.

A worker owns a fixed, contiguous run of shards for the whole job (so exact mode's wave cache
of stage-boundary activations lives beside the data it came from), and runs the local engine
of bnsurgery.measure on them unchanged: the same plan, waves, sub-models, ONNX
Runtime session per sub-model and cache. What differs is only where a wave ends: the worker
hands its wave's `Moments` to the driver and waits for the BN parameters the driver wrote
from the merged statistics of every worker, writes those same values into its own copy of the
model, and goes on to the next wave. Batch mode is one call: one pass over the shards.

This module imports no Ray at module level: the driver wraps `ShardWorker` with `ray.remote`.
"""

from __future__ import annotations

import io
import os
import queue
import threading
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from bnsurgery.data import DataSource, input_specs
from bnsurgery.data import batch_size_for as _batch_size
from bnsurgery.data import split_arrays as _split_arrays
from bnsurgery.errors import BnSurgeryError, DataError
from bnsurgery.measure.batch import measure_batch_mode
from bnsurgery.measure.exact import measure_waves
from bnsurgery.measure.feeds import Feeds
from bnsurgery.measure.runner import MeasureRunner, RunStats
from bnsurgery.measure.targets import BnTarget, find_batchnorms
from bnsurgery.stats import Moments


@dataclass
class Shard:
    """One piece of DATA: a name for messages, and a reference to its contents in Ray's object
    store (a block of file bytes read by Ray Data, or a block of a ray.data.Dataset)."""

    name: str
    ref: Any  # ray.ObjectRef
    kind: str  # "files": a block of {bytes, path} rows; "arrays": a block of columns
    row: int = 0  # the row of a "files" block


@dataclass
class WaveResult:
    """What a worker reports at the end of a wave (or of the one batch-mode pass)."""

    wave: int
    moments: dict[str, Moments]
    samples: int
    batches: int
    error: str | None = None  # a one-line message (bad data, a failing run): no moments


def decode_file(name: str, payload: bytes) -> dict[str, np.ndarray]:
    """The arrays of one .npz or .npy file given as bytes; a bad file names the shard."""
    try:
        if name.lower().endswith(".npy"):
            return {"": np.load(io.BytesIO(payload), allow_pickle=False)}
        with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"shard {name}: not a readable .npz/.npy ({exc})") from None


def shard_arrays(shard: Shard, block: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The arrays of one shard, from its block in the object store."""
    if shard.kind == "files":
        return decode_file(shard.name, bytes(block["bytes"][shard.row]))
    return {k: np.asarray(v) for k, v in block.items()}


def shard_source(model: onnx.ModelProto, shards: Sequence[Shard], batch_size: int | None):
    """A bnsurgery.data.DataSource over shards, each checked against the model's inputs with
    its own name in any message (the local engine's checks, shard by shard)."""
    import ray  # optional: installed with the extra, imported only on a worker

    specs = input_specs(model)
    size = _batch_size(specs, batch_size)

    def fix_npy(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "" in arrays and len(specs) == 1:  # an .npy: the one input's array
            return {specs[0].name: arrays[""]}
        return arrays

    def chunks() -> Iterator[Any]:
        for shard in shards:
            block = ray.get(shard.ref)
            arrays = fix_npy(shard_arrays(shard, block))
            yield _split_arrays(arrays, f"shard {shard.name}", specs, None)

    return DataSource(f"{len(shards)} shard(s)", chunks, specs, size)


class ShardWorker:
    """One worker: its shards, its copy of the model, its sessions (a Ray actor, threaded:
    `next_wave` and `continue_with` are called while the engine thread waits between waves)."""

    def __init__(self, model_bytes: bytes, options: Mapping[str, Any]) -> None:
        self.model = onnx.ModelProto.FromString(model_bytes)
        self.options = dict(options)
        self.pid = os.getpid()
        self._results: queue.Queue[WaveResult] = queue.Queue()
        self._params: queue.Queue[dict[str, np.ndarray] | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def ping(self) -> int:
        return self.pid

    def sizes(self, shards: Sequence[Shard]) -> list[int]:
        """Samples in each shard (reads them; --samples needs the counts)."""
        source = shard_source(self.model, shards, None)
        return [batch.size for batch in source._chunks()]

    # -- measuring ---------------------------------------------------------------------------
    def _targets(self) -> list[BnTarget]:
        targets, _ = find_batchnorms(self.model, self.options.get("nodes"))
        return targets

    def _runner(self) -> MeasureRunner:
        o = self.options
        return MeasureRunner(o["provider"], o["opt_level"], o["threads"], o["shared_arena"])

    def _feeds(self, shards: Sequence[Shard], samples: int | None) -> Feeds:
        return Feeds(shard_source(self.model, shards, self.options["batch_size"]), samples)

    def measure_batch(self, shards: Sequence[Shard], samples: int | None) -> WaveResult:
        """Batch mode: one pass over the shards, every BN on its batch statistics."""
        try:
            feeds = self._feeds(shards, samples)
            runner, stats = self._runner(), RunStats()
            with runner.scope():
                moments = measure_batch_mode(
                    self.model, self._targets(), feeds, runner=runner, stats=stats
                )
            return WaveResult(1, moments, feeds.seen_samples, stats.batches)
        except BnSurgeryError as exc:
            return WaveResult(1, {}, 0, 0, error=str(exc))

    def start_waves(self, shards: Sequence[Shard], samples: int | None) -> int:
        """Exact mode: start the wave engine on the shards in a thread; returns at once."""
        self._thread = threading.Thread(
            target=self._run_waves, args=(list(shards), samples), daemon=True
        )
        self._thread.start()
        return self.pid

    def next_wave(self) -> WaveResult:
        """The moments of the wave the engine thread has just finished (blocks until then)."""
        return self._results.get()

    def continue_with(self, params: dict[str, np.ndarray]) -> bool:
        """The BN parameters the driver wrote after the wave: the engine writes them into its
        model, then builds and runs the next wave's sub-model."""
        self._params.put(params)
        return True

    def _run_waves(self, shards: list[Shard], samples: int | None) -> None:
        feeds = None
        counter = {"wave": 0}
        stats = RunStats()

        def on_wave(wave_targets, moments: dict[str, Moments]) -> None:
            counter["wave"] += 1
            seen = feeds.seen_samples if feeds is not None else 0
            self._results.put(WaveResult(counter["wave"], moments, seen, stats.batches))
            params = self._params.get()
            if params is None:
                raise _Stopped
            write_params(self.model, params)

        try:
            feeds = self._feeds(shards, samples)
            runner = self._runner()
            with runner.scope():
                measure_waves(
                    self.model,
                    self._targets(),
                    feeds,
                    on_wave,
                    runner=runner,
                    memory_budget=self.options["memory_budget"],
                    stats=stats,
                )
        except _Stopped:
            return
        except BnSurgeryError as exc:
            self._results.put(WaveResult(counter["wave"] + 1, {}, 0, 0, error=str(exc)))
        except Exception as exc:  # reported to the driver as one line, never a traceback
            message = f"{type(exc).__name__}: {exc}".splitlines()[0]
            self._results.put(WaveResult(counter["wave"] + 1, {}, 0, 0, error=message))

    def stop(self) -> bool:
        self._params.put(None)
        return True


class _Stopped(Exception):
    """The driver ended the job (another worker failed): the engine thread stops quietly."""


def read_params(model: onnx.ModelProto, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The current values of some initializers (the BN parameters a wave wrote)."""
    inits = {t.name: t for t in model.graph.initializer}
    return {name: numpy_helper.to_array(inits[name]) for name in names}


def write_params(model: onnx.ModelProto, params: Mapping[str, np.ndarray]) -> None:
    """Overwrite initializers with the given values, bit for bit (the driver's written BN
    parameters, so every worker's next sub-model is the driver's)."""
    for tensor in model.graph.initializer:
        if tensor.name in params:
            tensor.CopyFrom(numpy_helper.from_array(params[tensor.name], tensor.name))
