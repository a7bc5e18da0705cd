"""`bnsurgery fold` and `bnsurgery info` on the command line: outputs, JSON, exit codes, and every
bad input fold can meet (exit 2, one clear line, no traceback, input untouched, nothing written)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import models as m
import numpy as np
import onnx
import pytest
from conftest import sha256

import bnsurgery


def listing(folder: Path) -> list[str]:
    """Every path under folder (hidden temp files included), relative, sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def assert_refused(cli, tmp_path: Path, model: Path | None, *args: str | Path) -> str:
    """Run `bnsurgery ARGS`; it must exit 2 with one error line and leave the folder as it was."""
    before_files = listing(tmp_path)
    before_hash = sha256(model) if model is not None and model.is_file() else None
    code, out, err = cli(*args)
    lines = err.strip().splitlines()
    problems = []
    if code != 2:
        problems.append(f"exit {code}, expected 2")
    if len(lines) != 1 or not lines[0].startswith("bnsurgery: error:"):
        problems.append(f"stderr is not one 'bnsurgery: error:' line: {err!r}")
    if "Traceback" in err + out:
        problems.append("a traceback was printed")
    if before_hash is not None and sha256(model) != before_hash:
        problems.append("the input model changed")
    if listing(tmp_path) != before_files:
        problems.append(f"files changed: {before_files} -> {listing(tmp_path)}")
    assert not problems, "; ".join(problems)
    return lines[0]


# -- the happy path -----------------------------------------------------------------------------
def test_fold_writes_stem_folded_onnx_beside_the_model(cli, write_model) -> None:
    path = write_model(m.conv_bn())
    code, _, _ = cli("fold", path)
    assert (code, (path.parent / "net.folded.onnx").is_file()) == (0, True)


def test_folded_file_has_no_bn(cli, write_model) -> None:
    path = write_model(m.conv_bn_bn())
    cli("fold", path)
    assert m.count_op(onnx.load(path.parent / "net.folded.onnx")) == 0


def test_folded_file_computes_what_the_original_computes(cli, write_model, tmp_path) -> None:
    model = m.gap_bn_flatten_gemm()
    path = write_model(model)
    cli("fold", path, "-o", tmp_path / "out.onnx")
    m.assert_equivalent(model, onnx.load(tmp_path / "out.onnx"))


def test_fold_leaves_the_input_file_byte_identical(cli, write_model) -> None:
    path = write_model(m.conv_bn())
    before = sha256(path)
    cli("fold", path)
    assert sha256(path) == before


def test_fold_text_table_lists_every_bn(cli, write_model) -> None:
    _, out, _ = cli("fold", write_model(m.conv_bn_bn()), "--no-verify")
    rows = [line.split()[0] for line in out.splitlines() if line.startswith("bn")]
    assert rows == ["bn1", "bn2"]


def test_fold_text_summary_has_counts_and_verification(cli, write_model) -> None:
    _, out, _ = cli("fold", write_model(m.conv_bn()))
    assert "1 -> 0" in out and "verification: ok" in out


def test_fold_json_is_one_document_with_the_agreed_keys(cli, write_model) -> None:
    _, out, _ = cli("fold", write_model(m.conv_bn()), "--json")
    keys = {"entries", "summary", "tensor_map", "verification", "output"}
    assert keys <= set(json.loads(out))


def test_fold_json_reports_the_reason(cli, write_model) -> None:
    _, out, _ = cli("fold", write_model(m.relu_between()), "--json")
    assert [e["reason"] for e in json.loads(out)["entries"]] == ["nonlinear-between"]


def test_fold_json_names_the_output_file(cli, write_model, tmp_path) -> None:
    _, out, _ = cli("fold", write_model(m.conv_bn()), "-o", tmp_path / "o.onnx", "--json")
    assert Path(json.loads(out)["output"]).resolve() == (tmp_path / "o.onnx").resolve()


def test_fold_json_records_a_passing_verification(cli, write_model) -> None:
    _, out, _ = cli("fold", write_model(m.conv_bn()), "--json")
    assert json.loads(out)["verification"]["ok"] is True


def test_no_verify_records_no_verification(cli, write_model) -> None:
    _, out, _ = cli("fold", write_model(m.conv_bn()), "--json", "--no-verify")
    assert json.loads(out)["verification"] is None


def test_in_place_rewrites_the_model(cli, write_model) -> None:
    path = write_model(m.conv_bn())
    code, _, _ = cli("fold", path, "--in-place")
    assert (code, m.count_op(onnx.load(path))) == (0, 0)


def test_no_backward_keeps_backward_only_bns(cli, write_model, tmp_path) -> None:
    cli("fold", write_model(m.bn_conv()), "--no-backward", "-o", tmp_path / "o.onnx")
    assert m.count_op(onnx.load(tmp_path / "o.onnx")) == 1


def test_no_affine_keeps_mul_add(cli, write_model, tmp_path) -> None:
    cli("fold", write_model(m.conv_affine()), "--no-affine", "-o", tmp_path / "o.onnx")
    assert len(onnx.load(tmp_path / "o.onnx").graph.node) == 3


def test_shape_option_sets_dynamic_dimensions(cli, write_model, tmp_path) -> None:
    model = m.conv_bn()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    _, out, _ = cli("fold", write_model(model), "--shape", "x:3x4x7x7", "--json")
    # --shape fixes every axis but the batch axis, which holds the judge's 4 samples
    assert json.loads(out)["verification"]["input_shapes"]["x"] == [4, 4, 7, 7]


def test_info_writes_nothing(cli, write_model, tmp_path) -> None:
    path = write_model(m.conv_bn())
    before = listing(tmp_path)
    code, _, _ = cli("info", path)
    assert (code, listing(tmp_path)) == (0, before)


def test_info_json_lists_every_bn_with_its_reason(cli, write_model) -> None:
    _, out, _ = cli("info", write_model(m.if_bn()), "--json")
    got = {(e["node"], e["reason"]) for e in json.loads(out)["entries"]}
    assert got == {("then_bn", "folded"), ("else_bn", "folded")}


# -- exit 0 where a BN cannot be folded but the command has nothing wrong -----------------------
@pytest.mark.parametrize("kind", ["nan-var", "inf-var", "negative-var", "nan-scale"])
def test_bad_statistics_exit_0(cli, write_model, kind) -> None:
    code, _, err = cli("fold", write_model(m.bad_statistics(kind)))
    assert code == 0, err


@pytest.mark.parametrize("kind", ["nan-var", "negative-var"])
def test_bad_statistics_reason_in_json(cli, write_model, tmp_path, kind) -> None:
    _, out, _ = cli("fold", write_model(m.bad_statistics(kind)), "--json", "--no-verify")
    assert json.loads(out)["entries"][0]["reason"] == "bad-statistics"


@pytest.mark.parametrize("where", ["weight", "bias"])
def test_fp16_overflow_exit_0(cli, write_model, where) -> None:
    code, _, err = cli("fold", write_model(m.fp16_overflow(where)))
    assert code == 0, err


@pytest.mark.parametrize(
    "build",
    [
        lambda: m.conv_bn_typed(m.F64),
        lambda: m.conv_bn_typed(m.BF16),
        m.opset6_bn,
        m.fp16_tiny_var,
        m.fp16_conv_fp32_params,
        m.spatial0_bn,
        m.loop_bn,
        m.function_bn,
        m.if_bn,
    ],
    ids=["fp64", "bf16", "opset6", "fp16-tiny-var", "mixed-15", "spatial0", "loop", "fn", "if"],
)
def test_verification_passes_on_correct_folds(cli, write_model, build) -> None:
    code, _, err = cli("fold", write_model(build()))
    assert code == 0, err


# -- exit 1: verification mismatch --------------------------------------------------------------
def test_verification_mismatch_exits_1_and_writes_nothing(cli, write_model, tmp_path, monkeypatch):
    from bnsurgery.passes.fold import arithmetic as fold_math

    real = fold_math.conv_forward

    def wrong(w, b, s, t):  # a fold with a 1% error in the scale
        return real(w, b, s * 1.01, t)

    monkeypatch.setattr(fold_math, "conv_forward", wrong)
    path = write_model(m.conv_bn())
    before = listing(tmp_path)
    code, _, _ = cli("fold", path)
    assert (code, listing(tmp_path)) == (1, before)


# -- exit 2: bad input --------------------------------------------------------------------------
def test_nonexistent_path(cli, tmp_path) -> None:
    assert_refused(cli, tmp_path, None, "fold", tmp_path / "missing.onnx")


def test_directory(cli, tmp_path) -> None:
    (tmp_path / "folder.onnx").mkdir()
    assert_refused(cli, tmp_path, None, "fold", tmp_path / "folder.onnx")


def test_empty_file(cli, write_model, tmp_path) -> None:
    path = write_model(b"")
    assert_refused(cli, tmp_path, path, "fold", path)


def test_random_bytes(cli, write_model, tmp_path) -> None:
    path = write_model(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert_refused(cli, tmp_path, path, "fold", path)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.99])
def test_truncated_model(cli, write_model, tmp_path, keep) -> None:
    data = m.conv_bn().SerializeToString()
    path = write_model(data[: int(len(data) * keep)])
    assert_refused(cli, tmp_path, path, "fold", path)


def test_text_file_with_onnx_suffix(cli, write_model, tmp_path) -> None:
    path = write_model(b"ir_version: 8\ngraph { }\n")
    assert_refused(cli, tmp_path, path, "fold", path)


def test_model_failing_the_checker(cli, write_model, tmp_path) -> None:
    path = write_model(m.checker_failing())
    assert_refused(cli, tmp_path, path, "fold", path)


@pytest.mark.parametrize("which", ["scale", "mean-2d"])
def test_bn_with_wrongly_shaped_params(cli, write_model, tmp_path, which) -> None:
    path = write_model(m.wrong_shape_params(which))
    assert_refused(cli, tmp_path, path, "fold", path)


def test_wrongly_shaped_params_message_names_the_bn(cli, write_model, tmp_path) -> None:
    path = write_model(m.wrong_shape_params())
    assert "'bn'" in assert_refused(cli, tmp_path, path, "fold", path)


def test_info_refuses_bad_input_too(cli, write_model, tmp_path) -> None:
    path = write_model(b"\x00\x01garbage")
    assert_refused(cli, tmp_path, path, "info", path)


def test_out_equal_to_model_without_in_place(cli, write_model, tmp_path) -> None:
    path = write_model(m.conv_bn())
    assert_refused(cli, tmp_path, path, "fold", path, "-o", path)


def test_out_equal_to_model_spelled_differently(cli, write_model, tmp_path) -> None:
    path = write_model(m.conv_bn())
    other = tmp_path / "sub" / ".." / "net.onnx"
    (tmp_path / "sub").mkdir()
    assert_refused(cli, tmp_path, path, "fold", path, "-o", other)


def test_out_is_a_symlink_to_model(cli, write_model, tmp_path) -> None:
    path = write_model(m.conv_bn())
    (tmp_path / "alias.onnx").symlink_to(path)
    assert_refused(cli, tmp_path, path, "fold", path, "-o", tmp_path / "alias.onnx")


def test_output_folder_is_a_file(cli, write_model, tmp_path) -> None:
    path = write_model(m.conv_bn())
    (tmp_path / "afile").write_text("not a folder")
    assert_refused(cli, tmp_path, path, "fold", path, "-o", tmp_path / "afile" / "out.onnx")


def test_output_folder_does_not_exist(cli, write_model, tmp_path) -> None:
    path = write_model(m.conv_bn())
    assert_refused(cli, tmp_path, path, "fold", path, "-o", tmp_path / "nowhere" / "out.onnx")


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="root ignores directory permissions; covered by the file-as-folder tests",
)
def test_unwritable_output_folder(cli, write_model, tmp_path) -> None:
    path = write_model(m.conv_bn())
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert_refused(cli, tmp_path, path, "fold", path, "-o", locked / "out.onnx")
    finally:
        locked.chmod(0o700)


def test_unwritable_output_file_on_read_only_filesystem(cli, write_model, tmp_path) -> None:
    """/proc refuses new files even to root."""
    path = write_model(m.conv_bn())
    target = Path("/proc/bnsurgery-test.onnx")
    if not Path("/proc").is_dir():
        pytest.skip("no /proc")
    assert_refused(cli, tmp_path, path, "fold", path, "-o", target)


def test_bad_shape_option(cli, write_model, tmp_path) -> None:
    path = write_model(m.conv_bn())
    assert_refused(cli, tmp_path, path, "fold", path, "--shape", "x:1xbanana")


def test_unknown_option_is_exit_2(cli, write_model, tmp_path) -> None:
    path = write_model(m.conv_bn())
    assert_refused(cli, tmp_path, path, "fold", path, "--no-such-option")


# -- external data on the command line ----------------------------------------------------------
def save_external(model: onnx.ModelProto, folder: Path, name: str = "net.onnx") -> Path:
    """Save with every tensor in folder/weights.bin (onnx.save_model mutates its argument)."""
    folder.mkdir(parents=True, exist_ok=True)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(
        copy,
        str(folder / name),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    return folder / name


def relocate_external(path: Path, location: str) -> None:
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(model.SerializeToString())


def test_external_data_model_folds(cli, tmp_path) -> None:
    path = save_external(m.conv_bn(), tmp_path / "model")
    code, _, err = cli("fold", path, "-o", tmp_path / "out.onnx")
    assert code == 0, err


def test_external_data_model_folds_correctly(cli, tmp_path) -> None:
    model = m.conv_bn()
    path = save_external(model, tmp_path / "model")
    cli("fold", path, "-o", tmp_path / "out.onnx")
    m.assert_equivalent(model, onnx.load(str(tmp_path / "out.onnx")))


def test_external_data_flag_writes_weights_beside_the_output(cli, write_model, tmp_path) -> None:
    big = m.conv_bn(cin=8, cout=16)  # a 4.6 kB weight: over any inline threshold
    code, _, err = cli("fold", write_model(big), "-o", tmp_path / "out.onnx", "--external-data")
    assert (code, (tmp_path / "out.onnx.data").is_file()) == (0, True), err


def test_external_data_flag_output_loads_and_is_folded(cli, write_model, tmp_path) -> None:
    big = m.conv_bn(cin=8, cout=16)
    cli("fold", write_model(big), "-o", tmp_path / "out.onnx", "--external-data")
    m.assert_equivalent(big, bnsurgery.load_model(tmp_path / "out.onnx"))


def test_external_data_flag_on_a_tiny_model_still_writes_it(cli, write_model, tmp_path) -> None:
    code, _, err = cli(
        "fold", write_model(m.conv_bn()), "-o", tmp_path / "o.onnx", "--external-data"
    )
    assert (code, (tmp_path / "o.onnx").is_file()) == (0, True), err


def test_external_data_dotdot_is_refused(cli, tmp_path) -> None:
    path = save_external(m.conv_bn(), tmp_path / "model")
    os.replace(tmp_path / "model" / "weights.bin", tmp_path / "weights.bin")
    relocate_external(path, "../weights.bin")
    assert_refused(cli, tmp_path, path, "fold", path)


def test_external_data_absolute_path_is_refused(cli, tmp_path) -> None:
    path = save_external(m.conv_bn(), tmp_path / "model")
    relocate_external(path, str(tmp_path / "model" / "weights.bin"))
    assert_refused(cli, tmp_path, path, "fold", path)


def test_external_data_symlink_leaving_the_folder_is_refused(cli, tmp_path) -> None:
    path = save_external(m.conv_bn(), tmp_path / "model")
    os.replace(tmp_path / "model" / "weights.bin", tmp_path / "outside.bin")
    (tmp_path / "model" / "weights.bin").symlink_to(tmp_path / "outside.bin")
    assert_refused(cli, tmp_path, path, "fold", path)


def test_external_data_missing_file_is_refused(cli, tmp_path) -> None:
    path = save_external(m.conv_bn(), tmp_path / "model")
    (tmp_path / "model" / "weights.bin").unlink()
    assert_refused(cli, tmp_path, path, "fold", path)


def test_external_data_truncated_file_is_refused(cli, tmp_path) -> None:
    path = save_external(m.conv_bn(), tmp_path / "model")
    data = (tmp_path / "model" / "weights.bin").read_bytes()
    (tmp_path / "model" / "weights.bin").write_bytes(data[: len(data) // 2])
    assert_refused(cli, tmp_path, path, "fold", path)


# -- as a real process --------------------------------------------------------------------------
def run_process(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bnsurgery", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_process_fold_json_stdout_is_only_json(write_model) -> None:
    proc = run_process("fold", write_model(m.conv_bn()), "--json")
    assert json.loads(proc.stdout)["summary"]["bns_after"] == 0


def test_process_bad_input_is_one_line_exit_2(write_model) -> None:
    proc = run_process("fold", write_model(b"garbage bytes, not a model"))
    assert (proc.returncode, len(proc.stderr.strip().splitlines())) == (2, 1), proc.stderr


def test_process_verification_failure_exits_1(write_model, tmp_path) -> None:
    """A wrong fold injected through a sitecustomize makes the real process exit 1."""
    (tmp_path / "sitecustomize.py").write_text(
        "from bnsurgery.passes.fold import arithmetic as fm\n"
        "_real = fm.conv_forward\n"
        "fm.conv_forward = lambda w, b, s, t: _real(w, b, s * 1.01, t)\n"
    )
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(
        [sys.executable, "-m", "bnsurgery", "fold", str(write_model(m.conv_bn()))],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 1, proc.stderr


def test_process_overflow_prints_no_numpy_warning(write_model) -> None:
    """stderr carries bnsurgery's own lines only, not a RuntimeWarning from a float cast."""
    proc = run_process("fold", write_model(m.fp16_overflow("weight")), "--no-verify", "--json")
    assert "Warning" not in proc.stderr, proc.stderr


def test_fold_command_does_not_import_the_other_commands(write_model, tmp_path) -> None:
    """Commands load on first use: `fold` pays neither for the harness nor for validate's checks
    (start-up time is part of what users wait for on every fold)."""
    code = (
        "import sys\n"
        "from bnsurgery.cli.main import main\n"
        f"code = main(['fold', {str(write_model(m.conv_bn()))!r}, '--no-verify', '--json'])\n"
        "loaded = [n for n in ('bnsurgery.harness.compare', 'bnsurgery.cli.reestimate',\n"
        "          'bnsurgery.validation.checks.folding', 'bnsurgery.passes.insert')\n"
        "          if n in sys.modules]\n"
        "print('LOADED', code, loaded)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert "LOADED 0 []" in proc.stdout, proc.stdout + proc.stderr
