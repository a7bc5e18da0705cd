"""DATA sources (docs/design.md): every kind, batching, the checks against the model's inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from models import F32, I64, make, vi
from onnx import helper

from bnsurgery.data import load_data, parse_shape_overrides, random_batches
from bnsurgery.errors import BadInputError, DataError


def single_input(shape=("N", 3, 4, 4)):
    """x [N,3,4,4] float32 -> Relu -> y."""
    model = [helper.make_node("Relu", ["x"], ["y"])]
    return make(model, [vi("x", list(shape))], [vi("y", list(shape))])


def two_inputs():
    """a [N,4] float32, b [N,4] float32 -> Add -> y."""
    return make(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        [vi("a", ["N", 4]), vi("b", ["N", 4])],
        [vi("y", ["N", 4])],
    )


def images(n=10, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 4, 4)).astype(np.float32)


def collect(source):
    batches = list(source)
    x = np.concatenate([b.feeds["x"] for b in batches])
    labels = None
    if all(b.labels is not None for b in batches):
        labels = np.concatenate([b.labels for b in batches])
    return batches, x, labels


# -- the five sources ---------------------------------------------------------------------------
def test_npz_keyed_by_input_name_with_labels_is_batched_along_axis_0(tmp_path: Path):
    x, y = images(10), np.arange(10) % 3
    np.savez(tmp_path / "d.npz", x=x, label=y)
    source = load_data(tmp_path / "d.npz", single_input(), batch_size=4)
    batches, got, labels = collect(source)
    assert [b.size for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(got, x)
    np.testing.assert_array_equal(labels, y)
    assert source.has_labels and source.samples == 10 and source.num_batches == 3


def test_npz_single_input_model_takes_the_only_non_label_array_under_any_name(tmp_path: Path):
    np.savez(tmp_path / "d.npz", images=images(6), label=np.zeros(6, np.int64))
    _, got, _ = collect(load_data(tmp_path / "d.npz", single_input()))
    np.testing.assert_array_equal(got, images(6))


def test_npz_labels_key_option_picks_another_key(tmp_path: Path):
    np.savez(tmp_path / "d.npz", x=images(5), target=np.arange(5))
    _, _, labels = collect(load_data(tmp_path / "d.npz", single_input(), labels_key="target"))
    np.testing.assert_array_equal(labels, np.arange(5))


def test_npy_feeds_a_single_input_model(tmp_path: Path):
    np.save(tmp_path / "d.npy", images(7))
    source = load_data(tmp_path / "d.npy", single_input(), batch_size=3)
    batches, got, labels = collect(source)
    assert [b.size for b in batches] == [3, 3, 1] and labels is None
    np.testing.assert_array_equal(got, images(7))


def test_folder_streams_its_files_in_sorted_order_across_batch_boundaries(tmp_path: Path):
    folder = tmp_path / "data"
    folder.mkdir()
    x = images(9)
    np.savez(folder / "b.npz", x=x[3:7], label=np.arange(3, 7))
    np.savez(folder / "a.npz", x=x[:3], label=np.arange(3))
    np.savez(folder / "c.npz", x=x[7:], label=np.arange(7, 9))
    (folder / "notes.txt").write_text("ignored")
    source = load_data(folder, single_input(), batch_size=5)
    batches, got, labels = collect(source)
    assert [b.size for b in batches] == [5, 4]
    np.testing.assert_array_equal(got, x)
    np.testing.assert_array_equal(labels, np.arange(9))
    assert source.samples == 9 and source.has_labels


def test_script_load_data_yields_feed_dicts(tmp_path: Path):
    script = tmp_path / "loader.py"
    script.write_text(
        "import numpy as np\n"
        "def load_data():\n"
        "    for i in range(3):\n"
        "        yield {'x': np.full((2, 3, 4, 4), i, np.float32), 'label': np.array([i, i])}\n"
    )
    source = load_data(script, single_input())
    batches, got, labels = collect(source)
    assert len(batches) == 3 and source.has_labels
    np.testing.assert_array_equal(labels, [0, 0, 1, 1, 2, 2])
    assert list(source) and got.shape == (6, 3, 4, 4)  # re-iterable: runs load_data() again


def test_random_n_is_seeded_and_shaped_from_the_model():
    model = single_input()
    a = collect(load_data("random:5", model, batch_size=2))[1]
    b = collect(load_data("random:5", model, batch_size=2))[1]
    np.testing.assert_array_equal(a, b)
    assert a.shape == (5, 3, 4, 4) and a.dtype == np.float32


def test_no_data_means_the_judges_random_4_seed_0_and_says_so():
    source = load_data(None, single_input())
    assert source.description == "random:4 (seed 0)" and source.synthetic
    assert any("random:4" in note for note in source.notes)
    assert sum(b.size for b in source) == 4


def test_random_with_dynamic_dims_says_what_it_chose_and_takes_shape():
    model = single_input(("N", 3, "H", "W"))
    chosen = load_data("random:2", model)
    assert next(iter(chosen)).feeds["x"].shape == (2, 3, 1, 1)  # as fold chooses
    assert any("random data uses 2x3x1x1" in n and "--shape x:" in n for n in chosen.notes)
    source = load_data("random:2", model, shapes=parse_shape_overrides(["x:1x3x5x6"]))
    assert next(iter(source)).feeds["x"].shape == (2, 3, 5, 6)


def test_random_batches_keeps_its_contract():
    batches = list(random_batches(single_input(), 5, batch_size=2))
    assert [b["x"].shape[0] for b in batches] == [2, 2, 1]


def test_mapping_and_iterable_of_dicts_are_accepted_from_python():
    x = images(4)
    assert collect(load_data({"x": x}, single_input()))[1].shape == (4, 3, 4, 4)
    feeds = [{"x": x[:2]}, {"x": x[2:]}]
    np.testing.assert_array_equal(collect(load_data(feeds, single_input()))[1], x)


def test_static_batch_dimension_sets_the_batch_size(tmp_path: Path):
    np.save(tmp_path / "d.npy", images(4))
    source = load_data(tmp_path / "d.npy", single_input((1, 3, 4, 4)))
    assert [b.size for b in source] == [1, 1, 1, 1]


def test_two_input_npz(tmp_path: Path):
    a, b = np.ones((3, 4), np.float32), np.zeros((3, 4), np.float32)
    np.savez(tmp_path / "d.npz", a=a, b=b)
    batch = next(iter(load_data(tmp_path / "d.npz", two_inputs())))
    assert set(batch.feeds) == {"a", "b"}


# -- bad input: DataError (exit 2) with the input, what was expected and what came -------------
def test_npz_missing_an_input_names_it(tmp_path: Path):
    np.savez(tmp_path / "d.npz", a=np.ones((3, 4), np.float32))
    with pytest.raises(DataError, match=r"input 'b' missing"):
        load_data(tmp_path / "d.npz", two_inputs())


def test_npz_with_an_unknown_array_names_it(tmp_path: Path):
    ones = np.ones((3, 4), np.float32)
    np.savez(tmp_path / "d.npz", a=ones, b=ones, c=ones)
    with pytest.raises(DataError, match=r"array 'c' matches no model input"):
        load_data(tmp_path / "d.npz", two_inputs())


def test_wrong_dtype_names_input_expected_and_got(tmp_path: Path):
    np.savez(tmp_path / "d.npz", x=images(2).astype(np.float64))
    with pytest.raises(DataError, match=r"input 'x' expects float32 \[\?x3x4x4\], got float64"):
        load_data(tmp_path / "d.npz", single_input())


def test_wrong_shape_names_the_axis(tmp_path: Path):
    np.save(tmp_path / "d.npy", np.zeros((2, 3, 5, 4), np.float32))
    with pytest.raises(
        DataError, match=r"input 'x' .* got float32 \[2x3x5x4\] \(axis 2 is 5, the model says 4\)"
    ):
        load_data(tmp_path / "d.npy", single_input())


def test_wrong_rank(tmp_path: Path):
    np.save(tmp_path / "d.npy", np.zeros((2, 48), np.float32))
    with pytest.raises(DataError, match=r"input 'x' expects rank 4"):
        load_data(tmp_path / "d.npy", single_input())


def test_labels_key_that_does_not_exist(tmp_path: Path):
    np.savez(tmp_path / "d.npz", x=images(2), label=np.zeros(2, np.int64))
    with pytest.raises(DataError, match=r"labels key 'target' not found"):
        load_data(tmp_path / "d.npz", single_input(), labels_key="target")


def test_labels_key_with_random_data():
    with pytest.raises(DataError, match=r"labels key 'label' not found: random data"):
        load_data("random:4", single_input(), labels_key="label")


def test_labels_of_the_wrong_length(tmp_path: Path):
    np.savez(tmp_path / "d.npz", x=images(4), label=np.zeros(3, np.int64))
    with pytest.raises(DataError, match=r"expected 4 labels"):
        load_data(tmp_path / "d.npz", single_input())


def test_script_without_load_data(tmp_path: Path):
    script = tmp_path / "nothing.py"
    script.write_text("x = 1\n")
    with pytest.raises(DataError, match=r"defines no load_data\(\)"):
        load_data(script, single_input())


def test_script_yielding_bad_dtype_is_checked(tmp_path: Path):
    script = tmp_path / "bad.py"
    script.write_text(
        "import numpy as np\ndef load_data():\n    yield {'x': np.zeros((1, 3, 4, 4), np.int64)}\n"
    )
    with pytest.raises(DataError, match=r"input 'x' expects float32"):
        load_data(script, single_input())


def test_npy_for_a_two_input_model(tmp_path: Path):
    np.save(tmp_path / "d.npy", np.ones((3, 4), np.float32))
    with pytest.raises(DataError, match=r"model has 2 inputs"):
        load_data(tmp_path / "d.npy", two_inputs())


def test_folder_with_labels_in_some_files_only(tmp_path: Path):
    np.savez(tmp_path / "a.npz", x=images(2), label=np.zeros(2, np.int64))
    np.savez(tmp_path / "b.npz", x=images(2))
    with pytest.raises(DataError, match=r"labels must be in every file"):
        load_data(tmp_path, single_input())


def test_missing_path_empty_folder_and_unknown_kind(tmp_path: Path):
    with pytest.raises(DataError, match="no such file"):
        load_data(tmp_path / "nope.npz", single_input())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no \.npz or \.npy"):
        load_data(tmp_path / "empty", single_input())
    (tmp_path / "d.csv").write_text("1,2")
    with pytest.raises(DataError, match="unknown kind"):
        load_data(tmp_path / "d.csv", single_input())
    with pytest.raises(DataError, match="random:N"):
        load_data("random:abc", single_input())


def test_integer_input_dtype_is_checked_too(tmp_path: Path):
    model = make(
        [helper.make_node("Cast", ["ids"], ["y"], to=F32)],
        [vi("ids", ["N", 2], I64)],
        [vi("y", ["N", 2])],
    )
    np.save(tmp_path / "d.npy", np.zeros((2, 2), np.int32))
    with pytest.raises(DataError, match=r"input 'ids' expects int64 \[\?x2\], got int32"):
        load_data(tmp_path / "d.npy", model)


def test_bad_shape_override_is_bad_input():
    with pytest.raises(BadInputError, match="NAME:DxDxD"):
        parse_shape_overrides(["x=1x3"])
