"""model.sites: every BN of a model found once, named as fold's report names it, with its
parameters read as constants; model.shapes and model.edit, the helpers beside it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import models as m
import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from bnsurgery.errors import BadInputError
from bnsurgery.model import shapes as model_shapes
from bnsurgery.model.edit import add_initializer, drop_dead_constants, remove_initializers
from bnsurgery.model.graph import GraphIndex, index_scopes, iter_scopes
from bnsurgery.model.shapes import TensorShapes
from bnsurgery.model.sites import (
    BnSite,
    bn_label,
    bn_sites,
    float64_params,
    main_graph_name_counts,
    stats_key,
)
from bnsurgery.passes.fold import FoldPass

C = 2  # channels of every generated tensor: [1, C, 3, 3]
F32 = onnx.TensorProto.FLOAT


# -- a random model with BNs in the main graph, in If branches and in a local function -------
@dataclass
class Built:
    """The generator's own record of the BNs it placed, in the order sites must find them."""

    model: onnx.ModelProto
    expected: list[tuple[str, str]] = field(default_factory=list)  # (scope, label)


class _Names:
    def __init__(self) -> None:
        self.counter = itertools.count()

    def __call__(self, base: str) -> str:
        return f"{base}{next(self.counter)}"


def _params(r: np.random.Generator) -> list[np.ndarray]:
    return [
        r.uniform(0.5, 1.5, C).astype(np.float32),
        r.normal(0, 0.1, C).astype(np.float32),
        r.normal(0, 0.1, C).astype(np.float32),
        r.uniform(0.5, 1.5, C).astype(np.float32),
    ]


def _chain(draw, names: _Names, x: str, r, *, constants: bool, inits: list, scope: str):
    """A few segments (Conv -> BN, BN, Relu) from `x`; the BNs named uniquely, not at all, or
    with a name they share. Returns (nodes, output, [(scope, label)])."""
    nodes: list[onnx.NodeProto] = []
    found: list[tuple[str, str]] = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["conv_bn", "bn", "relu"]))
        if kind == "conv_bn":
            w = names("W")
            value = (r.normal(0, 0.5, (C, C, 1, 1))).astype(np.float32)
            if constants:
                nodes.append(helper.make_node("Constant", [], [w], value=_tensor(w, value)))
            else:
                inits.append(numpy_helper.from_array(value, w))
            out = names("conv_out")
            nodes.append(helper.make_node("Conv", [x, w], [out], name=names("conv")))
            x = out
        if kind == "relu":
            out = names("relu_out")
            nodes.append(helper.make_node("Relu", [x], [out], name=names("relu")))
            x = out
            continue
        naming = draw(st.sampled_from(["unique", "unnamed", "shared"]))
        name = {"unique": names("bn"), "unnamed": "", "shared": "dup"}[naming]
        prefix = names("p")
        param_names = [f"{prefix}.{p}" for p in ("scale", "B", "mean", "var")]
        for pname, value in zip(param_names, _params(r), strict=True):
            if constants:
                nodes.append(helper.make_node("Constant", [], [pname], value=_tensor(pname, value)))
            else:
                inits.append(numpy_helper.from_array(value, pname))
        out = names("bn_out")
        nodes.append(helper.make_node("BatchNormalization", [x, *param_names], [out], name=name))
        found.append((scope, name or f"BatchNormalization({out})"))
        x = out
    return nodes, x, found


def _tensor(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(value, name)


def _vi(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, F32, [1, C, 3, 3])


@st.composite
def bn_models(draw) -> Built:
    r = np.random.default_rng(draw(st.integers(0, 2**16)))
    names = _Names()
    inits: list[onnx.TensorProto] = []
    nodes, x, main_found = _chain(draw, names, "x", r, constants=False, inits=inits, scope="")
    sub_found: list[tuple[str, str]] = []
    inputs = [_vi("x")]
    if draw(st.booleans()):  # an If whose branches hold BNs reading main-graph initializers
        if_name = draw(st.sampled_from(["cond_if", ""]))
        label = if_name or "If"
        branches = {}
        for branch in ("else_branch", "then_branch"):  # the attribute order make_node gives
            scope = f"{label}.{branch}"
            b_nodes, b_out, b_found = _chain(
                draw, names, x, r, constants=False, inits=inits, scope=scope
            )
            branches[branch] = helper.make_graph(b_nodes, branch, [], [_vi(b_out)])
            sub_found += b_found
        out = names("if_out")
        nodes.append(helper.make_node("If", ["cond"], [out], name=if_name, **branches))
        inputs.append(helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []))
        x = out
    functions = []
    function_found: list[tuple[str, str]] = []
    if draw(st.booleans()):  # a model-local function with BNs, its parameters Constant nodes
        scope = "function:custom::Blk"
        f_nodes, f_out, function_found = _chain(
            draw, names, "X", r, constants=True, inits=[], scope=scope
        )
        f_nodes.append(helper.make_node("Identity", [f_out], ["Y"]))
        functions.append(
            helper.make_function(
                "custom", "Blk", ["X"], ["Y"], f_nodes, [helper.make_opsetid("", 13)]
            )
        )
        out = names("blk_out")
        nodes.append(helper.make_node("Blk", [x], [out], name=names("blk"), domain="custom"))
        x = out
    graph = helper.make_graph(nodes, "g", inputs, [_vi(x)], inits)
    opsets = [helper.make_opsetid("", 13), helper.make_opsetid("custom", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=8, functions=functions)
    # iter_scopes order: the main graph, the subgraphs it holds, then local functions
    return Built(model, main_found + sub_found + function_found)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bn_models())
def test_every_bn_is_found_once_with_the_label_fold_reports(built: Built) -> None:
    onnx.checker.check_model(built.model)
    found = bn_sites(built.model)
    assert [(s.scope, s.label) for s in found] == built.expected
    assert len({id(s.node) for s in found}) == len(found)  # no node twice
    report = FoldPass()(built.model).report
    assert [(e.scope, e.node) for e in report.entries] == built.expected  # type: ignore[attr-defined]


# -- naming -----------------------------------------------------------------------------------
def _bn(name: str, y: str) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], [y], name=name)


def test_label_is_the_name_or_the_op_and_output() -> None:
    assert bn_label(_bn("bn1", "y")) == "bn1"
    assert bn_label(_bn("", "y")) == "BatchNormalization(y)"


def test_stats_key_is_reestimations_alias() -> None:
    """The key re-estimation's stats files use: the output where the label is not unique."""
    model = m.make(
        [
            _bn2("", "x", "a"),
            _bn2("twin", "a", "b"),
            _bn2("twin", "b", "c"),
            _bn2("solo", "c", "y"),
        ],
        [m.vi("x", [1, 4])],
        [m.vi("y", [1, 4])],
        [numpy_helper.from_array(np.ones(4, np.float32), n) for n in ("s", "b_", "m", "v")],
    )
    counts = main_graph_name_counts(model)
    keys = [stats_key(n, counts) for n in model.graph.node]
    labels = [bn_label(n) for n in model.graph.node]
    assert keys == ["a", "b", "c", "solo"]
    assert labels == ["BatchNormalization(a)", "twin", "twin", "solo"]


def _bn2(name: str, x: str, y: str) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x, "s", "b_", "m", "v"], [y], name=name)


# -- parameters -------------------------------------------------------------------------------
def test_sites_of_if_and_function_scopes() -> None:
    assert [(s.scope, s.label) for s in bn_sites(m.if_bn())] == [
        ("if.else_branch", "else_bn"),  # make_node sorts attributes: else_branch comes first
        ("if.then_branch", "then_bn"),
    ]
    scopes = {s.scope for s in bn_sites(m.function_bn())}
    assert scopes == {"function:custom::ConvBn"}


def test_branch_bn_reads_outer_constants() -> None:
    for site in bn_sites(m.if_bn()):
        view = site.view()
        values = site.param_values(view)
        assert all(v is not None for v in values), site.scope
        params = float64_params(view, values, name=site.label)
        assert params.scale.dtype == np.float64 and params.channels == 4


def test_overridable_initializers_are_constants_only_when_asked() -> None:
    (site,) = bn_sites(m.params_overridable())
    view = site.view()
    assert site.param_values(view) == [None] * 4
    assert site.param_problem(view, site.param_values(view)) == (
        "not-constant",
        "scale 'bn.scale' is not a constant",
    )
    stored = site.param_values(view, overridable=True)
    assert all(v is not None and v.shape == (4,) for v in stored)
    assert site.param_types(view, stored) == [F32] * 4


def test_param_problem_names_the_first_bad_parameter() -> None:
    model = m.conv_bn()
    var = next(t for t in model.graph.initializer if t.name == "bn.var")
    var.CopyFrom(numpy_helper.from_array(np.ones(6, dtype=np.int64), "bn.var"))
    (site,) = bn_sites(model)
    view = site.view()
    assert site.param_problem(view, site.param_values(view)) == (
        "unsupported-dtype",
        "var 'bn.var' has dtype int64",
    )


def test_wrongly_shaped_parameters_name_the_bn() -> None:
    (site,) = bn_sites(m.wrong_shape_params("scale"))
    view = site.view()
    with pytest.raises(BadInputError, match="'bn' has wrongly shaped parameters"):
        float64_params(view, site.param_values(view), name="bn")


def test_per_activation_parameters_are_flattened() -> None:
    (site,) = bn_sites(m.spatial0_bn())
    view = site.view()
    assert not view.spatial
    params = float64_params(view, site.param_values(view), name="bn")
    assert params.scale.ndim == 1 and params.scale.size == params.var.size


def test_custom_domain_batchnormalization_is_not_a_site() -> None:
    model = m.conv_bn()
    model.graph.node[1].domain = "custom"
    assert bn_sites(model) == []


def test_sites_share_the_scope_index_tree() -> None:
    indexes = index_scopes(m.if_bn())
    main, *branches = indexes
    assert all(b.parent is main for b in branches)
    assert [i.scope.path for i in indexes] == [s.path for s in iter_scopes(m.if_bn())]
    site = BnSite(branches[0].scope.nodes[-1], branches[0])
    assert site.scope == branches[0].scope.path


# -- shapes -----------------------------------------------------------------------------------
def test_shapes_come_from_inference_and_declarations_win() -> None:
    model = m.conv_bn()
    shapes = TensorShapes(model)
    assert shapes.shape("conv_out") == (2, 6, 7, 7)  # inferred
    assert shapes.shape("W") == (6, 4, 3, 3)  # an initializer's dims
    assert shapes.elem_type("conv_out") == F32
    declared = m.conv_bn()
    declared.graph.value_info.append(m.vi("conv_out", [2, 6, "h", "w"]))
    assert TensorShapes(declared).shape("conv_out") == (2, 6, None, None)


def test_large_models_are_not_inferred(monkeypatch) -> None:
    monkeypatch.setattr(model_shapes, "INFERENCE_LIMIT", 1)
    shapes = TensorShapes(m.conv_bn())
    assert shapes.shape("conv_out") is None
    assert shapes.shape("x") == (2, 4, 7, 7)  # declared: still known


def test_a_model_inference_rejects_has_declared_shapes_only(monkeypatch) -> None:
    def rejects(*args, **kwargs):
        raise onnx.shape_inference.InferenceError("[ShapeInferenceError] no")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", rejects)
    model = m.conv_bn()
    assert model_shapes.infer_shapes(model) is None  # permissive: None, never an exception
    shapes = TensorShapes(model)
    assert shapes.shape("conv_out") is None
    assert shapes.shape("y") == (2, 6, 7, 7) and shapes.elem_type("y") == F32


# -- edits ------------------------------------------------------------------------------------
@pytest.mark.parametrize("ir_version, listed", [(3, True), (8, False)])
def test_add_initializer_lists_an_input_below_ir4(ir_version: int, listed: bool) -> None:
    graph = helper.make_graph([], "g", [], [])
    stored = add_initializer(
        graph, numpy_helper.from_array(np.ones(3, np.float32), "w"), ir_version=ir_version
    )
    assert stored is graph.initializer[-1] and stored.name == "w"
    assert ([i.name for i in graph.input] == ["w"]) is listed
    remove_initializers(graph, {"w"})
    assert not graph.initializer and not graph.input


def test_drop_dead_constants_follows_constant_chains_and_keeps_overridable_inputs() -> None:
    model = m.params_overridable()
    c = helper.make_node("Constant", [], ["c0"], value=_tensor("c0", np.ones(4, np.float32)))
    neg = helper.make_node("Neg", ["c0"], ["c1"])
    model.graph.node.extend([c, neg])
    index = GraphIndex(next(iter_scopes(model)))
    drop_dead_constants(index, {"c1", "bn.scale", "W"})
    ops = [n.op_type for n in model.graph.node]
    assert "Neg" not in ops and "Constant" not in ops  # the unread chain went
    names = {t.name for t in model.graph.initializer}
    assert "bn.scale" in names  # overridable graph input: part of the interface
    assert "W" in names  # still read by the Conv
