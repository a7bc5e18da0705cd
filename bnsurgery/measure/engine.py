"""The local measuring engine: one call that measures the input statistics of target BNs on
DATA in this process, in either mode.

- `exact` (AdaBN, the default): wave by wave, each BN in inference mode once every BN upstream
  of it holds its new statistics (bnsurgery.measure.exact);
- `batch`: one pass with every BN on its batch statistics (bnsurgery.measure.batch).

Either way, `on_wave(wave_targets, moments)` is called once the moments of those targets are
final (once per wave in exact mode, once in batch mode): that is where a caller writes the new
parameters into the model, before anything downstream is measured.
"""

from __future__ import annotations

import onnx

from bnsurgery.measure.batch import measure_batch_mode
from bnsurgery.measure.cache import DEFAULT_MEMORY_BUDGET, CachePlanner
from bnsurgery.measure.exact import OnWave, measure_waves
from bnsurgery.measure.feeds import Feeds, Progress
from bnsurgery.measure.runner import MeasureRunner, RunStats
from bnsurgery.measure.targets import BnTarget
from bnsurgery.stats import Moments

MODES = ("exact", "batch")


def measure(
    model: onnx.ModelProto,
    targets: list[BnTarget],
    feeds: Feeds,
    on_wave: OnWave,
    *,
    mode: str,
    runner: MeasureRunner,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    planner: CachePlanner | None = None,
    batch_form: str = "auto",
    single_wave: bool = False,
    progress: Progress | None = None,
    stats: RunStats | None = None,
) -> dict[str, Moments]:
    """The input moments of every target on `feeds`, measured in `mode` (see the module
    docstring); `single_wave` measures every target on the model as it is (exact mode)."""
    if mode == "batch":
        measured = measure_batch_mode(
            model, targets, feeds, runner=runner, form=batch_form, progress=progress, stats=stats
        )
        on_wave(targets, measured)
        return measured
    return measure_waves(
        model,
        targets,
        feeds,
        on_wave,
        runner=runner,
        memory_budget=memory_budget,
        planner=planner,
        single_wave=single_wave,
        progress=progress,
        stats=stats,
    )
