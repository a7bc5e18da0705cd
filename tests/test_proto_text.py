"""Names that are not UTF-8 text: refused at load as bad input, wherever they sit."""

from __future__ import annotations

from pathlib import Path

import models as m
import onnx
import pytest
from onnx import helper

from bnsurgery import onnxio as io
from bnsurgery.errors import BadInputError
from bnsurgery.onnxio.proto_text import first_non_text_name

MARK = "QZQZ"  # a placeholder name, replaced by non-UTF-8 bytes of the same length


def damaged(model: onnx.ModelProto) -> bytes:
    data = model.SerializeToString()
    assert MARK.encode() in data
    return data.replace(MARK.encode(), b"\xff\xfe\xfd\xfc")


def with_if_branch(name: str) -> onnx.ModelProto:
    branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["z"], name=name)], "b", [], [m.vi("z", [2])]
    )
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)
    return m.make([node], [m.vi("c", [], onnx.TensorProto.BOOL), m.vi("x", [2])],
                  [m.vi("y", [2])], check=False)  # fmt: skip


def node_name(name: str) -> onnx.ModelProto:
    model = m.conv_bn()
    model.graph.node[1].name = name
    return model


def initializer_name(name: str) -> onnx.ModelProto:
    model = m.conv_bn()
    old = model.graph.initializer[0].name
    model.graph.initializer[0].name = name
    for node in model.graph.node:
        node.input[:] = [name if i == old else i for i in node.input]
    return model


@pytest.mark.parametrize(
    ("build", "where"),
    [
        (node_name, "graph node 1 name"),
        (initializer_name, "graph initializer 0 name"),
        (with_if_branch, "_branch' node 0 name"),
    ],
)
def test_non_text_name_is_refused_with_its_place(tmp_path: Path, build, where: str) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(damaged(build(MARK)))
    for mode in ("load", "lazy"):
        with pytest.raises(BadInputError, match="is not UTF-8 text") as info:
            io.load_model(path, external_data=mode, check=False)
        assert where in str(info.value)


def test_text_names_pass() -> None:
    assert first_non_text_name(with_if_branch("fine")) is None
    assert first_non_text_name(m.conv_bn()) is None


def test_fold_cli_refuses_and_writes_nothing(cli, tmp_path: Path) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(damaged(node_name(MARK)))
    before = path.read_bytes()
    code, _, err = cli("fold", path, "-o", tmp_path / "out.onnx", "--no-verify")
    assert code == 2 and "not UTF-8 text" in err and len(err.strip().splitlines()) == 1
    assert path.read_bytes() == before and not (tmp_path / "out.onnx").exists()
