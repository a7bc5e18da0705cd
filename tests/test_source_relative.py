"""Source-relative adaptation: the change from SOURCE to TARGET composed into stored BN statistics.

The composed BN must be exactly "map TARGET's moments onto SOURCE's, then the stored BN"; the
same data as source and target gives back the stored statistics; it agrees with the
fold -> insert -> calibrate -> re-estimate route; and it works with --prior, --nodes, batch
mode and statistics files that merge.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bnsurgery
from bnsurgery.passes.source_relative import compose
from bnsurgery.stats import Moments, StatsSet

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
DIGITS = SAMPLES / "digits_cnn.onnx"
EPS = 1e-5


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _digits() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray, np.ndarray]:
    data = np.load(SAMPLES / "digits_test.npz")
    x, labels = data["input"], data["label"]
    shifted = (x[270:] * 0.6 + np.random.default_rng(0).normal(0, 0.3, x[270:].shape)).astype(
        np.float32
    )
    return onnx.load(DIGITS), x[:270], shifted, labels[270:]


def _stats(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    return {
        n.name: (inits[n.input[3]].astype(np.float64), inits[n.input[4]].astype(np.float64))
        for n in model.graph.node
        if n.op_type == "BatchNormalization"
    }


def _bn(x, scale, bias, mean, var):
    return scale * (x - mean) / np.sqrt(var + EPS) + bias


channel_values = st.lists(
    st.tuples(
        st.floats(-5, 5),  # stored mean
        st.floats(1e-4, 10),  # stored var
        st.floats(-3, 3),  # source mean
        st.floats(0, 10),  # source var
        st.floats(-3, 3),  # target mean
        st.floats(0, 10),  # target var
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=60, deadline=None)
@given(channel_values)
def test_composed_bn_is_the_map_from_target_to_source_then_the_stored_bn(channels) -> None:
    m0, v0, ms, vs, mt, vt = (np.array(c, dtype=np.float64) for c in zip(*channels, strict=True))
    scale, bias = np.linspace(0.5, 1.5, len(m0)), np.linspace(-1, 1, len(m0))
    new = compose(m0, v0, scale, EPS, Moments(4, ms, vs * 4), Moments(4, mt, vt * 4))
    assert (new.var >= 0).all()  # never a negative variance written
    x = np.linspace(-4, 4, 9)[:, None] + mt
    mapped = (x - mt) * np.sqrt(vs + EPS) / np.sqrt(vt + EPS) + ms
    expected = _bn(mapped, scale, bias, m0, v0)
    used_scale = scale if new.scale is None else new.scale
    np.testing.assert_allclose(_bn(x, used_scale, bias, new.mean, new.var), expected, atol=1e-9)
    assert new.clamped == int((new.var == 0).sum())  # only a clamped channel has var 0


@pytest.mark.parametrize("stored_var", [0.5, 1.0])  # composed var negative; a rounding residue
def test_a_silenced_channel_is_clamped_to_var_zero_with_its_scale_compensated(stored_var) -> None:
    m0, v0, scale = np.zeros(2), np.array([stored_var, 1.0]), np.ones(2)
    source = Moments(10, np.zeros(2), np.array([10.0, 10.0]))  # var 1
    target = Moments(10, np.zeros(2), np.array([0.0, 10.0]))  # channel 0 went constant
    new = compose(m0, v0, scale, EPS, source, target)
    assert new.clamped == 1 and new.var[0] == 0.0 and new.var[1] == pytest.approx(1.0)
    assert new.scale is not None and new.scale[1] == 1.0
    # the function is kept: scale' / sqrt(0 + eps) == scale / sqrt(composed var + eps)
    composed = (stored_var + EPS) * EPS / (1 + EPS) - EPS
    assert new.scale[0] / np.sqrt(EPS) == pytest.approx(1 / np.sqrt(composed + EPS), rel=1e-9)


@pytest.mark.parametrize("mode", ["exact", "batch"])
def test_the_same_data_as_source_and_target_gives_back_the_stored_statistics(mode) -> None:
    model, clean, _, _ = _digits()
    result = bnsurgery.reestimate(model, {"input": clean}, source={"input": clean}, mode=mode)
    before, after = _stats(model), _stats(result.model)
    for name, (mean, var) in before.items():
        np.testing.assert_allclose(after[name][0], mean, rtol=1e-5, atol=1e-6 * np.abs(mean).max())
        np.testing.assert_allclose(after[name][1], var, rtol=1e-5)
    assert result.report.to_dict()["source_relative"]["clamped_channels"] == 0


def test_it_agrees_with_the_fold_insert_reestimate_route() -> None:
    """Folding the BNs away and letting `adapt` insert, calibrate on SOURCE, re-estimate on
    TARGET and fold back is the same idea through inserted nodes; the two differ only by
    where epsilon enters (the inserted BNs see the folded, rescaled channels)."""
    model, clean, shifted, labels = _digits()
    direct = bnsurgery.adapt(model, {"input": shifted}, source={"input": clean}).model
    folded = bnsurgery.fold(model).model
    routed = bnsurgery.adapt(folded, {"input": shifted}, source={"input": clean}).model
    a, b = _run(direct, shifted), _run(routed, shifted)
    assert np.abs(a - b).max() < 1e-3 * np.abs(a).max()
    assert (a.argmax(1) == b.argmax(1)).mean() > 0.99
    original = (_run(model, shifted).argmax(1) == labels).mean()
    assert (a.argmax(1) == labels).mean() > original  # and it helps on this shift


def test_a_large_prior_keeps_the_statistics_and_nodes_limits_the_bns() -> None:
    model, clean, shifted, _ = _digits()
    kept = bnsurgery.reestimate(
        model, {"input": shifted}, source={"input": clean}, prior=1e12
    ).model
    for name, (mean, var) in _stats(model).items():
        np.testing.assert_allclose(_stats(kept)[name][0], mean, atol=1e-5)
        np.testing.assert_allclose(_stats(kept)[name][1], var, rtol=1e-5)
    only = bnsurgery.reestimate(
        model, {"input": shifted}, source={"input": clean}, nodes="bn1/"
    ).model
    changed = {
        n for n, (m, _) in _stats(only).items() if not np.array_equal(m, _stats(model)[n][0])
    }
    assert changed == {"/bn1/BatchNormalization"}


def test_source_moments_are_saved_merged_and_applied(tmp_path) -> None:
    """Batch mode: shards (source and target) merge to the single run's statistics."""
    model, clean, shifted, _ = _digits()
    whole = bnsurgery.reestimate(
        model,
        {"input": shifted[:256]},
        source={"input": clean[:256]},
        mode="batch",
        batch_size=64,
    )
    parts = []
    for i, (lo, hi) in enumerate([(0, 128), (128, 256)]):
        part = bnsurgery.reestimate(
            model,
            {"input": shifted[lo:hi]},
            source={"input": clean[lo:hi]},
            mode="batch",
            batch_size=64,
        )
        parts.append(part.report.stats.save(tmp_path / f"part{i}.npz"))
    from bnsurgery.stats import merge_files

    merged = merge_files(parts)
    assert merged.source is not None and merged.source.samples == 256
    merged.save(tmp_path / "merged.npz")
    assert StatsSet.load(tmp_path / "merged.npz").source is not None
    applied = bnsurgery.reestimate(model, stats=tmp_path / "merged.npz", mode="batch").model
    for name, (mean, var) in _stats(whole.model).items():
        np.testing.assert_allclose(_stats(applied)[name][0], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(_stats(applied)[name][1], var, rtol=1e-5)
    # the source part alone is reusable as --source
    reused = bnsurgery.reestimate(
        model,
        {"input": shifted[:256]},
        source=tmp_path / "merged.npz",
        mode="batch",
        batch_size=64,
    ).model
    for name, (mean, _) in _stats(whole.model).items():
        np.testing.assert_allclose(_stats(reused)[name][0], mean, rtol=1e-5, atol=1e-6)


def test_a_plain_statistics_file_is_refused_as_source(tmp_path) -> None:
    from bnsurgery.errors import DataError

    model, clean, shifted, _ = _digits()
    plain = bnsurgery.reestimate(model, {"input": clean}).report.stats.save(tmp_path / "p.npz")
    with pytest.raises(DataError, match="no source statistics"):
        bnsurgery.reestimate(model, {"input": shifted}, source=plain)


def test_cli_reestimate_and_adapt_take_source_on_a_model_with_bns(cli, tmp_path) -> None:
    _model, clean, shifted, _ = _digits()
    np.savez(tmp_path / "clean.npz", input=clean)
    np.savez(tmp_path / "shifted.npz", input=shifted)
    for command, data_flag in (("reestimate", "--data"), ("adapt", "--target")):
        out = tmp_path / f"{command}.onnx"
        code, stdout, err = cli(
            command,
            DIGITS,
            data_flag,
            tmp_path / "shifted.npz",
            "--source",
            tmp_path / "clean.npz",
            "-o",
            out,
            "--json",
        )
        assert code == 0, err
        payload = json.loads(stdout)
        section = (
            payload["source_relative"]
            if command == "reestimate"
            else payload["reestimate"]["source_relative"]
        )
        assert section["source_samples"] == len(clean)
        assert out.is_file()
        ev = payload["evidence"]  # label-free signals: entropy on the target, agreement on source
        assert ev["entropy_before"] is not None and ev["source_agreement"] is not None
