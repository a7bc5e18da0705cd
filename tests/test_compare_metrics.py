"""Error and agreement metrics (harness/metrics.py): what each number means."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bnsurgery.errors import BadInputError
from bnsurgery.harness.metrics import (
    ErrorAccumulator,
    ToleranceSpec,
    compare_arrays,
    default_tolerance,
)


def logits(n=50, c=10, seed=0):
    return np.random.default_rng(seed).standard_normal((n, c)).astype(np.float32)


def test_default_tolerances_follow_the_dtype():
    assert default_tolerance(np.float32) == (1e-5, 1e-4)
    assert default_tolerance(np.float64) == (1e-5, 1e-4)
    assert default_tolerance(np.float16) == (2.5e-3, 1e-3)


def test_pass_rule_is_allclose_against_the_reference():
    ref = np.array([1.0, 100.0], np.float32)
    ok = compare_arrays(ref, ref + np.array([1e-5, 1e-2], np.float32))
    assert ok.passed  # 1e-2 <= 1e-5 + 1e-4 * 100
    bad = compare_arrays(ref, ref + np.array([0.0, 2e-2], np.float32))
    assert not bad.passed and bad.mismatched == 1


def test_errors_and_the_minimum_passing_tolerances():
    ref = np.array([2.0, -4.0, 0.5])
    cand = ref + np.array([0.1, -0.2, 0.0])
    m = compare_arrays(ref, cand, atol=0.0, rtol=0.01)
    assert m.max_abs == pytest.approx(0.2) and m.mean_abs == pytest.approx(0.1)
    assert m.max_rel == pytest.approx(0.05)
    assert m.min_atol == pytest.approx(0.2 - 0.01 * 4.0)  # max(|d| - rtol |ref|)
    assert m.min_rtol == pytest.approx(0.05)  # max(|d| - atol) / |ref|
    assert compare_arrays(ref, cand, atol=m.min_atol + 1e-12, rtol=0.01).passed
    assert compare_arrays(ref, cand, atol=0.0, rtol=m.min_rtol + 1e-12).passed


def test_cosine_similarity():
    ref = np.array([1.0, 0.0])
    assert compare_arrays(ref, np.array([0.0, 1.0])).cosine == pytest.approx(0.0)
    assert compare_arrays(ref, np.array([2.0, 0.0])).cosine == pytest.approx(1.0)


def test_nan_passes_only_where_the_reference_has_nan_too():
    ref = np.array([1.0, np.nan, np.inf])
    same = compare_arrays(ref, ref.copy())
    assert same.passed and same.reference_nan == 1 and same.reference_inf == 1
    cand = np.array([np.nan, np.nan, np.inf])
    m = compare_arrays(ref, cand)
    assert not m.passed and m.candidate_nan == 2 and math.isinf(m.max_abs)
    assert m.worst_index == [0] and "NaN/Inf" in m.note


def test_top1_top5_agreement_and_accuracy_for_n_by_c_outputs():
    ref = logits()
    cand = ref.copy()
    cand[0] = -cand[0]  # sample 0 changes its top-1 and its top-5
    labels = ref.argmax(axis=1)
    m = compare_arrays(ref, cand, labels=labels)
    assert m.top1_agreement == pytest.approx(49 / 50)
    assert m.top5_agreement == pytest.approx(49 / 50)
    assert m.reference_accuracy == 1.0 and m.candidate_accuracy == pytest.approx(49 / 50)


def test_topk_is_not_reported_for_other_shapes():
    m = compare_arrays(np.zeros((4, 3, 2), np.float32), np.zeros((4, 3, 2), np.float32))
    assert m.top1_agreement is None and m.top5_agreement is None
    few = compare_arrays(logits(c=3), logits(c=3))
    assert few.top1_agreement == 1.0 and few.top5_agreement is None  # 3 classes: no top-5


def test_streaming_over_batches_equals_one_shot():
    ref, cand = logits(40), logits(40) * 0.999
    labels = np.arange(40) % 10
    acc = ErrorAccumulator("y", 1e-5, 1e-4)
    for start in range(0, 40, 16):
        acc.update(ref[start : start + 16], cand[start : start + 16], labels[start : start + 16])
    streamed = acc.result().to_dict()
    whole = compare_arrays(ref, cand, name="y", labels=labels).to_dict()
    for key in ("max_abs", "max_rel", "mean_abs", "cosine", "min_atol", "min_rtol", "accuracy",
                "top1_agreement", "top5_agreement", "mismatched", "worst_index"):  # fmt: skip
        assert streamed[key] == pytest.approx(whole[key]), key


def test_shape_mismatch_fails_with_a_note():
    m = compare_arrays(np.zeros((2, 3)), np.zeros((2, 4)))
    assert not m.passed and "shape mismatch" in m.note


def test_json_has_no_bare_infinities():
    d = compare_arrays(np.array([0.0]), np.array([np.inf])).to_dict()
    assert d["max_abs"] == "inf" and d["min_atol"] == "inf"


def test_tolerances_per_output_override_the_global_one():
    spec = ToleranceSpec.parse(["1e-3", "logits:1e-1"], ["probs:0"])
    assert spec.for_output("logits", np.float32) == (1e-1, 1e-4)
    assert spec.for_output("probs", np.float16) == (1e-3, 0.0)
    assert spec.for_output("other", np.float16) == (1e-3, 1e-3)
    spec.check_names(["logits", "probs"])
    with pytest.raises(BadInputError, match="unknown output") as exc:
        spec.check_names(["logits"])
    assert exc.value.option == "rtol"  # probs has an rtol only


@pytest.mark.parametrize("bad", ["abc", "x:", "-1", "x:nan"])
@pytest.mark.parametrize("what", ["atol", "rtol"])
def test_bad_tolerance_strings_name_their_parameter(bad, what):
    with pytest.raises(BadInputError) as exc:
        ToleranceSpec.parse(**{what: [bad]})
    assert exc.value.option == what and str(exc.value).startswith(f"bad {what} '{bad}'")
    assert exc.value.render("--" + what).startswith(f"bad --{what} '{bad}'")
