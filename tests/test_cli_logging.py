"""-v and -vv: the library's logging on stderr (INFO, then DEBUG and tracebacks), never on
stdout, and only for the run of one command."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import SAMPLES

CNN = SAMPLES / "digits_cnn.onnx"


def _logged(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(("info: ", "debug: "))]


def test_without_v_nothing_is_logged(cli, tmp_path) -> None:
    code, out, err = cli("fold", CNN, "-o", tmp_path / "f.onnx", "--json")
    assert code == 0 and json.loads(out)["output"] == str(tmp_path / "f.onnx")
    assert _logged(err) == []


@pytest.mark.parametrize("where", ["before", "after"])
def test_v_logs_each_pass_and_how_long_the_command_took_on_stderr(cli, tmp_path, where) -> None:
    args = ["fold", CNN, "-o", tmp_path / "f.onnx", "--json"]
    code, out, err = cli(*(["-v", *args] if where == "before" else [*args, "-v"]))
    assert code == 0
    assert json.loads(out)["summary"]  # stdout is still exactly one JSON document
    logged = _logged(err)
    assert any(line.startswith("info: pass fold: modified in ") for line in logged), err
    assert logged[-1].startswith("info: fold took ") and logged[-1].endswith(" s")
    assert not any(line.startswith("debug: ") for line in logged)


def test_v_logs_what_each_validate_check_found(cli) -> None:
    code, out, err = cli("-v", "validate", CNN, "--json")
    assert code == 0 and json.loads(out)["ok"] is True
    checks = [line for line in _logged(err) if line.startswith("info: check ")]
    assert any(
        line.startswith("info: check bn-training-mode: ran, 0 finding(s) in ") for line in checks
    )
    assert any(
        line.startswith("info: check bn-not-folded: ran, 4 finding(s) in ") for line in checks
    )


def test_v_logs_a_reestimation_and_the_save(cli, tmp_path) -> None:
    data = SAMPLES / "digits_test.npz"
    out_path = tmp_path / "r.onnx"
    code, out, err = cli("-v", "reestimate", CNN, "--data", data, "-o", out_path, "--json")
    assert code == 0 and json.loads(out)["output"] == str(out_path)
    logged = _logged(err)
    assert any(line.startswith("info: pass reestimate: modified in ") for line in logged), err
    assert any(line.startswith(f"info: saved {out_path} in ") for line in logged), err


def test_vv_names_the_logger_and_a_failure_gets_its_traceback(cli) -> None:
    code, _, plain = cli("validate", CNN, "--skip", "no-such-check")
    assert code == 2 and len(plain.strip().splitlines()) == 1
    code, out, err = cli("-vv", "validate", CNN, "--skip", "no-such-check")
    assert code == 2 and out == ""
    assert "Traceback (most recent call last):" in err
    assert "bnsurgery.errors.BadInputError: unknown check 'no-such-check' in skip" in err
    assert err.strip().splitlines()[-1] == plain.strip()  # the same one line, with its flag
    code, _, err = cli("-vv", "validate", CNN)
    assert code == 0
    assert any(
        line.startswith("info: bnsurgery.validation.gate: check onnx-checker: ran")
        for line in _logged(err)
    ), err


def test_quiet_logs_nothing_even_with_v(cli, tmp_path) -> None:
    code, out, err = cli("-q", "-v", "fold", CNN, "-o", tmp_path / "f.onnx")
    assert code == 0 and "wrote" in out
    assert _logged(err) == []


def test_a_command_leaves_logging_as_it_found_it(cli, tmp_path) -> None:
    package = logging.getLogger("bnsurgery")
    before = (package.level, package.propagate, list(package.handlers))
    assert cli("-vv", "fold", CNN, "-o", tmp_path / "f.onnx")[0] == 0
    assert cli("-v", "validate", CNN, "--skip", "no-such-check")[0] == 2
    assert (package.level, package.propagate, list(package.handlers)) == before
