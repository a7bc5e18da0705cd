"""Damaged and mutated models never make a command fail in an unforeseen way.

Every outcome is a documented one: success, exit 1 (a check failed) or exit 2 with one line
that says what is wrong, never the '(run with -vv for details)' line of an unforeseen error.
The mutations are those that found real bugs: values (NaN, inf, huge), dtypes, shapes,
attributes, missing inputs, training-mode BN, and bytes damaged at random.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
from conftest import SAMPLES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

MODELS = ["digits_cnn.onnx", "digits_mlp.onnx", "digits_cnn_nobn.onnx"]


def _mutate(model: onnx.ModelProto, kind: int, pick: int, value: float) -> None:
    g = model.graph
    tensor = g.initializer[pick % len(g.initializer)]
    node = g.node[pick % len(g.node)]
    if kind == 0:  # one value becomes NaN, inf, negative, huge or zero
        a = numpy_helper.to_array(tensor).copy()
        if a.size and a.dtype.kind == "f":
            a.flat[pick % a.size] = value
            tensor.CopyFrom(numpy_helper.from_array(a, tensor.name))
    elif kind == 1:  # flattened: the same data, another shape
        a = numpy_helper.to_array(tensor)
        tensor.CopyFrom(numpy_helper.from_array(a.reshape(-1), tensor.name))
    elif kind == 2:  # an integer attribute changes
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.INT:
                attr.i = int(value) if np.isfinite(value) and abs(value) < 2**31 else -1
    elif kind == 3:  # a float attribute (epsilon, momentum, alpha) changes
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.FLOAT:
                attr.f = value
    elif kind == 4:  # another dtype
        a = numpy_helper.to_array(tensor)
        if a.dtype.kind == "f":
            cast = (np.float16, np.float64, np.int64)[pick % 3]
            tensor.CopyFrom(numpy_helper.from_array(a.astype(cast), tensor.name))
    elif kind == 5 and len(node.input) > 1:  # an input goes missing
        del node.input[-1]
    elif kind == 6:  # BN in training mode
        bns = [n for n in g.node if n.op_type == "BatchNormalization"]
        if bns:
            bns[0].attribute.append(helper.make_attribute("training_mode", 1))


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    name=st.sampled_from(MODELS),
    mutations=st.lists(
        st.tuples(
            st.integers(0, 6),
            st.integers(0, 10_000),
            st.sampled_from([np.nan, np.inf, -1.0, 1e38, 0.0, 3.0]),
        ),
        min_size=1,
        max_size=2,
    ),
    damage=st.none() | st.tuples(st.integers(0, 5000), st.binary(min_size=1, max_size=3)),
)
def test_no_unforeseen_errors(cli, tmp_path, name, mutations, damage) -> None:
    model = onnx.load(SAMPLES / name)
    for kind, pick, value in mutations:
        _mutate(model, kind, pick, value)
    data = model.SerializeToString()
    if damage is not None:
        at, junk = damage
        data = data[:at] + junk + data[at + len(junk) :]
    path = tmp_path / "mutated.onnx"
    path.write_bytes(data)
    out = tmp_path / "out.onnx"
    for args in (
        ("fold", path, "-o", out),
        ("fold", path, "-o", out, "--no-verify"),
        ("info", path),
        ("insert", path, "-o", out),
    ):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code, _, err = cli(*args)
        noise = [
            f"{w.filename}:{w.lineno}: {w.message}"
            for w in caught
            if issubclass(w.category, RuntimeWarning)
        ]
        assert not noise, (args[0], noise)  # a warning is one more line on the user's stderr
        assert code in (0, 1, 2), (args[0], code, err)
        assert "-vv for details" not in err, (args[0], err)
        assert code != 2 or len(err.strip().splitlines()) == 1, (args[0], err)
        assert path.read_bytes() == data
        out.unlink(missing_ok=True)
