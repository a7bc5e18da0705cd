"""A DATA or statistics file that is not a real .npz/.npy is named and refused in one line.

numpy's own loader calls such a file "pickled data" and suggests `allow_pickle`, an option
bnsurgery does not have; the user must instead learn that the file is not what its name says.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import models as m
import numpy as np
import pytest
from conftest import SAMPLES

NOT_NUMPY = {
    "random bytes": bytes(range(256)) * 8,
    "text": b"hello, this is not an array\n",
    "empty": b"",
    "onnx model": (SAMPLES / "digits_cnn.onnx").read_bytes(),
    "truncated zip": (SAMPLES / "digits_test.npz").read_bytes()[:3000],
}


def _conv_bn_model(write_model) -> Path:
    return write_model(m.conv_bn())


@pytest.mark.parametrize("content", sorted(NOT_NUMPY))
@pytest.mark.parametrize("suffix", [".npz", ".npy"])
def test_data_that_is_not_numpy_is_named_as_such(cli, write_model, tmp_path, content, suffix):
    model = _conv_bn_model(write_model)
    data = tmp_path / f"garbage{suffix}"
    data.write_bytes(NOT_NUMPY[content])
    code, _, err = cli("compare", model, model, "--data", data)
    assert code == 2
    assert err.count("\n") == 1, err
    assert f"garbage{suffix}: not a valid {suffix} file" in err
    assert "pickle" not in err


def test_an_npy_file_named_npz_is_recognised(cli, write_model, tmp_path):
    model = _conv_bn_model(write_model)
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 8, 8), np.float32))
    shutil.move(tmp_path / "x.npy", tmp_path / "x.npz")
    code, _, err = cli("compare", model, model, "--data", tmp_path / "x.npz")
    assert code == 2
    assert "x.npz: not a valid .npz file (it is an .npy file" in err


def test_object_arrays_are_refused_without_numpys_pickle_advice(cli, write_model, tmp_path):
    model = _conv_bn_model(write_model)
    np.savez(tmp_path / "obj.npz", input=np.array([{"a": 1}], dtype=object))
    code, _, err = cli("compare", model, model, "--data", tmp_path / "obj.npz")
    assert code == 2
    assert "obj.npz: not a valid .npz file (it holds pickled Python objects" in err
    assert "allow_pickle" not in err


def test_a_zip_whose_members_are_not_arrays_is_not_an_npz(cli, write_model, tmp_path):
    import zipfile

    model = _conv_bn_model(write_model)
    with zipfile.ZipFile(tmp_path / "notes.npz", "w") as archive:
        archive.writestr("readme.txt", "hello")
    code, _, err = cli("compare", model, model, "--data", tmp_path / "notes.npz")
    assert code == 2
    assert "member 'readme.txt' is not an .npy array" in err


def test_a_folder_holding_a_bad_file_names_that_file(cli, write_model, tmp_path):
    model = _conv_bn_model(write_model)
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "b.npz").write_bytes(b"junk")
    code, _, err = cli("compare", model, model, "--data", folder)
    assert code == 2
    assert "b.npz: not a valid .npz file" in err and "pickle" not in err


def test_merge_stats_given_a_model_says_it_is_not_an_npz(cli, tmp_path):
    model = SAMPLES / "digits_cnn.onnx"
    out = tmp_path / "merged.npz"
    code, _, err = cli("merge-stats", model, model, "-o", out)
    assert code == 2
    assert err.strip() == (
        f"bnsurgery: error: {model}: not a valid .npz file (it is neither a zip archive of .npy "
        "arrays nor an .npy array)"
    )
    assert not out.exists()


def test_reestimate_stats_that_are_not_npz_are_named(cli, tmp_path):
    stats = tmp_path / "stats.npz"
    stats.write_text("not statistics")
    out = tmp_path / "out.onnx"
    code, _, err = cli("reestimate", SAMPLES / "digits_cnn.onnx", "--stats", stats, "-o", out)
    assert code == 2
    assert "stats.npz: not a valid .npz file" in err and "pickle" not in err
    assert not out.exists()
