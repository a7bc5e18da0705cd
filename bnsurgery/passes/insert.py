"""Insert BatchNormalization after Conv / ConvTranspose / Gemm / MatMul (docs/design.md).

Many deployed models had their BN folded away by the exporter, which leaves nothing for
re-estimation to adapt. This pass puts a BN back after each selected node that is not already
followed by one:

- its channel count comes from the weights (Conv W[0], ConvTranspose W[1] * group, Gemm N,
  MatMul the last dim of B; shape inference otherwise), its dtype from the tensor it follows;
- its attributes suit the model's opset (`is_test=1` at opset 6; `epsilon` everywhere);
- the producer's output is renamed and the BN's output takes the old name, so consumers,
  graph outputs and value_info keep their names; new names are unique model-wide;
- without calibration the BN is the identity: mean 0, var 1 - eps, scale 1, B 0;
- `calibrate` measures each new BN's input (mu, sigma^2) on DATA and sets mean = mu,
  var = sigma^2, scale = sqrt(sigma^2 + eps), B = mu: still the identity, and on DATA's
  distribution the BN's normalised value has mean 0 and variance 1, so a later re-estimation
  on shifted data performs AdaBN on a model whose BN was folded away.

A MatMul followed by an Add of a constant bias gets its BN after the Add (the pattern fold
recognises, so folding it back restores the original node count). A node whose output is a
graph output (usually the classifier) is skipped unless `include_outputs` is set.

InsertPass (registered as "insert") does both steps; `insert()` is the same pass as a function,
so a pipeline's insert step and the API call run the same code.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnsurgery.errors import BadInputError, UsageError
from bnsurgery.measure.exact import measure_waves
from bnsurgery.measure.feeds import check_samples, open_data
from bnsurgery.measure.params import ParamWriter
from bnsurgery.measure.report import BnChange, ReestimateReport
from bnsurgery.measure.runner import MEASURE_OPT_LEVEL, MeasureRunner
from bnsurgery.measure.targets import compile_nodes, find_batchnorms
from bnsurgery.model.bn import DEFAULT_EPSILON, FLOAT_TYPES
from bnsurgery.model.edit import add_initializer
from bnsurgery.model.graph import GraphIndex, NameGenerator, iter_scopes
from bnsurgery.passes import PassBase, PassResult, register
from bnsurgery.stats import StatsSet

logger = logging.getLogger(__name__)

DEFAULT_AFTER = ("Conv", "ConvTranspose", "Gemm", "MatMul")
SUPPORTED_AFTER = frozenset(DEFAULT_AFTER)


@dataclass
class InsertReport:
    """Every candidate node: the BN inserted after it, or why none was."""

    after: tuple[str, ...]
    epsilon: float
    inserted: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    calibration: Any = None  # a ReestimateReport when calibrated
    seconds: float = 0.0

    @property
    def bn_names(self) -> list[str]:
        return [entry["bn"] for entry in self.inserted]

    def to_dict(self) -> dict[str, Any]:
        return {
            "after": list(self.after),
            "epsilon": self.epsilon,
            "inserted": list(self.inserted),
            "skipped": list(self.skipped),
            "calibration": self.calibration.to_dict() if self.calibration is not None else None,
            "seconds": round(self.seconds, 4),
        }


def parse_after(after: str | Sequence[str] | None) -> tuple[str, ...]:
    """`Conv,Gemm` (or a sequence) to a tuple of op types; unknown ops are a usage error."""
    if after is None:
        return DEFAULT_AFTER
    items = after.split(",") if isinstance(after, str) else list(after)
    ops = tuple(dict.fromkeys(i.strip() for i in items if i.strip()))
    unknown = [op for op in ops if op not in SUPPORTED_AFTER]
    if unknown or not ops:
        raise UsageError(
            f"{{option}} {','.join(unknown) or repr(after)}: BN can follow only "
            f"{', '.join(DEFAULT_AFTER)}",
            option="after",
        )
    return ops


@dataclass
class _Candidate:
    node: onnx.NodeProto
    anchor: onnx.NodeProto  # the node whose output the BN follows (an Add after a MatMul)
    tensor: str
    channels: int
    dtype: int


@register("insert")
class InsertPass(PassBase):
    """Insert identity BatchNormalization nodes; never in place.

    With `calibrate` (DATA), each new BN is then set to the identity on DATA's distribution:
    its statistics are DATA's (calibrate_inserted)."""

    name = "insert"
    in_place = False

    def __init__(
        self,
        after: str | Sequence[str] | None = None,
        *,
        nodes: str | Sequence[str] | None = None,
        calibrate: Any = None,
        epsilon: float = DEFAULT_EPSILON,
        include_outputs: bool = False,
        samples: int | None = None,
        batch_size: int | None = None,
        shapes: Mapping[str, list[int]] | None = None,
        provider: str = "cpu",
        opt_level: str = MEASURE_OPT_LEVEL,
        progress: Any = None,
    ) -> None:
        if not epsilon > 0:
            raise UsageError(f"{{option}} must be > 0, got {epsilon}", option="epsilon")
        self.after = parse_after(after)
        self.nodes = nodes
        self.pattern = compile_nodes(nodes)
        self.epsilon = float(epsilon)
        self.include_outputs = include_outputs
        self.calibrate = calibrate  # DATA: calibrate the new BNs on it (None: exact identities)
        self.samples, self.batch_size, self.shapes = samples, batch_size, shapes
        self.provider, self.opt_level, self.progress = provider, opt_level, progress

    def call(self, model: onnx.ModelProto) -> PassResult:
        start = time.perf_counter()
        work = onnx.ModelProto()
        work.CopyFrom(model)
        report = InsertReport(self.after, self.epsilon)
        scope = next(iter_scopes(work))
        index = GraphIndex(scope)
        shapes = _inferred(work)
        candidates: list[_Candidate] = []
        considered = 0
        for node in scope.nodes:
            if node.op_type not in self.after or node.domain not in ("", "ai.onnx"):
                continue
            label = node.name or node.output[0]
            if self.pattern is not None and not self.pattern.search(label):
                continue
            considered += 1
            found = self._candidate(index, node, shapes)
            if isinstance(found, str):
                logger.info("insert: no BN after %s '%s' (%s)", node.op_type, label, found)
                report.skipped.append({"node": label, "op": node.op_type, "reason": found})
            else:
                candidates.append(found)
        if considered == 0:
            if self.pattern is not None:
                raise BadInputError(
                    f"{{option}} '{self.nodes}' matches no {'/'.join(self.after)} node",
                    option="nodes",
                )
            has_bn = any(n.op_type == "BatchNormalization" for n in scope.nodes)
            raise BadInputError(
                f"the model has no {'/'.join(self.after)} node to insert a BN after"
                + ("" if has_bn else " (and no BatchNormalization either)")
            )
        if candidates and scope.opset < 6:
            raise BadInputError(
                f"opset {scope.opset} predates BatchNormalization-6; convert the model first"
            )
        self._insert(work, scope.opset, candidates, report)
        if self.calibrate is not None and report.inserted:
            report.calibration = calibrate_inserted(
                work,
                report.bn_names,
                self.calibrate,
                samples=self.samples,
                batch_size=self.batch_size,
                shapes=self.shapes,
                provider=self.provider,
                opt_level=self.opt_level,
                progress=self.progress,
            )
        report.seconds = time.perf_counter() - start
        return PassResult(work, report, modified=bool(candidates))

    # -- finding -------------------------------------------------------------------------
    def _candidate(
        self, index: GraphIndex, node: onnx.NodeProto, shapes: Mapping[str, tuple]
    ) -> _Candidate | str:
        anchor = node
        if node.op_type == "MatMul":
            anchor = _bias_add(index, node) or node
        tensor = anchor.output[0]
        if any(
            c.op_type == "BatchNormalization" and c.input and c.input[0] == tensor
            for c in index.consumers_of(tensor)
        ):
            return "followed-by-bn"
        if index.is_graph_output(tensor) and not self.include_outputs:
            return "produces-graph-output"
        if node.op_type == "MatMul":
            rank = len(shapes[tensor][1]) if tensor in shapes and shapes[tensor][1] else None
            if rank is None:
                return "unknown-rank"
            if rank != 2:
                return "channel-axis-mismatch"
        channels = _channels(index, node, shapes.get(tensor))
        if channels is None:
            return "unknown-channels"
        dtype = _dtype(index, node, shapes.get(tensor))
        if dtype not in FLOAT_TYPES:
            return "unsupported-dtype"
        return _Candidate(node, anchor, tensor, channels, dtype)

    # -- rewriting -----------------------------------------------------------------------
    def _insert(
        self,
        model: onnx.ModelProto,
        opset: int,
        candidates: list[_Candidate],
        report: InsertReport,
    ) -> None:
        if not candidates:
            return
        graph = model.graph
        names = NameGenerator(model)
        after_anchor: dict[int, onnx.NodeProto] = {}
        value_info = {v.name: v for v in graph.value_info}
        for cand in candidates:
            base = cand.node.name or cand.node.op_type
            bn_name = names(f"{base}/BatchNormalization")
            pre = names(f"{cand.tensor}_before_bn")
            np_dtype = helper.tensor_dtype_to_np_dtype(cand.dtype)
            c = cand.channels
            values = {
                "scale": np.ones(c),
                "B": np.zeros(c),
                "mean": np.zeros(c),
                "var": np.full(c, 1.0 - self.epsilon),
            }
            param_names = []
            for label, value in values.items():
                pname = names(f"{bn_name}.{label}")
                add_initializer(
                    model.graph,
                    numpy_helper.from_array(value.astype(np_dtype), pname),
                    ir_version=model.ir_version,
                )
                param_names.append(pname)
            attrs: dict[str, Any] = {"epsilon": self.epsilon}
            if opset < 7:
                attrs["is_test"] = 1
            bn = helper.make_node(
                "BatchNormalization", [pre, *param_names], [cand.tensor], name=bn_name, **attrs
            )
            cand.anchor.output[0] = pre
            if cand.tensor in value_info:
                copy = onnx.ValueInfoProto()
                copy.CopyFrom(value_info[cand.tensor])
                copy.name = pre
                graph.value_info.append(copy)
            after_anchor[id(cand.anchor)] = bn
            logger.info(
                "insert: BN '%s' after %s '%s' on '%s' (%d channels)",
                bn_name, cand.node.op_type, cand.node.name or cand.node.output[0], cand.tensor, c,
            )  # fmt: skip
            report.inserted.append(
                {
                    "node": cand.node.name or cand.node.output[0],
                    "op": cand.node.op_type,
                    "after": cand.anchor.name or cand.anchor.op_type,
                    "tensor": cand.tensor,
                    "bn": bn_name,
                    "channels": c,
                    "dtype": helper.tensor_dtype_to_string(cand.dtype).removeprefix("TensorProto."),
                }
            )
        ordered: list[onnx.NodeProto] = []
        for node in graph.node:
            ordered.append(node)
            bn = after_anchor.get(id(node))
            if bn is not None:
                ordered.append(bn)
        del graph.node[:]
        graph.node.extend(ordered)


def _inferred(model: onnx.ModelProto) -> dict[str, tuple[int, tuple[int | None, ...] | None]]:
    """{tensor: (elem_type, dims)} from ONNX shape inference (best effort)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # shape inference is a convenience here, never a requirement
        inferred = model
    found: dict[str, tuple[int, tuple[int | None, ...] | None]] = {}
    graph = inferred.graph
    for value in [*graph.input, *graph.value_info, *graph.output]:
        tensor = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            continue
        dims = None
        if tensor.HasField("shape"):
            dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
        found[value.name] = (tensor.elem_type, dims)
    return found


def _bias_add(index: GraphIndex, matmul: onnx.NodeProto) -> onnx.NodeProto | None:
    """The Add of a constant bias right after a MatMul, when it is the MatMul's only user."""
    out = matmul.output[0]
    users = index.consumers_of(out)
    if len(users) != 1 or index.is_graph_output(out):
        return None
    add = users[0]
    if add.op_type != "Add" or len(add.input) != 2:
        return None
    other = add.input[1] if add.input[0] == out else add.input[0]
    value = index.constant(other)
    if value is None or value.ndim > 1:
        return None
    return add


def _channels(
    index: GraphIndex, node: onnx.NodeProto, shape: tuple[int, tuple | None] | None
) -> int | None:
    weight = index.constant(node.input[1]) if len(node.input) > 1 else None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    found = None
    if weight is not None and weight.ndim >= 1:
        if node.op_type == "Conv" and weight.ndim >= 3:
            found = int(weight.shape[0])
        elif node.op_type == "ConvTranspose" and weight.ndim >= 3:
            found = int(weight.shape[1]) * int(attrs.get("group", 1))
        elif node.op_type == "Gemm" and weight.ndim == 2:
            found = int(weight.shape[0] if attrs.get("transB", 0) else weight.shape[1])
        elif node.op_type == "MatMul" and weight.ndim >= 2:
            found = int(weight.shape[-1])
    if found is None and shape is not None and shape[1] and len(shape[1]) >= 2:
        dim = shape[1][1] if node.op_type != "MatMul" else shape[1][-1]
        found = int(dim) if dim else None
    return found


def _dtype(
    index: GraphIndex, node: onnx.NodeProto, shape: tuple[int, tuple | None] | None
) -> int | None:
    if shape is not None and shape[0]:
        return shape[0]
    for name in node.input[:2]:
        dtype = index.tensor_dtype(name)
        if dtype:
            return dtype
    return None


def calibrate_inserted(
    model: onnx.ModelProto,
    bn_names: Sequence[str],
    data: Any,
    *,
    samples: int | None = None,
    batch_size: int | None = None,
    shapes: Mapping[str, list[int]] | None = None,
    provider: str = "cpu",
    opt_level: str = MEASURE_OPT_LEVEL,
    progress: Any = None,
) -> Any:
    """Set each named BN to the identity on DATA's distribution (in place); its report.

    All the BNs are measured in one pass: they are identities before and after, so no BN's
    input depends on another's calibration.
    """

    start = time.perf_counter()
    wanted = set(bn_names)
    targets = [t for t in find_batchnorms(model)[0] if t.key in wanted]
    missing = wanted - {t.key for t in targets}
    if missing:
        raise BadInputError(f"cannot calibrate BN {sorted(missing)[0]!r}: not found")
    writer = ParamWriter(model)
    for target in targets:
        writer.privatise(target, (1, 2, 3, 4))
    feeds = open_data(data, model, samples=samples, batch_size=batch_size, shapes=shapes)
    report = ReestimateReport("calibrate", data=feeds.description, data_notes=feeds.notes)
    old = {t.key: (t.params.mean.copy(), t.params.var.copy()) for t in targets}

    def on_wave(wave, moments) -> None:
        check_samples(feeds.seen_samples)
        for t in wave:
            m = moments[t.key]
            var = m.var
            writer.write(t, 1, np.sqrt(var + t.view.epsilon))
            writer.write(t, 2, m.mean)
            writer.write(t, 3, m.mean)
            writer.write(t, 4, var)

    runner = MeasureRunner(provider, opt_level)
    measured = measure_waves(
        model,
        targets,
        feeds,
        on_wave,
        runner=runner,
        single_wave=True,
        progress=progress,
        stats=report.run,
    )
    writer.finish()
    for t in targets:
        m = measured[t.key]
        logger.info(
            "insert: BN '%s' calibrated on %d samples (mean %.4g, variance %.4g, channel average)",
            t.key, feeds.seen_samples, float(np.mean(m.mean)), float(np.mean(m.var)),
        )  # fmt: skip
        report.bns.append(
            BnChange(
                t.key, t.channels, t.wave, m.count, old[t.key][0], m.mean, old[t.key][1], m.var
            )
        )
    report.samples, report.batches = feeds.seen_samples, report.run.batches
    report.batch_size = getattr(feeds.source, "batch_size", None)
    report.waves = 1
    report.session = runner.session_info
    report.stats = StatsSet("calibrate", measured, feeds.seen_samples)
    report.seconds = time.perf_counter() - start
    return report


def insert(
    model: onnx.ModelProto,
    *,
    after: str | Sequence[str] | None = None,
    nodes: str | Sequence[str] | None = None,
    calibrate: Any = None,
    epsilon: float = DEFAULT_EPSILON,
    include_outputs: bool = False,
    samples: int | None = None,
    batch_size: int | None = None,
    shapes: Mapping[str, list[int]] | None = None,
    provider: str = "cpu",
    opt_level: str = MEASURE_OPT_LEVEL,
    progress: Any = None,
) -> PassResult:
    """Insert BNs (identity), then calibrate them on `calibrate` DATA when given: InsertPass."""
    return InsertPass(
        after,
        nodes=nodes,
        calibrate=calibrate,
        epsilon=epsilon,
        include_outputs=include_outputs,
        samples=samples,
        batch_size=batch_size,
        shapes=shapes,
        provider=provider,
        opt_level=opt_level,
        progress=progress,
    )(model)
