"""Pipelines: the Python API, `bnsurgery run pipeline.toml MODEL`, and every kind of bad file
named with its line and key."""

from __future__ import annotations

import json
from pathlib import Path

import models as M
import onnx
import pytest
from conftest import SAMPLES, sha256

import bnsurgery
from bnsurgery.errors import BadInputError
from bnsurgery.passes import Pipeline, PipelineReport
from bnsurgery.passes.fold import FoldPass
from bnsurgery.pipeline.config import SourceLines, load_pipeline, parse_pipeline
from bnsurgery.pipeline.registry import make_pass, registry
from bnsurgery.validation.gate import ValidatePass, ValidationReport

FOLD_THEN_GATE = """\
name = "deploy"
description = "fold, then gate"

[[step]]
pass = "fold"
backward = true

[[step]]
pass = "validate"
fail_on = "warning"
"""


def write(tmp_path: Path, text: str, name: str = "pipeline.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- the Python API ----------------------------------------------------------------------------
def test_pipeline_runs_passes_in_order_and_keeps_every_report():
    model = M.conv_bn_relu()
    before = model.SerializeToString()
    result = Pipeline([FoldPass(), ValidatePass(fail_on="warning")]).run(model)
    report = result.report
    assert isinstance(report, PipelineReport) and report.ok
    assert [s.name for s in report.steps] == ["fold", "validate"]
    assert report.steps[0].report.bns_after == 0
    assert isinstance(report.steps[1].report, ValidationReport)
    assert result.modified and M.count_op(result.model) == 0
    assert model.SerializeToString() == before
    payload = report.to_dict()
    assert payload["steps_run"] == 2 and payload["steps"][1]["report"]["ok"]


def test_an_in_place_pass_never_changes_the_callers_model():
    model = M.conv_bn()
    before = model.SerializeToString()
    result = Pipeline([FoldPass(in_place=True)]).run(model)
    assert M.count_op(result.model) == 0
    assert model.SerializeToString() == before


def test_a_failing_validate_step_stops_the_pipeline():
    untrained = M.conv_bn(stats=M.Stats(*(v for v in ([1.0] * 6, [0.0] * 6, [0.0] * 6,
                                                      [1.0] * 6))))  # fmt: skip
    steps = [ValidatePass(fail_on="warning"), FoldPass()]
    result = Pipeline(steps).run(untrained)
    assert result.report.stopped_at == 0
    assert [s.name for s in result.report.steps] == ["validate"]
    assert M.count_op(result.model) == 1  # fold never ran


def test_registry_has_the_builtin_passes_by_name():
    passes = registry()
    assert {"adapt", "fold", "insert", "reestimate", "validate"} <= set(passes)
    assert isinstance(make_pass("fold", backward=False), FoldPass)
    with pytest.raises(KeyError, match="unknown pass 'nope'"):
        make_pass("nope")


# -- bnsurgery run ---------------------------------------------------------------------------
def test_run_writes_the_output_and_one_json_of_step_reports(cli, tmp_path):
    pipeline = write(tmp_path, FOLD_THEN_GATE)
    source = SAMPLES / "digits_cnn.onnx"
    before = sha256(source)
    out = tmp_path / "deploy.onnx"
    code, stdout, _ = cli("run", pipeline, source, "-o", out, "--json")
    payload = json.loads(stdout)
    assert code == 0
    assert payload["schema"] == "bnsurgery.run/1"
    assert payload["pipeline"]["name"] == "deploy"
    assert [(s["pass"], s["options"]) for s in payload["steps"]] == [
        ("fold", {"backward": True}),
        ("validate", {"fail_on": "warning"}),
    ]
    assert payload["steps"][0]["report"]["summary"]["bns_after"] == 0
    assert payload["steps"][1]["report"]["schema"] == "bnsurgery.validate/1"
    assert payload["output"] == str(out)
    assert M.count_op(onnx.load(str(out))) == 0
    assert sha256(source) == before


def test_run_default_output_is_beside_the_model(cli, tmp_path, write_model):
    model = write_model(M.conv_bn())
    code, out, _ = cli("run", write(tmp_path, FOLD_THEN_GATE), model)
    assert code == 0 and "2. validate" in out
    assert (tmp_path / "net.pipeline.onnx").is_file()


def test_run_stops_at_a_failing_gate_and_writes_nothing(cli, tmp_path):
    pipeline = write(tmp_path, '[[step]]\npass = "insert"\n\n'
                     '[[step]]\npass = "validate"\nfail_on = "warning"\n')  # fmt: skip
    out = tmp_path / "out.onnx"
    code, stdout, err = cli("run", pipeline, SAMPLES / "digits_cnn_nobn.onnx", "-o", out, "--json")
    assert code == 1 and not out.exists()
    payload = json.loads(stdout)
    assert payload["ok"] is False and payload["stopped_at"] == 1
    findings = payload["steps"][1]["report"]["findings"]
    assert {f["id"] for f in findings if f["severity"] == "warning"} == {"bn-untrained-stats"}
    assert "pipeline stopped at step 2 (validate)" in err


def test_reestimate_fold_validate_pipeline(cli, tmp_path):
    pipeline = write(
        tmp_path,
        f'[[step]]\npass = "reestimate"\ndata = "{SAMPLES / "digits_train.npz"}"\n'
        'samples = 128\n\n[[step]]\npass = "fold"\n\n'
        f'[[step]]\npass = "validate"\ndata = "{SAMPLES / "digits_test.npz"}"\n',
    )
    out = tmp_path / "adapted.onnx"
    code, stdout, _ = cli("run", pipeline, SAMPLES / "digits_cnn.onnx", "-o", out, "--json")
    steps = json.loads(stdout)["steps"]
    assert code == 0
    assert [(s["pass"], s["modified"]) for s in steps] == [
        ("reestimate", True), ("fold", True), ("validate", False),
    ]  # fmt: skip
    assert steps[2]["report"]["counts"]["error"] == 0


def test_an_error_inside_a_step_names_the_step_and_line(cli, tmp_path):
    pipeline = write(tmp_path, '[[step]]\npass = "fold"\n\n'
                     '[[step]]\npass = "reestimate"\ndata = "absent.npz"\n')  # fmt: skip
    code, out, err = cli("run", pipeline, SAMPLES / "digits_cnn.onnx", "-o", tmp_path / "o.onnx")
    assert code == 2 and out == ""
    assert f"{pipeline}:4: step 2 (reestimate): " in err
    assert not (tmp_path / "o.onnx").exists()


def test_run_pipeline_api_takes_a_file_or_a_checked_spec(tmp_path):
    path = write(tmp_path, FOLD_THEN_GATE)
    for pipeline in (path, parse_pipeline(FOLD_THEN_GATE, "inline")):
        result = bnsurgery.run_pipeline(pipeline, M.conv_bn())
        assert result.report.ok and M.count_op(result.model) == 0


# -- bad pipeline files: exit 2, the file, the line and the key --------------------------------
BAD = [
    ("unknown-top-key", 'name = "x"\nverbose = true\n[[step]]\npass = "fold"\n', 2,
     "unknown key 'verbose'"),
    ("unknown-pass", '[[step]]\npass = "fold"\n\n[[step]]\npass = "folt"\n', 5,
     "step 2: unknown pass 'folt' (known: adapt, fold, insert"),
    ("unknown-option", '[[step]]\npass = "fold"\n# comment\nbakward = true\n', 4,
     "step 1 (fold): unknown option 'bakward' (known: affine, atol, backward, data, in_place, "
     "label, rtol, samples, seed, shapes, source, verify)"),
    ("wrong-type", '[[step]]\npass = "validate"\nskip = [\n  "a",\n]\nfail_on = 3\n', 6,
     "option 'fail_on' = 3 has the wrong type (expected a string)"),
    ("wrong-bool", '[[step]]\npass = "fold"\nbackward = "yes"\n', 3,
     "option 'backward' = 'yes' has the wrong type (expected a boolean)"),
    ("no-pass-key", '[[step]]\npass = "fold"\n\n[[step]]\nbackward = false\n', 4,
     "step 2 has no 'pass' key"),
    ("pass-not-string", '[[step]]\npass = 3\n', 2, "'pass' must be a string"),
    ("syntax", '[[step]]\npass = "fold"\nbackward = tru\n', 3, "invalid TOML"),
    ("refused-by-pass", '[[step]]\npass = "fold"\n\n[[step]]\npass = "reestimate"\n'
     'mode = "exact"\n', 4, "step 2 (reestimate): re-estimation needs DATA"),
    ("bad-value", '[[step]]\npass = "validate"\nfail_on = "info"\n', 1,
     "step 1 (validate): fail_on must be one of error, warning"),
    ("missing-option", '\n[[step]]\npass = "adapt"\nsource = "s.npz"\n', 2,
     "step 1 (adapt): missing option 'target'"),
    ("quoted-key", '[[step]]\n"pass" = "fold"\n\n[[step]]\npass = "insert"\n"after" = 1\n',
     6, "step 2 (insert): option 'after' = 1 has the wrong type (expected a string or an array)"),
    ("inline-tables", 'step = [{pass = "fold"},\n  {pass = "fold", bakward = 1}]\n', 2,
     "unknown option 'bakward'"),
    ("step-not-table", 'step = "fold"\n', 1, "'step' must be an array of tables"),
]  # fmt: skip


@pytest.mark.parametrize("text, line, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_a_bad_pipeline_names_its_line_and_key(cli, tmp_path, write_model, text, line, message):
    pipeline = write(tmp_path, text)
    model = write_model(M.conv_bn())
    before = sha256(model)
    code, out, err = cli("run", pipeline, model)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert f"{pipeline}:{line}: " in err
    assert message in err
    assert sha256(model) == before and not (tmp_path / "net.pipeline.onnx").exists()


@pytest.mark.parametrize(
    "text, message",
    [("", "no steps"), ('name = "x"\n', "no steps"), ("step = []\n", "no steps in the pipeline")],
)
def test_a_pipeline_without_steps_is_refused(tmp_path, text, message):
    with pytest.raises(BadInputError, match=message):
        load_pipeline(write(tmp_path, text))


def test_an_error_keeps_the_parameter_it_names():
    with pytest.raises(BadInputError) as exc:
        parse_pipeline('[[step]]\npass = "fold"\n\n[[step]]\npass = "insert"\nafter = "Relu"\n',
                       "p.toml")  # fmt: skip
    assert exc.value.option == "after"
    assert str(exc.value).startswith("p.toml:4: step 2 (insert): after Relu: BN can follow only")


def test_a_missing_pipeline_file_is_bad_input(cli, tmp_path):
    code, _, err = cli("run", tmp_path / "absent.toml", SAMPLES / "digits_mlp.onnx")
    assert code == 2 and "no such pipeline file" in err


def test_source_lines_skip_multiline_strings_and_arrays():
    text = (
        'description = """\nfake = 1\n[[step]]\n"""\n'  # lines 1-4
        "[[step]]\n"  # 5
        'pass = "validate"\n'  # 6
        "skip = [\n  'x = 1',\n]\n"  # 7-9
        "seed = 3 # a comment with [ bracket\n"  # 10
        "[[step]]\n"  # 11
        "pass = 'fold'\n"  # 12
    )
    lines = SourceLines(text)
    assert lines.top_key("description") == 1 and lines.top_key("fake") is None
    assert [lines.step_header(0), lines.step_header(1)] == [5, 11]
    assert [lines.step_key(0, k) for k in ("pass", "skip", "seed", "x")] == [6, 7, 10, None]
    assert lines.step_key(1, "pass") == 12
