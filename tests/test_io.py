"""onnxio: loading from paths and bytes, safe external data, atomic saving."""

from __future__ import annotations

import os
from pathlib import Path

import models as m
import numpy as np
import onnx
import pytest
from conftest import sha256

from bnsurgery import onnxio as io
from bnsurgery.errors import EXIT_BAD_INPUT, BadInputError, UnsafePathError
from bnsurgery.onnxio import load as onnxio_load


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def save_external(model: onnx.ModelProto, folder: Path, location: str = "weights.bin") -> Path:
    (folder / location).parent.mkdir(parents=True, exist_ok=True)
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


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


# -- loading ------------------------------------------------------------------------------------
def test_load_from_path(write_model) -> None:
    path = write_model(m.conv_bn())
    assert io.load_model(path).SerializeToString() == m.conv_bn().SerializeToString()


def test_load_from_str_path(write_model) -> None:
    assert m.count_op(io.load_model(str(write_model(m.conv_bn())))) == 1


def test_load_from_bytes() -> None:
    data = m.conv_bn().SerializeToString()
    assert io.load_model(data).SerializeToString() == data


def test_load_model_proto_is_returned_as_is() -> None:
    model = m.conv_bn()
    assert io.load_model(model) is model


@pytest.mark.parametrize(
    "content",
    [b"", b"\x00\xff" * 100, b"this is text", b"\x08\x07"],
    ids=["empty", "binary", "text", "ir-only"],
)
def test_garbage_is_bad_input(write_model, content: bytes) -> None:
    with pytest.raises(BadInputError):
        io.load_model(write_model(content))


@pytest.mark.parametrize("content", [b"\x00\xff" * 100, b"this is text"], ids=["binary", "text"])
def test_garbage_bytes_are_bad_input(content: bytes) -> None:
    with pytest.raises(BadInputError):
        io.load_model(content)


def test_truncated_model_is_bad_input(write_model) -> None:
    data = m.conv_bn().SerializeToString()
    with pytest.raises(BadInputError):
        io.load_model(write_model(data[: len(data) // 2]))


def test_missing_path_is_bad_input(tmp_path) -> None:
    with pytest.raises(BadInputError, match="no such file"):
        io.load_model(tmp_path / "nope.onnx")


def test_directory_is_bad_input(tmp_path) -> None:
    with pytest.raises(BadInputError, match="directory"):
        io.load_model(tmp_path)


def test_bad_input_maps_to_exit_2(tmp_path) -> None:
    with pytest.raises(BadInputError) as info:
        io.load_model(tmp_path / "nope.onnx")
    assert info.value.exit_code == EXIT_BAD_INPUT


def test_checker_failure_is_bad_input() -> None:
    with pytest.raises(BadInputError, match="checker"):
        io.load_model(m.checker_failing())


def test_checker_failure_message_is_one_line() -> None:
    with pytest.raises(BadInputError) as info:
        io.load_model(m.checker_failing())
    assert "\n" not in str(info.value)


def test_checker_failure_message_keeps_the_whole_reason() -> None:
    """onnx's message spans lines ('... of node:\nname: conv ...\n is not output ...')."""
    with pytest.raises(BadInputError) as info:
        io.load_model(m.checker_failing())
    assert "conv" in str(info.value) and "is not output" in str(info.value)


def test_check_false_skips_the_checker() -> None:
    assert io.load_model(m.checker_failing(), check=False).graph.node[0].name == "conv"


def test_large_model_check_goes_through_a_file(monkeypatch) -> None:
    """Past the protobuf limit the checker needs a path; a valid model still passes."""
    monkeypatch.setattr(onnxio_load, "EXTERNAL_DATA_THRESHOLD", 100)
    io.check_model(m.conv_bn(cin=8, cout=16))


def test_large_invalid_model_still_fails_the_check(monkeypatch) -> None:
    monkeypatch.setattr(onnxio_load, "EXTERNAL_DATA_THRESHOLD", 100)
    with pytest.raises(BadInputError):
        io.check_model(m.checker_failing())


def test_load_leaves_the_file_byte_identical(write_model) -> None:
    path = write_model(m.conv_bn())
    before = sha256(path)
    io.load_model(path)
    assert sha256(path) == before


# -- external data ------------------------------------------------------------------------------
def test_external_data_is_loaded_inline(tmp_path) -> None:
    model = m.conv_bn()
    loaded = io.load_model(save_external(model, tmp_path / "model"))
    got, want = weights(loaded), weights(model)
    assert all(np.array_equal(got[k], want[k]) for k in want) and got.keys() == want.keys()


def test_external_data_in_a_subfolder_is_allowed(tmp_path) -> None:
    model = m.conv_bn()
    path = save_external(model, tmp_path / "model", location="sub/weights.bin")
    assert weights(io.load_model(path)).keys() == weights(model).keys()


def test_external_data_loaded_model_has_no_external_references(tmp_path) -> None:
    loaded = io.load_model(save_external(m.conv_bn(), tmp_path / "model"))
    assert not any(t.external_data for t in loaded.graph.initializer)


def _relocate(path: Path, location: str) -> None:
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(model.SerializeToString())


def test_external_data_dotdot_is_unsafe(tmp_path) -> None:
    path = save_external(m.conv_bn(), tmp_path / "model")
    os.replace(tmp_path / "model" / "weights.bin", tmp_path / "weights.bin")
    _relocate(path, "../weights.bin")
    with pytest.raises(UnsafePathError):
        io.load_model(path)


def test_external_data_dotdot_inside_is_unsafe_too(tmp_path) -> None:
    """'sub/../weights.bin' stays inside, but a '..' component is refused on principle."""
    path = save_external(m.conv_bn(), tmp_path / "model")
    (tmp_path / "model" / "sub").mkdir()
    _relocate(path, "sub/../weights.bin")
    with pytest.raises(UnsafePathError):
        io.load_model(path)


def test_external_data_absolute_path_is_unsafe(tmp_path) -> None:
    path = save_external(m.conv_bn(), tmp_path / "model")
    _relocate(path, str((tmp_path / "model" / "weights.bin").resolve()))
    with pytest.raises(UnsafePathError):
        io.load_model(path)


def test_external_data_windows_absolute_path_is_unsafe(tmp_path) -> None:
    path = save_external(m.conv_bn(), tmp_path / "model")
    _relocate(path, "C:\\weights.bin")
    with pytest.raises(UnsafePathError):
        io.load_model(path)


def test_external_data_symlink_out_of_the_folder_is_unsafe(tmp_path) -> None:
    path = save_external(m.conv_bn(), tmp_path / "model")
    os.replace(tmp_path / "model" / "weights.bin", tmp_path / "outside.bin")
    (tmp_path / "model" / "weights.bin").symlink_to(tmp_path / "outside.bin")
    with pytest.raises(UnsafePathError):
        io.load_model(path)


def test_external_data_symlinked_model_folder_is_fine(tmp_path) -> None:
    """A link to the model's folder itself does not leave the folder."""
    path = save_external(m.conv_bn(), tmp_path / "model")
    (tmp_path / "alias").symlink_to(tmp_path / "model")
    assert m.count_op(io.load_model(tmp_path / "alias" / path.name)) == 1


def test_external_data_missing_file_is_bad_input(tmp_path) -> None:
    path = save_external(m.conv_bn(), tmp_path / "model")
    (tmp_path / "model" / "weights.bin").unlink()
    with pytest.raises(BadInputError, match="missing"):
        io.load_model(path)


def test_external_data_truncated_file_is_bad_input(tmp_path) -> None:
    path = save_external(m.conv_bn(), tmp_path / "model")
    (tmp_path / "model" / "weights.bin").write_bytes(b"\x00" * 8)
    with pytest.raises(BadInputError, match="truncated"):
        io.load_model(path)


def test_bytes_with_external_references_are_refused(tmp_path) -> None:
    path = save_external(m.conv_bn(), tmp_path / "model")
    with pytest.raises(BadInputError, match="external"):
        io.load_model(path.read_bytes())


# -- saving -------------------------------------------------------------------------------------
def test_save_writes_the_model(tmp_path) -> None:
    model = m.conv_bn()
    io.save_model(model, tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx").read_bytes() == model.SerializeToString()


def test_save_leaves_no_temporary_files(tmp_path) -> None:
    io.save_model(m.conv_bn(), tmp_path / "out.onnx")
    assert listing(tmp_path) == ["out.onnx"]


def test_save_small_model_inline_by_default(tmp_path) -> None:
    io.save_model(m.conv_bn(cin=8, cout=16), tmp_path / "out.onnx")
    assert listing(tmp_path) == ["out.onnx"]


def test_save_with_external_data_when_asked(tmp_path) -> None:
    model = m.conv_bn(cin=8, cout=16)
    io.save_model(model, tmp_path / "out.onnx", external_data=True)
    assert listing(tmp_path) == ["out.onnx", "out.onnx.data"]


def test_saved_external_data_loads_back_equal(tmp_path) -> None:
    model = m.conv_bn(cin=8, cout=16)
    io.save_model(model, tmp_path / "out.onnx", external_data=True)
    got, want = weights(io.load_model(tmp_path / "out.onnx")), weights(model)
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_save_with_external_data_does_not_mutate_the_model(tmp_path) -> None:
    model = m.conv_bn(cin=8, cout=16)
    before = model.SerializeToString()
    io.save_model(model, tmp_path / "out.onnx", external_data=True)
    assert model.SerializeToString() == before


def test_save_with_external_data_over_the_threshold(tmp_path, monkeypatch) -> None:
    """Over the size threshold (2 GB in real life) external data is chosen automatically."""
    monkeypatch.setattr(onnxio_load, "EXTERNAL_DATA_THRESHOLD", 1000)
    io.save_model(m.conv_bn(cin=8, cout=16), tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx.data").is_file()


def test_save_to_a_missing_folder_is_bad_input(tmp_path) -> None:
    with pytest.raises(BadInputError):
        io.save_model(m.conv_bn(), tmp_path / "nowhere" / "out.onnx")


def test_save_under_a_file_is_bad_input(tmp_path) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(BadInputError):
        io.save_model(m.conv_bn(), tmp_path / "afile" / "out.onnx")


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch) -> None:
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous content")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(BadInputError):
        io.save_model(m.conv_bn(), target)
    assert target.read_bytes() == b"previous content"


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch) -> None:
    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(BadInputError):
        io.save_model(m.conv_bn(), tmp_path / "out.onnx")
    assert listing(tmp_path) == []


def test_failed_external_write_leaves_nothing_behind(tmp_path, monkeypatch) -> None:
    def broken_save(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", broken_save)
    with pytest.raises(BadInputError):
        io.save_model(m.conv_bn(cin=8, cout=16), tmp_path / "out.onnx", external_data=True)
    assert listing(tmp_path) == []


# -- atomic_write: one file, all or nothing -------------------------------------------------------
def test_atomic_write_writes_the_file_and_nothing_else(tmp_path) -> None:
    target = tmp_path / "report.html"
    assert io.atomic_write(target, lambda fh: fh.write(b"<html>")) == target
    assert target.read_bytes() == b"<html>"
    assert listing(tmp_path) == ["report.html"]


def test_atomic_write_replaces_only_once_the_writer_is_done(tmp_path) -> None:
    target = tmp_path / "report.html"
    target.write_bytes(b"old")
    seen = []

    def write(fh) -> None:
        fh.write(b"new")
        seen.append(target.read_bytes())  # the target, while the new file is being written

    io.atomic_write(target, write)
    assert seen == [b"old"] and target.read_bytes() == b"new"


@pytest.mark.parametrize("failure", [ValueError("bug in the writer"), KeyboardInterrupt()])
def test_atomic_write_a_failing_writer_leaves_the_target_unchanged(tmp_path, failure) -> None:
    target = tmp_path / "report.html"
    target.write_bytes(b"previous content")

    def write(fh) -> None:
        fh.write(b"half a page")
        raise failure

    with pytest.raises(type(failure)):
        io.atomic_write(target, write)
    assert target.read_bytes() == b"previous content"
    assert listing(tmp_path) == ["report.html"]


def test_atomic_write_a_full_disk_is_bad_input_and_leaves_no_partial_file(tmp_path) -> None:
    def write(fh) -> None:
        fh.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(BadInputError, match="No space left on device") as exc:
        io.atomic_write(tmp_path / "report.html", write)
    assert exc.value.option is None and str(tmp_path / "report.html") in str(exc.value)
    assert listing(tmp_path) == []


def test_atomic_write_a_failed_rename_keeps_the_previous_file(tmp_path, monkeypatch) -> None:
    target = tmp_path / "report.html"
    target.write_bytes(b"previous content")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(BadInputError):
        io.atomic_write(target, lambda fh: fh.write(b"new"))
    assert target.read_bytes() == b"previous content"
    assert listing(tmp_path) == ["report.html"]


def test_atomic_write_names_the_option_that_gave_the_path(tmp_path) -> None:
    target = tmp_path / "nowhere" / "report.html"
    with pytest.raises(BadInputError) as exc:
        io.atomic_write(target, lambda fh: fh.write(b"x"), option="report")
    assert exc.value.option == "report"
    assert str(exc.value).startswith(f"report {target}: output folder ")
    assert exc.value.render("--report").startswith(f"--report {target}: ")


def test_atomic_write_gives_the_file_the_usual_permissions(tmp_path) -> None:
    """Staged in a private folder, the file itself is created as an ordinary open() would."""
    ordinary = tmp_path / "ordinary"
    ordinary.write_bytes(b"x")
    written = io.atomic_write(tmp_path / "written", lambda fh: fh.write(b"x"))
    assert written.stat().st_mode == ordinary.stat().st_mode
