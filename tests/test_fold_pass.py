"""FoldPass as a pass: verification is its postcondition (`ensures`), what it logs, and the
names its report gives BNs whose output a later fold renamed."""

from __future__ import annotations

import logging
from pathlib import Path

import models as m
import onnx
import pytest

import bnsurgery
from bnsurgery.errors import BadInputError, CheckFailed
from bnsurgery.passes.fold import FoldPass, VerificationFailed
from bnsurgery.passes.fold import arithmetic as fold_math
from bnsurgery.pipeline.registry import make_pass


def _wrong_conv_fold(monkeypatch) -> None:
    real = fold_math.conv_forward
    monkeypatch.setattr(fold_math, "conv_forward", lambda w, b, s, t: real(w, b, s * 1.01, t))


# -- verification as the postcondition -----------------------------------------------------------
def test_verify_puts_the_verdict_in_the_report() -> None:
    result = FoldPass(verify=True)(m.conv_bn())
    assert result.report.verification["ok"] is True  # type: ignore[attr-defined]


def test_without_verify_there_is_no_verdict() -> None:
    assert FoldPass()(m.conv_bn()).report.verification is None  # type: ignore[attr-defined]


def test_a_wrong_fold_fails_its_postcondition_and_keeps_the_result(monkeypatch) -> None:
    _wrong_conv_fold(monkeypatch)
    model = m.conv_bn()
    with pytest.raises(VerificationFailed) as caught:
        FoldPass(verify=True)(model)
    assert isinstance(caught.value, CheckFailed) and caught.value.exit_code == 1
    rejected = caught.value.result
    assert rejected is not None and rejected.model is not model
    assert rejected.report.verification["ok"] is False  # type: ignore[attr-defined]
    assert [e.action for e in rejected.report.entries] == ["folded"]  # type: ignore[attr-defined]


def test_an_in_place_verified_fold_needs_a_source() -> None:
    with pytest.raises(BadInputError) as caught:
        FoldPass(in_place=True, verify=True)
    assert caught.value.option == "source"


def test_an_in_place_fold_reloads_its_source_to_verify(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "net.onnx"
    onnx.save(m.conv_bn(), path)
    loaded = onnx.load(path)
    result = FoldPass(in_place=True, verify=True, source=path)(loaded)
    assert result.model is loaded and m.count_op(loaded) == 0
    assert result.report.verification["ok"] is True  # type: ignore[attr-defined]
    _wrong_conv_fold(monkeypatch)  # judged against the file, not against the rewritten input
    with pytest.raises(VerificationFailed):
        FoldPass(in_place=True, verify=True, source=path)(onnx.load(path))


def test_the_judges_options_reach_the_judge() -> None:
    result = FoldPass(verify=True, samples=2, seed=7, label="my model")(m.conv_bn())
    verification = result.report.verification  # type: ignore[attr-defined]
    assert verification["ok"] is True
    assert (verification["seed"], verification["samples"]) == (7, 2)


def test_a_pipeline_step_verifies_like_the_api() -> None:
    step = make_pass("fold", verify=True)
    assert step(m.conv_bn()).report.verification["ok"] is True  # type: ignore[attr-defined]


def test_the_api_raises_the_pass_failure(monkeypatch) -> None:
    _wrong_conv_fold(monkeypatch)
    with pytest.raises(VerificationFailed):
        bnsurgery.fold(m.conv_bn())


def test_fold_file_writes_nothing_on_failure(tmp_path: Path, monkeypatch) -> None:
    path, out = tmp_path / "net.onnx", tmp_path / "out.onnx"
    onnx.save(m.conv_bn(), path)
    _wrong_conv_fold(monkeypatch)
    with pytest.raises(CheckFailed, match=r"out\.onnx was not written"):
        bnsurgery.fold_file(path, out)
    assert not out.exists()


# -- logging -------------------------------------------------------------------------------------
def test_each_decision_is_logged_at_info(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="bnsurgery.passes.fold"):
        FoldPass()(m.conv_two_consumers())
        FoldPass()(m.conv_bn())
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("bnsurgery.passes")]
    assert "fold: BN bn folded forward into conv (Conv)" in messages
    kept = [msg for msg in messages if msg.startswith("fold: BN bn kept (")]
    assert kept and "producer-has-other-consumers" in kept[0]


# -- names ---------------------------------------------------------------------------------------
def test_a_kept_bn_keeps_its_original_name_when_a_fold_renames_its_output() -> None:
    """x -> BN (unnamed, output a) -> BN b -> y: b folds into the first BN, whose output
    becomes y; the report still names the first BN as in the original model."""
    r = m.rng(5)
    inits = [*m.bn_inits("p1", m.bn_stats(r, 4)), *m.bn_inits("p2", m.bn_stats(r, 4))]
    first = m.bn_node("", "x", "a", prefix="p1")
    second = m.bn_node("b", "a", "y", prefix="p2")
    model = m.make(
        [first, second], [m.vi("x", [2, 4, 3, 3])], [m.vi("y", [2, 4, 3, 3])], inits, name="u"
    )
    report = FoldPass()(model).report
    names = {e.node: e.action for e in report.entries}  # type: ignore[attr-defined]
    assert names == {"BatchNormalization(a)": "kept", "b": "folded"}
    folded = FoldPass()(model).model
    assert [n.output[0] for n in folded.graph.node] == ["y"]  # the renamed output


def test_report_names_match_the_sites_of_the_original() -> None:
    from bnsurgery.model.sites import bn_sites

    for build in (m.if_bn, m.loop_bn, m.function_bn, m.conv_bn_bn, m.bn_bn):
        model = build()
        report = FoldPass()(model).report
        expected = [(s.scope, s.label) for s in bn_sites(model)]
        assert [(e.scope, e.node) for e in report.entries] == expected, build.__name__  # type: ignore[attr-defined]
