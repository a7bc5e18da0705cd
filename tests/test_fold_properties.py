"""Property tests: random Conv/ConvTranspose/Gemm graphs with a BN before or after them.

Whatever the channels, groups, kernel sizes, strides, pads, dilations, biases, transA/transB,
alpha/beta and epsilon, the folded model computes what the original computes (ORT, DISABLE_ALL),
and every BN that docs/design.md says can fold is gone.
"""

from __future__ import annotations

from dataclasses import dataclass

import models as m
import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

import bnsurgery

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass
class Generated:
    model: onnx.ModelProto
    foldable: bool  # docs/design.md says this BN must fold
    description: str


def _bn(prefix: str, x: str, y: str, r: np.random.Generator, c: int, eps: float):
    inits = m.bn_inits(prefix, m.bn_stats(r, c))
    return m.bn_node(prefix, x, y, epsilon=eps), inits


@st.composite
def conv_graphs(draw) -> Generated:
    """Conv or ConvTranspose of rank 1 or 2, with a BN after (forward) or before (backward)."""
    transpose = draw(st.booleans())
    after = draw(st.booleans())
    dims = draw(st.integers(1, 2))
    group = draw(st.integers(1, 3))
    cin = group * draw(st.integers(1, 3))
    cout = group * draw(st.integers(1, 3))
    k = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    pads = [draw(st.integers(0, k - 1)) for _ in range(2 * dims)]
    bias = draw(st.booleans())
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    size = (k - 1) * dilation + 1 + draw(st.integers(0, 4))
    r = m.rng(draw(st.integers(0, 2**16)))

    op = "ConvTranspose" if transpose else "Conv"
    w_shape = [cin, cout // group] if transpose else [cout, cin // group]
    inits = [m.init("W", m.weight(r, w_shape + [k] * dims))]
    inputs = ["bn_out" if not after else "x", "W"]
    if bias:
        inits.append(m.init("b", r.normal(0, 0.5, cout)))
        inputs.append("b")
    attrs = {
        "group": group,
        "kernel_shape": [k] * dims,
        "strides": [stride] * dims,
        "dilations": [dilation] * dims,
    }
    if transpose:
        attrs["output_padding"] = [draw(st.integers(0, stride - 1)) for _ in range(dims)]
        out_sizes = [
            (size - 1) * stride + (k - 1) * dilation + 1 - pads[i] - pads[i + dims] + op_
            for i, op_ in enumerate(attrs["output_padding"])
        ]
        if min(out_sizes) < 1:
            pads = [0] * (2 * dims)
    attrs["pads"] = pads
    conv_out = "conv_out" if after else "y"
    conv = helper.make_node(op, inputs, [conv_out], name="conv", **attrs)
    if after:
        bn, bn_inits = _bn("bn", "conv_out", "y", r, cout, eps)
        nodes = [conv, bn]
        foldable = True
    else:
        bn, bn_inits = _bn("bn", "x", "bn_out", r, cin, eps)
        nodes = [bn, conv]
        foldable = op == "Conv" and not any(pads)
    model = m.make(
        nodes,
        [m.vi("x", [2, cin] + [size] * dims)],
        [m.vi("y", ["n", "c"] + [f"d{i}" for i in range(dims)])],
        inits + bn_inits,
        check=False,
    )
    onnx.checker.check_model(model)
    return Generated(model, foldable, f"{op} after={after} {attrs} bias={bias} eps={eps}")


@st.composite
def gemm_graphs(draw) -> Generated:
    """Gemm with every attribute, with a BN on its output (forward) or on its A input."""
    after = draw(st.booleans())
    trans_a, trans_b = draw(st.integers(0, 1)), draw(st.integers(0, 1))
    rows, k, n = draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    alpha = draw(st.floats(0.1, 3.0))
    beta = draw(st.floats(0.1, 3.0))
    c_shape = draw(st.sampled_from([None, (n,), (1, n), (), (rows, n)]))
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    r = m.rng(draw(st.integers(0, 2**16)))

    inits = [m.init("B", m.weight(r, [n, k] if trans_b else [k, n], fan_in=k))]
    a_shape = [k, rows] if trans_a else [rows, k]
    inputs = ["x" if after else "bn_out", "B"]
    if c_shape is not None:
        inits.append(m.init("C", r.normal(0, 0.5, c_shape)))
        inputs.append("C")
    gemm_out = "gemm_out" if after else "y"
    attrs = {"alpha": alpha, "beta": beta, "transA": trans_a, "transB": trans_b}
    gemm = helper.make_node("Gemm", inputs, [gemm_out], name="gemm", **attrs)
    if after:
        bn, bn_inits = _bn("bn", "gemm_out", "y", r, n, eps)
        nodes, foldable = [gemm, bn], True
    else:
        bn, bn_inits = _bn("bn", "x", "bn_out", r, a_shape[1], eps)
        nodes, foldable = [bn, gemm], not trans_a
    model = m.make(
        nodes, [m.vi("x", a_shape)], [m.vi("y", [rows, n])], inits + bn_inits, check=False
    )
    onnx.checker.check_model(model, full_check=True)
    return Generated(model, foldable, f"Gemm after={after} {attrs} C={c_shape} eps={eps}")


@st.composite
def flatten_graphs(draw) -> Generated:
    """x[N,C,H,W] -> BN -> Flatten(axis) or Reshape(target) -> Gemm or MatMul.

    Only a flattening that keeps one sample per row (Flatten axis=1, Reshape to [N, C*H*W] with
    N spelled 0, -1 or literally) maps feature f to channel f // (H*W); the others mix channels
    or samples within a row, and the BN must stay."""
    n, c = draw(st.integers(2, 3)), draw(st.integers(1, 4))
    h, w = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    per_sample = c * h * w
    how = draw(st.sampled_from(["flatten", "reshape"]))
    if how == "flatten":
        axis = draw(st.integers(0, 3))
        rows, cols = int(np.prod([n, c, h, w][:axis])), int(np.prod([n, c, h, w][axis:]))
        foldable = axis == 1
        node = helper.make_node("Flatten", ["bn_out"], ["flat"], name="flatten", axis=axis)
        extra = []
    else:
        total = n * per_sample
        cols = draw(st.sampled_from(sorted({d for d in range(1, total + 1) if total % d == 0})))
        rows = total // cols
        first = draw(st.sampled_from([rows, -1] + ([0] if rows == n else [])))
        foldable = cols == per_sample
        extra = [onnx.numpy_helper.from_array(np.array([first, cols], np.int64), "shape")]
        node = helper.make_node("Reshape", ["bn_out", "shape"], ["flat"], name="reshape")
    k = draw(st.integers(1, 4))
    r = m.rng(draw(st.integers(0, 2**16)))
    use_gemm = draw(st.booleans())
    inits = [*extra, m.init("W", m.weight(r, [k, cols] if use_gemm else [cols, k], fan_in=cols))]
    if use_gemm:
        inits.append(m.init("C", r.normal(0, 0.5, k)))
        dense = helper.make_node("Gemm", ["flat", "W", "C"], ["y"], name="gemm", transB=1)
    else:
        dense = helper.make_node("MatMul", ["flat", "W"], ["y"], name="matmul")
    bn, bn_inits = _bn("bn", "x", "bn_out", r, c, 1e-5)
    model = m.make(
        [bn, node, dense],
        [m.vi("x", [n, c, h, w])],
        [m.vi("y", [rows, k])],
        inits + bn_inits,
        check=False,
    )
    onnx.checker.check_model(model, full_check=True)
    label = f"{how} to [{rows}, {cols}] of {[n, c, h, w]} into {dense.op_type}"
    return Generated(model, foldable, label)


graphs = st.one_of(conv_graphs(), gemm_graphs(), flatten_graphs())


@SETTINGS
@given(conv_graphs())
def test_conv_fold_is_equivalent_to_the_original(case: Generated) -> None:
    m.assert_equivalent(case.model, bnsurgery.fold(case.model).model)


@SETTINGS
@given(gemm_graphs())
def test_gemm_fold_is_equivalent_to_the_original(case: Generated) -> None:
    m.assert_equivalent(case.model, bnsurgery.fold(case.model).model)


@SETTINGS
@given(flatten_graphs())
def test_flatten_fold_is_equivalent_to_the_original(case: Generated) -> None:
    folded = bnsurgery.fold(case.model).model
    try:
        m.assert_equivalent(case.model, folded)
    except AssertionError:
        raise AssertionError(f"{case.description}: folded model differs") from None


@SETTINGS
@given(graphs)
def test_every_foldable_bn_is_folded(case: Generated) -> None:
    result = bnsurgery.fold(case.model)
    if case.foldable:
        assert m.count_op(result.model) == 0, (case.description, result.report.to_dict())


@SETTINGS
@given(graphs)
def test_a_kept_bn_has_a_reason_other_than_folded(case: Generated) -> None:
    report = bnsurgery.fold(case.model).report
    left = m.count_op(bnsurgery.fold(case.model).model)
    assert left == sum(1 for e in report.entries if e.action == "kept")
