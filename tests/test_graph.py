"""GraphIndex: producers, consumers, constant resolution, scopes, unique names, edits."""

from __future__ import annotations

import models as m
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnsurgery.model.graph import (
    GraphIndex,
    NameGenerator,
    default_opset,
    free_names,
    index_scopes,
    iter_scopes,
)


def main_index(model: onnx.ModelProto) -> GraphIndex:
    return GraphIndex(next(iter_scopes(model)))


def indexes(model: onnx.ModelProto) -> dict[str, GraphIndex]:
    """Every scope's index, parents linked, keyed by scope path."""
    return {index.scope.path: index for index in index_scopes(model)}


def constants_model(extra_nodes, extra_inits=(), inputs=()) -> GraphIndex:
    """A model whose nodes only compute constants; output 'out' keeps it valid."""
    nodes = [*extra_nodes, helper.make_node("Identity", ["x"], ["out"], name="keep")]
    model = m.make(
        nodes,
        [m.vi("x", [1]), *inputs],
        [m.vi("out", [1])],
        list(extra_inits),
        check=False,
    )
    return main_index(model)


# -- structure ----------------------------------------------------------------------------------
def test_producer_of_conv_output() -> None:
    assert main_index(m.conv_bn_relu()).producer("conv_out").name == "conv"


def test_producer_of_graph_input_is_none() -> None:
    assert main_index(m.conv_bn_relu()).producer("x") is None


def test_consumers_of_conv_output() -> None:
    index = main_index(m.conv_two_consumers())
    assert sorted(n.name for n in index.consumers_of("conv_out")) == ["bn", "relu"]


def test_use_count_includes_graph_outputs() -> None:
    assert main_index(m.conv_graph_output()).use_count("conv_out") == 2


def test_graph_output_is_known() -> None:
    assert main_index(m.conv_graph_output()).is_graph_output("conv_out")


def test_if_node_consumes_the_outer_names_its_branches_read() -> None:
    index = main_index(m.if_bn())
    assert [n.name for n in index.consumers_of("else_W")] == ["if"]


def test_if_node_consumes_outer_x_once() -> None:
    """Both branches read x: the If node is one consumer of it per read name list entry."""
    index = main_index(m.if_bn())
    assert {n.name for n in index.consumers_of("x")} == {"if"}


def test_free_names_of_a_branch() -> None:
    model = m.if_bn()
    else_branch = next(a.g for a in model.graph.node[0].attribute if a.name == "else_branch")
    expected = {"x", "else_W", "else_bn.scale", "else_bn.B", "else_bn.mean", "else_bn.var"}
    assert free_names(else_branch) == expected


def test_free_names_of_a_self_contained_branch_is_just_x() -> None:
    model = m.if_bn()
    then_branch = next(a.g for a in model.graph.node[0].attribute if a.name == "then_branch")
    assert free_names(then_branch) == {"x"}


# -- scopes -------------------------------------------------------------------------------------
def test_scopes_of_if_model() -> None:
    assert sorted(s.path for s in iter_scopes(m.if_bn())) == [
        "",
        "if.else_branch",
        "if.then_branch",
    ]


def test_scopes_of_loop_model() -> None:
    assert [s.path for s in iter_scopes(m.loop_bn())] == ["", "loop.body"]


def test_scopes_of_function_model() -> None:
    assert [s.path for s in iter_scopes(m.function_bn())] == ["", "function:custom::ConvBn"]


def test_function_scope_uses_the_function_opset() -> None:
    scopes = list(iter_scopes(m.function_bn()))
    assert scopes[1].opset == 13 and scopes[1].is_function


def test_nested_subgraph_path() -> None:
    inner = m.if_bn()
    outer_branch = helper.make_graph(
        list(inner.graph.node), "outer_then", [], [m.vi("y", [1, 4, 3, 3])]
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["alt"], ["y2"], name="id")], "outer_else", [],
        [m.vi("y2", [1, 4, 3, 3])],
    )  # fmt: skip
    node = helper.make_node(
        "If", ["cond2"], ["z"], name="outer", then_branch=outer_branch, else_branch=other
    )
    model = m.make(
        [node],
        [m.vi("cond2", [], m.BOOL), m.vi("cond", [], m.BOOL), m.vi("x", [1, 3, 5, 5]),
         m.vi("alt", [1, 4, 3, 3])],
        [m.vi("z", [1, 4, 3, 3])],
        list(inner.graph.initializer),
    )  # fmt: skip
    paths = [s.path for s in iter_scopes(model)]
    assert "outer.then_branch/if.else_branch" in paths


def test_default_opset_reads_the_default_domain() -> None:
    assert default_opset(m.function_bn().opset_import) == 13


# -- constants ----------------------------------------------------------------------------------
def test_initializer_is_constant() -> None:
    index = main_index(m.conv_bn())
    np.testing.assert_array_equal(index.constant("W"), m.initializer(m.conv_bn(), "W"))


def test_graph_input_is_not_constant() -> None:
    assert main_index(m.params_graph_inputs()).constant("bn.var") is None


def test_initializer_that_is_also_an_input_is_not_constant_from_ir4() -> None:
    assert main_index(m.params_overridable()).constant("bn.var") is None


def test_initializer_listed_as_input_is_constant_in_ir3() -> None:
    assert main_index(m.opset6_bn()).constant("bn.var") is not None


def test_node_output_is_not_constant() -> None:
    assert main_index(m.conv_bn()).constant("conv_out") is None


def test_constant_node_value_tensor() -> None:
    index = main_index(m.params_from_constants())
    assert index.constant("bn.var").shape == (4,)


def test_constant_node_value_floats() -> None:
    index = main_index(m.params_from_constants())
    assert index.constant("bn.B").dtype == np.float32


def test_cast_of_constant_is_constant() -> None:
    model = m.params_from_constants()
    index = main_index(model)
    scale64 = numpy_helper.to_array(m.node_named(model, "const_scale64").attribute[0].t)
    np.testing.assert_array_equal(index.constant("bn.scale"), scale64.astype(np.float32))


def test_identity_of_initializer_is_constant() -> None:
    model = m.params_from_constants()
    np.testing.assert_array_equal(
        main_index(model).constant("bn.mean"), m.initializer(model, "mean_init")
    )


@pytest.mark.parametrize(
    ("attr", "value", "expected"),
    [
        ("value_float", 2.5, np.float32(2.5)),
        ("value_floats", [1.0, 2.0], np.array([1.0, 2.0], np.float32)),
        ("value_int", 7, np.int64(7)),
        ("value_ints", [3, 4], np.array([3, 4], np.int64)),
    ],
)
def test_constant_node_attribute_kinds(attr, value, expected) -> None:
    index = constants_model([helper.make_node("Constant", [], ["c"], name="c", **{attr: value})])
    np.testing.assert_array_equal(index.constant("c"), expected)


def test_constant_of_shape_is_constant() -> None:
    nodes = [
        helper.make_node("Constant", [], ["shape"], name="s", value_ints=[2, 3]),
        helper.make_node(
            "ConstantOfShape", ["shape"], ["c"], name="cos",
            value=numpy_helper.from_array(np.array([1.5], np.float32)),
        ),
    ]  # fmt: skip
    np.testing.assert_array_equal(
        constants_model(nodes).constant("c"), np.full((2, 3), 1.5, np.float32)
    )


def test_reshape_of_constants_is_constant() -> None:
    inits = [
        numpy_helper.from_array(np.arange(6, dtype=np.float32), "v"),
        numpy_helper.from_array(np.array([2, 3], np.int64), "shape"),
    ]
    nodes = [helper.make_node("Reshape", ["v", "shape"], ["c"], name="r")]
    assert constants_model(nodes, inits).constant("c").shape == (2, 3)


def test_chain_of_foldable_ops_is_constant() -> None:
    """Sqrt(Add(var, eps)): exporters sometimes precompute BN parameters this way."""
    inits = [
        numpy_helper.from_array(np.array([3.0, 8.0], np.float32), "var"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
    ]
    nodes = [
        helper.make_node("Add", ["var", "one"], ["v1"], name="add"),
        helper.make_node("Sqrt", ["v1"], ["c"], name="sqrt"),
    ]
    np.testing.assert_allclose(constants_model(nodes, inits).constant("c"), [2.0, 3.0])


def test_runtime_op_of_constants_is_not_folded() -> None:
    """Relu is not in the foldable list: it stays a runtime op even with constant inputs."""
    inits = [numpy_helper.from_array(np.array([-1.0, 2.0], np.float32), "v")]
    nodes = [helper.make_node("Relu", ["v"], ["c"], name="relu")]
    assert constants_model(nodes, inits).constant("c") is None


def test_op_reading_a_graph_input_is_not_constant() -> None:
    nodes = [helper.make_node("Identity", ["p"], ["c"], name="id")]
    assert constants_model(nodes, inputs=[m.vi("p", [2])]).constant("c") is None


def test_subgraph_resolves_outer_initializers() -> None:
    by_path = indexes(m.if_bn())
    assert by_path["if.else_branch"].constant("else_W").shape == (4, 3, 3, 3)


def test_subgraph_resolves_its_own_initializers() -> None:
    by_path = indexes(m.if_bn())
    assert by_path["if.then_branch"].constant("then_W").shape == (4, 3, 3, 3)


def test_loop_body_input_is_not_constant() -> None:
    assert indexes(m.loop_bn())["loop.body"].constant("x_in") is None


def test_constants_inside_a_function() -> None:
    by_path = indexes(m.function_bn())
    assert by_path["function:custom::ConvBn"].constant("bn.var").shape == (4,)


def test_function_input_is_not_constant() -> None:
    by_path = indexes(m.function_bn(constant_params=False))
    assert by_path["function:custom::ConvBn"].constant("bn.var") is None


def test_tensor_dtype_of_initializer() -> None:
    assert main_index(m.conv_bn_typed(m.F16)).tensor_dtype("W") == m.F16


def test_tensor_dtype_of_constant_node() -> None:
    assert main_index(m.params_from_constants()).tensor_dtype("scale64") == m.F64


# -- unique names -------------------------------------------------------------------------------
def test_fresh_name_is_kept() -> None:
    assert NameGenerator(m.conv_bn())("fresh") == "fresh"


def test_taken_name_gets_a_suffix() -> None:
    assert NameGenerator(m.conv_bn())("W") == "W_1"


def test_names_are_never_handed_out_twice() -> None:
    gen = NameGenerator(m.conv_bn())
    assert [gen("n"), gen("n"), gen("n")] == ["n", "n_1", "n_2"]


def test_names_in_subgraphs_are_taken() -> None:
    assert NameGenerator(m.if_bn())("then_W") == "then_W_1"


def test_names_in_functions_are_taken() -> None:
    assert NameGenerator(m.function_bn())("conv_out") == "conv_out_1"


def test_node_names_are_taken() -> None:
    assert NameGenerator(m.conv_bn())("conv") == "conv_1"


# -- edits keep the maps current ----------------------------------------------------------------
def test_remove_node_forgets_its_outputs() -> None:
    index = main_index(m.conv_bn_relu())
    index.remove_node(index.producer("bn_out"))
    assert index.producer("bn_out") is None


def test_remove_node_forgets_it_as_consumer() -> None:
    index = main_index(m.conv_bn_relu())
    index.remove_node(index.producer("bn_out"))
    assert index.consumers_of("conv_out") == []


def test_remove_node_removes_it_from_the_graph() -> None:
    model = m.conv_bn_relu()
    index = main_index(model)
    index.remove_node(index.producer("bn_out"))
    assert [n.name for n in model.graph.node] == ["conv", "relu"]


def test_set_input_moves_the_consumer() -> None:
    index = main_index(m.conv_bn_relu())
    relu = index.producer("y")
    index.set_input(relu, 0, "conv_out")
    assert (index.consumers_of("bn_out"), len(index.consumers_of("conv_out"))) == ([], 2)


def test_set_output_moves_the_producer() -> None:
    index = main_index(m.conv_bn_relu())
    conv = index.producer("conv_out")
    index.set_output(conv, 0, "renamed")
    assert (index.producer("conv_out"), index.producer("renamed").name) == (None, "conv")
