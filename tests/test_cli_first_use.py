"""What a first-time user meets: help that agrees with the checks, no useless output files,
swapped arguments recognised, tracebacks exactly where the README says, and data notes."""

from __future__ import annotations

import click
import pytest
from conftest import SAMPLES

from bnsurgery.passes.reestimate import MIN_SAMPLES

CNN = SAMPLES / "digits_cnn.onnx"
SAMPLE_RUNS = {
    "reestimate": [CNN, "--data", "random:8"],
    "adapt": [CNN, "--target", "random:8"],
    "insert": [SAMPLES / "digits_cnn_nobn.onnx", "--calibrate", "random:8"],
}


def _samples_option(command: str) -> click.Option:
    from bnsurgery.cli import cli

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
