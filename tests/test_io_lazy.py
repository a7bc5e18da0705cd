"""Lazy external data: tensors stay in their files, are read on demand and streamed on save.

The fold CLI loads this way, so a multi-GB model never sits in memory twice. The folded result
must be the same, byte for byte, as folding the fully loaded model.
"""

from __future__ import annotations

from pathlib import Path

import models as m
import numpy as np
import onnx
import pytest

from bnsurgery import onnxio as io
from bnsurgery.errors import BadInputError, UnsafePathError
from bnsurgery.onnxio.lazy import SOURCE_KEY
from bnsurgery.passes.fold import FoldPass


def save_external(model: onnx.ModelProto, folder: Path, location: str = "weights.bin") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(
        copy,
        str(folder / "net.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )
    return folder / "net.onnx"


def arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: io.tensor_to_array(t) for t in model.graph.initializer}


def chain() -> onnx.ModelProto:
    """Conv -> BN with 8 -> 16 channels: weights big enough for the .data file."""
    return m.conv_bn(cin=8, cout=16)


@pytest.fixture
def external_model(tmp_path: Path) -> Path:
    return save_external(chain(), tmp_path / "src")


def test_lazy_load_reads_no_tensor_data(external_model) -> None:
    model = io.load_model(external_model, external_data="lazy")
    assert all(not t.raw_data for t in model.graph.initializer)


def test_lazy_model_is_lazy(external_model) -> None:
    assert io.is_lazy(io.load_model(external_model, external_data="lazy"))


def test_loaded_model_is_not_lazy(external_model) -> None:
    assert not io.is_lazy(io.load_model(external_model))


def test_lazy_tensors_read_the_same_values(external_model) -> None:
    lazy = arrays(io.load_model(external_model, external_data="lazy"))
    eager = arrays(io.load_model(external_model))
    assert all(np.array_equal(lazy[k], eager[k]) for k in eager) and lazy.keys() == eager.keys()


def test_lazy_fold_equals_in_memory_fold(external_model) -> None:
    lazy = FoldPass()(io.load_model(external_model, external_data="lazy")).model
    eager = FoldPass()(io.load_model(external_model)).model
    assert {k: v.tobytes() for k, v in arrays(lazy).items()} == {
        k: v.tobytes() for k, v in arrays(eager).items()
    }


def test_lazy_fold_saved_equals_in_memory_fold_saved(external_model, tmp_path) -> None:
    lazy = FoldPass(in_place=True)(io.load_model(external_model, external_data="lazy")).model
    io.save_model(lazy, tmp_path / "lazy.onnx")
    eager = FoldPass()(io.load_model(external_model)).model
    io.save_model(eager, tmp_path / "eager.onnx")
    back_lazy = io.load_model(tmp_path / "lazy.onnx")
    back_eager = io.load_model(tmp_path / "eager.onnx")
    assert [n.op_type for n in back_lazy.graph.node] == [n.op_type for n in back_eager.graph.node]
    a, b = arrays(back_lazy), arrays(back_eager)
    assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_lazy_save_writes_external_data(external_model, tmp_path) -> None:
    io.save_model(io.load_model(external_model, external_data="lazy"), tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx.data").is_file()


def test_lazy_saved_file_has_no_private_keys(external_model, tmp_path) -> None:
    io.save_model(io.load_model(external_model, external_data="lazy"), tmp_path / "out.onnx")
    saved = onnx.load(str(tmp_path / "out.onnx"), load_external_data=False)
    keys = {e.key for t in saved.graph.initializer for e in t.external_data}
    assert SOURCE_KEY not in keys


def test_lazy_saved_file_loads_with_onnx_and_runs_the_same(external_model, tmp_path) -> None:
    io.save_model(io.load_model(external_model, external_data="lazy"), tmp_path / "out.onnx")
    m.assert_equivalent(chain(), onnx.load(str(tmp_path / "out.onnx")))


def test_lazy_model_stays_usable_after_save(external_model, tmp_path) -> None:
    model = io.load_model(external_model, external_data="lazy")
    before = arrays(model)
    io.save_model(model, tmp_path / "out.onnx")
    after = arrays(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_lazy_save_inline_when_asked(external_model, tmp_path) -> None:
    model = io.load_model(external_model, external_data="lazy")
    io.save_model(model, tmp_path / "out.onnx", external_data=False)
    assert not (tmp_path / "out.onnx.data").exists()


def test_lazy_save_over_its_own_source(external_model) -> None:
    """--in-place on an external-data model: the source is read before it is replaced."""
    model = FoldPass(in_place=True)(io.load_model(external_model, external_data="lazy")).model
    io.save_model(model, external_model)
    m.assert_equivalent(chain(), io.load_model(external_model))


def test_materialize_gives_inline_tensors(external_model) -> None:
    model = io.materialize(io.load_model(external_model, external_data="lazy"))
    assert not io.is_lazy(model) and all(t.raw_data for t in model.graph.initializer)


def test_lazy_dotdot_is_unsafe(tmp_path) -> None:
    path = save_external(chain(), tmp_path / "model")
    (tmp_path / "model" / "weights.bin").rename(tmp_path / "weights.bin")
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../weights.bin"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(UnsafePathError):
        io.load_model(path, external_data="lazy")


def test_lazy_truncated_file_is_bad_input(external_model) -> None:
    data = external_model.parent / "weights.bin"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(BadInputError):
        io.load_model(external_model, external_data="lazy")


def test_fold_cli_on_external_data_matches_the_api(cli, external_model, tmp_path) -> None:
    code, _, err = cli("fold", external_model, "-o", tmp_path / "cli.onnx", "--no-verify")
    api = FoldPass()(io.load_model(external_model)).model
    a, b = arrays(io.load_model(tmp_path / "cli.onnx")), arrays(api)
    assert code == 0 and a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), err


def test_fold_cli_verifies_external_data_models(cli, external_model, tmp_path) -> None:
    code, _, err = cli("fold", external_model, "-o", tmp_path / "cli.onnx")
    assert code == 0, err


def test_in_place_fold_returns_the_given_model() -> None:
    model = chain()
    assert FoldPass(in_place=True)(model).model is model


def test_copying_fold_leaves_the_model_alone() -> None:
    model = chain()
    before = model.SerializeToString()
    FoldPass()(model)
    assert model.SerializeToString() == before


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("offset", "abc", "malformed"),
        ("offset", "-1", "malformed"),
        ("length", "", "malformed"),
        ("length", "-5", "malformed"),
        ("location", "w\0.bin", "NUL"),
    ],
)
@pytest.mark.parametrize("mode", ["load", "lazy"])
def test_malformed_external_data_entries_are_bad_input(tmp_path, key, value, message, mode):
    """Found by fuzzing: these reached onnx's ExternalDataInfo or the OS as a ValueError."""
    path = save_external(chain(), tmp_path / "src")
    model = onnx.load(str(path), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.external_data)
    for entry in tensor.external_data:
        if entry.key == key:
            entry.value = value
    path.write_bytes(model.SerializeToString())
    with pytest.raises(BadInputError, match=message):
        io.load_model(path, external_data=mode)


@pytest.mark.parametrize("kernel", ["refuses", "absent"])
def test_streamed_save_without_copy_file_range_writes_the_same_bytes(
    external_model, tmp_path, monkeypatch, kernel
) -> None:
    """Where copy_file_range fails (EXDEV on old kernels) or does not exist, the bytes are
    copied by reading and writing, with the same result."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    io.save_model(io.load_model(external_model, external_data="lazy"), tmp_path / "a" / "o.onnx")
    if kernel == "absent":
        monkeypatch.delattr("os.copy_file_range", raising=False)
    else:

        def refuse(*args):
            raise OSError(18, "Invalid cross-device link")

        monkeypatch.setattr("os.copy_file_range", refuse, raising=False)
    io.save_model(io.load_model(external_model, external_data="lazy"), tmp_path / "b" / "o.onnx")
    for name in ("o.onnx", "o.onnx.data"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "o.onnx.data").stat().st_size > 4096  # weights were copied
