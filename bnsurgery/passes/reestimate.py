"""The `reestimate` pass: new BatchNormalization statistics from DATA (docs/design.md).

The measuring is bnsurgery.measure's: which BNs (targets), the waves and the stage cache of
exact mode (AdaBN, the default), the one batch-statistics pass of batch mode, and the Ray
engine. This pass decides what is written into each BN once its input is measured: the
population moments, blended with the stored statistics when a `prior` is given
(lambda = prior / (prior + samples), Schneider et al. 2020), or composed with source moments
for source-relative adaptation (bnsurgery.passes.source_relative). With `stats`, saved
statistics are applied instead of measuring. It never changes its input model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from bnsurgery.errors import DataError, UsageError
from bnsurgery.measure.batch import BATCH_FORMS
from bnsurgery.measure.cache import DEFAULT_MEMORY_BUDGET, CachePlanner
from bnsurgery.measure.engine import MODES, measure
from bnsurgery.measure.feeds import (
    MIN_SAMPLES,
    Progress,
    check_sample_limit,
    check_samples,
    open_data,
)
from bnsurgery.measure.params import ParamWriter, blend
from bnsurgery.measure.ray import RayOptions, describe_data, measure_on_ray
from bnsurgery.measure.report import BnChange, ReestimateReport
from bnsurgery.measure.runner import MEASURE_OPT_LEVEL, MeasureRunner
from bnsurgery.measure.targets import BnTarget, find_batchnorms
from bnsurgery.passes import PassBase, PassResult, register
from bnsurgery.passes.source_relative import compose, resolve_source, source_summary
from bnsurgery.stats import Moments, StatsSet

logger = logging.getLogger(__name__)


@register("reestimate")
class ReestimatePass(PassBase):
    """Re-estimate BN statistics on DATA (or apply saved statistics); never in place.

    With `shared_arena` (CPU EP), the measuring sessions allocate from one arena registered
    with ORT's environment, and its free memory is released when measuring ends
    (bnsurgery.runtime.arena). A process that registers its own environment allocator with
    `onnxruntime.create_and_register_allocator` passes False: ORT keeps one per device.
    `cache_planner` decides what exact mode's wave cache keeps (bnsurgery.measure.cache);
    `batch_form` "centred" makes batch mode use the per-sample centred rewrite on every EP
    (bnsurgery.measure.batch). Both apply to the local engine; `engine="ray"` runs on a Ray
    cluster (bnsurgery.measure.ray, `ray_options` its RayOptions).
    """

    name = "reestimate"
    in_place = False

    def __init__(
        self,
        data: Any = None,
        *,
        mode: str = "exact",
        samples: int | None = None,
        batch_size: int | None = None,
        prior: float | None = None,
        nodes: str | Sequence[str] | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        stats: StatsSet | str | None = None,
        source: Any = None,
        shapes: Mapping[str, list[int]] | None = None,
        provider: str = "cpu",
        opt_level: str = MEASURE_OPT_LEVEL,
        threads: int = 0,
        shared_arena: bool = True,
        progress: Progress | None = None,
        engine: str = "local",
        ray_options: Any = None,
        cache_planner: CachePlanner | None = None,
        batch_form: str = "auto",
    ) -> None:
        if engine not in ("local", "ray"):
            raise UsageError(f"unknown engine '{engine}' (expected local or ray)", option="engine")
        if mode not in MODES:
            raise UsageError(
                f"unknown mode '{mode}' (expected {' or '.join(MODES)})", option="mode"
            )
        if batch_form not in BATCH_FORMS:
            expected = " or ".join(BATCH_FORMS)
            raise UsageError(f"unknown {{option}} '{batch_form}' (expected {expected})",
                             option="batch_form")  # fmt: skip
        if engine == "ray" and (cache_planner is not None or batch_form != "auto"):
            option = "cache_planner" if cache_planner is not None else "batch_form"
            raise UsageError("{option} applies to the local engine, not to engine='ray'",
                             option=option)  # fmt: skip
        if data is not None and stats is not None:
            raise UsageError("give DATA to measure, or saved statistics to apply, not both")
        if data is None and stats is None:
            raise UsageError("re-estimation needs DATA, or saved statistics to apply ({option})",
                             option="stats")  # fmt: skip
        if prior is not None and prior < 0:
            raise UsageError(f"{{option}} must be >= 0, got {prior}", option="prior")
        if memory_budget < 0:
            raise UsageError("{option} must be >= 0", option="memory_budget")
        if batch_size is not None and batch_size < 1:
            raise UsageError(f"{{option}} must be >= 1, got {batch_size}", option="batch_size")
        self.data, self.mode, self.samples, self.batch_size = data, mode, samples, batch_size
        self.prior, self.nodes, self.memory_budget = prior, nodes, memory_budget
        self.stats, self.shapes, self.progress = stats, shapes, progress
        self.engine, self.ray_options = engine, ray_options
        self.cache_planner, self.batch_form = cache_planner, batch_form
        self.source = source  # DATA, a StatsSet or a statistics file: source-relative
        self.runner = MeasureRunner(provider, opt_level, threads, shared_arena)
        self._source: StatsSet | None = None  # the source moments, once known
        self._source_description: str | None = None
        self._written: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}

    def call(self, model: onnx.ModelProto) -> PassResult:
        start = time.perf_counter()
        work = onnx.ModelProto()
        work.CopyFrom(model)
        targets, skipped = find_batchnorms(work, self.nodes)
        how = "saved statistics" if self.stats is not None else f"DATA, {self.engine} engine"
        logger.info(
            "reestimate: %d BN(s) selected, %d skipped; %s mode from %s%s",
            len(targets), len(skipped), self.mode, how,
            "" if self.source is None else ", source-relative",
        )  # fmt: skip
        writer = ParamWriter(work)
        for target in targets:  # source-relative may rescale a clamped channel (scale, slot 1)
            writer.privatise(target, (3, 4) if self.source is None else (1, 3, 4))
        report = ReestimateReport(
            self.mode, prior=self.prior, memory_budget=self.memory_budget, skipped=skipped
        )
        self._source, self._source_description, self._written = None, None, {}
        if self.stats is not None:
            measured = self._apply_saved(targets, writer, report)
        elif self.engine == "ray":
            measured = self._measure_on_ray(work, targets, writer, report)
        else:
            with self.runner.scope():
                measured = self._measure(work, targets, writer, report)
        report.stats = StatsSet(report.mode, measured, report.samples, self._source)
        writer.finish()
        for t in targets:
            new_mean, new_var, _ = self._written[t.key]
            change = BnChange(t.key, t.channels, t.wave, measured[t.key].count,
                              t.params.mean, new_mean, t.params.var, new_var)  # fmt: skip
            report.bns.append(change)
        if self._source is not None:
            clamped = {k: v[2] for k, v in self._written.items()}
            summary = source_summary(self._source, self._source_description, clamped)
            report.extras["source_relative"] = summary
        report.waves = max((t.wave for t in targets), default=0)
        report.session = self.runner.session_info
        report.seconds = time.perf_counter() - start
        return PassResult(work, report)

    def _write(self, writer: ParamWriter, target: BnTarget, moments: Moments, samples: int) -> None:
        """Write one BN's new statistics: blended with a prior, or source-relative."""
        clamped = 0
        if self._source is None:
            mean, var = blend(target.params.mean, target.params.var, moments, self.prior, samples)
        else:
            p, source = target.params, self._source.entries[target.key]
            new = compose(p.mean, p.var, p.scale, target.view.epsilon, source, moments,
                          self.prior, samples)  # fmt: skip
            mean, var, clamped = new.mean, new.var, new.clamped
            if new.scale is not None:
                writer.write(target, 1, new.scale)
        writer.write(target, 3, mean)
        writer.write(target, 4, var)
        self._written[target.key] = (mean, var, clamped)

    def _apply_saved(self, targets, writer, report) -> dict[str, Moments]:
        saved = self.stats if isinstance(self.stats, StatsSet) else StatsSet.load(self.stats)
        report.stats_file = None if isinstance(self.stats, StatsSet) else str(self.stats)
        expected = {t.key: t.channels for t in targets}
        if self.nodes is None and saved.channels != expected:
            saved.check_against(expected)
        entries = {k: saved.entries[k] for k in expected if k in saved.entries}
        StatsSet(saved.mode, entries, saved.samples).check_against(expected)
        if saved.mode != self.mode and saved.mode in MODES:
            report.mode = saved.mode
        self._source = resolve_source(self, report.mode, expected, saved.source, None, None)[0]
        report.samples = saved.samples
        label = report.stats_file or "the statistics"
        for t in targets:
            count = entries[t.key].count
            if count < MIN_SAMPLES:  # a variance needs two values; fewer would write NaN
                raise DataError(
                    f"{label}: BatchNormalization '{t.key}' has {count} value(s) per channel; "
                    f"statistics need at least {MIN_SAMPLES}"
                )
        for t in targets:
            self._write(writer, t, entries[t.key], saved.samples)
        return entries

    def _measure(self, work, targets, writer, report) -> dict[str, Moments]:
        feeds = open_data(
            self.data, work, samples=self.samples, batch_size=self.batch_size, shapes=self.shapes
        )
        report.data, report.data_notes, report.batch_size = (
            feeds.description, feeds.notes, feeds.batch_size
        )  # fmt: skip
        self._measure_source(work, targets)

        def on_wave(wave: list[BnTarget], moments: dict[str, Moments]) -> None:
            check_samples(feeds.seen_samples)
            for t in wave:
                self._write(writer, t, moments[t.key], feeds.seen_samples)

        measured = measure(
            work, targets, feeds, on_wave, mode=self.mode, runner=self.runner,
            memory_budget=self.memory_budget, planner=self.cache_planner,
            batch_form=self.batch_form, progress=self.progress, stats=report.run,
        )  # fmt: skip
        report.samples, report.batches = feeds.seen_samples, report.run.batches
        return measured

    def _measure_on_ray(self, work, targets, writer, report) -> dict[str, Moments]:
        check_sample_limit(self.samples)
        self._measure_source(work, targets)  # in this process, as locally

        def on_wave(wave: list[BnTarget], moments: dict[str, Moments], samples: int) -> None:
            check_samples(samples)
            for t in wave:
                self._write(writer, t, moments[t.key], samples)

        run = measure_on_ray(
            work, targets, self.data, on_wave, mode=self.mode, batch_size=self.batch_size,
            samples=self.samples, memory_budget=self.memory_budget, nodes=self.nodes,
            runner=self.runner, options=self.ray_options or RayOptions(),
        )  # fmt: skip
        report.data, report.batch_size = describe_data(self.data, run), self.batch_size
        report.samples, report.batches, report.run.passes = run.samples, run.batches, run.waves
        report.extras["engine"] = run.engine_section()
        return run.moments

    def _measure_source(self, work: onnx.ModelProto, targets: list[BnTarget]) -> None:
        """The source moments of source-relative adaptation (a `source` option), if any."""
        expected = {t.key: t.channels for t in targets}
        found = resolve_source(self, self.mode, expected, None, work, targets)
        self._source, self._source_description = found


def reestimate(model: onnx.ModelProto, data: Any = None, **options: Any) -> PassResult:
    """Re-estimate the BN statistics of `model` on `data` (see ReestimatePass for options)."""
    return ReestimatePass(data, **options)(model)


__all__ = ["ReestimatePass", "ReestimateReport", "reestimate"]
