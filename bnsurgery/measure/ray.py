"""Re-estimation on a Ray cluster: the driver (docs/scale.md).

DATA is cut into shards (the .npz/.npy files of a folder or glob, read by Ray Data, or the
blocks of a `ray.data.Dataset`); each worker, a Ray actor (bnsurgery.measure.ray_worker),
owns a contiguous run of shards for the whole job and runs the local engine on them, with one
ONNX Runtime session per sub-model.

- **Batch mode:** one pass over all shards; each worker returns its pooled `Moments` per BN,
  the driver merges them (Chan, float64, a balanced tree).
- **Exact mode:** wave by wave, the same waves as the local engine. Each wave runs over all
  shards in parallel; the driver merges the workers' Moments, writes that wave's statistics
  into its model (`on_wave`, the same call the local engine makes), and sends the written
  BN parameters to every worker, which writes them into its own copy of the model before it
  builds the next wave's sub-model. The model crosses the network once (the object store);
  per wave and worker only per-channel numbers do: `count, mean, M2` up (8 + 16 C bytes per
  BN) and the written mean and var down (2 C values in the model's dtype).

A worker that dies is replaced once (`retries`) on the same shards: the new worker replays
the waves already merged with the statistics the driver wrote then (its own earlier moments
are not counted twice), so the result is the one a run without the failure gives. Past the
retries the run fails with one line (exit 3); nothing is written from partial statistics.

`measure_on_ray(model, targets, data, on_wave, ...)` is the one call an engine user needs:
the input statistics of these BNs on this data, wave by wave, with whatever `on_wave` writes
into `model` between the waves.

(A little over 500 lines, on purpose: the wave loop, the shard assignment and the replacement
of dead workers share one driver state, and a worker can die in any of them.)
"""

from __future__ import annotations

import glob
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bnsurgery.errors import (
    BadInputError,
    DataError,
    EnvironmentProblem,
    first_line_or_type,
)
from bnsurgery.measure.plan import Plan
from bnsurgery.measure.ray_worker import Shard, ShardWorker, WaveResult, read_params
from bnsurgery.measure.runner import MeasureRunner
from bnsurgery.measure.targets import BnTarget
from bnsurgery.stats import Moments, merge_all

INSTALL = 'pip install "bnsurgery[ray]"'
ENGINES = ("local", "ray")
# ONNX Runtime session settings a worker takes from the pass
RUNNER_OPTIONS = ("provider", "opt_level", "threads", "shared_arena")

Log = Callable[[str], None]


def require_ray() -> Any:
    """The ray module, or exit 3 with the install line."""
    try:
        import ray
        import ray.data  # the extra brings both
    except ImportError:
        raise EnvironmentProblem(
            f"{{option}} ray needs Ray, which is not installed: {INSTALL}", option="engine"
        ) from None
    return ray


@dataclass
class RayOptions:
    """Where and how wide to run: `address` of a running cluster (None: a local one, started
    and stopped here unless Ray is already initialised in this process), `workers` (None: one
    per CPU of the cluster), CPUs per worker (None: the cluster's CPUs shared out), and how
    many times a dead worker is replaced."""

    address: str | None = None
    workers: int | None = None
    cpus_per_worker: int | None = None
    retries: int = 1
    log: Log | None = None
    start_timeout: float = 120.0  # seconds for every worker to be placed and started
    object_store_memory: int | None = None


@dataclass
class RayRun:
    """What the driver measured, and what it cost."""

    moments: dict[str, Moments]
    samples: int
    batches: int
    workers: int
    shards: int
    waves: int
    retried: list[str] = field(default_factory=list)
    worker_stats: list[dict[str, Any]] = field(default_factory=list)
    seconds_per_wave: list[float] = field(default_factory=list)

    def engine_section(self) -> dict[str, Any]:
        """The report's `engine` section."""
        return {
            "name": "ray",
            "workers": self.workers,
            "shards": self.shards,
            "retried": self.retried,
            "seconds_per_wave": [round(s, 4) for s in self.seconds_per_wave],
        }


# ---------------------------------------------------------------------------------------------
# Data -> shards


def shard_files(spec: str | os.PathLike[str]) -> list[Path]:
    """The .npz/.npy files of DATA: one file, a folder's files, or a glob; sorted by name."""
    text = os.fspath(spec)
    path = Path(text)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".npz", ".npy"))
    elif path.is_file():
        files = [path]
    elif glob.has_magic(text):
        files = sorted(Path(p) for p in glob.glob(text) if Path(p).is_file())
    else:
        raise DataError(f"DATA '{text}': no such file, folder or glob")
    if not files:
        raise DataError(f"DATA '{text}': no .npz or .npy files")
    odd = [p for p in files if p.suffix.lower() not in (".npz", ".npy")]
    if odd:
        raise DataError(f"DATA '{text}': {odd[0]} is not an .npz or .npy shard")
    return files


def data_shards(ray: Any, data: Any) -> tuple[list[Shard], str]:
    """Shards of DATA in Ray's object store, and DATA's description for the report."""
    import ray.data

    if isinstance(data, ray.data.Dataset):
        refs = data.to_numpy_refs()
        return [Shard(f"block {i}", ref, "arrays") for i, ref in enumerate(refs)], "<ray dataset>"
    if isinstance(data, Mapping):
        return [Shard("<arrays>", ray.put(dict(data)), "arrays")], "<arrays>"
    if not isinstance(data, str | os.PathLike):
        raise BadInputError(
            "{option} ray reads DATA as .npz/.npy shards (a file, folder or glob) or a "
            f"ray.data.Dataset, not {type(data).__name__}",
            option="engine",
        )
    text = os.fspath(data)
    if text.startswith("random:") or text.endswith(".py"):
        raise BadInputError(
            f"{{option}} ray reads DATA as .npz/.npy shards (a file, folder or glob), not '{text}'",
            option="engine",
        )
    files = shard_files(text)
    dataset = ray.data.read_binary_files(
        [str(f) for f in files], include_paths=True, override_num_blocks=len(files)
    )
    blocks = dataset.to_numpy_refs()
    paths = ray.get([_block_paths.remote(block) for block in blocks])
    shards = [
        Shard(str(path), block, "files", row)
        for block, names in zip(blocks, paths, strict=True)
        for row, path in enumerate(names)
    ]
    shards.sort(key=lambda s: s.name)  # the local engine's order: files by name
    return shards, f"{text} ({len(files)} shards)"


def _remote_block_paths(block: Mapping[str, Any]) -> list[str]:
    return [str(p) for p in block["path"]]


_block_paths: Any = None  # ray.remote(_remote_block_paths), made once Ray is imported


def split_shards(shards: Sequence[Shard], workers: int) -> list[list[Shard]]:
    """Contiguous runs of shards, as even as the shard count allows; no empty run."""
    parts = np.array_split(np.arange(len(shards)), min(workers, len(shards)))
    return [[shards[i] for i in part] for part in parts if len(part)]


# ---------------------------------------------------------------------------------------------
# The cluster


def _connect(ray: Any, options: RayOptions) -> bool:
    """Connect (or start a local cluster); True when this call started Ray."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.ERROR,
    }
    if options.address is not None:
        kwargs["address"] = options.address
    elif options.object_store_memory is not None:
        kwargs["object_store_memory"] = options.object_store_memory
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = options.address or "a local cluster"
        why = first_line_or_type(exc)
        raise EnvironmentProblem(f"cannot start Ray on {where}: {why}") from None
    return True


def _quiet_ray_data() -> None:
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.execution_options.preserve_order = True
    logging.getLogger("ray.data").setLevel(logging.ERROR)


# ---------------------------------------------------------------------------------------------
# The driver


class Driver:
    """One job: actors over shard runs, waves merged and broadcast, dead workers replaced."""

    def __init__(
        self, ray: Any, model: onnx.ModelProto, worker_options: dict[str, Any], options: RayOptions
    ) -> None:
        self.ray = ray
        self.options = options
        self.worker_options = worker_options
        self.model_ref = ray.put(model.SerializeToString())
        self.actor_class = ray.remote(ShardWorker)
        self.actors: list[Any] = []
        self.runs: list[list[Shard]] = []
        self.limits: list[int | None] = []
        self.retries_left: list[int] = []
        self.retried: list[str] = []
        self.cpus: float = 1.0

    def log(self, message: str) -> None:
        if self.options.log is not None:
            self.options.log(message)

    def start(self, shards: Sequence[Shard], samples: int | None) -> None:
        total_cpus = int(self.ray.cluster_resources().get("CPU", 1))
        workers = self.options.workers or total_cpus
        self.runs = split_shards(shards, workers)
        # more workers than CPUs share them (Ray places fractional CPUs)
        self.cpus = self.options.cpus_per_worker or total_cpus / len(self.runs)
        if not self.worker_options.get("threads"):  # no oversubscription of a node's cores
            self.worker_options["threads"] = max(1, int(self.cpus))
        self.actors = [self._new_actor() for _ in self.runs]
        try:
            self.ray.get([a.ping.remote() for a in self.actors], timeout=self.options.start_timeout)
        except self.ray.exceptions.GetTimeoutError:
            raise EnvironmentProblem(
                f"Ray could not start {len(self.actors)} worker(s) of {self.cpus:g} CPU(s) "
                f"within {self.options.start_timeout:g} s (the cluster has {total_cpus} CPUs)"
            ) from None
        self.retries_left = [self.options.retries] * len(self.runs)
        self.limits = [None] * len(self.runs)
        if samples is not None:  # the first N samples of DATA, in shard order
            pairs = zip(self.actors, self.runs, strict=True)
            sizes = self._gather([a.sizes.remote(run) for a, run in pairs])
            left = samples
            for i, per_shard in enumerate(sizes):
                self.limits[i] = max(0, min(left, sum(per_shard)))
                left -= self.limits[i]
            for i in reversed(range(len(self.runs))):  # workers past the first N: none
                if self.limits[i] == 0 and len(self.runs) > 1:
                    self.ray.kill(self.actors[i])
                    for items in (self.actors, self.runs, self.limits, self.retries_left):
                        del items[i]

    def _new_actor(self) -> Any:
        return self.actor_class.options(num_cpus=self.cpus, max_concurrency=4).remote(
            self.model_ref, self.worker_options
        )

    def _gather(self, refs: list[Any]) -> list[Any]:
        try:
            return self.ray.get(refs)
        except self.ray.exceptions.RayError as exc:
            raise EnvironmentProblem(f"a Ray worker failed: {first_line_or_type(exc)}") from None

    def _describe(self, i: int) -> str:
        run = self.runs[i]
        shards = run[0].name if len(run) == 1 else f"{run[0].name} .. {run[-1].name}"
        return f"worker {i} ({len(run)} shard(s): {shards})"

    def _died(self, i: int, wave: int, exc: BaseException) -> None:
        """A worker died: replace it, or fail the job with one line (exit 3)."""
        if self.retries_left[i] <= 0:
            raise EnvironmentProblem(
                f"{self._describe(i)} died in wave {wave} ({first_line_or_type(exc)}); "
                "no statistics were written"
            )
        self.retries_left[i] -= 1
        self.retried.append(f"{self._describe(i)}, wave {wave}")
        self.log(f"ray: {self._describe(i)} died in wave {wave}; replacing it on the same shards")
        self.actors[i] = self._new_actor()

    @staticmethod
    def _check(results: list[WaveResult]) -> None:
        for result in results:
            if result.error is not None:
                raise DataError(result.error)

    # -- batch mode ---------------------------------------------------------------------------
    def batch(self) -> list[WaveResult]:
        refs = [
            actor.measure_batch.remote(run, limit)
            for actor, run, limit in zip(self.actors, self.runs, self.limits, strict=True)
        ]
        results: list[WaveResult] = []
        for i, ref in enumerate(refs):
            while True:
                try:
                    if ref is None:
                        ref = self.actors[i].measure_batch.remote(self.runs[i], self.limits[i])
                    results.append(self.ray.get(ref))
                    break
                except self.ray.exceptions.RayActorError as exc:
                    self._died(i, 1, exc)
                    ref = None
        self._check(results)
        return results

    # -- exact mode ---------------------------------------------------------------------------
    def start_waves(self) -> None:
        self._gather(
            [
                actor.start_waves.remote(run, limit)
                for actor, run, limit in zip(self.actors, self.runs, self.limits, strict=True)
            ]
        )

    def wave(self, wave: int, history: list[dict[str, np.ndarray]]) -> list[WaveResult]:
        """Every worker's moments of this wave (a dead worker is replaced and replayed)."""
        refs = [actor.next_wave.remote() for actor in self.actors]
        results: list[WaveResult] = []
        for i, ref in enumerate(refs):
            while True:
                try:
                    if ref is None:
                        ref = self.replay(i, history)
                    results.append(self.ray.get(ref))
                    break
                except self.ray.exceptions.RayActorError as exc:
                    self._died(i, wave, exc)
                    ref = None
        self._check(results)
        return results

    def _catch_up(self, i: int, history: list[dict[str, np.ndarray]]) -> None:
        """Bring a new worker to where the others are: it re-measures the earlier waves on its
        shards (their moments are already merged, so they are dropped) with the parameters
        the driver wrote then."""
        actor = self.actors[i]
        self.ray.get(actor.start_waves.remote(self.runs[i], self.limits[i]))
        for params in history:
            self.ray.get(actor.next_wave.remote())
            self.ray.get(actor.continue_with.remote(params))

    def replay(self, i: int, history: list[dict[str, np.ndarray]]) -> Any:
        """Worker `i`, just replaced, caught up with the earlier waves and set to measure the
        current one; the reference of its result."""
        self._catch_up(i, history)
        return self.actors[i].next_wave.remote()

    def send(self, wave: int, history: list[dict[str, np.ndarray]]) -> None:
        """Hand every worker the parameters just written (history[-1]). A worker that died
        meanwhile (ray.kill is asynchronous, so a death can surface here rather than in the
        wave) is replaced and caught up, as in `wave`."""
        refs = [actor.continue_with.remote(history[-1]) for actor in self.actors]
        for i, ref in enumerate(refs):
            while True:
                try:
                    if ref is not None:
                        self.ray.get(ref)
                    else:
                        self._catch_up(i, history)
                    break
                except self.ray.exceptions.RayActorError as exc:
                    self._died(i, wave, exc)
                    ref = None

    def stop(self) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor)
            except Exception:  # already dead: nothing to stop
                pass


def measure_on_ray(
    model: onnx.ModelProto,
    targets: list[BnTarget],
    data: Any,
    on_wave: Callable[[list[BnTarget], dict[str, Moments], int], None],
    *,
    mode: str,
    batch_size: int | None,
    samples: int | None,
    memory_budget: int,
    nodes: str | Sequence[str] | None,
    runner: MeasureRunner,
    options: RayOptions,
) -> RayRun:
    """Measure the input statistics of `targets` on `data` on Ray, wave by wave in exact mode
    (one pass in batch mode). `on_wave(wave_targets, moments, samples)` writes into `model`;
    what it wrote into the BN parameters of that wave goes to every worker before the next.

    Raises EnvironmentProblem (exit 3) when Ray is missing or a worker stays dead, DataError
    (exit 2) for data that does not fit (naming the shard). `runner` gives the workers their
    ONNX Runtime settings."""
    ray = require_ray()
    Plan.build(model, targets, single_wave=mode == "batch")  # the waves, as the workers plan them
    clock = time.perf_counter()
    started = _connect(ray, options)
    if started and options.log is not None:
        where = options.address or "a local cluster"
        options.log(f"ray: connected to {where} in {time.perf_counter() - clock:.1f} s")
    _quiet_ray_data()
    global _block_paths
    if _block_paths is None:
        _block_paths = ray.remote(_remote_block_paths)
    driver = None
    try:
        clock = time.perf_counter()
        shards, _ = data_shards(ray, data)
        if options.log is not None:
            options.log(f"ray: {len(shards)} shard(s) read in {time.perf_counter() - clock:.1f} s")
        worker_options = {
            **{k: getattr(runner, k) for k in RUNNER_OPTIONS},
            "batch_size": batch_size,
            "memory_budget": memory_budget,
            "nodes": nodes,
        }
        driver = Driver(ray, model, worker_options, options)
        clock = time.perf_counter()
        driver.start(shards, samples)
        log = driver.log
        log(f"ray: {len(driver.actors)} worker(s) started in {time.perf_counter() - clock:.1f} s")
        log(
            f"ray: {len(shards)} shard(s) on {len(driver.runs)} worker(s), "
            f"{driver.cpus:g} CPU(s) each, mode {mode}"
        )
        if mode == "batch":
            start = time.perf_counter()
            results = driver.batch()
            merged = _merge(targets, results)
            total = sum(r.samples for r in results)
            on_wave(targets, merged, total)
            log(f"pass 1/1: {total} samples merged from {len(results)} worker(s)")
            seconds = [time.perf_counter() - start]
            return _run(driver, merged, results, total, 1, seconds)
        waves = sorted({t.wave for t in targets})
        driver.start_waves()
        history: list[dict[str, np.ndarray]] = []
        merged_all: dict[str, Moments] = {}
        total, seconds = 0, []
        results = []
        for number, wave in enumerate(waves, 1):
            start = time.perf_counter()
            results = driver.wave(number, history)
            wave_targets = [t for t in targets if t.wave == wave]
            merged = _merge(wave_targets, results)
            if number == 1:
                total = sum(r.samples for r in results)
            on_wave(wave_targets, merged, total)
            written = [t.node.input[slot] for t in wave_targets for slot in (3, 4)]
            params = read_params(model, written)
            history.append(params)
            driver.send(number, history)
            merged_all.update(merged)
            seconds.append(time.perf_counter() - start)
            log(
                f"wave {number}/{len(waves)}: {len(wave_targets)} BN(s) merged from "
                f"{len(results)} worker(s) in {seconds[-1]:.2f} s"
            )
        return _run(driver, merged_all, results, total, len(waves), seconds)
    finally:
        if driver is not None:
            driver.stop()
        if started:
            ray.shutdown()


def _merge(targets: Sequence[Any], results: Sequence[WaveResult]) -> dict[str, Moments]:
    """Chan merges of every worker's moments per BN (a balanced tree, float64)."""
    return {
        t.key: merge_all(r.moments.get(t.key, Moments.zeros(t.channels)) for r in results)
        for t in targets
    }


def _run(driver, merged, results, total, waves, seconds) -> RayRun:
    return RayRun(
        moments=merged,
        samples=total,
        batches=sum(r.batches for r in results),
        workers=len(driver.runs),
        shards=sum(len(run) for run in driver.runs),
        waves=waves,
        retried=list(driver.retried),
        seconds_per_wave=seconds,
    )


def describe_data(data: Any, run: RayRun) -> str:
    """DATA as a report names it: its path or type, and the shards it was cut into."""
    if isinstance(data, str | os.PathLike):
        return f"{os.fspath(data)} ({run.shards} shards)"
    return f"<{type(data).__name__}> ({run.shards} shards)"
