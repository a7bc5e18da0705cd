"""`bnsurgery validate`: one model that triggers each check and one that passes it, the planted
faults model, the sample models, exit codes and the JSON schema."""

from __future__ import annotations

import json
from pathlib import Path

import models as M
import numpy as np
import onnx
import pytest
from conftest import SAMPLES, sha256
from onnx import helper

import bnsurgery
from bnsurgery.errors import CheckFailed
from bnsurgery.validation.checks import builtin_checks
from bnsurgery.validation.gate import ValidationFailed, validate

CHECK_IDS = [
    "onnx-checker",
    "shape-inference",
    "bn-invalid-params",
    "bn-training-mode",
    "bn-nonfinite-params",
    "bn-negative-variance",
    "bn-dead-channels",
    "bn-untrained-stats",
    "bn-small-epsilon",
    "bn-not-folded",
    "bn-fp16-overflow-risk",
    "fold-verification",
    "provider-parity",
]
SAMPLE_MODELS = ["digits_cnn", "digits_cnn_nobn", "digits_mlp", "resnet_small"]


# -- models built for these tests --------------------------------------------------------------
def conv_bn_stats(*, dtype: int = M.F32, eps: float | None = None, **changes) -> onnx.ModelProto:
    """x -> Conv -> BN with healthy statistics, then `changes` applied: e.g. var={2: 0.0}
    sets channel 2's var, scale=1.0 sets every channel's scale, W={(0, 0, 0, 0): 30.0}."""
    r = M.rng(40)
    w = M.weight(r, [4, 3, 3, 3])
    st = M.bn_stats(r, 4)
    for key, change in changes.items():
        target = w if key == "W" else getattr(st, key)
        if isinstance(change, dict):
            for where, value in change.items():
                target[where] = value
        else:
            target[...] = change
    return M._conv_bn_w(w, st, dtype, eps=eps, name="conv_bn_stats")


def planted_faults() -> onnx.ModelProto:
    """Four Conv -> BN branches, each with one planted fault: a BN in training mode, a NaN
    variance, a dead channel, and a fold whose bias would overflow float16 (-1e5)."""
    r = M.rng(50)
    c = 4
    nodes, inits, outputs = [], [], []
    for tag in ("bn_train", "bn_nan", "bn_dead", "bn_big"):
        w = M.weight(r, [c, 3, 3, 3])
        st = M.bn_stats(r, c)
        attrs, extra = {}, []
        if tag == "bn_train":
            attrs["training_mode"] = 1
            extra = [f"{tag}.running_mean", f"{tag}.running_var"]
        elif tag == "bn_nan":
            st.var[1] = np.nan
        elif tag == "bn_dead":
            st.var[2] = 0.0
        else:  # s = 100 on channel 0 and mean 1000: the folded bias is beta - 1e5
            st.scale[0], st.var[0], st.mean[0] = 100.0, 1.0, 1000.0
        inits += [M.init(f"{tag}.W", w), *M.bn_inits(tag, st)]
        nodes.append(
            helper.make_node("Conv", ["x", f"{tag}.W"], [f"{tag}.conv"], name=f"{tag}_conv")
        )
        nodes.append(M.bn_node(tag, f"{tag}.conv", f"y_{tag}", outputs=extra, **attrs))
        outputs.append(M.vi(f"y_{tag}", [2, c, 3, 3]))
    return M.make(nodes, [M.vi("x", [2, 3, 5, 5])], outputs, inits, opset=15, name="planted")


def shape_conflict() -> onnx.ModelProto:
    """Conv's output declared [2, 4, 7, 7] where it is [2, 4, 3, 3]: the checker accepts it,
    strict shape inference does not."""
    model = M.conv_bn(cin=3, cout=4, k=3, pad=0, size=5)
    model.graph.output[0].type.tensor_type.shape.dim[2].dim_value = 7
    return model


def offset_conv_bn() -> onnx.ModelProto:
    """Conv with bias 1e5 -> BN with mean 1e5: the unfused graph loses the activations in the
    rounding of 1e5 (float32 ulp 0.008); ORT's own Conv+BN fusion (ORT_ENABLE_ALL) cancels the
    offset exactly. The two sessions disagree by ~1e-2."""
    r = M.rng(41)
    w = M.weight(r, [4, 3, 3, 3]) * 0.2
    st = M.Stats(scale=np.ones(4), bias=np.zeros(4), mean=np.full(4, 1e5), var=np.full(4, 0.1))
    return M._conv_bn_w(w, st, M.F32, bias=np.full(4, 1e5), name="offset")


def ids(report, severity: str | None = None) -> list[tuple[str, str | None]]:
    return [(f.id, f.node) for f in report.findings if severity is None or f.severity == severity]


def only(model, check: str, **options):
    return validate(model, only=[check], plugins=False, **options)


# -- the check list ------------------------------------------------------------------------------
def test_every_builtin_check_has_a_stable_id_severity_and_hint():
    checks = builtin_checks()
    assert [c.name for c in checks] == CHECK_IDS
    severities = {c.name: c.severity for c in checks}
    assert {k for k, v in severities.items() if v == "error"} == {
        "onnx-checker", "shape-inference", "bn-invalid-params", "bn-training-mode",
        "bn-nonfinite-params", "bn-negative-variance", "fold-verification", "provider-parity",
    }  # fmt: skip
    assert {k for k, v in severities.items() if v == "warning"} == {
        "bn-dead-channels", "bn-untrained-stats", "bn-small-epsilon", "bn-fp16-overflow-risk",
    }  # fmt: skip
    assert severities["bn-not-folded"] == "info"
    assert all(c.hint and "\n" not in c.hint for c in checks)


def test_docs_list_every_check_with_an_example_finding():
    text = (Path(__file__).parent.parent / "docs" / "validate.md").read_text()
    for check_id in [*CHECK_IDS, "check-crashed"]:
        assert f"`{check_id}`" in text
        assert f'"id": "{check_id}"' in text, f"no example finding for {check_id}"


# -- one trigger and one pass per check ----------------------------------------------------------
def test_onnx_checker_reports_an_invalid_model():
    report = only(M.checker_failing(), "onnx-checker")
    [finding] = report.findings
    assert finding.id == "onnx-checker" and finding.severity == "error"
    assert "W_missing" in finding.message


def test_onnx_checker_passes_a_valid_model():
    assert only(M.conv_bn(), "onnx-checker").findings == []


def test_a_model_failing_the_checker_is_not_run():
    report = validate(M.checker_failing(), plugins=False)
    skipped = {c.name: c.note for c in report.checks if c.status == "skipped"}
    assert skipped["provider-parity"] == "the model fails the ONNX checker"
    assert not report.ok


def test_shape_inference_reports_a_declared_shape_conflict():
    [finding] = only(shape_conflict(), "shape-inference").findings
    assert finding.id == "shape-inference" and finding.severity == "error"
    assert "strict shape inference fails" in finding.message


def test_shape_inference_passes_consistent_shapes():
    assert only(M.conv_bn(), "shape-inference").findings == []


def test_invalid_params_reports_a_wrongly_shaped_scale():
    [finding] = only(M.wrong_shape_params("scale"), "bn-invalid-params").findings
    assert (finding.id, finding.node) == ("bn-invalid-params", "bn")
    assert "scale[5]" in finding.message


def test_invalid_params_passes_four_channel_vectors():
    assert only(M.conv_bn(), "bn-invalid-params").findings == []


def test_fold_checks_skip_a_model_fold_refuses():
    report = validate(M.wrong_shape_params("scale"), plugins=False)
    notes = {c.name: (c.status, c.note) for c in report.checks}
    assert notes["bn-not-folded"][0] == "skipped"
    assert "fold pass refused" in notes["bn-not-folded"][1]


@pytest.mark.parametrize(
    "build, why",
    [
        (M.training_mode_bn, "training_mode=1"),
        (lambda: M.opset6_bn(is_test=0), "is_test=0"),
        (lambda: M.bn_extra_outputs(opset=9), "extra training outputs"),
    ],
    ids=["training_mode-1", "opset6-is_test-0", "opset9-extra-outputs"],
)
def test_training_mode_is_an_error(build, why):
    [finding] = only(build(), "bn-training-mode").findings
    assert (finding.id, finding.severity, finding.node) == ("bn-training-mode", "error", "bn")
    assert why in finding.message


def test_training_mode_passes_inference_bns():
    assert only(M.opset6_bn(is_test=1), "bn-training-mode").findings == []
    assert only(M.conv_bn(), "bn-training-mode").findings == []


@pytest.mark.parametrize(
    "kind, where", [("nan-var", "var"), ("inf-var", "var"), ("nan-scale", "scale"),
                    ("inf-mean", "mean")],
)  # fmt: skip
def test_nonfinite_params_is_an_error(kind, where):
    [finding] = only(M.bad_statistics(kind), "bn-nonfinite-params").findings
    assert (finding.id, finding.severity) == ("bn-nonfinite-params", "error")
    assert finding.details["channels"] == {where: [1]}


def test_nonfinite_params_passes_finite_params():
    assert only(M.conv_bn(), "bn-nonfinite-params").findings == []


def test_negative_variance_is_an_error():
    [finding] = only(M.bad_statistics("negative-var"), "bn-negative-variance").findings
    assert (finding.severity, finding.details["channels"]) == ("error", [1])


def test_negative_variance_passes_zero_variance():
    assert only(conv_bn_stats(var={2: 0.0}), "bn-negative-variance").findings == []


def test_dead_channel_is_a_warning_with_its_gain():
    [finding] = only(conv_bn_stats(var={2: 0.0}, scale={2: 1.0}), "bn-dead-channels").findings
    assert (finding.severity, finding.details["channels"]) == ("warning", [2])
    assert finding.details["max_gain"] == pytest.approx(1 / np.sqrt(np.float32(1e-5)), rel=1e-6)


def test_dead_channels_pass_small_but_live_variances_and_pruned_channels():
    assert only(conv_bn_stats(var={2: 1e-4}), "bn-dead-channels").findings == []
    pruned = conv_bn_stats(var={2: 0.0}, scale={2: 0.0})  # gamma 0: nothing to amplify
    assert only(pruned, "bn-dead-channels").findings == []


def test_untrained_statistics_are_a_warning():
    [finding] = only(conv_bn_stats(mean=0.0, var=1.0), "bn-untrained-stats").findings
    assert (finding.id, finding.severity, finding.node) == ("bn-untrained-stats", "warning", "bn")


def test_untrained_statistics_pass_when_one_channel_was_trained():
    assert only(conv_bn_stats(mean=0.0, var={0: 1.0, 1: 1.0, 2: 1.0, 3: 0.9}),
                "bn-untrained-stats").findings == []  # fmt: skip


def test_small_epsilon_warns_for_float16_with_tiny_variances():
    [finding] = only(M.fp16_tiny_var(), "bn-small-epsilon").findings
    assert finding.severity == "warning" and finding.details["channels"]


def test_small_epsilon_passes_float32_and_a_float16_epsilon_of_1e_3():
    assert only(conv_bn_stats(var=1e-4), "bn-small-epsilon").findings == []
    fp16 = conv_bn_stats(dtype=M.F16, var=1e-4, eps=1e-3)
    assert only(fp16, "bn-small-epsilon").findings == []


def test_fp16_overflow_risk_of_folded_weights():
    model = conv_bn_stats(scale={0: 3000.0}, var={0: 1.0}, W={(0, 0, 0, 0): 30.0})
    [finding] = only(model, "bn-fp16-overflow-risk").findings
    assert (finding.severity, finding.details["tensor"]) == ("warning", "W")
    assert finding.details["max_abs"] == pytest.approx(30 * 3000 / np.sqrt(1 + 1e-5), rel=1e-5)


def test_fp16_overflow_risk_of_a_float16_model_fold_refuses():
    [finding] = only(M.fp16_overflow("weight"), "bn-fp16-overflow-risk").findings
    assert finding.details["reason"] == "overflow"


def test_fp16_overflow_risk_passes_ordinary_weights():
    assert only(M.conv_bn(), "bn-fp16-overflow-risk").findings == []


def test_not_folded_is_info_with_the_dry_run_reason():
    report = only(M.conv_bn_relu(), "bn-not-folded")
    [finding] = report.findings
    assert (finding.severity, finding.details["reason"]) == ("info", "folded")
    assert finding.details["target"] == "conv"
    [kept] = only(M.bn_relu(), "bn-not-folded").findings
    assert kept.details["action"] == "kept"
    assert kept.details["reason"] == bnsurgery.info(M.bn_relu()).entries[0].reason


@pytest.mark.parametrize("sample", ["digits_cnn", "resnet_small"])
def test_not_folded_speaks_the_dry_run_vocabulary_of_info(sample):
    """validate and info describe one dry run: the same action, direction and target per BN
    (the fold report's own fields), and the text says what fold *would* do."""
    path = SAMPLES / f"{sample}.onnx"
    entries = {e.node: e for e in bnsurgery.info(path).entries}
    findings = only(path, "bn-not-folded").findings
    assert len(findings) == len(entries)
    for finding in findings:
        entry = entries[finding.node]
        assert finding.details["action"] == entry.action
        assert finding.details["direction"] == entry.direction
        if entry.action == "folded":
            assert finding.message == (
                f"would fold {entry.direction} into {entry.target} ({entry.target_op})"
            )
        else:
            assert finding.message.startswith(f"would be kept (reason {entry.reason}")


def test_not_folded_passes_a_folded_model():
    folded = bnsurgery.fold(M.conv_bn()).model
    assert only(folded, "bn-not-folded").findings == []


def test_fold_verification_reports_a_wrong_fold(monkeypatch):
    from bnsurgery.passes.fold import FoldPass

    real = FoldPass.__call__

    def wrong_fold(self, model):
        result = real(self, model)
        for tensor in result.model.graph.initializer:
            if tensor.name == "W":
                w = onnx.numpy_helper.to_array(tensor) + 0.1
                tensor.CopyFrom(onnx.numpy_helper.from_array(w.astype(np.float32), "W"))
        return result

    monkeypatch.setattr(FoldPass, "__call__", wrong_fold)
    [finding] = only(M.conv_bn(), "fold-verification").findings
    assert (finding.id, finding.severity) == ("fold-verification", "error")
    assert finding.details["output"]["name"] == "y"


def test_fold_verification_passes_a_correct_fold():
    report = only(M.conv_bn(), "fold-verification")
    assert report.findings == []
    (output,) = report.details["fold-verification"]["outputs"].values()
    assert output["passed"] and output["rule"] == "noise"


def test_fold_verification_is_not_fooled_by_nan_in_both_models():
    report = only(planted_faults(), "fold-verification")
    assert report.findings == []


def test_provider_parity_judges_an_ill_conditioned_graph_by_its_own_rounding_noise():
    """ORT's fusion differs from the unfused graph by ~1e-2 here, but one rounding of the
    model's own weights (the bias of 1e5, ulp 0.008) moves its outputs as much: the judge
    calls that rounding, not a parity failure (docs/verification.md)."""
    report = only(offset_conv_bn(), "provider-parity")
    assert report.findings == []
    ((output,),) = [c["outputs"] for c in report.details["provider-parity"]["comparisons"]]
    assert output["max_abs"] > 1e-3 and output["ratio"] <= output["limit"]


def test_provider_parity_reports_outputs_that_differ(monkeypatch):
    import bnsurgery.harness.compare as harness_compare

    def wrong_everywhere(model, seed=0):  # a noise run that moves nothing: no room for error
        return model

    monkeypatch.setattr(harness_compare, "rounding_noise_copy", wrong_everywhere)
    report = only(offset_conv_bn(), "provider-parity")
    [finding] = report.findings
    assert (finding.id, finding.severity) == ("provider-parity", "error")
    assert finding.details["provider"] == "cpu"


def test_provider_parity_passes_a_deterministic_model_on_data():
    report = only(SAMPLES / "digits_cnn.onnx", "provider-parity", data=SAMPLES / "digits_test.npz")
    assert report.findings == []
    assert report.details["provider-parity"]["data"]["samples"] == 540


def test_provider_parity_skips_when_only_the_reference_is_asked_for():
    report = only(M.conv_bn(), "provider-parity", parity_opt_level="disable_all")
    assert [c.status for c in report.checks if c.name == "provider-parity"] == ["skipped"]


# -- crashing checks -------------------------------------------------------------------------
def test_a_crashing_check_is_reported_by_name_and_the_others_still_run():
    def exploding(ctx):
        raise RuntimeError("boom")
        yield  # pragma: no cover

    report = validate(
        M.bad_statistics("nan-var"), extra_checks=[exploding], plugins=False,
        skip=["provider-parity", "fold-verification"],
    )  # fmt: skip
    crash = report.by_id("check-crashed")
    assert [(f.check, f.severity) for f in crash] == [("exploding", "error")]
    assert "RuntimeError: boom" in crash[0].message
    assert report.by_id("bn-nonfinite-params")  # the built-ins ran


# -- the planted faults and the sample models --------------------------------------------------
def test_planted_faults_give_exactly_those_findings():
    report = validate(planted_faults(), plugins=False)
    assert sorted(ids(report, "error")) == [
        ("bn-nonfinite-params", "bn_nan"),
        ("bn-training-mode", "bn_train"),
    ]
    assert sorted(ids(report, "warning")) == [
        ("bn-dead-channels", "bn_dead"),
        ("bn-fp16-overflow-risk", "bn_big"),
    ]
    infos = ids(report, "info")
    assert sorted(infos) == sorted(("bn-not-folded", n) for n in
                                   ("bn_train", "bn_nan", "bn_dead", "bn_big"))  # fmt: skip
    assert all(c.status == "ran" for c in report.checks)
    assert not report.ok


def test_planted_faults_exit_1(cli, write_model):
    path = write_model(planted_faults())
    before = sha256(path)
    code, out, err = cli("validate", path, "--json", "--no-plugins")
    assert code == 1
    payload = json.loads(out)
    assert payload["counts"] == {"error": 2, "warning": 2, "info": 4}
    assert "validation FAILED" in err
    assert sha256(path) == before


@pytest.mark.parametrize("name", SAMPLE_MODELS)
def test_sample_models_validate_clean(cli, name):
    code, out, _ = cli("validate", SAMPLES / f"{name}.onnx", "--fail-on", "warning", "--json")
    payload = json.loads(out)
    assert code == 0
    assert payload["counts"]["error"] == payload["counts"]["warning"] == 0
    assert all(f["id"] == "bn-not-folded" for f in payload["findings"])


# -- fail-on, exit codes, output ---------------------------------------------------------------
def test_fail_on_warning_fails_on_warnings_only_then(cli, write_model):
    path = write_model(conv_bn_stats(mean=0.0, var=1.0))
    assert cli("validate", path)[0] == 0
    code, _, err = cli("validate", path, "--fail-on", "warning")
    assert code == 1 and "bn-untrained-stats" in err


def test_a_failed_gate_names_fail_on_as_each_front_end_spells_it(cli, write_model) -> None:
    path = write_model(conv_bn_stats(mean=0.0, var=1.0))  # untrained statistics: a warning
    code, out, err = cli("validate", path, "--fail-on", "warning")
    assert code == 1
    assert "validation FAILED (--fail-on warning)" in out
    assert err.startswith("bnsurgery: error: validation FAILED (--fail-on warning): ")
    report = bnsurgery.validate(path, fail_on="warning")
    assert report.summary().startswith("validation FAILED (fail_on warning): ")
    with pytest.raises(ValidationFailed) as raised:
        report.raise_for_findings()
    assert raised.value.option == "fail_on" and isinstance(raised.value, CheckFailed)
    assert str(raised.value).startswith("validation FAILED (fail_on warning): ")


def test_text_output_has_severity_id_node_message_and_fix(cli, write_model):
    code, out, _ = cli("validate", write_model(planted_faults()), "--no-plugins")
    assert code == 1
    assert "error    bn-training-mode  [bn_train]" in out
    assert "fix: export from an eval-mode model" in out
    assert "info: bn-not-folded x4" in out


def test_json_is_one_document_with_every_finding(cli, write_model):
    code, out, _ = cli("validate", write_model(M.conv_bn_relu()), "--json")
    payload = json.loads(out)
    assert code == 0
    assert payload["schema"] == "bnsurgery.validate/1"
    assert set(payload) >= {"model", "ok", "fail_on", "counts", "findings", "checks"}
    [finding] = payload["findings"]
    assert set(finding) == {"id", "severity", "check", "node", "scope", "message", "hint",
                            "details"}  # fmt: skip
    assert [c["name"] for c in payload["checks"]][: len(CHECK_IDS)] == CHECK_IDS


def test_skip_leaves_a_check_out(cli, write_model):
    path = write_model(planted_faults())
    code, out, _ = cli("validate", path, "--json", "--skip", "bn-training-mode",
                       "--skip", "bn-nonfinite-params")  # fmt: skip
    assert code == 0
    checks = {c["name"]: c["status"] for c in json.loads(out)["checks"]}
    assert checks["bn-training-mode"] == "skipped"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--skip", "no-such-check"], "unknown check 'no-such-check'"),
        (["--providers", "gpu"], "unknown execution provider 'gpu'"),
        (["--data", "missing.npz"], "missing.npz"),
    ],
)
def test_bad_usage_exits_2(cli, args, message):
    code, out, err = cli("validate", SAMPLES / "digits_mlp.onnx", *args)
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1


def test_unreadable_model_exits_2(cli, tmp_path):
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"not a model")
    assert cli("validate", bogus)[0] == 2
    assert cli("validate", tmp_path / "absent.onnx")[0] == 2


def test_unavailable_provider_exits_3(cli):
    import onnxruntime as ort

    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("TensorRT is available here")
    code, out, err = cli("validate", SAMPLES / "digits_mlp.onnx", "--providers", "cpu,tensorrt")
    assert code == 3 and out == ""
    assert "TensorrtExecutionProvider" in err


# -- the Python API ----------------------------------------------------------------------------
def test_raise_for_findings():
    report = bnsurgery.validate(planted_faults(), plugins=False)
    with pytest.raises(ValidationFailed) as info:
        report.raise_for_findings()
    assert info.value.exit_code == 1 and info.value.report is report
    assert "bn-training-mode bn_train" in str(info.value)
    clean = bnsurgery.validate(M.conv_bn(), plugins=False)
    assert clean.ok
    clean.raise_for_findings()


def test_validate_accepts_path_bytes_proto_and_never_changes_its_input(write_model):
    model = planted_faults()
    before = model.SerializeToString()
    reports = [
        bnsurgery.validate(source, plugins=False, only=["bn-training-mode"])
        for source in (model, before, write_model(model))
    ]
    assert {len(r.findings) for r in reports} == {1}
    assert model.SerializeToString() == before


# -- data and engines --------------------------------------------------------------------------
def test_without_data_random_samples_fit_a_static_batch():
    report = validate(M.gemm_bn(), plugins=False)  # static batch 3: random:6
    assert report.data == "random:6 (seed 0)"
    assert all(c.status == "ran" for c in report.checks)
    assert "no DATA given: using random:6, seed 0" in report.notes


def test_random_data_feeds_inputs_of_different_static_first_dimensions_whole():
    """BN parameters fed as graph inputs ([4]) beside x ([2, ...]): random data feeds each at
    its own shape, as fold's verification always did, instead of skipping the checks."""
    report = validate(M.params_graph_inputs(), plugins=False)
    [parity] = [c for c in report.checks if c.name == "provider-parity"]
    assert parity.status == "ran"
    assert report.ok


def test_fold_verification_falls_back_to_onnx_reference_where_ort_has_no_kernel():
    report = only(M.conv_bn_typed(M.F64), "fold-verification")
    assert report.findings == []
    assert "onnx.reference" in " ".join(report.details["fold-verification"]["engines"])


def test_a_model_onnxruntime_cannot_run_fails_parity():
    [finding] = only(M.conv_bn_typed(M.F64), "provider-parity").findings
    assert "does not run on onnxruntime" in finding.message


def test_a_bug_in_a_builtin_check_is_a_crash_not_a_finding_about_the_model(monkeypatch):
    import bnsurgery.harness.compare as harness

    def broken(*args, **kwargs):
        raise IndexError("tuple index out of range")

    monkeypatch.setattr(harness, "compare", broken)
    [crash] = only(M.conv_bn(), "provider-parity").findings
    assert (crash.id, crash.check) == ("check-crashed", "provider-parity")
    assert "check 'provider-parity' (builtin) raised IndexError" in crash.message
