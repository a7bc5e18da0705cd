"""What a first-time user meets: help that agrees with the checks, no useless output files,
swapped arguments recognised, tracebacks exactly where the README says, and data notes."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
import pytest
from conftest import SAMPLES, sha256

from bnsurgery.measure.feeds import MIN_SAMPLES

CNN = SAMPLES / "digits_cnn.onnx"
SAMPLE_RUNS = {
    "reestimate": [CNN, "--data", "random:8"],
    "adapt": [CNN, "--target", "random:8"],
    "insert": [SAMPLES / "digits_cnn_nobn.onnx", "--calibrate", "random:8"],
}


def _samples_option(command: str) -> click.Option:
    from bnsurgery.cli.main import cli

    cmd = cli.get_command(click.Context(cli), command)
    assert cmd is not None
    return next(p for p in cmd.params if p.name == "samples")  # type: ignore[return-value]


@pytest.mark.parametrize("command", sorted(SAMPLE_RUNS))
def test_samples_help_states_the_minimum_the_engine_needs(cli, command: str) -> None:
    """The help's range is the check's range: --samples below it is refused by the option
    itself, and the minimum it shows is accepted."""
    option = _samples_option(command)
    assert isinstance(option.type, click.IntRange) and option.type.min == MIN_SAMPLES
    code, out, _ = cli(command, "--help")
    assert code == 0 and f"[x>={MIN_SAMPLES}]" in out


@pytest.mark.parametrize("command", sorted(SAMPLE_RUNS))
def test_samples_at_the_minimum_runs_and_below_is_one_line(cli, tmp_path, command: str) -> None:
    args = [*SAMPLE_RUNS[command], "-o", tmp_path / "out.onnx"]
    code, _, err = cli(command, *args, "--samples", MIN_SAMPLES - 1)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"x>={MIN_SAMPLES}" in err
    code, _, err = cli(command, *args, "--samples", MIN_SAMPLES)
    assert code == 0, err
    assert (tmp_path / "out.onnx").exists()


# -- insert with nothing to insert -----------------------------------------------------------


def test_insert_with_bn_after_every_target_writes_nothing(cli, tmp_path) -> None:
    model = tmp_path / "cnn.onnx"
    model.write_bytes(CNN.read_bytes())
    before = sha256(model)
    code, out, err = cli("insert", model)
    assert code == 0, err
    assert "nothing to insert (skipped followed-by-bn: 4, produces-graph-output: 1" in out
    assert out.rstrip().endswith("nothing written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.onnx"]
    assert sha256(model) == before


def test_insert_in_place_with_nothing_to_insert_leaves_the_model_alone(cli, tmp_path) -> None:
    model = tmp_path / "cnn.onnx"
    model.write_bytes(CNN.read_bytes())
    stamp = model.stat().st_mtime_ns
    code, out, _ = cli("insert", model, "--in-place", "--json")
    assert code == 0
    assert json.loads(out)["output"] is None
    assert model.stat().st_mtime_ns == stamp and model.read_bytes() == CNN.read_bytes()


def test_insert_with_an_explicit_output_writes_it_and_says_why_it_is_unchanged(
    cli, tmp_path
) -> None:
    out_path = tmp_path / "copy.onnx"
    code, out, _ = cli("insert", CNN, "-o", out_path)
    assert code == 0
    assert "nothing to insert (skipped followed-by-bn: 4" in out
    assert f"{out_path} is an unchanged copy of {CNN}" in out
    assert out.rstrip().endswith(f"wrote {out_path}")
    assert out_path.exists()


# -- run with its arguments swapped ----------------------------------------------------------

PIPELINE = '[[step]]\npass = "fold"\n'


def test_run_with_model_and_pipeline_swapped_says_so(cli, tmp_path) -> None:
    deploy = tmp_path / "deploy.toml"
    deploy.write_text(PIPELINE)
    code, out, err = cli("run", CNN, deploy)
    assert code == 2 and out == ""
    assert err.strip() == (
        f"bnsurgery: error: the arguments are swapped: {CNN} is an ONNX model and {deploy} a "
        f"pipeline; run bnsurgery run {deploy} {CNN}"
    )
    assert not list(SAMPLES.glob("*.pipeline.onnx"))


def test_run_recognises_a_model_by_its_bytes_whatever_its_name(cli, tmp_path) -> None:
    model = tmp_path / "model.bin"
    model.write_bytes(CNN.read_bytes())
    deploy = tmp_path / "deploy.toml"
    deploy.write_text(PIPELINE)
    code, _, err = cli("run", model, deploy)
    assert code == 2 and "the arguments are swapped" in err


def test_run_given_a_model_as_pipeline_or_a_pipeline_as_model(cli, tmp_path) -> None:
    deploy = tmp_path / "deploy.toml"
    deploy.write_text(PIPELINE)
    code, _, err = cli("run", CNN, CNN)
    assert code == 2 and f"{CNN} is an ONNX model, not a pipeline file" in err
    code, _, err = cli("run", deploy, deploy)
    assert code == 2 and f"{deploy} is a TOML file, not an ONNX model" in err


def test_a_pipeline_file_that_is_not_text_is_named_without_a_codec_error(tmp_path) -> None:
    import bnsurgery
    from bnsurgery.errors import BadInputError

    binary = tmp_path / "deploy.toml"
    binary.write_bytes(b"\x96\xff\x00binary")
    with pytest.raises(BadInputError, match=r"deploy.toml: not a pipeline file") as info:
        bnsurgery.run_pipeline(binary, CNN)
    assert "codec" not in str(info.value)


# -- what -v and -vv show --------------------------------------------------------------------


@pytest.mark.parametrize("where", ["before", "after"])
def test_vv_shows_the_traceback_of_a_bad_input_error(cli, tmp_path, where: str) -> None:
    """The README: -vv prints the traceback of any error, bad input included, above the same
    one line, with the same exit code."""
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not numpy")
    args = ["compare", CNN, CNN, "--data", garbage]
    code, _, plain = cli(*args)
    assert code == 2 and len(plain.strip().splitlines()) == 1
    code, _, err = cli(*(["-vv", *args] if where == "before" else [*args, "-vv"]))
    assert code == 2
    logged, traceback = err.split("Traceback (most recent call last):\n", 1)
    assert all(line.startswith(("info: ", "debug: ")) for line in logged.splitlines())
    assert "bnsurgery.errors.DataError: " in traceback
    assert err.strip().splitlines()[-1] == plain.strip()


def test_vv_shows_the_traceback_of_an_unforeseen_error_and_still_exits_2(
    cli, tmp_path, monkeypatch
) -> None:
    import bnsurgery.stats

    def broken(_files: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(bnsurgery.stats, "merge_files", broken)
    args = ["merge-stats", tmp_path / "a.npz", "-o", tmp_path / "m.npz"]
    code, _, err = cli(*args)
    assert code == 2 and err.strip() == (
        "bnsurgery: error: RuntimeError: a bug (run with -vv for details)"
    )
    code, _, err = cli("-vv", *args)
    assert code == 2 and "Traceback" in err and 'raise RuntimeError("a bug")' in err
    assert err.strip().splitlines()[-1] == "bnsurgery: error: RuntimeError: a bug"


def test_vv_leaves_usage_errors_one_line(cli) -> None:
    code, _, err = cli("-vv", "fold", CNN, "--no-such-option")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_v_lists_validates_info_findings(cli) -> None:
    _, plain, _ = cli("validate", CNN)
    _, verbose, _ = cli("-v", "validate", CNN)
    assert "bn-not-folded  [" not in plain and "bn-not-folded  [" in verbose


# -- an .npz whose only array has another name -----------------------------------------------

STAND_IN = "using the only array 'x' for input 'input'"


@pytest.fixture
def other_key_npz(tmp_path) -> Path:
    """Four digits-shaped samples under the key 'x'; the digits models' input is 'input'."""
    path = tmp_path / "x.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.standard_normal((4, 1, 8, 8)).astype(np.float32))
    return path


def test_the_data_source_notes_the_stand_in_array(other_key_npz) -> None:
    import onnx

    from bnsurgery.data import load_data

    model = onnx.load(CNN)
    assert load_data(other_key_npz, model).notes == [STAND_IN]
    assert load_data(other_key_npz.parent, model).notes == [STAND_IN]  # a folder of such files
    assert load_data({"x": np.zeros((2, 1, 8, 8), np.float32)}, model).notes == [STAND_IN]
    assert load_data([{"x": np.zeros((2, 1, 8, 8), np.float32)}], model).notes == [STAND_IN]
    np.savez(other_key_npz, input=np.zeros((2, 1, 8, 8), np.float32))
    assert load_data(other_key_npz, model).notes == []  # the right key: nothing to say


@pytest.mark.parametrize(
    "args",
    [
        ["compare", CNN, CNN, "--data", "{data}"],
        ["validate", CNN, "--data", "{data}"],
        ["reestimate", CNN, "--data", "{data}", "-o", "{out}"],
        ["insert", SAMPLES / "digits_cnn_nobn.onnx", "--calibrate", "{data}", "-o", "{out}"],
        ["adapt", CNN, "--target", "{data}", "-o", "{out}"],
        [
            "adapt",
            SAMPLES / "digits_cnn_nobn.onnx",
            "--source",
            "{data}",
            "--target",
            "random:8",
            "-o",
            "{out}",
        ],
    ],
    ids=["compare", "validate", "reestimate", "insert", "adapt-target", "adapt-source"],
)
def test_every_command_that_reads_data_says_which_array_it_used(
    cli, tmp_path, other_key_npz, args
) -> None:
    filled = [str(a).format(data=other_key_npz, out=tmp_path / "out.onnx") for a in args]
    code, out, err = cli(*filled)
    assert code == 0, err
    assert STAND_IN in out + err
