"""A model that passes the ONNX checker but that no engine can run (a Conv whose group does not
match its weight): every command says so in one line, and ORT's own log stays silent."""

from __future__ import annotations

from pathlib import Path

import models as m
import onnx
import pytest
from onnx import helper


@pytest.fixture
def unrunnable(tmp_path: Path) -> Path:
    model = m.conv_bn(cin=4, cout=4)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    del conv.attribute[:]
    conv.attribute.append(helper.make_attribute("group", 3))  # 4 channels cannot split in 3
    onnx.checker.check_model(model)  # valid as far as the checker goes
    path = tmp_path / "net.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def test_fold_verify_refuses_in_one_line(cli, unrunnable: Path, tmp_path: Path) -> None:
    before = unrunnable.read_bytes()
    code, _, err = cli("fold", unrunnable, "-o", tmp_path / "out.onnx")
    # ORT rejects it (not a missing kernel), so onnx.reference is not asked to second-guess it
    assert code == 2 and err.startswith("bnsurgery: error: ONNX Runtime cannot run the model:")
    assert len(err.strip().splitlines()) == 1
    assert unrunnable.read_bytes() == before and not (tmp_path / "out.onnx").exists()


def test_ort_log_stays_silent(unrunnable: Path, tmp_path: Path) -> None:
    """ORT logs a failing kernel to the process's stderr (file descriptor 2) from C++, where
    capsys cannot see it: run the command in a subprocess."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "bnsurgery", "fold", str(unrunnable), "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2 and "[E:onnxruntime" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_validate_reports_instead_of_stopping(cli, unrunnable: Path) -> None:
    code, _, err = cli("validate", unrunnable, "--json")
    assert code == 1 and "validation FAILED" in err


def test_compare_says_ort_cannot_run_it(cli, unrunnable: Path) -> None:
    code, _, err = cli("compare", unrunnable, unrunnable)
    assert code == 2 and err.startswith("bnsurgery: error: ONNX Runtime cannot run the model:")
    assert len(err.strip().splitlines()) == 1 and "-vv" not in err


@pytest.fixture
def nan_outputs(tmp_path: Path) -> Path:
    """Conv -> BN, then sqrt(-|y|): every output is NaN, on any input."""
    model = m.conv_bn()
    out = model.graph.output[0]
    y = out.name
    model.graph.node.extend(
        [
            helper.make_node("Abs", [y], ["y_abs"]),
            helper.make_node("Neg", ["y_abs"], ["y_neg"]),
            helper.make_node("Sqrt", ["y_neg"], ["nan_out"]),
        ]
    )
    out.name = "nan_out"
    onnx.checker.check_model(model)
    path = tmp_path / "nan.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def test_fold_does_not_call_agreeing_nans_a_verification(cli, nan_outputs: Path, tmp_path):
    """Found by fuzzing: all-NaN outputs on both sides read as 'verification: ok, max abs
    error 0'. The fold is judged on its own tensor instead, and the line says so."""
    out = tmp_path / "out.onnx"
    code, stdout, err = cli("fold", nan_outputs, "-o", out)
    assert code == 0 and out.exists(), err
    assert "1 of 1 folds verified on their own tensors" in stdout
    assert "'nan_out' are NaN/Inf in the original" in stdout


def test_fold_refuses_nan_outputs_when_nothing_was_folded(cli, nan_outputs: Path, tmp_path):
    model = onnx.load(nan_outputs)
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    bn.op_type = "Relu"  # no BN: nothing folded, so nothing can be verified fold by fold
    del bn.input[1:], bn.attribute[:]
    next(n for n in model.graph.node if n.op_type == "Abs").op_type = "Exp"  # sqrt(-exp): NaN
    path = tmp_path / "kept.onnx"
    onnx.save(model, path)
    out = tmp_path / "out.onnx"
    code, _, err = cli("fold", path, "-o", out)
    assert code == 2 and "no finite output value" in err and "--shape" in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    code, _, err = cli("fold", path, "-o", out, "--no-verify")
    assert code == 0 and out.exists(), err
