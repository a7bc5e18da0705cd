"""Fold BatchNormalization (and per-channel constant Mul/Add/Sub/Div) into neighbouring linear ops.

Forward: the affine follows a Conv, ConvTranspose, Gemm, MatMul (+ constant Add) or another BN,
and is absorbed into that op's weights and bias. Backward: the affine precedes an unpadded Conv,
a Gemm or a MatMul, possibly through a Flatten/Reshape, and is absorbed into its input side.

Every skip condition is one named check raising `Refusal(reason)`, so each BN left in the model
carries a stable reason code (fold_report.REASONS). Arithmetic is float64 (fold_math); results are
cast back to the stored dtype with a range check. BNs are revisited until nothing changes, so a
chain BN -> BN -> Conv folds completely whatever the order.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from bnsurgery.model.bn import (
    BatchNormView,
    BnParams,
    affine,
    check_param_shapes,
    statistics_problem,
)
from bnsurgery.model.graph import FOLDABLE_OPS, GraphIndex, NameGenerator, Scope, iter_scopes
from bnsurgery.passes import PassBase, PassResult, register
from bnsurgery.passes.fold import arithmetic as fm
from bnsurgery.passes.fold.layout import LAYOUT_OPS, LayoutError, LayoutStep, channel_map
from bnsurgery.passes.fold.report import AffineFold, BnDecision, FoldReport, bn_label

LINEAR_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
AFFINE_OPS = frozenset({"Mul", "Add", "Sub", "Div"})
AFFINE_TARGETS = frozenset({"Conv", "ConvTranspose", "Gemm"})
NONLINEAR_OPS = frozenset(
    {
        "Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Clip", "Elu", "Selu", "Celu",
        "HardSigmoid", "HardSwish", "Softplus", "Softsign", "Gelu", "Mish", "ThresholdedRelu",
        "Swish", "Softmax", "LogSoftmax", "MaxPool", "Abs", "Exp", "Log", "Sqrt", "Pow",
    }
)  # fmt: skip
FLATTENING_OPS = frozenset({"Flatten", "Reshape"})


class Refusal(Exception):
    """One named reason not to fold, raised by the check that found it."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Site:
    """A per-channel affine y = s*x + t standing at one node (a BN, or an elementwise op)."""

    node: onnx.NodeProto
    x: str
    y: str
    s: np.ndarray
    t: np.ndarray

    def channels(self, n: int, what: str) -> tuple[np.ndarray, np.ndarray]:
        """(s, t) as n-channel vectors; a uniform affine (size 1) broadcasts."""
        if self.s.size == 1:
            return np.full(n, self.s.item()), np.full(n, self.t.item())
        if self.s.size != n:
            raise Refusal("channel-axis-mismatch", f"{self.s.size} channels here but {n} in {what}")
        return self.s, self.t


@dataclass
class Write:
    """A staged replacement of one node input by a new constant (applied only once all pass)."""

    node: onnx.NodeProto
    index: int
    value: np.ndarray  # already cast to the stored dtype
    hint: str


@dataclass
class Plan:
    """A complete fold, checked and computed, not yet applied."""

    target: onnx.NodeProto
    writes: list[Write] = field(default_factory=list)
    attributes: dict[str, float] = field(default_factory=dict)  # attributes of target to set
    become_gemm: bool = False  # MatMul -> Gemm(A, B', C')
    rewire: onnx.NodeProto | None = None  # backward: the node whose input becomes site.x
    # forward through Identity/Reshape/Transpose/Flatten: those nodes, upstream first
    chain: list[onnx.NodeProto] = field(default_factory=list)


def _attr(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _set_float_attr(node: onnx.NodeProto, name: str, value: float) -> None:
    for attr in node.attribute:
        if attr.name == name:
            attr.f = value
            return
    node.attribute.append(onnx.helper.make_attribute(name, value))


@register("fold")
class FoldPass(PassBase):
    """Fold BNs and per-channel affines into linear ops.

    Returns a new model, unless constructed with in_place=True: then the given model is rewritten
    and returned (the CLI does that when it needs no copy of the original, saving a full copy).
    """

    name = "fold"

    def __init__(
        self, *, backward: bool = True, affine: bool = True, in_place: bool = False
    ) -> None:
        self.backward = backward
        self.affine = affine
        self._in_place = in_place

    @property
    def in_place(self) -> bool:
        return self._in_place

    def call(self, model: onnx.ModelProto) -> PassResult:
        start = time.perf_counter()
        # In place, `original` is the model being rewritten: it is only read for tensor ranks,
        # which folding never changes (every name keeps its meaning and its rank).
        working = model if self.in_place else copy.deepcopy(model)
        folder = _ModelFolder(working, original=model, backward=self.backward, affine=self.affine)
        # Non-finite and out-of-range results are refused explicitly (cast_checked: "overflow"),
        # so numpy's own warnings about them would only be noise on stderr.
        with np.errstate(all="ignore"):
            report = folder.run()
        report.seconds = time.perf_counter() - start
        return PassResult(working, report, modified=bool(report.folded or report.affine_folds))


class _ModelFolder:
    def __init__(
        self, model: onnx.ModelProto, *, original: onnx.ModelProto, backward: bool, affine: bool
    ) -> None:
        self.model = model
        self.original = original
        self.backward = backward
        self.affine = affine
        self.names = NameGenerator(model)
        self._shapes: dict[str, tuple[int | None, ...]] | None = None
        self.detached: set[str] = set()  # inputs a fold stopped reading: cleanup candidates
        self.rewritten: set[str] = set()  # initializers rewritten in place: value_info is stale

    # -- shapes ---------------------------------------------------------------------------
    def shape(self, name: str) -> tuple[int | None, ...] | None:
        """The shape (None for unknown dims) of a tensor of the original model, if known.

        Names keep their meaning and shape when folded, so the original's shapes stay valid.
        """
        if self._shapes is None:
            self._shapes = _declared_shapes(self.original.graph)
            if self.original.ByteSize() < (1 << 30):
                try:
                    inferred = onnx.shape_inference.infer_shapes(self.original)
                    self._shapes = _declared_shapes(inferred.graph) | self._shapes
                except Exception:  # inference is a help, never a requirement
                    pass
        return self._shapes.get(name)

    def rank(self, name: str) -> int | None:
        shape = self.shape(name)
        return None if shape is None else len(shape)

    # -- the pass -------------------------------------------------------------------------
    def run(self) -> FoldReport:
        scopes = list(iter_scopes(self.model))
        report = FoldReport()
        report.nodes_before = sum(len(s.nodes) for s in scopes)
        report.bns_before = _count_bns(scopes)
        original_names = {n for s in scopes for n in s.defined_names()}
        indexes: dict[int, GraphIndex] = {}
        for scope in scopes:
            parent = indexes.get(id(scope.parent)) if scope.parent is not None else None
            indexes[id(scope)] = GraphIndex(scope, parent)
        folders = [_ScopeFolder(self, indexes[id(s)], report) for s in scopes]
        # Keyed by id(node); the node is kept in the value so its id stays unique.
        decisions: dict[int, tuple[onnx.NodeProto, BnDecision]] = {}
        changed = True
        while changed:
            changed = False
            for folder in folders:
                changed |= folder.sweep(decisions)
        report.entries = [decision for _, decision in decisions.values()]
        _cleanup(self.model, self.detached, self.rewritten)
        scopes = list(iter_scopes(self.model))
        report.nodes_after = sum(len(s.nodes) for s in scopes)
        report.bns_after = _count_bns(scopes)
        remaining = {n for s in scopes for n in s.defined_names()}
        report.tensor_map = {name: None for name in sorted(original_names - remaining)}
        return report


def _count_bns(scopes: list[Scope]) -> int:
    return sum(1 for s in scopes for n in s.nodes if n.op_type == "BatchNormalization")


def _declared_shapes(graph: onnx.GraphProto) -> dict[str, tuple[int | None, ...]]:
    shapes: dict[str, tuple[int | None, ...]] = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        tensor_type = value.type.tensor_type
        if value.type.HasField("tensor_type") and tensor_type.HasField("shape"):
            shapes[value.name] = tuple(
                d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim
            )
    for init in graph.initializer:
        shapes[init.name] = tuple(init.dims)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                shapes |= _declared_shapes(attr.g)
    return shapes


class _ScopeFolder:
    """Folding inside one scope, through its GraphIndex."""

    def __init__(self, owner: _ModelFolder, index: GraphIndex, report: FoldReport) -> None:
        self.owner = owner
        self.index = index
        self.scope = index.scope
        self.report = report

    # -- sweep ----------------------------------------------------------------------------
    def sweep(self, decisions: dict[int, tuple[onnx.NodeProto, BnDecision]]) -> bool:
        """One pass over the scope's nodes; True if anything was folded."""
        changed = False
        for node in list(self.scope.nodes):
            if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
                key = id(node)
                if key in decisions and decisions[key][1].action == "folded":
                    continue
                decision = self.fold_bn(node)
                decisions[key] = (node, decision)
                changed |= decision.action == "folded"
            elif self.owner.affine and node.op_type in AFFINE_OPS and node.domain == "":
                changed |= self.fold_elementwise(node)
        return changed

    def fold_bn(self, node: onnx.NodeProto) -> BnDecision:
        label = bn_label(node)
        decision = BnDecision(node=label, scope=self.scope.path, action="kept", reason="")
        try:
            site = self.bn_site(node)
        except Refusal as refusal:
            decision.reason, decision.detail = refusal.reason, refusal.detail
            return decision
        forward_fail = backward_fail = None
        try:
            plan = self.plan_forward(site)
            self.apply(site, plan, forward=True)
            return self._folded(decision, "folded", "forward", plan.target)
        except Refusal as refusal:
            forward_fail = refusal
        try:
            plan = self.plan_backward(site)
            if not self.owner.backward:
                raise Refusal("backward-disabled", f"could fold backward into {plan.target.name}")
            self.apply(site, plan, forward=False)
            return self._folded(decision, "folded-backward", "backward", plan.target)
        except Refusal as refusal:
            backward_fail = refusal
        chosen = _most_specific(forward_fail, backward_fail)
        decision.reason, decision.detail = chosen.reason, chosen.detail
        return decision

    @staticmethod
    def _folded(
        decision: BnDecision, reason: str, direction: str, target: onnx.NodeProto
    ) -> BnDecision:
        decision.action, decision.reason, decision.direction = "folded", reason, direction
        decision.target = target.name or target.output[0]
        decision.target_op = target.op_type
        return decision

    def fold_elementwise(self, node: onnx.NodeProto) -> bool:
        """Fold a per-channel constant Mul/Add/Sub/Div into an adjacent Conv/ConvTranspose/Gemm."""
        for forward in (True, False):
            try:
                neighbour = self._affine_neighbour(node, forward)
                site = self.elementwise_site(node, neighbour, forward)
                plan = self.plan_forward(site) if forward else self.plan_backward(site)
                if plan.target.op_type not in AFFINE_TARGETS or (
                    not forward and not self.owner.backward
                ):
                    continue
                self.apply(site, plan, forward=forward)
            except Refusal:
                continue
            self.report.affine_folds.append(
                AffineFold(
                    node=node.name or node.output[0],
                    op_type=node.op_type,
                    scope=self.scope.path,
                    direction="forward" if forward else "backward",
                    target=plan.target.name or plan.target.output[0],
                    target_op=plan.target.op_type,
                )
            )
            return True
        return False

    # -- sites ----------------------------------------------------------------------------
    def bn_site(self, node: onnx.NodeProto) -> Site:
        view = BatchNormView.of(node, self.scope.opset)
        if view.training_mode or view.extra_outputs_used(lambda n: self.index.use_count(n) > 0):
            raise Refusal("training-mode", "BN normalises with batch statistics")
        if not view.spatial:
            raise Refusal("per-activation-stats", "spatial=0 keeps statistics per activation")
        params = self.bn_params(view)
        problem = statistics_problem(params, view.epsilon)
        if problem:
            raise Refusal("bad-statistics", problem)
        s, t = affine(params, view.epsilon)
        if not (np.isfinite(s).all() and np.isfinite(t).all()):
            raise Refusal("overflow", "the affine of this BN is not finite in float64")
        return Site(node, view.x, view.y, s, t)

    def bn_params(self, view: BatchNormView) -> BnParams:
        values = []
        for label, name in zip(("scale", "B", "mean", "var"), view.param_names, strict=True):
            value = self.index.constant(name)
            if value is None:
                raise Refusal("not-constant", f"{label} '{name}' is not a constant")
            if value.dtype.kind != "f" and not _is_bfloat16(value):
                raise Refusal("unsupported-dtype", f"{label} '{name}' has dtype {value.dtype}")
            values.append(value)
        check_param_shapes(view.name or view.y, *values)
        return BnParams(*(v.astype(np.float64) for v in values))

    def elementwise_site(
        self, node: onnx.NodeProto, neighbour: onnx.NodeProto, forward: bool
    ) -> Site:
        """The per-channel affine of Mul/Add/Sub/Div with one constant operand, if it is one."""
        if len(node.input) != 2:
            raise Refusal("no-linear-neighbour")
        values = [self.index.constant(name) for name in node.input]
        if (values[0] is None) == (values[1] is None):
            raise Refusal("not-constant", "needs exactly one constant operand")
        const_pos = 0 if values[0] is not None else 1
        c = values[const_pos]
        if c is None or (c.dtype.kind != "f" and not _is_bfloat16(c)):
            raise Refusal("unsupported-dtype")
        rank = _tensor_rank_at(neighbour, self.index)
        vector = _channel_vector(c.astype(np.float64), rank)
        if vector is None:
            raise Refusal("channel-axis-mismatch", "constant is not per-channel")
        one, zero = np.ones_like(vector), np.zeros_like(vector)
        op = node.op_type
        if op == "Mul":
            s, t = vector, zero
        elif op == "Add":
            s, t = one, vector
        elif op == "Sub":
            s, t = (one, -vector) if const_pos == 1 else (-one, vector)
        elif const_pos == 1 and (vector != 0).all():  # Div(x, c)
            s, t = 1.0 / vector, zero
        else:
            raise Refusal("no-linear-neighbour", "Div by a tensor is not affine")
        x = node.input[1 - const_pos]
        return Site(node, x, node.output[0], s, t)

    def _affine_neighbour(self, node: onnx.NodeProto, forward: bool) -> onnx.NodeProto:
        if forward:
            candidates = [self.index.producer(n) for n in node.input]
        else:
            candidates = self.index.consumers_of(node.output[0])
        for candidate in candidates:
            if candidate is not None and candidate.op_type in AFFINE_TARGETS:
                return candidate
        raise Refusal("no-linear-neighbour")

    # -- forward --------------------------------------------------------------------------
    def plan_forward(self, site: Site) -> Plan:
        chain = self._layout_chain(site.x)
        head = self.index.producer(chain[0].input[0]) if chain else None
        if head is not None and head.output[0] == chain[0].input[0] and self._leads(head):
            for node in chain:
                self._require_single_use(node.output[0], node)
            plan = self._forward_into(self._site_through(site, chain, head), head)
            plan.chain = chain
            return plan
        producer = self.index.producer(site.x)
        if producer is None or producer.output[0] != site.x:
            raise Refusal("no-linear-neighbour", "its input is not produced by a linear op")
        return self._forward_into(site, producer)

    def _forward_into(self, site: Site, producer: onnx.NodeProto) -> Plan:
        op = producer.op_type
        foldable = op in LINEAR_OPS or op == "BatchNormalization" or op == "Add"
        if not foldable:
            between = self._nonlinear_path(site.x, upstream=True)
            if between:
                raise Refusal("nonlinear-between", f"{between} between it and a linear op")
            raise Refusal("no-linear-neighbour", f"its input comes from {op}")
        if op == "Add" and not self._is_matmul_bias_add(producer):
            raise Refusal("no-linear-neighbour", "its input comes from Add")
        self._require_single_use(producer.output[0], producer)
        if op == "Conv":
            return self._conv_forward(site, producer)
        if op == "ConvTranspose":
            return self._conv_transpose_forward(site, producer)
        if op == "Gemm":
            return self._gemm_forward(site, producer)
        if op == "MatMul":
            return self._matmul_forward(site, producer, bias_add=None)
        if op == "Add":
            matmul = self._matmul_of_bias_add(producer)
            self._require_single_use(matmul.output[0], matmul)
            return self._matmul_forward(site, matmul, bias_add=producer)
        return self._bn_forward(site, producer)

    def _require_single_use(self, name: str, producer: onnx.NodeProto) -> None:
        if self.index.is_graph_output(name):
            raise Refusal("producer-is-graph-output", f"'{name}' of {producer.op_type} is output")
        users = len(self.index.consumers_of(name))
        if users != 1:
            raise Refusal(
                "producer-has-other-consumers", f"'{name}' of {producer.op_type} has {users} users"
            )

    def _conv_forward(self, site: Site, conv: onnx.NodeProto) -> Plan:
        w, b = self.weight(conv, 1), self.optional_const(conv, 2)
        s, t = site.channels(w.shape[0], f"Conv '{conv.name}'")
        new_w, new_b = fm.conv_forward(w, b, s, t)  # W' is cast block by block
        return Plan(conv, self.writes(conv, (1, new_w, w.dtype, "W"), (2, new_b, w.dtype, "B")))

    def _conv_transpose_forward(self, site: Site, conv: onnx.NodeProto) -> Plan:
        w, b = self.weight(conv, 1), self.optional_const(conv, 2)
        group = int(_attr(conv, "group", 1))
        s, t = site.channels(w.shape[1] * group, f"ConvTranspose '{conv.name}'")
        new_w, new_b = fm.conv_transpose_forward(w, b, s, t, group)
        return Plan(conv, self.writes(conv, (1, new_w, w.dtype, "W"), (2, new_b, w.dtype, "B")))

    def _gemm_forward(self, site: Site, gemm: onnx.NodeProto) -> Plan:
        b_mat, c = self.weight(gemm, 1), self.optional_const(gemm, 2)
        trans_b = bool(_attr(gemm, "transB", 0))
        n = b_mat.shape[0 if trans_b else 1] if b_mat.ndim == 2 else -1
        s, t = site.channels(n, f"Gemm '{gemm.name}'")
        beta = float(_attr(gemm, "beta", 1.0))
        new_b, new_c = fm.gemm_forward(b_mat, c, s, t, trans_b=trans_b, beta=beta)
        writes = self.writes(gemm, (1, new_b, b_mat.dtype, "B"), (2, new_c, b_mat.dtype, "C"))
        return Plan(gemm, writes, attributes={"beta": 1.0})

    def _matmul_forward(
        self, site: Site, matmul: onnx.NodeProto, bias_add: onnx.NodeProto | None
    ) -> Plan:
        b_mat = self.weight(matmul, 1)
        if b_mat.ndim != 2 or self.owner.rank(matmul.input[0]) != 2:
            raise Refusal(
                "channel-axis-mismatch",
                "BN normalises axis 1 but MatMul's channels are its last axis; folds only 2-D",
            )
        s, t = site.channels(b_mat.shape[1], f"MatMul '{matmul.name}'")
        if bias_add is None:
            new_b, new_c = fm.matmul_forward(b_mat, None, s, t)
            writes = self.writes(matmul, (1, new_b, b_mat.dtype, "B"), (2, new_c, b_mat.dtype, "C"))
            return Plan(matmul, writes, become_gemm=True)
        bias_index = 1 if bias_add.input[0] == matmul.output[0] else 0
        bias = self.index.constant(bias_add.input[bias_index])
        assert bias is not None  # checked by _is_matmul_bias_add
        new_b, new_bias = fm.matmul_forward(b_mat, bias, s, t)
        writes = self.writes(matmul, (1, new_b, b_mat.dtype, "B"))
        writes += self.writes(bias_add, (bias_index, new_bias, bias.dtype, "bias"))
        return Plan(bias_add, writes)

    def _bn_forward(self, site: Site, bn: onnx.NodeProto) -> Plan:
        try:
            self.bn_site(bn)
        except Refusal as refusal:
            raise Refusal(
                "no-linear-neighbour", f"the BN before it stays ({refusal.reason})"
            ) from None
        gamma = self.index.constant(bn.input[1])
        beta = self.index.constant(bn.input[2])
        assert gamma is not None and beta is not None
        s, t = site.channels(gamma.shape[0], f"BatchNormalization '{bn.name}'")
        new_gamma, new_beta = fm.affine_forward(gamma, beta, s, t)
        return Plan(
            bn,
            self.writes(bn, (1, new_gamma, gamma.dtype, "scale"), (2, new_beta, beta.dtype, "B")),
        )

    def _is_matmul_bias_add(self, add: onnx.NodeProto) -> bool:
        try:
            self._matmul_of_bias_add(add)
        except Refusal:
            return False
        return True

    def _matmul_of_bias_add(self, add: onnx.NodeProto) -> onnx.NodeProto:
        for i, name in enumerate(add.input[:2]):
            producer = self.index.producer(name)
            other = add.input[1 - i] if len(add.input) == 2 else ""
            if producer is not None and producer.op_type == "MatMul" and other:
                bias = self.index.constant(other)
                if bias is not None and bias.ndim <= 2 and (bias.ndim < 2 or bias.shape[0] == 1):
                    return producer
        raise Refusal("no-linear-neighbour", "Add is not a MatMul bias")

    def _leads(self, head: onnx.NodeProto) -> bool:
        """An op a layout chain may lead back to: a linear op, a MatMul's bias Add, a BN."""
        if head.domain not in ("", "ai.onnx"):
            return False
        if head.op_type == "Add":
            return self._is_matmul_bias_add(head)
        return head.op_type in LINEAR_OPS or head.op_type == "BatchNormalization"

    def _layout_chain(self, name: str) -> list[onnx.NodeProto]:
        """The Identity/Reshape/Transpose/Flatten nodes right above `name`, upstream first."""
        chain: list[onnx.NodeProto] = []
        node = self.index.producer(name)
        while (
            node is not None
            and node.op_type in LAYOUT_OPS
            and node.domain in ("", "ai.onnx")
            and node.output[0] == name
            and node.input
            and len(chain) < 8
        ):
            chain.insert(0, node)
            name = node.input[0]
            node = self.index.producer(name)
        return chain

    def _site_through(self, site: Site, chain: list[onnx.NodeProto], head: onnx.NodeProto) -> Site:
        """The BN's affine as seen at the head's output: its vectors gathered per head channel
        (channel_map proves each head channel lands on one BN channel)."""
        source = chain[0].input[0]
        if all(node.op_type == "Identity" for node in chain):
            return Site(site.node, source, site.y, site.s, site.t)
        shape = self.owner.shape(source)
        ops = " -> ".join(node.op_type for node in chain)
        last_axis = head.op_type in ("MatMul", "Add")  # MatMul's channels are its last axis
        axis = (len(shape) - 1 if last_axis else 1) if shape else 0
        try:
            steps = [self._layout_step(node) for node in chain]
            mapping = channel_map(steps, shape or (), axis, site.s.size)
        except LayoutError as exc:
            raise Refusal("channel-axis-mismatch", f"through {ops}: {exc}") from None
        return Site(site.node, source, site.y, site.s[mapping], site.t[mapping])

    def _layout_step(self, node: onnx.NodeProto) -> LayoutStep:
        op = node.op_type
        if op == "Transpose":
            perm = _attr(node, "perm", None)
            return LayoutStep(op, perm=tuple(int(p) for p in perm) if perm else None)
        if op == "Flatten":
            return LayoutStep(op, axis=int(_attr(node, "axis", 1)))
        if op == "Reshape":
            target = self.index.constant(node.input[1]) if len(node.input) > 1 else None
            if target is None and len(node.input) == 1:  # Reshape-1: the shape is an attribute
                target = _attr(node, "shape", None)
            if target is None:
                raise LayoutError("the Reshape target is not a constant")
            dims = tuple(int(d) for d in np.ravel(target))
            return LayoutStep(op, target=dims, allowzero=bool(_attr(node, "allowzero", 0)))
        return LayoutStep(op)

    def _nonlinear_path(self, name: str, *, upstream: bool) -> str:
        """The ops between a BN and the nearest linear op on a single path, when one of them is
        a nonlinearity ("Mul -> Add -> Relu"); "" when there is no such path. Per-channel
        constant Mul/Add/Sub/Div, layout ops and other BNs may stand on the path too."""
        ops: list[str] = []
        nonlinear = False
        for _ in range(16):
            if upstream:
                node = self.index.producer(name)
            else:
                users = self.index.consumers_of(name)
                single = len(users) == 1 and not self.index.is_graph_output(name)
                node = users[0] if single else None
            if node is None:
                return ""
            if node.op_type in LINEAR_OPS:
                return " -> ".join(reversed(ops) if upstream else ops) if nonlinear else ""
            data = self._data_input(node)
            if data is None:
                return ""
            nonlinear |= node.op_type in NONLINEAR_OPS
            ops.append(node.op_type)
            name = data if upstream else node.output[0]
        return ""

    def _data_input(self, node: onnx.NodeProto) -> str | None:
        """The one input a path through `node` follows, or None if the path cannot pass."""
        op = node.op_type
        if op in NONLINEAR_OPS or op in LAYOUT_OPS or op == "BatchNormalization":
            return node.input[0] if node.input else None
        if op in AFFINE_OPS and len(node.input) == 2:
            constant = [self.index.constant(n) is not None for n in node.input]
            if constant.count(True) == 1:
                return node.input[constant.index(False)]
        return None

    # -- backward -------------------------------------------------------------------------
    def plan_backward(self, site: Site) -> Plan:
        consumer, position = self._single_consumer(site.y)
        flatten = None
        if consumer.op_type in FLATTENING_OPS and position == 0:
            flatten = consumer
            consumer, position = self._single_consumer(flatten.output[0])
        op = consumer.op_type
        if op not in LINEAR_OPS:
            between = self._nonlinear_path(site.y, upstream=False)
            if between:
                raise Refusal("nonlinear-between", f"{between} between it and a linear op")
            raise Refusal("no-linear-neighbour", f"its output goes to {op}")
        if position != 0:
            raise Refusal("no-linear-neighbour", f"it feeds input {position} of {op}, not data")
        if op == "ConvTranspose":
            raise Refusal(
                "no-linear-neighbour", "a backward fold into ConvTranspose is not exact at borders"
            )
        if op == "Conv":
            if flatten is not None:
                raise Refusal("channel-axis-mismatch", "a Conv after a flatten")
            plan = self._conv_backward(site, consumer)
        else:
            plan = self._dense_backward(site, consumer, flatten)
        plan.rewire = flatten if flatten is not None else consumer
        return plan

    def _single_consumer(self, name: str) -> tuple[onnx.NodeProto, int]:
        if self.index.is_graph_output(name):
            raise Refusal("no-linear-neighbour", f"'{name}' is a graph output")
        users = self.index.consumers_of(name)
        if len(users) != 1:
            raise Refusal("no-linear-neighbour", f"'{name}' has {len(users)} consumers")
        user = users[0]
        positions = [i for i, n in enumerate(user.input) if n == name]
        if len(positions) != 1:
            raise Refusal("no-linear-neighbour", f"'{name}' is read implicitly or twice")
        return user, positions[0]

    def _conv_backward(self, site: Site, conv: onnx.NodeProto) -> Plan:
        w, b = self.weight(conv, 1), self.optional_const(conv, 2)
        _require_no_padding(conv, w.shape[2:])
        group = int(_attr(conv, "group", 1))
        s, t = site.channels(w.shape[1] * group, f"Conv '{conv.name}' input")
        new_w, new_b = fm.conv_backward(w, b, s, t, group)
        return Plan(conv, self.writes(conv, (1, new_w, w.dtype, "W"), (2, new_b, w.dtype, "B")))

    def _dense_backward(
        self, site: Site, node: onnx.NodeProto, flatten: onnx.NodeProto | None
    ) -> Plan:
        b_mat = self.weight(node, 1)
        if b_mat.ndim != 2:
            raise Refusal("channel-axis-mismatch", f"{node.op_type} weight is not 2-D")
        is_gemm = node.op_type == "Gemm"
        trans_b = bool(_attr(node, "transB", 0)) if is_gemm else False
        if is_gemm and _attr(node, "transA", 0):
            raise Refusal("channel-axis-mismatch", "Gemm transA=1 reads BN channels as rows")
        k = b_mat.shape[1 if trans_b else 0]
        if flatten is not None:
            channels = site.s.size
            self._require_channel_major_flatten(flatten, k, channels, site.x)
            s, t = (
                fm.expand_to_features(site.s, site.t, k)
                if channels > 1
                else site.channels(k, "flatten")
            )
        else:
            if not is_gemm and self.owner.rank(node.input[0]) != 2:
                raise Refusal("channel-axis-mismatch", "MatMul input is not proven 2-D")
            s, t = site.channels(k, f"{node.op_type} '{node.name}'")
        if is_gemm:
            alpha, beta = float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))
            c = self.optional_const(node, 2)
            new_b, new_c = fm.gemm_backward(b_mat, c, s, t, trans_b=trans_b, alpha=alpha, beta=beta)
            writes = self.writes(node, (1, new_b, b_mat.dtype, "B"), (2, new_c, b_mat.dtype, "C"))
            return Plan(node, writes, attributes={"beta": 1.0})
        bias_add = self._bias_add_after(node)
        if bias_add is None:
            new_b, shift = fm.matmul_backward(b_mat, None, s, t)
            writes = self.writes(node, (1, new_b, b_mat.dtype, "B"), (2, shift, b_mat.dtype, "C"))
            return Plan(node, writes, become_gemm=True)
        bias_index = 1 if bias_add.input[0] == node.output[0] else 0
        bias = self.index.constant(bias_add.input[bias_index])
        assert bias is not None
        new_b, new_bias = fm.matmul_backward(b_mat, bias, s, t)
        writes = self.writes(node, (1, new_b, b_mat.dtype, "B"))
        writes += self.writes(bias_add, (bias_index, new_bias, bias.dtype, "bias"))
        return Plan(node, writes)

    def _bias_add_after(self, matmul: onnx.NodeProto) -> onnx.NodeProto | None:
        name = matmul.output[0]
        users = self.index.consumers_of(name)
        if self.index.is_graph_output(name) or len(users) != 1 or users[0].op_type != "Add":
            return None
        return users[0] if self._is_matmul_bias_add(users[0]) else None

    def _require_channel_major_flatten(
        self, node: onnx.NodeProto, features: int, channels: int, source: str
    ) -> None:
        """Flatten(axis=1), or a Reshape proven to give one row per sample ([N, C*HW]): then
        feature f belongs to channel f // HW. A Reshape whose rows mix samples is refused."""
        if features % channels:
            raise Refusal("channel-axis-mismatch", f"{features} features for {channels} channels")
        if node.op_type == "Flatten":
            if int(_attr(node, "axis", 1)) != 1:
                raise Refusal("channel-axis-mismatch", "Flatten axis is not 1")
            return
        shape = self.index.constant(node.input[1]) if len(node.input) > 1 else None
        if shape is None or shape.ndim != 1 or shape.size != 2:
            raise Refusal("channel-axis-mismatch", "Reshape target is not a constant 2-D shape")
        rows, cols = (int(v) for v in shape)
        if int(_attr(node, "allowzero", 0)) and 0 in (rows, cols):
            raise Refusal("channel-axis-mismatch", "Reshape with allowzero")
        if cols not in (-1, features):
            raise Refusal("channel-axis-mismatch", f"Reshape to {[rows, cols]}")
        if rows == 0:  # copies the batch axis: one row per sample
            return
        shape = self.owner.shape(source)
        if rows == -1 and cols == features and shape is not None:
            per_sample = shape[1:]
            if all(d is not None for d in per_sample) and int(np.prod(per_sample)) == features:
                return
        if rows > 0 and shape is not None and shape and shape[0] == rows:
            return
        raise Refusal(
            "channel-axis-mismatch",
            f"Reshape to {[rows, cols]} is not proven to keep one row per sample",
        )

    # -- constants and writes -------------------------------------------------------------
    def weight(self, node: onnx.NodeProto, index: int) -> np.ndarray:
        name = node.input[index] if len(node.input) > index else ""
        value = self.index.constant(name) if name else None
        if value is None:
            raise Refusal("not-constant", f"{node.op_type} '{node.name}' input '{name}'")
        if value.dtype.kind != "f" and not _is_bfloat16(value):
            raise Refusal("unsupported-dtype", f"{node.op_type} weight dtype {value.dtype}")
        return value

    def optional_const(self, node: onnx.NodeProto, index: int) -> np.ndarray | None:
        if len(node.input) <= index or not node.input[index]:
            return None
        return self.weight(node, index)

    def writes(self, node: onnx.NodeProto, *items) -> list[Write]:
        """Cast float64 results to their stored dtypes; refuse with `overflow` if out of range."""
        staged = []
        for index, value, dtype, hint in items:
            cast = fm.cast_checked(value, np.dtype(dtype))
            if cast is None:
                raise Refusal("overflow", f"folded {hint} of '{node.name}' overflows {dtype}")
            staged.append(Write(node, index, cast, hint))
        return staged

    # -- applying a plan ------------------------------------------------------------------
    def apply(self, site: Site, plan: Plan, *, forward: bool) -> None:
        for write in plan.writes:
            self._write_param(write)
        for name, value in plan.attributes.items():
            _set_float_attr(plan.target, name, value)
        if plan.become_gemm:
            plan.target.op_type = "Gemm"
            if self.scope.opset < 7:
                plan.target.attribute.append(onnx.helper.make_attribute("broadcast", 1))
        self.owner.detached.update(n for n in site.node.input if n != site.x)
        self.index.remove_node(site.node)
        if forward:
            producer = self.index.producer(plan.chain[0].input[0] if plan.chain else site.x)
            assert producer is not None
            self._relink(producer, plan.chain, site.y)
        else:
            assert plan.rewire is not None
            position = list(plan.rewire.input).index(site.y)
            self.index.set_input(plan.rewire, position, site.x)

    def _relink(self, producer: onnx.NodeProto, chain: list[onnx.NodeProto], y: str) -> None:
        """After a forward fold: Identity nodes of the chain go, the others keep their places
        under new output names (their values have changed), and the last one outputs y."""
        kept = [node for node in chain if node.op_type != "Identity"]
        for node in chain:
            if node.op_type == "Identity":
                self.index.remove_node(node)
        names = [self.owner.names(f"{node.input[0]}_folded") for node in kept] + [y]
        self.index.set_output(producer, 0, names[0])
        for i, node in enumerate(kept):
            self.index.set_input(node, 0, names[i])
            self.index.set_output(node, 0, names[i + 1])

    def _write_param(self, write: Write) -> None:
        node, index = write.node, write.index
        while len(node.input) <= index:
            node.input.append("")
        old = node.input[index]
        if old and self._owns_initializer(old):
            _replace_tensor_value(self.index.initializers[old], write.value)
            self.index.forget_constant(old)
            self.owner.rewritten.add(old)
            return
        tensor = numpy_helper.from_array(write.value)
        base = old or f"{node.name or node.op_type}_{write.hint}"
        tensor.name = self.owner.names(f"{base}_folded")
        self._add_constant(tensor, before=node)
        self.index.set_input(node, index, tensor.name)
        if old:
            self.owner.detached.add(old)

    def _owns_initializer(self, name: str) -> bool:
        return (
            name in self.index.initializers
            and self.index.use_count(name) == 1
            and name not in self.index.inputs
        )

    def _add_constant(self, tensor: onnx.TensorProto, before: onnx.NodeProto) -> None:
        graph = self.scope.graph
        if graph is not None:
            graph.initializer.append(tensor)
            self.index.initializers[tensor.name] = graph.initializer[-1]
            if self.scope.ir_version < 4:  # IR 3: every initializer is also a graph input
                graph.input.append(
                    onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
                )
                self.index.inputs.add(tensor.name)
            return
        constant = onnx.helper.make_node(
            "Constant", [], [tensor.name], name=self.owner.names(f"{tensor.name}_const"),
            value=tensor,
        )  # fmt: skip
        nodes = self.scope.nodes
        position = next(i for i, n in enumerate(nodes) if n is before)
        nodes.insert(position, constant)
        self.index.producers[tensor.name] = (nodes[position], 0)


_RAW_TYPES = {
    np.dtype("<f2"): onnx.TensorProto.FLOAT16,
    np.dtype("<f4"): onnx.TensorProto.FLOAT,
    np.dtype("<f8"): onnx.TensorProto.DOUBLE,
}


def _replace_tensor_value(tensor: onnx.TensorProto, value: np.ndarray) -> None:
    """Make `tensor` hold `value`, keeping its name: what CopyFrom(from_array(value)) does, with
    one copy of the data fewer (weights are the bulk of a model, so this is worth the lines)."""
    data_type = _RAW_TYPES.get(value.dtype) if np.little_endian else None
    if data_type is None:  # bfloat16 and anything unusual: onnx's own conversion
        new = numpy_helper.from_array(value, tensor.name)
        tensor.CopyFrom(new)
        return
    name = tensor.name
    tensor.Clear()
    tensor.name = name
    tensor.data_type = data_type
    tensor.dims.extend(value.shape)
    tensor.raw_data = np.ascontiguousarray(value).tobytes()


def _most_specific(forward: Refusal | None, backward: Refusal | None) -> Refusal:
    """The reason to report: a failed fold next to a real linear op beats 'no neighbour'."""
    generic = ("no-linear-neighbour",)
    for candidate in (forward, backward):
        if candidate is not None and candidate.reason not in (*generic, "nonlinear-between"):
            return candidate
    for candidate in (forward, backward):
        if candidate is not None and candidate.reason == "nonlinear-between":
            return candidate
    return forward or backward or Refusal("no-linear-neighbour")


def _require_no_padding(conv: onnx.NodeProto, kernel: tuple[int, ...]) -> None:
    auto_pad = _attr(conv, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER") and any(k != 1 for k in kernel):
        raise Refusal("padding-breaks-backward-fold", f"Conv '{conv.name}' auto_pad={auto_pad}")
    pads = _attr(conv, "pads", [])
    if auto_pad in ("NOTSET", "") and any(int(p) != 0 for p in pads):
        raise Refusal("padding-breaks-backward-fold", f"Conv '{conv.name}' pads={list(pads)}")


def _tensor_rank_at(node: onnx.NodeProto, index: GraphIndex) -> int:
    """The rank of a linear op's data tensors (its output, and its input for Conv)."""
    if node.op_type in ("Gemm", "MatMul"):
        return 2
    weight = index.constant(node.input[1]) if len(node.input) > 1 else None
    if weight is None:
        raise Refusal("not-constant", f"{node.op_type} weight is not constant")
    return int(weight.ndim)


def _channel_vector(c: np.ndarray, rank: int) -> np.ndarray | None:
    """The per-channel vector of a constant broadcast against an [N, C, ...] tensor of `rank`.

    Returns a vector of size C, or of size 1 for a uniform constant; None when the constant
    varies along any axis but the channel axis or would change the output's shape.
    """
    if c.ndim > rank:
        return None
    if c.size == 1:
        return c.reshape(1)
    channel_pos = 1 - (rank - c.ndim)  # dims align right
    if channel_pos < 0:
        return None
    if any(d != 1 for i, d in enumerate(c.shape) if i != channel_pos):
        return None
    return c.reshape(-1)


def _is_bfloat16(value: np.ndarray) -> bool:
    return fm._BF16 is not None and value.dtype == fm._BF16


def _cleanup(model: onnx.ModelProto, detached: set[str], rewritten: set[str]) -> None:
    """Drop the constants a fold detached once nobody reads them, and stale value_info.

    Inner scopes go first, so an outer constant only a subgraph read is seen as unread.
    Constants the model already carried unread are left alone: that is not this pass's job.
    """
    for scope in reversed(list(iter_scopes(model))):
        index = GraphIndex(scope)
        _drop_dead_constants(scope, index, set(detached))
        if scope.graph is not None:
            defined = scope.defined_names()
            stale = [
                i
                for i, v in enumerate(scope.graph.value_info)
                if v.name not in defined or v.name in rewritten
            ]
            for i in reversed(stale):
                del scope.graph.value_info[i]


def _drop_dead_constants(scope: Scope, index: GraphIndex, candidates: set[str]) -> None:
    """Remove unread initializers and unread constant-producing nodes among `candidates`,
    following each removed node's inputs upstream."""
    graph = scope.graph
    dead_initializers: set[str] = set()
    pending = [n for n in candidates if n]
    while pending:
        name = pending.pop()
        if index.use_count(name) or name in dead_initializers:
            continue
        if name in index.initializers:
            if not index.is_overridable_input(name):
                dead_initializers.add(name)
            continue
        producer = index.producer(name)
        if producer is None or not _is_constant_producer(producer, index):
            continue
        if any(index.use_count(o) for o in producer.output if o):
            continue
        index.remove_node(producer)
        pending.extend(n for n in producer.input if n)
    if graph is None or not dead_initializers:
        return
    for i in reversed(range(len(graph.initializer))):
        if graph.initializer[i].name in dead_initializers:
            del graph.initializer[i]
    for i in reversed(range(len(graph.input))):  # IR < 4 lists initializers as inputs too
        if graph.input[i].name in dead_initializers:
            del graph.input[i]


def _is_constant_producer(node: onnx.NodeProto, index: GraphIndex) -> bool:
    if node.op_type == "Constant":
        return True
    if node.op_type not in FOLDABLE_OPS or node.domain not in ("", "ai.onnx"):
        return False
    return all(index.constant(n) is not None for n in node.input if n)
