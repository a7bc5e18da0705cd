"""The batch-statistics engine: one pass in which every BN normalises with its batch's
statistics (torch's train-mode forward, as in `torch.optim.swa_utils.update_bn`), rewritten
into ONNX ops so it runs on any EP. The stored statistics are the pooled population moments
over all samples.

Two forms of the rewritten BN (bnsurgery.measure.probes): on ONNX Runtime's CPU provider, the
BN itself in training mode (`training_mode_rewrite`, three passes over its input); elsewhere,
where that form does not apply, or with `form="centred"`, the per-sample centred rewrite
(`batch_norm_rewrite`, float64-level accuracy: docs/reestimate.md, "Accuracy").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import numpy as np
import onnx

from bnsurgery.errors import BadInputError, DataError, UsageError
from bnsurgery.measure.feeds import MIN_SAMPLES, Feeds, Progress, feed_size
from bnsurgery.measure.plan import Plan
from bnsurgery.measure.probes import (
    Probe,
    batch_norm_rewrite,
    nonfinite_message,
    submodel,
    tensor_types,
    training_mode_rewrite,
)
from bnsurgery.measure.runner import MeasureRunner, RunStats, run_batch
from bnsurgery.measure.targets import BnTarget
from bnsurgery.model.graph import NameGenerator, default_opset, node_inputs_with_implicit
from bnsurgery.stats import Moments

logger = logging.getLogger(__name__)

# "auto": training-mode BNs where the runner runs them (the CPU EP), else the centred rewrite
BATCH_FORMS = ("auto", "centred")


def measure_batch_mode(
    model: onnx.ModelProto,
    targets: list[BnTarget],
    feeds: Feeds,
    *,
    runner: MeasureRunner,
    form: str = "auto",
    progress: Progress | None = None,
    stats: RunStats | None = None,
) -> dict[str, Moments]:
    """One pass with every target BN in batch-statistics mode; pooled moments per BN."""
    if form not in BATCH_FORMS:
        expected = " or ".join(BATCH_FORMS)
        raise UsageError(f"unknown batch form '{form}' (expected {expected})", option="batch_form")
    clock = time.perf_counter()
    stats = stats if stats is not None else RunStats()
    plan = Plan.build(model, targets, single_wave=True)
    stats.model_nodes = sum(plan.dynamic)
    opset = default_opset(model.opset_import)
    if opset < 7:
        raise BadInputError(
            f"{{option}} batch needs opset >= 7 (the model has opset {opset})", option="mode"
        )
    names = NameGenerator(model)
    types = tensor_types(model) if opset >= 15 else {}  # below 15, X has the params' dtype
    by_node = {id(t.node): t for t in targets}
    one_node = form == "auto" and runner.runs_training_mode_bn
    probes: dict[int, Probe] = {}
    # every target runs, even a last BN whose output nothing measured reads
    run = set(plan.needed) | {plan.nodes.index(t.node) for t in targets}
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    for i in sorted(run | plan.static_closure(run)):
        node = plan.nodes[i]
        target = by_node.get(id(node))
        if target is None:
            nodes.append(node)
            continue
        x_dtype = types.get(target.x) or target.dtypes[0]
        probe = training_mode_rewrite(target, x_dtype, opset, names) if one_node else None
        probe = probe or batch_norm_rewrite(target, x_dtype, opset, names)
        probes[i] = probe
        nodes.extend(probe.nodes)
        inits.extend(probe.initializers)
    ordered = [probes[i] for i in sorted(probes)]
    single = sum(1 for p in ordered if p.nodes[0].op_type == "BatchNormalization")
    logger.info(
        "batch mode: %d BN(s) in one pass over %d node(s), %d as training-mode BNs",
        len(ordered), stats.model_nodes, single,
    )  # fmt: skip
    outputs = [o for p in ordered for o in p.outputs]
    used = {n for node in nodes for n in node_inputs_with_implicit(node)}
    inputs = [v for name, v in plan.runtime_inputs.items() if name in used]
    session = runner.session(submodel(model, nodes, inputs, outputs, inits))
    stats.passes += 1
    stats.node_evaluations += len([i for i in run if plan.dynamic[i]])
    acc = {p.target.key: Moments.zeros(p.target.channels) for p in ordered}
    feed_names = [v.name for v in inputs]
    b = 0
    for batch in merge_last(feeds):
        feed = {n: batch[n] for n in feed_names}
        arrays = run_batch(session, outputs, feed, b)
        for p in ordered:
            moments = p.decode([arrays[o] for o in p.outputs])
            if moments.count < MIN_SAMPLES:
                raise DataError(
                    f"BatchNormalization '{p.target.key}' sees {moments.count} value(s) per "
                    f"channel in batch {b}; batch statistics need at least {MIN_SAMPLES} "
                    "(use a larger {option})",
                    option="batch_size",
                )
            if not moments.is_finite():
                raise DataError(nonfinite_message(p.target, b, ordered, arrays))
            acc[p.target.key] = acc[p.target.key].merge(moments)
        b += 1
        if progress is not None:
            progress(1, feeds.expected_batches)
    stats.batches = b
    logger.info("batch pass: %d batch(es) in %.3f s", b, time.perf_counter() - clock)
    return acc


def merge_last(feeds: Feeds) -> Iterator[dict[str, np.ndarray]]:
    """Batches, with a final 1-sample batch joined to the one before it (one sample has no
    batch statistics; torch would refuse it)."""
    held: list[dict[str, np.ndarray]] = []
    for batch in feeds:
        held.append(batch)
        if len(held) > 2:
            yield held.pop(0)
    if len(held) == 2 and feed_size(held[1]) < MIN_SAMPLES:
        held = [{k: np.concatenate([held[0][k], held[1][k]]) for k in held[0]}]
    yield from held
