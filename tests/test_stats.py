"""Streaming per-channel moments: float64 accuracy, exact Chan merges, files, merge-stats CLI."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnsurgery.errors import DataError
from bnsurgery.stats import (
    Moments,
    RunningMoments,
    StatsSet,
    merge_all,
    merge_files,
    relative_error,
)


def _data(seed: int = 0, shape=(40, 5, 3, 4), offset: float = 3.0) -> np.ndarray:
    r = np.random.default_rng(seed)
    spread = r.uniform(0.1, 3.0, (1, shape[1]) + (1,) * (len(shape) - 2))
    return (r.normal(offset, 2.0, shape) * spread).astype(np.float32)


def test_moments_of_a_batch_match_numpy_in_float64():
    x = _data()
    m = Moments.of(x, axis=1)
    x64 = x.astype(np.float64)
    assert m.count == 40 * 3 * 4
    assert relative_error(m.mean, x64.mean(axis=(0, 2, 3))) < 1e-12
    assert relative_error(m.var, x64.var(axis=(0, 2, 3))) < 1e-12


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_any_channel_axis(axis: int):
    x = _data(1, shape=(6, 7, 8))
    m = Moments.of(x, axis=axis)
    others = tuple(i for i in range(3) if i != axis % 3)
    assert m.channels == x.shape[axis]
    assert relative_error(m.var, x.astype(np.float64).var(axis=others)) < 1e-12


def test_streaming_batches_equal_one_pass():
    x = _data(2)
    acc = RunningMoments(5)
    for i in range(0, 40, 7):  # uneven batches
        acc.add_batch(x[i : i + 7])
    whole = Moments.of(x)
    assert acc.value.count == whole.count
    assert relative_error(acc.value.mean, whole.mean) < 1e-12
    assert relative_error(acc.value.m2, whole.m2) < 1e-12


def test_population_and_sample_variance():
    x = np.array([[1.0], [2.0], [4.0]])
    m = Moments.of(x, axis=1)
    assert m.var[0] == pytest.approx(np.var([1, 2, 4]))
    assert m.sample_var[0] == pytest.approx(np.var([1, 2, 4], ddof=1))


def test_from_sums_with_a_shift_is_accurate_despite_a_large_offset():
    r = np.random.default_rng(3)
    x = r.normal(1e4, 1e-2, (1000, 2))
    shift = np.array([1e4, 1e4])
    d = x - shift
    m = Moments.from_sums(1000, d.sum(axis=0), (d * d).sum(axis=0), shift)
    assert relative_error(m.var, x.var(axis=0)) < 1e-9


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 30), min_size=1, max_size=8),
    channels=st.integers(1, 4),
    offset=st.floats(-1e3, 1e3),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_merging_shards_equals_a_single_run(sizes, channels, offset, scale, seed):
    r = np.random.default_rng(seed)
    x = r.normal(offset, scale, (sum(sizes), channels))
    parts, start = [], 0
    for n in sizes:
        parts.append(Moments.of(x[start : start + n], axis=1))
        start += n
    merged = merge_all(parts)
    single = Moments.of(x, axis=1)
    assert merged.count == single.count
    assert relative_error(merged.mean, single.mean) < 1e-9
    assert relative_error(merged.m2, single.m2) < 1e-9


def test_merge_is_associative_to_rounding():
    parts = [Moments.of(_data(s, (10, 3, 2, 2))) for s in range(3)]
    left = parts[0].merge(parts[1]).merge(parts[2])
    right = parts[0].merge(parts[1].merge(parts[2]))
    assert relative_error(left.m2, right.m2) < 1e-12


def test_empty_moments_are_the_merge_identity():
    m = Moments.of(_data())
    assert Moments.zeros(5).merge(m) is m
    assert m.merge(Moments.zeros(5)) is m


def test_channel_mismatch_is_refused():
    with pytest.raises(ValueError):
        Moments.zeros(3).merge(Moments.zeros(4))


def _set(mode: str = "exact", seed: int = 0, samples: int = 40) -> StatsSet:
    return StatsSet(
        mode,
        {"bn1": Moments.of(_data(seed)), "bn/2": Moments.of(_data(seed + 1, (40, 3, 2, 2)))},
        samples,
    )


def test_save_and_load_round_trip(tmp_path):
    original = _set()
    path = original.save(tmp_path / "s.npz")
    loaded = StatsSet.load(path)
    assert loaded.mode == "exact" and loaded.samples == 40
    assert loaded.channels == {"bn1": 5, "bn/2": 3}
    for name, m in original.entries.items():
        assert loaded.entries[name].count == m.count
        np.testing.assert_array_equal(loaded.entries[name].mean, m.mean)
        np.testing.assert_array_equal(loaded.entries[name].m2, m.m2)


def test_merge_files_equals_merging_in_memory(tmp_path):
    a, b = _set(seed=0), _set(seed=5)
    merged = merge_files([a.save(tmp_path / "a.npz"), b.save(tmp_path / "b.npz")])
    direct = a.merge(b)
    assert merged.samples == 80
    for name in direct.entries:
        assert relative_error(merged.entries[name].m2, direct.entries[name].m2) < 1e-12


def test_files_from_another_model_or_mode_are_refused(tmp_path):
    a = _set()
    other = StatsSet("exact", {"bn1": Moments.of(_data(0, (4, 7, 2, 2)))}, 4)
    with pytest.raises(DataError, match="another model"):
        a.merge(other)
    with pytest.raises(DataError, match="mode"):
        a.merge(_set(mode="batch"))
    with pytest.raises(DataError, match="channel counts differ"):
        a.check_against({"bn1": 5, "bn/2": 4})


def test_a_non_stats_file_is_refused(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, input=np.zeros(3))
    with pytest.raises(DataError, match="not a bnsurgery statistics file"):
        StatsSet.load(path)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"junk.npz: not a valid \.npz file"):
        StatsSet.load(tmp_path / "junk.npz")


def _tampered(tmp_path, change) -> object:
    path = _set().save(tmp_path / "good.npz")
    arrays = dict(np.load(path))
    change(arrays)
    np.savez(tmp_path / "bad.npz", **arrays)
    return tmp_path / "bad.npz"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.__setitem__("mean_0", np.full_like(a["mean_0"], np.nan)), "NaN or infinite"),
        (lambda a: a.__setitem__("m2_1", np.full_like(a["m2_1"], np.inf)), "NaN or infinite"),
        (lambda a: a.__setitem__("m2_0", -a["m2_0"] - 1), "negative sum of squares"),
        (lambda a: a.__setitem__("mean_0", a["mean_0"].astype(np.int64)), "not floats"),
        (lambda a: a.__setitem__("counts", a["counts"][:1]), "differ in length"),
        (lambda a: a.__setitem__("channels", a["channels"][:1]), "differ in length"),
    ],
)
def test_a_tampered_stats_file_is_refused(tmp_path, change, message):
    """Found by fuzzing: a NaN mean was applied as is (exit 0, a model that outputs NaN), and a
    shortened channels or counts array crashed with an IndexError."""
    with pytest.raises(DataError, match=message):
        StatsSet.load(_tampered(tmp_path, change))


def test_a_zip_that_is_not_npz_is_refused(tmp_path):
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 and then nothing of a zip")
    with pytest.raises(DataError, match=r"not a valid \.npz file \(a truncated or damaged zip"):
        StatsSet.load(tmp_path / "broken.npz")


def test_merge_stats_cli(tmp_path, cli):
    a = _set(seed=0).save(tmp_path / "a.npz")
    b = _set(seed=2).save(tmp_path / "b.npz")
    code, out, err = cli("merge-stats", a, b, "-o", tmp_path / "m.npz", "--json")
    assert code == 0, err
    import json

    payload = json.loads(out)
    assert payload["samples"] == 80 and payload["bns"] == 2
    assert StatsSet.load(tmp_path / "m.npz").entries["bn1"].count == 2 * 40 * 12


def test_merge_stats_cli_refuses_mismatched_files(tmp_path, cli):
    a = _set().save(tmp_path / "a.npz")
    other = StatsSet("exact", {"x": Moments.of(_data())}, 40).save(tmp_path / "o.npz")
    code, _, err = cli("merge-stats", a, other, "-o", tmp_path / "m.npz")
    assert code == 2
    assert "another model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.npz").exists()
