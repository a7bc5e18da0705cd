"""The robustness workflow in one call: insert -> calibrate on SOURCE -> re-estimate on TARGET
-> fold back.

- A model that has BNs keeps them. With SOURCE, the change from SOURCE to TARGET is composed
  into their stored statistics (source-relative adaptation, bnsurgery.passes.source_relative);
  without it, plain re-estimation on TARGET replaces them. Nothing is folded: the output has
  the input's nodes.
- A model without BN (folded by its exporter) gets identity BNs after its Conv /
  ConvTranspose / Gemm / MatMul nodes, calibrated on SOURCE (DESIGN.md §5), re-estimated on
  TARGET, and, with `fold=True` (the default), folded back into the weights with
  `bnsurgery.fold`: the output has the same nodes as the input, only new weights.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import onnx

from bnsurgery.errors import UsageError
from bnsurgery.measure.cache import DEFAULT_MEMORY_BUDGET
from bnsurgery.measure.runner import MEASURE_OPT_LEVEL
from bnsurgery.passes import PassResult


@dataclass
class AdaptReport:
    """Each step's report, and the node counts that `fold` promises to keep."""

    inserted: Any = None  # InsertReport, when the model had no BN
    reestimate: Any = None  # ReestimateReport
    fold: Any = None  # the fold pass's report, when folded back
    nodes_before: int = 0
    nodes_after: int = 0
    bns_before: int = 0
    bns_after: int = 0
    folded: bool = False
    notes: tuple[str, ...] = ()
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "inserted": self.inserted.to_dict() if self.inserted is not None else None,
            "reestimate": self.reestimate.to_dict() if self.reestimate is not None else None,
            "fold": self.fold.to_dict() if self.fold is not None else None,
            "folded": self.folded,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "bns_before": self.bns_before,
            "bns_after": self.bns_after,
            "notes": list(self.notes),
            "seconds": round(self.seconds, 4),
        }


def _count_bns(model: onnx.ModelProto) -> int:
    return sum(1 for n in model.graph.node if n.op_type == "BatchNormalization")


def adapt(
    model: onnx.ModelProto,
    target: Any,
    *,
    source: Any = None,
    fold: bool = True,
    mode: str = "exact",
    prior: float | None = None,
    samples: int | None = None,
    batch_size: int | None = None,
    after: str | Sequence[str] | None = None,
    nodes: str | None = None,
    include_outputs: bool = False,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    shapes: Mapping[str, list[int]] | None = None,
    provider: str = "cpu",
    opt_level: str = MEASURE_OPT_LEVEL,
    shared_arena: bool = True,
    progress: Any = None,
) -> PassResult:
    """Adapt `model` to TARGET's input distribution by re-estimating BN statistics.

    `nodes` selects the nodes to insert BNs after (model without BN) or the BNs to
    re-estimate (model with BN). `samples` and `batch_size` apply to both data sets.
    """
    from bnsurgery.passes.insert import insert
    from bnsurgery.passes.reestimate import ReestimatePass

    start = time.perf_counter()
    report = AdaptReport(nodes_before=len(model.graph.node), bns_before=_count_bns(model))
    notes: list[str] = []
    work = model
    reestimate_nodes = nodes
    relative_to = None  # source-relative re-estimation of a model's own BNs
    if report.bns_before == 0:
        if source is None:
            raise UsageError(
                "the model has no BatchNormalization: --source DATA is needed to calibrate "
                "the BNs adapt inserts"
            )
        inserted = insert(
            work,
            after=after,
            nodes=nodes,
            calibrate=source,
            include_outputs=include_outputs,
            samples=samples,
            batch_size=batch_size,
            shapes=shapes,
            provider=provider,
            opt_level=opt_level,
            progress=progress,
        )
        report.inserted = inserted.report
        names = inserted.report.bn_names  # type: ignore[attr-defined]
        if not names:
            reasons = sorted({s["reason"] for s in inserted.report.skipped})  # type: ignore[attr-defined]
            raise UsageError(f"no BN could be inserted (skipped: {', '.join(reasons)})")
        work = inserted.model
        reestimate_nodes = "^(" + "|".join(_escape(n) for n in names) + ")$"
    else:
        relative_to = source
        if source is None:
            notes.append(
                "plain re-estimation: the stored statistics are replaced by TARGET's; give "
                "--source with clean data of your own to adapt relative to it"
            )
        if fold:
            notes.append("the model's own BNs are kept (only BNs adapt inserts are folded)")
    result = ReestimatePass(
        target,
        mode=mode,
        samples=samples,
        batch_size=batch_size,
        prior=prior,
        nodes=reestimate_nodes,
        source=relative_to,
        memory_budget=memory_budget,
        shapes=shapes,
        provider=provider,
        opt_level=opt_level,
        shared_arena=shared_arena,
        progress=progress,
    )(work)
    report.reestimate = result.report
    work = result.model
    if fold and report.inserted is not None:
        import bnsurgery

        folded = bnsurgery.fold(work)
        report.fold = folded.report
        work = folded.model
        report.folded = True
    report.nodes_after = len(work.graph.node)
    report.bns_after = _count_bns(work)
    if report.folded and report.nodes_after != report.nodes_before:
        notes.append(
            f"{report.bns_after} inserted BN(s) could not be folded back "
            f"({report.nodes_before} nodes in, {report.nodes_after} out); see the fold report"
        )
    report.notes = tuple(notes)
    report.seconds = time.perf_counter() - start
    return PassResult(work, report)


def _escape(name: str) -> str:
    import re

    return re.escape(name)
