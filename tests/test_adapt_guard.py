"""The evidence around an adaptation: the drift warning, the labelled guard, --auto.

The model: two features -> BN (stored statistics mean 0, var 1) -> identity Gemm; the class is
the larger raw feature. On data whose feature 0 sits at +2 (the model's training domain), the
stored statistics are right and plain re-estimation, which re-centres feature 0, is wrong.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from conftest import SAMPLES, sha256
from onnx import TensorProto, helper, numpy_helper

from bnsurgery.passes.adapt_guard import (
    FAR_SHARE,
    FLIP_SHARE,
    INFO_GAIN,
    MANY_FLIPS,
    SIGNIFICANCE,
    Evidence,
    better_p,
    drift,
    harm_figure,
    information,
    sign_test_p,
)


def _model() -> onnx.ModelProto:
    def t(name, value):
        return numpy_helper.from_array(np.asarray(value, np.float32), name)

    nodes = [
        helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["h"], name="bn"),
        helper.make_node("Gemm", ["h", "w", "c"], ["logits"], name="head"),
    ]
    inits = [t("s", [1, 1]), t("b", [0, 0]), t("m", [0, 0]), t("v", [1, 1])]
    inits += [t("w", np.eye(2)), t("c", [0, 0])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])


def _data(seed: int, n: int = 400, offset: float = 2.0) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).normal(0, 1, (n, 2))
    x[:, 0] += offset
    return {"x": x.astype(np.float32), "label": x.argmax(axis=1).astype(np.int64)}


def test_the_drift_rule_counts_deep_channels_moved_by_more_than_one_stored_std() -> None:
    def change(name, move, channels=10):
        old = np.zeros(channels)
        new = np.r_[np.full(move, 3.0), np.zeros(channels - move)]
        return SimpleNamespace(name=name, old_mean=old, new_mean=new, old_var=np.ones(channels))

    far = round(10 * FAR_SHARE)
    quiet = drift([change("early", 10), change("deep", far - 1)])
    assert quiet["deep_bns"] == 1 and quiet["far_channels"] == far - 1 and not quiet["warn"]
    loud = drift([change("early", 0), change("deep", far)])
    assert loud["warn"] and loud["largest_move_bn"] == "deep"
    assert loud["largest_move"] == 3.0


def test_information_is_diversity_minus_uncertainty() -> None:
    sure_and_diverse = np.array([[1.0, 0.0], [0.0, 1.0]])
    collapsed = np.array([[1.0, 0.0], [1.0, 0.0]])
    unsure = np.full((2, 2), 0.5)
    assert information(sure_and_diverse) == pytest.approx(np.log(2))
    assert information(collapsed) == pytest.approx(0.0, abs=1e-9)
    assert information(unsure) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(
    ("agreement", "info_after", "warns"),
    [
        (100.0 * (1 - FLIP_SHARE) + 0.1, 0.3, False),  # hardly any flips: (b) stays silent
        (100.0 * (1 - FLIP_SHARE) - 0.1, 0.5 - 1e-3, True),  # a few flips that lose information
        (100.0 * (1 - MANY_FLIPS) + 0.1, 0.5 + 1e-3, False),  # a few flips, any gain explains
        (70.0, 0.5 * (1 + INFO_GAIN) - 1e-3, True),  # many flips, too little gain
        (70.0, 0.5 * (1 + INFO_GAIN) + 1e-3, False),  # the flips made it surer or more diverse
        (70.0, 0.3, True),  # many flips that lose information
    ],
)
def test_the_flip_rule_needs_a_gain_in_information(agreement, info_after, warns) -> None:
    quiet_drift = {"warn": False, "far_channels": 0, "deep_channels": 8}
    evidence = Evidence(target_agreement=agreement, information_before=0.5)
    evidence.information_after = info_after
    figure = harm_figure(quiet_drift, evidence)
    assert figure["warn"] is warns and figure["unexplained_flips"] is warns
    assert figure["target_flips"] == pytest.approx(1 - agreement / 100, abs=1e-4)
    assert harm_figure(quiet_drift, None)["warn"] is False  # no predictions, no rule (b)


def test_plain_reestimation_that_helps_a_collapsed_model_does_not_warn(cli, tmp_path) -> None:
    """The digits CNN on low-contrast digits predicts one class, confidently; plain AdaBN brings
    it back (about 10 % -> 97 %). Its predictions get *less* sure on average, so a rule on
    entropy alone would warn; they become far more informative, so the flip rule does not."""
    train = np.load(SAMPLES / "digits_train.npz")["input"]
    mean = train.mean(axis=(1, 2, 3), keepdims=True)
    np.savez(tmp_path / "t.npz", input=((train - mean) * 0.3 + mean).astype(np.float32))
    code, stdout, err = cli(
        "reestimate", SAMPLES / "digits_cnn.onnx", "--data", tmp_path / "t.npz",
        "-o", tmp_path / "out.onnx", "--json",
    )  # fmt: skip
    assert code == 0, err
    figure = json.loads(stdout)["drift"]
    assert figure["entropy_rise"] > 0.1 and figure["target_flips"] > 0.5
    assert figure["information_gain"] > 10 and not figure["warn"]
    assert "warning" not in err


def test_plain_reestimation_that_lowers_accuracy_is_refused_and_nothing_is_written(
    cli, tmp_path
) -> None:
    model = tmp_path / "net.onnx"
    onnx.save(_model(), model)
    np.savez(tmp_path / "t.npz", **_data(0))
    digest = sha256(model)
    out = tmp_path / "out.onnx"
    code, stdout, err = cli("reestimate", model, "--data", tmp_path / "t.npz", "-o", out, "--json")
    assert code == 1
    assert "was not written" in err and "held-out accuracy" in err
    assert not out.exists() and sha256(model) == digest
    payload = json.loads(stdout)
    ev = payload["evidence"]
    assert ev["refused"] and ev["accuracy_after"] < ev["accuracy_before"] - 0.5
    assert ev["held_out"] == 100  # a quarter of the 400 samples
    assert payload["drift"]["warn"] and "warning: plain re-estimation" in err
    assert payload["drift"]["far_channels"] == 1
    # rule (a) catches it; (b) cannot: the target's classes really are skewed (feature 0 at
    # +2), so the predictions that re-centring makes more diverse also look more informative
    assert not payload["drift"]["unexplained_flips"] and payload["drift"]["target_flips"] > 0.3
    assert "--source" in err
    # --force writes it anyway, and says so
    code, stdout, err = cli(
        "reestimate", model, "--data", tmp_path / "t.npz", "-o", out, "--json", "--force"
    )
    assert code == 0 and out.is_file() and json.loads(stdout)["evidence"]["forced"]


def test_a_helpful_adaptation_passes_the_guard(cli, tmp_path) -> None:
    """Source-relative: SOURCE from the training domain, TARGET shifted by +3 on feature 1."""
    model = tmp_path / "net.onnx"
    onnx.save(_model(), model)
    source = _data(1)
    target = _data(2)
    target["x"][:, 1] += 3.0  # the shift; labels stay those of the unshifted features
    np.savez(tmp_path / "s.npz", x=source["x"])
    np.savez(tmp_path / "t.npz", **target)
    out = tmp_path / "out.onnx"
    code, stdout, err = cli(
        "adapt",
        model,
        "--target",
        tmp_path / "t.npz",
        "--source",
        tmp_path / "s.npz",
        "-o",
        out,
        "--json",
    )
    assert code == 0, err
    ev = json.loads(stdout)["evidence"]
    assert ev["accuracy_after"] > ev["accuracy_before"] + 10 and not ev["refused"]
    assert json.loads(stdout)["drift"]["warn"] is False  # no warning for source-relative


def test_without_labels_the_summary_reports_entropy_and_source_agreement(cli, tmp_path) -> None:
    model = tmp_path / "net.onnx"
    onnx.save(_model(), model)
    np.savez(tmp_path / "t.npz", x=_data(0)["x"])
    np.savez(tmp_path / "s.npz", x=_data(1)["x"])
    code, stdout, err = cli(
        "reestimate", model, "--data", tmp_path / "t.npz", "--source", tmp_path / "s.npz"
    )
    assert code == 0, err
    assert "mean prediction entropy on the target" in stdout
    assert "agree on" in stdout and "of the source" in stdout


def test_auto_picks_a_candidate_on_held_out_labels_and_says_why(cli, tmp_path) -> None:
    model = tmp_path / "net.onnx"
    onnx.save(_model(), model)
    target = _data(2)
    target["x"][:, 1] += 3.0
    np.savez(tmp_path / "t.npz", **target)
    np.savez(tmp_path / "s.npz", x=_data(1)["x"])
    out = tmp_path / "out.onnx"
    code, stdout, err = cli(
        "reestimate",
        model,
        "--data",
        tmp_path / "t.npz",
        "--source",
        tmp_path / "s.npz",
        "--auto",
        "-o",
        out,
        "--json",
    )
    assert code == 0, err
    auto = json.loads(stdout)["auto"]
    assert auto["chosen"].startswith("source-relative")
    assert "held-out accuracy" in auto["reason"] and "one-sided p = " in auto["reason"]
    assert {t["candidate"] for t in auto["tried"]} >= {"none", "plain", "source-relative"}
    chosen = next(t for t in auto["tried"] if t["candidate"] == auto["chosen"])
    assert chosen["p_value"] < SIGNIFICANCE
    assert out.is_file()


def test_auto_writes_nothing_on_a_gain_too_small_to_measure(cli, tmp_path) -> None:
    """The same helpful shift as above, but 8 samples: --auto holds out half, 4, and even 4
    fixed of 4 (p = 1/16) is not a measured reason to write an adapted model."""
    model = tmp_path / "net.onnx"
    onnx.save(_model(), model)
    target = _data(2, n=8)
    target["x"][:, 1] += 3.0
    np.savez(tmp_path / "t.npz", **target)
    np.savez(tmp_path / "s.npz", x=_data(1)["x"])
    out = tmp_path / "out.onnx"
    code, stdout, err = cli(
        "reestimate", model, "--data", tmp_path / "t.npz", "--source", tmp_path / "s.npz",
        "--auto", "-o", out, "--json",
    )  # fmt: skip
    assert code == 1 and not out.exists(), err
    auto = json.loads(stdout)["auto"]
    assert auto["chosen"] == "none" and "measurably" in auto["reason"]
    assert all(t["p_value"] >= SIGNIFICANCE for t in auto["tried"][1:])


@pytest.mark.parametrize(
    ("wins", "losses", "p"),
    [(0, 0, 1.0), (4, 0, 1 / 16), (5, 0, 1 / 32), (8, 1, 10 / 512), (3, 3, 42 / 64)],
)
def test_the_sign_test_is_exact(wins, losses, p) -> None:
    assert sign_test_p(wins, losses) == pytest.approx(p)


def test_without_labels_measurably_better_means_a_paired_entropy_decrease() -> None:
    rng = np.random.default_rng(0)
    unsure = rng.dirichlet([2, 2], size=200)
    surer = np.clip(unsure + np.where(unsure > 0.5, 0.2, -0.2), 0.01, 0.99)
    surer /= surer.sum(axis=1, keepdims=True)
    assert better_p(unsure, surer, None).p_value < 1e-6
    assert better_p(unsure, unsure, None).p_value == 1.0
    assert better_p(surer, unsure, None).p_value > 0.99


def test_auto_writes_nothing_when_no_candidate_beats_the_original(cli, tmp_path) -> None:
    model = tmp_path / "net.onnx"
    onnx.save(_model(), model)
    np.savez(tmp_path / "t.npz", **_data(0))
    out = tmp_path / "out.onnx"
    code, stdout, err = cli("reestimate", model, "--data", tmp_path / "t.npz", "--auto", "-o", out)
    assert code == 1 and not out.exists()
    assert "found no adaptation to write" in err and "measurably" in err
    assert "auto: chose none" in stdout
