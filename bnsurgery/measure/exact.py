"""The exact (wave) engine: every BN measured in inference mode once every BN upstream of it
holds its new statistics (AdaBN).

One pass over the data per wave: the pass runs the wave's stage of the model (bnsurgery.measure
.plan) from the model inputs or the cached stage-boundary tensors, measures the inputs of the
wave's BNs with probes (bnsurgery.measure.probes), and keeps the tensors later stages read in
the cache (bnsurgery.measure.cache), as far as its budget allows. Between waves, `on_wave`
writes the wave's new parameters into the model, so the next wave's sub-model runs on them.
Every node therefore runs about once per sample in all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import onnx

from bnsurgery.errors import DataError
from bnsurgery.measure.cache import DEFAULT_MEMORY_BUDGET, CachePlanner, GreedyPlanner, TensorCache
from bnsurgery.measure.feeds import Feeds, Progress, feed_size
from bnsurgery.measure.plan import Plan
from bnsurgery.measure.probes import (
    measure_probe,
    nonfinite_message,
    submodel,
    tensor_types,
    value_info,
)
from bnsurgery.measure.runner import MeasureRunner, RunStats, run_batch
from bnsurgery.measure.targets import BnTarget
from bnsurgery.model.graph import NameGenerator, default_opset
from bnsurgery.stats import Moments

logger = logging.getLogger(__name__)

OnWave = Callable[[list[BnTarget], dict[str, Moments]], None]


def measure_waves(
    model: onnx.ModelProto,
    targets: list[BnTarget],
    feeds: Feeds,
    on_wave: OnWave,
    *,
    runner: MeasureRunner,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    planner: CachePlanner | None = None,
    single_wave: bool = False,
    progress: Progress | None = None,
    stats: RunStats | None = None,
) -> dict[str, Moments]:
    """Measure every target's input statistics, wave by wave; `on_wave(wave_targets, moments)`
    writes the new parameters into `model` before the next wave runs. `single_wave` measures
    every target in one pass on the model as it is; `planner` decides what the cache keeps
    (GreedyPlanner by default)."""
    plan = Plan.build(model, targets, single_wave)
    planner = planner if planner is not None else GreedyPlanner()
    stats = stats if stats is not None else RunStats()
    stats.model_nodes = sum(plan.dynamic)
    opset = default_opset(model.opset_import)
    names = NameGenerator(model)
    types = tensor_types(model) if opset >= 15 else {}  # below 15, X has the params' dtype
    cache = TensorCache(memory_budget)
    results: dict[str, Moments] = {}
    dtypes: dict[str, np.dtype] = {}
    runs = len({t.wave for t in targets})
    expected = feeds.expected_batches
    total = runs * expected if expected is not None else None
    batch_sizes: list[int] | None = None
    logger.info(
        "exact mode: %d BN(s) in %d wave(s), %d of %d node(s) to run, cache budget %s",
        len(targets), runs, len(plan.needed), stats.model_nodes, _bytes(memory_budget),
    )  # fmt: skip
    for s in range(plan.waves):
        wave = [t for t in targets if t.wave == s + 1]
        if not wave:
            continue
        clock = time.perf_counter()
        run = {i for i in plan.needed if plan.stage[i] == s}
        wanted = set().union(*(plan.inputs[i] for i in run)) if run else set()
        wanted |= {t.x for t in wave}
        # recompute whatever is neither cached, nor produced here, nor a model input
        recomputed = plan.recompute(wanted, cache, run)
        run |= recomputed
        stats.recomputed_nodes += len(recomputed)
        order = sorted(run | plan.static_closure(run))
        run_nodes = [plan.nodes[i] for i in order]
        produced = {o for i in run for o in plan.nodes[i].output if o}
        feeds_needed = sorted(
            {
                n
                for i in run
                for n in plan.inputs[i]
                if n not in produced and (n in plan.runtime_inputs or n in cache)
            }
            | {t.x for t in wave if t.x not in produced}
        )
        # tensors to keep for later stages, latest producers first (they save the most work)
        keep = sorted(
            (n for n in produced if plan.last_use.get(n, -1) > s and n not in cache),
            key=lambda n: -plan.producer[n],
        )
        logger.debug(
            "wave %d: feeds %s; keeps %s; %d node(s) recomputed", s + 1, feeds_needed, keep,
            len(recomputed),
        )  # fmt: skip
        probes = [measure_probe(t, types.get(t.x) or t.dtypes[0], opset, names) for t in wave]
        inputs = [
            plan.runtime_inputs[n] if n in plan.runtime_inputs else value_info(n, dtypes[n])
            for n in feeds_needed
        ]
        probe_outputs = [o for p in probes for o in p.outputs]
        part = submodel(
            model,
            run_nodes + [n for p in probes for n in p.nodes],
            inputs,
            probe_outputs + keep,
            [t for p in probes for t in p.initializers],
        )
        session = runner.session(part)
        stats.passes += 1
        stats.node_evaluations += len([i for i in run if plan.dynamic[i]])
        acc = {p.target.key: Moments.zeros(p.target.channels) for p in probes}
        kept: dict[str, list[np.ndarray]] = {n: [] for n in keep}
        kept_bytes = 0
        uses_data = any(n in plan.runtime_inputs for n in feeds_needed)
        # cached inputs no later stage reads: each batch's array is freed once it has run, so
        # the tensors this stage keeps can take its place within the budget
        spent = [n for n in feeds_needed if n in cache and plan.last_use.get(n, -1) <= s]
        sizes: list[int] = []
        for b, batch in enumerate(_batches(feeds, uses_data, cache, feeds_needed, batch_sizes)):
            feed = {n: batch[n] for n in feeds_needed}
            out_names = probe_outputs + list(kept)
            arrays = run_batch(session, out_names, feed, b)
            sizes.append(feed_size(feed))
            for p in probes:
                moments = p.decode([arrays[o] for o in p.outputs])
                if not moments.is_finite():
                    raise DataError(nonfinite_message(p.target, b, probes, arrays))
                acc[p.target.key] = acc[p.target.key].merge(moments)
            for n in list(kept):
                kept[n].append(arrays[n])
                dtypes[n] = arrays[n].dtype
                kept_bytes += arrays[n].nbytes
            if b == 0 and batch_sizes is not None and kept:
                # the batch sizes are known: plan this stage's drops for its full outputs now,
                # while a spent input can still be held as the anchor of a recomputation
                total_samples = sum(batch_sizes)
                projected = {n: kept[n][0].nbytes * total_samples // sizes[0] for n in kept}
                drops, anchors = planner.plan_stage(plan, projected, cache, spent, s, cache.budget)
                if drops or anchors:
                    logger.debug("wave %d: drops %s, holds %s", s + 1, drops, anchors)
                for n in drops:
                    kept_bytes -= sum(a.nbytes for a in kept.pop(n))
                for n, last in anchors.items():
                    spent.remove(n)
                    plan.last_use[n] = max(plan.last_use.get(n, -1), last)
            if planner.free_spent:
                for n in spent:
                    cache.release(n, b)
            while kept and cache.bytes + kept_bytes > cache.budget:
                victim = planner.victim(plan, kept, cache, s)
                logger.debug("wave %d, batch %d: over budget, drops %s", s + 1, b, victim)
                kept_bytes -= sum(a.nbytes for a in kept.pop(victim))
            if progress is not None:
                progress(1, total)
        if batch_sizes is None:
            batch_sizes = sizes
            stats.batches = len(sizes)
        for n, arrays_ in kept.items():
            cache.add(n, arrays_)
        stats.peak_cache_bytes = max(stats.peak_cache_bytes, cache.peak)
        for n in [n for n in cache.tensors if plan.last_use.get(n, -1) <= s]:
            cache.evict(n)
        for t in wave:
            results[t.key] = acc[t.key]
        on_wave(wave, {t.key: acc[t.key] for t in wave})
        logger.info(
            "wave %d/%d: %d BN(s), %d node(s) (%d recomputed), %d batch(es) in %.3f s; "
            "cache %s",
            s + 1, plan.waves, len(wave), len(run), len(recomputed), len(sizes),
            time.perf_counter() - clock, _bytes(cache.bytes),
        )  # fmt: skip
    return results


def _batches(
    feeds: Feeds,
    uses_data: bool,
    cache: TensorCache,
    names: Sequence[str],
    expected_sizes: list[int] | None,
) -> Iterator[dict[str, np.ndarray]]:
    """One stage's batches: DATA's (checked against the first pass) with the cached tensors of
    the same batch, or the cached tensors alone when the stage reads no model input."""
    cached = [n for n in names if n in cache]
    if uses_data:
        for b, batch in enumerate(feeds):
            if expected_sizes is not None and (
                b >= len(expected_sizes) or feed_size(batch) != expected_sizes[b]
            ):
                raise DataError(
                    "DATA gave different batches on a second pass; a load_data() "
                    "script must yield the same data every time it is called"
                )
            yield {**batch, **{n: cache.tensors[n][b] for n in cached}}
        if expected_sizes is not None and feeds.seen_batches != len(expected_sizes):
            raise DataError("DATA gave a different number of batches on a second pass")
        return
    count = len(cache.tensors[cached[0]]) if cached else 0
    for b in range(count):
        yield {n: cache.tensors[n][b] for n in cached}


def _bytes(count: int) -> str:
    return f"{count / 2**20:.1f} MiB"
