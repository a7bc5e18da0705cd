"""Lazy loading of embedded weights: the raw data of large initializers stays in the .onnx file.

`bnsurgery fold` loads this way, so an ordinary model's weights are not parsed into protobuf,
checked and re-serialised when most of them do not change. These tests hold that path to the
ordinary one: the same model after materialising, the same checker verdicts, and the same
output file byte for byte.
"""

from __future__ import annotations

from pathlib import Path

import models as m
import numpy as np
import onnx
import pytest
from conftest import SAMPLES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from bnsurgery import onnxio as io
from bnsurgery.errors import BadInputError
from bnsurgery.onnxio import load as onnxio_load
from bnsurgery.onnxio import wire
from bnsurgery.passes.fold import FoldPass

SAMPLE_NAMES = ["digits_cnn.onnx", "digits_cnn_nobn.onnx", "digits_mlp.onnx", "resnet_small.onnx"]


@pytest.fixture
def cut_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every initializer of a plain type with data is left in the file (not only >= 64 KiB)."""
    monkeypatch.setattr(onnxio_load, "EMBEDDED_LAZY_MIN_BYTES", 1)


def write(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def embedded_lazy(model: onnx.ModelProto) -> list[str]:
    return [t.name for t in model.graph.initializer if io.is_embedded_lazy(t)]


# -- the wire scan --------------------------------------------------------------------------


def reassembled(data: bytes, min_bytes: int) -> tuple[onnx.ModelProto, list[wire.Payload]]:
    skeleton, payloads = wire.find_embedded_payloads(data, min_bytes)
    model = onnx.ModelProto()
    model.ParseFromString(skeleton)
    for p in payloads:
        tensor = model.graph.initializer[p.index]
        assert not tensor.HasField("raw_data")
        tensor.raw_data = data[p.offset : p.offset + p.length]
    return model, payloads


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_scan_cuts_and_puts_back_every_sample_model(name: str) -> None:
    data = (SAMPLES / name).read_bytes()
    model, payloads = reassembled(data, 1)
    assert payloads and model.SerializeToString() == data


def _tensor(kind: str, r: np.random.Generator, n: int) -> onnx.TensorProto:
    """One initializer of a given kind: cuttable, or one of the shapes the scan must leave."""
    values = r.standard_normal(n).astype(np.float32)
    if kind == "float":
        return onnx.numpy_helper.from_array(values, "t")
    if kind == "int64":
        return onnx.numpy_helper.from_array(r.integers(-9, 9, n), "t")
    if kind == "float16":
        return onnx.numpy_helper.from_array(values.astype(np.float16), "t")
    if kind == "typed":  # float_data, not raw_data
        return helper.make_tensor("t", TensorProto.FLOAT, [n], values.tolist())
    if kind == "short":  # raw_data shorter than the shape: the checker's to reject
        t = onnx.numpy_helper.from_array(values, "t")
        t.raw_data = t.raw_data[:-4]
        return t
    if kind == "int4":  # sub-byte: never cut
        return helper.make_tensor("t", TensorProto.INT4, [n], [1] * n)
    if kind == "external":
        t = TensorProto()
        t.name, t.data_type = "t", TensorProto.FLOAT
        t.dims.append(n)
        t.data_location = TensorProto.EXTERNAL
        entry = t.external_data.add()
        entry.key, entry.value = "location", "w.bin"
        return t
    raise AssertionError(kind)


KINDS = ["float", "int64", "float16", "typed", "short", "int4", "external"]
CUT = {"float", "int64", "float16"}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kinds=st.lists(st.sampled_from(KINDS), min_size=0, max_size=6),
    sizes=st.lists(st.integers(0, 40), min_size=6, max_size=6),
    min_bytes=st.sampled_from([1, 16, 64]),
    seed=st.integers(0, 2**16),
)
def test_scan_cuts_exactly_the_plain_raw_tensors(kinds, sizes, min_bytes, seed) -> None:
    r = np.random.default_rng(seed)
    inits = []
    for i, kind in enumerate(kinds):
        tensor = _tensor(kind, r, sizes[i])
        tensor.name = f"t{i}"
        inits.append(tensor)
    outs = [m.vi(f"y{i}", None) for i in range(len(inits))]
    nodes = [helper.make_node("Identity", [f"t{i}"], [f"y{i}"]) for i in range(len(inits))]
    model = m.make(nodes, [], outs, inits, check=False)
    model.graph.doc_string = "after the initializers, in field order"
    data = model.SerializeToString()
    back, payloads = reassembled(data, min_bytes)
    assert back.SerializeToString() == data
    expected = [
        i
        for i, (kind, t) in enumerate(zip(kinds, inits, strict=True))
        if kind in CUT and len(t.raw_data) >= min_bytes and len(t.raw_data) > 0
    ]
    assert [p.index for p in payloads] == expected


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d[: len(d) // 2],  # truncated inside the graph
        lambda d: d + b"\x3a\x00",  # a second graph field
        lambda d: b"\x0b" + d,  # a group (wire type 3)
        lambda d: d + b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",  # overlong varint
    ],
)
def test_scan_refuses_what_it_cannot_walk(damage) -> None:
    data = (SAMPLES / "digits_cnn.onnx").read_bytes()
    with pytest.raises(wire.WireFormatError):
        wire.find_embedded_payloads(damage(data), 1)


@settings(max_examples=80, deadline=None)
@given(cut=st.integers(0, 2000), junk=st.binary(min_size=1, max_size=8))
def test_scan_of_damaged_bytes_fails_only_with_its_own_error(cut: int, junk: bytes) -> None:
    data = (SAMPLES / "digits_mlp.onnx").read_bytes()
    damaged = data[:cut] + junk + data[cut + len(junk) :]
    try:
        wire.find_embedded_payloads(damaged, 1)
    except wire.WireFormatError:
        pass


def test_varints_round_trip() -> None:
    for value in [0, 1, 127, 128, 300, 2**31, 2**63 - 1]:
        encoded = wire.encode_varint(value)
        assert wire.read_varint(memoryview(encoded), 0, len(encoded)) == (value, len(encoded))


# -- loading --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_lazy_load_materialises_to_the_ordinary_load(cut_everything, name: str) -> None:
    path = SAMPLES / name
    lazy = io.load_model(path, external_data="lazy")
    assert io.is_lazy(lazy) and embedded_lazy(lazy)
    assert not io.has_external_files(lazy)
    eager = io.load_model(path)
    assert io.materialize(lazy).SerializeToString() == eager.SerializeToString()


def test_default_threshold_leaves_small_models_as_they_were() -> None:
    assert not io.is_lazy(io.load_model(SAMPLES / "digits_cnn.onnx", external_data="lazy"))


def test_big_weights_stay_in_the_file_by_default(tmp_path: Path) -> None:
    model = m.conv_bn(cin=64, cout=128)  # a 294 KiB weight
    lazy = io.load_model(write(model, tmp_path / "net.onnx"), external_data="lazy")
    assert embedded_lazy(lazy) == ["W"]


def test_lazy_tensors_read_the_same_values(cut_everything) -> None:
    path = SAMPLES / "resnet_small.onnx"
    lazy, eager = io.load_model(path, external_data="lazy"), io.load_model(path)
    for a, b in zip(lazy.graph.initializer, eager.graph.initializer, strict=True):
        assert io.tensor_to_array(a).tobytes() == io.tensor_to_array(b).tobytes()


def _checker_message(path: Path, **kwargs) -> str:
    with pytest.raises(BadInputError) as info:
        io.load_model(path, **kwargs)
    return str(info.value)


def test_checker_still_rejects_a_bad_graph(cut_everything, tmp_path: Path) -> None:
    model = m.conv_bn()
    model.graph.node[0].op_type = "NoSuchOp"
    path = write(model, tmp_path / "bad.onnx")
    lazy = _checker_message(path, external_data="lazy")
    assert lazy == _checker_message(path) and "checker" in lazy


def test_checker_still_rejects_short_raw_data(cut_everything, tmp_path: Path) -> None:
    model = m.conv_bn()
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:-4]
    path = write(model, tmp_path / "short.onnx")
    lazy = _checker_message(path, external_data="lazy")
    assert lazy == _checker_message(path) and "too small" in lazy


def test_truncated_file_is_bad_input_as_before(cut_everything, tmp_path: Path) -> None:
    data = (SAMPLES / "digits_cnn.onnx").read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) - 100])
    assert _checker_message(path, external_data="lazy") == _checker_message(path)


def test_mixed_external_and_embedded(cut_everything, tmp_path: Path) -> None:
    model = m.conv_bn(cin=8, cout=16)
    folder = tmp_path / "src"
    folder.mkdir()
    onnx.save_model(
        onnx.ModelProto.FromString(model.SerializeToString()),  # save_model rewrites its input
        str(folder / "net.onnx"),
        save_as_external_data=True,
        location="w.bin",
        size_threshold=2048,  # W (4.6 KiB) external, the BN parameters embedded
    )
    lazy = io.load_model(folder / "net.onnx", external_data="lazy")
    assert io.has_external_files(lazy) and embedded_lazy(lazy)
    out = tmp_path / "out.onnx"
    io.save_model(lazy, out)
    assert (tmp_path / "out.onnx.data").is_file()  # it came with external data: keeps it
    m.assert_equivalent(model, io.load_model(out))


# -- saving ---------------------------------------------------------------------------------


def _fold_eager_bytes(path: Path, tmp_path: Path) -> bytes:
    out = tmp_path / "eager.onnx"
    io.save_model(FoldPass()(io.load_model(path)).model, out)
    return out.read_bytes()


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_fold_cli_output_is_byte_identical(cut_everything, cli, tmp_path: Path, name) -> None:
    path = SAMPLES / name
    before = path.read_bytes()
    code, _, err = cli("fold", path, "-o", tmp_path / "cli.onnx", "--no-verify")
    assert code == 0, err
    assert (tmp_path / "cli.onnx").read_bytes() == _fold_eager_bytes(path, tmp_path)
    assert path.read_bytes() == before and not (tmp_path / "cli.onnx.data").exists()


def test_fold_cli_verifies_embedded_lazy_models(cut_everything, cli, tmp_path: Path) -> None:
    code, out, err = cli("fold", SAMPLES / "resnet_small.onnx", "-o", tmp_path / "o.onnx")
    assert code == 0 and "verification: ok" in out, err


def test_fold_cli_in_place(cut_everything, cli, tmp_path: Path) -> None:
    path = tmp_path / "net.onnx"
    path.write_bytes((SAMPLES / "digits_cnn.onnx").read_bytes())
    expected = _fold_eager_bytes(path, tmp_path)
    code, _, err = cli("fold", path, "--in-place", "--no-verify")
    assert code == 0 and path.read_bytes() == expected, err


def test_fold_cli_external_data_when_asked(cut_everything, cli, tmp_path: Path) -> None:
    path = SAMPLES / "digits_cnn.onnx"
    code, _, err = cli("fold", path, "-o", tmp_path / "x.onnx", "--external-data", "--no-verify")
    assert code == 0 and (tmp_path / "x.onnx.data").is_file(), err
    eager = FoldPass()(io.load_model(path)).model
    m.assert_equivalent(eager, io.load_model(tmp_path / "x.onnx"))


def test_info_on_embedded_lazy_model(cut_everything, cli) -> None:
    code, out, err = cli("info", SAMPLES / "digits_cnn.onnx")
    assert code == 0 and "folded" in out, err


def test_saved_model_points_into_the_output(cut_everything, tmp_path: Path) -> None:
    """After the save the lazy tensors refer to the written file, so the model stays usable
    even when the input is replaced (--in-place) or deleted."""
    src = tmp_path / "in.onnx"
    src.write_bytes((SAMPLES / "digits_mlp.onnx").read_bytes())
    model = io.load_model(src, external_data="lazy")
    before = {t.name: io.tensor_to_array(t).tobytes() for t in model.graph.initializer}
    out = tmp_path / "out.onnx"
    io.save_model(model, out)
    src.unlink()
    sources = {io.lazy_source(t)[0] for t in model.graph.initializer if io.lazy_source(t)}
    assert sources == {out.resolve()}
    after = {t.name: io.tensor_to_array(t).tobytes() for t in model.graph.initializer}
    assert after == before


def test_save_twice_from_one_lazy_model(cut_everything, tmp_path: Path) -> None:
    model = io.load_model(SAMPLES / "digits_cnn.onnx", external_data="lazy")
    io.save_model(model, tmp_path / "a.onnx")
    io.save_model(model, tmp_path / "b.onnx")
    data = (SAMPLES / "digits_cnn.onnx").read_bytes()
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes() == data


def test_unknown_fields_are_kept(cut_everything, tmp_path: Path) -> None:
    """A field this onnx does not know (a newer onnx.proto) survives: the piecewise write would
    drop it, so such a model is read into memory and saved the ordinary way."""
    data = (SAMPLES / "digits_cnn.onnx").read_bytes() + wire.encode_len_field(999, 3) + b"new"
    src = tmp_path / "in.onnx"
    src.write_bytes(data)
    io.save_model(io.load_model(src, external_data="lazy"), tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx").read_bytes() == data


def test_save_inline_streaming_leaves_no_private_keys(cut_everything, tmp_path: Path) -> None:
    io.save_model(
        io.load_model(SAMPLES / "digits_cnn.onnx", external_data="lazy"), tmp_path / "o.onnx"
    )
    saved = onnx.load(str(tmp_path / "o.onnx"))
    assert all(not t.external_data and t.raw_data for t in saved.graph.initializer)


# -- bnsurgery.fold_file: the CLI's path from Python ----------------------------------------


def test_fold_file_writes_what_the_cli_writes(cut_everything, cli, tmp_path: Path) -> None:
    import bnsurgery

    path = SAMPLES / "resnet_small.onnx"
    report = bnsurgery.fold_file(path, tmp_path / "api.onnx")
    code, _, err = cli("fold", path, "-o", tmp_path / "cli.onnx", "--no-verify")
    assert code == 0, err
    assert (tmp_path / "api.onnx").read_bytes() == (tmp_path / "cli.onnx").read_bytes()
    assert report.bns_before == 20 and report.bns_after == 0


def test_fold_file_verifies_when_asked(tmp_path: Path) -> None:
    import bnsurgery

    report = bnsurgery.fold_file(SAMPLES / "digits_cnn.onnx", tmp_path / "o.onnx", verify=True)
    assert report.verification["ok"]


def test_fold_file_mismatch_raises_and_writes_nothing(monkeypatch, tmp_path: Path) -> None:
    import bnsurgery
    from bnsurgery.errors import CheckFailed
    from bnsurgery.passes.fold import arithmetic as fold_math

    real = fold_math.conv_forward
    monkeypatch.setattr(fold_math, "conv_forward", lambda w, b, s, t: real(w, b, s * 1.01, t))
    with pytest.raises(CheckFailed, match="was not written"):
        bnsurgery.fold_file(SAMPLES / "digits_cnn.onnx", tmp_path / "o.onnx", verify=True)
    assert list(tmp_path.iterdir()) == []


# -- a source file that changes under a lazy model ------------------------------------------


def _rewrite_same_size(path: Path) -> None:
    """Replace `path` by a file of the same size (a new inode), as a re-export would."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data[::-1])


def test_replaced_model_file_is_refused_not_read(cut_everything, tmp_path: Path) -> None:
    src = tmp_path / "in.onnx"
    src.write_bytes((SAMPLES / "digits_cnn.onnx").read_bytes())
    model = io.load_model(src, external_data="lazy")
    _rewrite_same_size(src)
    with pytest.raises(BadInputError, match="changed since the model was loaded"):
        io.save_model(model, tmp_path / "out.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]
    with pytest.raises(BadInputError, match="changed since"):
        io.tensor_to_array(model.graph.initializer[0])


def test_replaced_external_data_file_is_refused(tmp_path: Path) -> None:
    model = m.conv_bn(cin=8, cout=16)
    folder = tmp_path / "src"
    folder.mkdir()
    copy = onnx.ModelProto.FromString(model.SerializeToString())
    onnx.save_model(copy, str(folder / "net.onnx"), save_as_external_data=True,
                    location="w.bin", size_threshold=0)  # fmt: skip
    lazy = io.load_model(folder / "net.onnx", external_data="lazy")
    _rewrite_same_size(folder / "w.bin")
    with pytest.raises(BadInputError, match="changed since the model was loaded"):
        io.save_model(lazy, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_every_cuttable_type_and_subgraphs_round_trip(cut_everything, tmp_path: Path) -> None:
    """bfloat16, bool, int8, float64 initializers are cut and read back exactly; tensors inside
    an If branch and in Constant nodes are never cut; the saved file equals the input."""
    import ml_dtypes

    r = np.random.default_rng(3)
    values = {
        "bf16": r.standard_normal(40).astype(ml_dtypes.bfloat16),
        "flag": r.integers(0, 2, 40).astype(bool),
        "i8": r.integers(-100, 100, 40).astype(np.int8),
        "f64": r.standard_normal(40),
    }
    inits = [onnx.numpy_helper.from_array(v, k) for k, v in values.items()]
    branch = helper.make_graph(
        [helper.make_node("Identity", ["inner"], ["z"])],
        "branch",
        [],
        [m.vi("z", [40])],
        [onnx.numpy_helper.from_array(r.standard_normal(40).astype(np.float32), "inner")],
    )
    const = onnx.numpy_helper.from_array(r.standard_normal(40).astype(np.float32), "c")
    nodes = [
        helper.make_node("Constant", [], ["k"], value=const),
        helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch),
        *[helper.make_node("Identity", [k], [f"o_{k}"]) for k in values],
    ]
    outputs = [m.vi("y", [40]), m.vi("k", [40])]
    outputs += [m.vi(f"o_{k}", [40], init.data_type) for k, init in zip(values, inits, strict=True)]
    model = m.make(nodes, [m.vi("cond", [], TensorProto.BOOL)], outputs, inits)
    src = write(model, tmp_path / "in.onnx")
    lazy = io.load_model(src, external_data="lazy")
    assert sorted(embedded_lazy(lazy)) == sorted(values)
    for tensor in lazy.graph.initializer:
        assert io.tensor_to_array(tensor).tobytes() == values[tensor.name].tobytes()
    io.save_model(lazy, tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx").read_bytes() == src.read_bytes()


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(cut=st.integers(0, 3000), junk=st.binary(min_size=1, max_size=4))
def test_damaged_file_loads_lazily_as_it_loads_whole(
    cut_everything, tmp_path: Path, cut: int, junk: bytes
) -> None:
    """Whatever the damage, the lazy load and the whole load agree: both refuse it (exit 2), or
    both give the same model."""
    data = (SAMPLES / "digits_mlp.onnx").read_bytes()
    path = tmp_path / "damaged.onnx"
    path.write_bytes(data[:cut] + junk + data[cut + len(junk) :])
    outcomes = []
    for mode in ("lazy", "load"):
        try:
            model = io.load_model(path, external_data=mode)
            outcomes.append(io.materialize(model).SerializeToString())
        except BadInputError:
            outcomes.append("refused")
    assert outcomes[0] == outcomes[1]


def test_damaged_non_utf8_name_is_one_line_exit_2(cli, tmp_path: Path) -> None:
    """Found by the property above: a damaged name that is not UTF-8 made the checker's message
    undecodable (a UnicodeDecodeError), and, where the checker let such a name pass, broke
    the report table after the output was written. The loader now refuses such names first."""
    data = (SAMPLES / "digits_mlp.onnx").read_bytes()
    path = tmp_path / "damaged.onnx"
    path.write_bytes(data[:35] + b"\x80" + data[36:])
    before = path.read_bytes()
    code, _, err = cli("fold", path, "-o", tmp_path / "out.onnx")
    assert code == 2 and "not UTF-8" in err and len(err.strip().splitlines()) == 1
    assert path.read_bytes() == before and not (tmp_path / "out.onnx").exists()
