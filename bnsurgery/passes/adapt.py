"""The robustness workflow as one pass: insert -> calibrate on SOURCE -> re-estimate on TARGET
-> fold back.

- A model that has BNs keeps them. With SOURCE, the change from SOURCE to TARGET is composed
  into their stored statistics (source-relative adaptation, bnsurgery.passes.source_relative);
  without it, plain re-estimation on TARGET replaces them. Nothing is folded: the output has
  the input's nodes.
- A model without BN (folded by its exporter) gets identity BNs after its Conv /
  ConvTranspose / Gemm / MatMul nodes, calibrated on SOURCE (docs/design.md), re-estimated on
  TARGET (exactly the BNs the insert step reports, by name), and, with `fold=True` (the
  default), folded back into the weights and verified as `bnsurgery.fold` does: the output
  has the same nodes as the input, only new weights.

AdaptPass is registered as "adapt" (a pipeline step); `adapt()` is the same pass as a function.
Each step is a registered pass in its own right: InsertPass, ReestimatePass and FoldPass.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import onnx

from bnsurgery.errors import UsageError
from bnsurgery.measure.cache import DEFAULT_MEMORY_BUDGET
from bnsurgery.measure.runner import MEASURE_OPT_LEVEL
from bnsurgery.onnxio import load_model
from bnsurgery.passes import PassBase, PassResult, register
from bnsurgery.passes.fold import FoldPass
from bnsurgery.passes.fold.verify import verify_fold
from bnsurgery.passes.insert import InsertPass, InsertReport
from bnsurgery.passes.reestimate import ReestimatePass

logger = logging.getLogger(__name__)


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


@register("adapt")
class AdaptPass(PassBase):
    """Adapt to TARGET: insert and calibrate BNs if none, re-estimate them, fold them back.

    `nodes` selects the nodes to insert BNs after (model without BN) or the BNs to re-estimate
    (model with BN; a regex, or a collection of exact BN names). `samples` and `batch_size`
    apply to both data sets. Never in place.
    """

    name = "adapt"
    in_place = False

    def __init__(
        self,
        target: Any,
        *,
        source: Any = None,
        fold: bool = True,
        mode: str = "exact",
        prior: float | None = None,
        samples: int | None = None,
        batch_size: int | None = None,
        after: str | Sequence[str] | None = None,
        nodes: str | Sequence[str] | None = None,
        include_outputs: bool = False,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        shapes: Mapping[str, list[int]] | None = None,
        provider: str = "cpu",
        opt_level: str = MEASURE_OPT_LEVEL,
        shared_arena: bool = True,
        progress: Any = None,
    ) -> None:
        self.target, self.source, self.fold = target, source, fold
        self.after, self.nodes, self.include_outputs = after, nodes, include_outputs
        self.measuring: dict[str, Any] = dict(
            samples=samples, batch_size=batch_size, shapes=shapes, provider=provider,
            opt_level=opt_level, progress=progress,
        )  # fmt: skip
        self.reestimating: dict[str, Any] = dict(
            mode=mode, prior=prior, memory_budget=memory_budget, shared_arena=shared_arena
        )
        # Options either step refuses fail here, before any model is read.
        self._insert_pass()
        self._reestimate_pass(nodes, source)

    def _insert_pass(self) -> InsertPass:
        return InsertPass(
            self.after,
            nodes=self.nodes,
            calibrate=self.source,
            include_outputs=self.include_outputs,
            **self.measuring,
        )

    def _reestimate_pass(self, nodes: Any, relative_to: Any) -> ReestimatePass:
        return ReestimatePass(
            self.target, nodes=nodes, source=relative_to, **self.reestimating, **self.measuring
        )

    def requires(self, model: onnx.ModelProto) -> None:
        if self.source is None and _count_bns(model) == 0:
            raise UsageError(
                "the model has no BatchNormalization: {option} DATA is needed to calibrate "
                "the BNs adapt inserts",
                option="source",
            )

    def call(self, model: onnx.ModelProto) -> PassResult:
        start = time.perf_counter()
        report = AdaptReport(nodes_before=len(model.graph.node), bns_before=_count_bns(model))
        notes: list[str] = []
        work = model
        if report.bns_before == 0:
            logger.info("adapt: the model has no BN: inserting BNs calibrated on SOURCE")
            inserted = self._insert_pass()(work)
            insert_report: InsertReport = inserted.report  # type: ignore[assignment]
            report.inserted = insert_report
            names = insert_report.bn_names
            if not names:
                reasons = sorted({s["reason"] for s in insert_report.skipped})
                raise UsageError(f"no BN could be inserted (skipped: {', '.join(reasons)})")
            work = inserted.model
            # Exactly the BNs inserted, by name: the model had none of its own.
            reestimate = self._reestimate_pass(names, None)
        else:
            mode = "relative to SOURCE" if self.source is not None else "plain"
            logger.info("adapt: re-estimating the model's own BNs (%s)", mode)
            if self.source is None:
                notes.append(
                    "plain re-estimation: the stored statistics are replaced by TARGET's; give "
                    "--source with clean data of your own to adapt relative to it"
                )
            if self.fold:
                notes.append("the model's own BNs are kept (only BNs adapt inserts are folded)")
            reestimate = self._reestimate_pass(self.nodes, self.source)
        result = reestimate(work)
        report.reestimate = result.report
        work = result.model
        if self.fold and report.inserted is not None:
            folded = self._fold_back(work)
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

    @staticmethod
    def _fold_back(model: onnx.ModelProto) -> PassResult:
        """Fold, then verify the fold against its input, as `bnsurgery.fold` does."""
        checked = load_model(model)
        folded = FoldPass()(checked)
        verify_fold(checked, folded)
        logger.info(
            "adapt: folded back %d of the %d inserted BN(s)",
            _count_bns(model) - _count_bns(folded.model), _count_bns(model),
        )  # fmt: skip
        return folded


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
    nodes: str | Sequence[str] | None = None,
    include_outputs: bool = False,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    shapes: Mapping[str, list[int]] | None = None,
    provider: str = "cpu",
    opt_level: str = MEASURE_OPT_LEVEL,
    shared_arena: bool = True,
    progress: Any = None,
) -> PassResult:
    """Adapt `model` to TARGET's input distribution by re-estimating BN statistics: AdaptPass."""
    return AdaptPass(
        target,
        source=source,
        fold=fold,
        mode=mode,
        prior=prior,
        samples=samples,
        batch_size=batch_size,
        after=after,
        nodes=nodes,
        include_outputs=include_outputs,
        memory_budget=memory_budget,
        shapes=shapes,
        provider=provider,
        opt_level=opt_level,
        shared_arena=shared_arena,
        progress=progress,
    )(model)
