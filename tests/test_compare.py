"""`bnsurgery compare` end to end on the sample models: folded vs original, a planted weight
corruption, CUDA on a CPU-only machine, and every bad input compare refuses (exit 2, one
line)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import SAMPLES
from onnx import numpy_helper

import bnsurgery
from bnsurgery.errors import BadInputError
from bnsurgery.runtime.providers import available_providers

DIGITS = SAMPLES / "digits_test.npz"
CUDA_MISSING = "CUDAExecutionProvider" not in available_providers()


@pytest.fixture(scope="module")
def digits_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 128 test digits, with labels (keeps layer-wise runs fast)."""
    data = np.load(DIGITS)
    path = tmp_path_factory.mktemp("data") / "digits128.npz"
    np.savez(path, input=data["input"][:128], label=data["label"][:128])
    return path


@pytest.fixture(scope="module")
def digits_flat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits flattened to 64 features, for digits_mlp.onnx."""
    data = np.load(DIGITS)
    path = tmp_path_factory.mktemp("data") / "digits_flat.npz"
    np.savez(path, input=data["input"].reshape(-1, 64)[:256], label=data["label"][:256])
    return path


def corrupt(model: onnx.ModelProto, node_name: str, factor: float = 1.5) -> onnx.ModelProto:
    """A copy with the weight (input 1) of node `node_name` multiplied by `factor`."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    node = next(n for n in copy.graph.node if n.name == node_name)
    tensor = next(t for t in copy.graph.initializer if t.name == node.input[1])
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * factor, tensor.name))
    return copy


def fold_to(tmp_path: Path, model: str | Path | onnx.ModelProto, name: str = "folded.onnx"):
    path = tmp_path / name
    onnx.save(bnsurgery.fold(model).model, path)
    return path


# -- folded vs original: every sample model passes --------------------------------------------
@pytest.mark.parametrize(
    ("sample", "data"),
    [
        ("digits_cnn", "digits_small"),
        ("digits_cnn_nobn", "digits_small"),
        ("digits_mlp", "digits_flat"),
        ("resnet_small", None),
    ],
)
def test_each_sample_model_matches_its_folded_version(cli, tmp_path, request, sample, data):
    original = SAMPLES / f"{sample}.onnx"
    folded = fold_to(tmp_path, original)
    args = [original, folded, "--layerwise", "--json"]
    if data:
        args += ["--data", request.getfixturevalue(data)]
    code, out, err = cli("compare", *args)
    assert code == 0, err
    report = json.loads(out)
    assert report["passed"] is True
    assert report["layerwise"][0]["first_divergence"] is None  # no false divergence at renames
    (logits,) = report["comparisons"][0]["outputs"]
    assert logits["top1_agreement"] == 1.0
    if data:
        assert logits["accuracy"]["reference"] == logits["accuracy"]["candidate"] > 0.9


def test_api_compare_returns_a_report_for_pipelines(digits_small):
    folded = bnsurgery.fold(SAMPLES / "digits_cnn.onnx").model
    report = bnsurgery.compare(SAMPLES / "digits_cnn.onnx", folded, ("cpu",), str(digits_small))
    assert report.passed and report.pairs[0].outputs[0].max_abs < 1e-4
    assert report.data["samples"] == 128 and report.data["labels"] is True


# -- planted corruption: exit 1, and layer-wise names the corrupted node -----------------------
@pytest.mark.parametrize("node", ["/conv2/Conv", "/conv1/Conv"])
def test_planted_weight_corruption_fails_and_layerwise_names_the_node(
    cli, tmp_path, digits_small, node
):
    original = SAMPLES / "digits_cnn.onnx"
    bad = tmp_path / "bad.onnx"
    onnx.save(corrupt(onnx.load(original), node), bad)
    code, out, err = cli("compare", original, bad, "--data", digits_small, "--layerwise")
    assert code == 1
    assert "outputs beyond tolerance" in err and "Traceback" not in err
    assert f"first divergence at Conv node '{node}'" in out
    assert "result: FAIL" in out


def test_corruption_in_a_folded_model_is_found_at_the_conv_that_absorbed_the_bn(
    cli, tmp_path, digits_small
):
    """Fold then corrupt: the first diverging tensor is the BN's output name, made by the Conv."""
    original = SAMPLES / "digits_cnn.onnx"
    bad = tmp_path / "bad_folded.onnx"
    folded = bnsurgery.fold(original).model
    onnx.save(corrupt(folded, "/conv2/Conv"), bad)
    code, out, _ = cli("compare", original, bad, "--data", digits_small, "--layerwise", "--json")
    assert code == 1
    first = json.loads(out)["layerwise"][0]["first_divergence"]
    assert first["candidate_node"] == "/conv2/Conv" and first["candidate_op_type"] == "Conv"
    assert first["tensor"] == "/bn2/BatchNormalization_output_0"


def test_fold_report_tensor_map_is_accepted_with_map(cli, tmp_path, digits_small):
    original = SAMPLES / "digits_cnn.onnx"
    folded = tmp_path / "f.onnx"
    code, out, _ = cli("fold", original, "-o", folded, "--json")
    assert code == 0
    (tmp_path / "fold.json").write_text(out)
    code, out, _ = cli(
        "compare", original, folded, "--data", digits_small, "--layerwise",
        "--map", tmp_path / "fold.json", "--json",
    )  # fmt: skip
    assert code == 0
    layerwise = json.loads(out)["layerwise"][0]
    # the four pre-BN tensors that no longer exist, as the fold report says
    assert [u["decided_by"] for u in layerwise["unmatched"]] == ["map"] * 4
    assert layerwise["first_divergence"] is None


def test_per_output_tolerance_can_make_a_small_corruption_pass(cli, tmp_path, digits_small):
    original = SAMPLES / "digits_cnn.onnx"
    bad = tmp_path / "slightly.onnx"
    onnx.save(corrupt(onnx.load(original), "/fc2/Gemm", 1.0001), bad)
    assert cli("compare", original, bad, "--data", digits_small)[0] == 1
    code, out, _ = cli(
        "compare", original, bad, "--data", digits_small, "--atol", "logits:1e-2", "--json"
    )
    assert code == 0
    (logits,) = json.loads(out)["comparisons"][0]["outputs"]
    assert logits["atol"] == 1e-2 and logits["min_atol"] < 1e-2


# -- providers -----------------------------------------------------------------------------------
@pytest.mark.skipif(not CUDA_MISSING, reason="this machine has CUDA")
def test_cuda_requested_on_a_cpu_only_machine_exits_3(cli):
    code, out, err = cli("compare", SAMPLES / "digits_mlp.onnx", "--providers", "cpu,cuda")
    assert code == 3 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "CUDAExecutionProvider" in err and "not available" in err


@pytest.mark.skipif(not CUDA_MISSING, reason="this machine has CUDA")
def test_allow_fallback_states_the_fallback_in_text_and_json(cli):
    model = SAMPLES / "digits_mlp.onnx"
    args = ["compare", model, "--providers", "cpu,cuda", "--allow-fallback", "--cuda-tf32"]
    code, out, err = cli(*args)
    assert code == 0
    assert out.startswith("WARNING: FALLBACK:") and "WARNING: FALLBACK" in err
    assert "cuda -> CPUExecutionProvider (FALLBACK)" in out
    code, out, _ = cli(*args, "--json")
    report = json.loads(out)
    assert report["fallbacks"] and report["fallbacks"][0].startswith("FALLBACK:")
    (pair,) = report["comparisons"]
    assert pair["provider"] == "cuda" and pair["session"]["fallback"] is True
    assert pair["session"]["ran_on"] == "CPUExecutionProvider"
    assert pair["session"]["provider_options"] == {
        "device_id": "0",
        "use_tf32": "1",
        "cudnn_conv_algo_search": "EXHAUSTIVE",
    }


def test_same_model_at_two_optimisation_levels(cli):
    code, out, _ = cli("compare", SAMPLES / "digits_mlp.onnx", "--opt-level", "all", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["reference"]["session"]["graph_optimization_level"] == "ORT_DISABLE_ALL"
    assert report["comparisons"][0]["session"]["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert any("random:4" in note for note in report["data"]["notes"])  # said so


# -- bad input: exit 2, one line, no traceback ----------------------------------------------------
def _one_line_exit_2(result, *needles):
    code, out, err = result
    assert code == 2, err
    assert out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for needle in needles:
        assert needle in err
    return err


def test_data_of_the_wrong_dtype(cli, tmp_path):
    np.savez(tmp_path / "d.npz", input=np.zeros((4, 1, 8, 8), np.float64))
    _one_line_exit_2(
        cli("compare", SAMPLES / "digits_cnn.onnx", "--opt-level", "all", "--data",
            tmp_path / "d.npz"),
        "input 'input' expects float32", "got float64",
    )  # fmt: skip


def test_data_of_the_wrong_shape(cli, tmp_path):
    np.save(tmp_path / "d.npy", np.zeros((4, 1, 8, 9), np.float32))
    _one_line_exit_2(
        cli("compare", SAMPLES / "digits_cnn.onnx", "--opt-level", "all", "--data",
            tmp_path / "d.npy"),
        "axis 3 is 9, the model says 8",
    )  # fmt: skip


def test_npz_missing_an_input(cli, tmp_path, write_model):
    from test_compare_matching import two_input_model

    model = write_model(two_input_model())
    np.savez(tmp_path / "d.npz", a=np.zeros((2, 4), np.float32))
    _one_line_exit_2(
        cli("compare", model, "--opt-level", "all", "--data", tmp_path / "d.npz"),
        "input 'b' missing",
    )


def test_labels_key_that_does_not_exist(cli):
    _one_line_exit_2(
        cli("compare", SAMPLES / "digits_cnn.onnx", "--opt-level", "all", "--data", DIGITS,
            "--labels", "target"),
        "labels key 'target' not found",
    )  # fmt: skip


def test_models_with_different_output_names(cli, write_model):
    model = onnx.load(SAMPLES / "digits_mlp.onnx")
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    renamed.graph.node[-1].output[0] = "scores"
    renamed.graph.output[0].name = "scores"
    err = _one_line_exit_2(
        cli("compare", SAMPLES / "digits_mlp.onnx", write_model(renamed)),
        "different outputs",
    )
    assert "only the reference has 'logits'" in err and "only the candidate has 'scores'" in err


def test_models_with_different_input_names(cli, write_model):
    renamed = onnx.load(SAMPLES / "digits_mlp.onnx")
    renamed.graph.input[0].name = "pixels"
    for node in renamed.graph.node:
        for i, name in enumerate(node.input):
            if name == "input":
                node.input[i] = "pixels"
    _one_line_exit_2(
        cli("compare", SAMPLES / "digits_mlp.onnx", write_model(renamed)),
        "different inputs",
        "'input'",
        "'pixels'",
    )


def test_unknown_provider_alias(cli):
    _one_line_exit_2(
        cli("compare", SAMPLES / "digits_mlp.onnx", "--providers", "cpu,gpu"),
        "unknown execution provider 'gpu'",
    )


def test_script_without_load_data(cli, tmp_path):
    (tmp_path / "data.py").write_text("def loader():\n    return []\n")
    _one_line_exit_2(
        cli("compare", SAMPLES / "digits_mlp.onnx", "--opt-level", "all", "--data",
            tmp_path / "data.py"),
        "no load_data() function",
    )  # fmt: skip


def test_nothing_to_compare_and_unknown_output_tolerance(cli):
    _one_line_exit_2(cli("compare", SAMPLES / "digits_mlp.onnx"), "nothing to compare")
    with pytest.raises(BadInputError, match="nothing to compare") as exc:
        bnsurgery.compare(SAMPLES / "digits_mlp.onnx")
    assert exc.value.option == "providers"
    _one_line_exit_2(
        cli("compare", SAMPLES / "digits_mlp.onnx", "--opt-level", "all", "--atol", "probs:1"),
        "unknown output(s) 'probs'",
    )


def test_not_a_model_and_a_bad_map(cli, tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    _one_line_exit_2(cli("compare", tmp_path / "junk.onnx", SAMPLES / "digits_mlp.onnx"))
    (tmp_path / "map.json").write_text("[1, 2]")
    _one_line_exit_2(
        cli("compare", SAMPLES / "digits_mlp.onnx", SAMPLES / "digits_mlp.onnx", "--layerwise",
            "--map", tmp_path / "map.json"),
        "tensor_map",
    )  # fmt: skip
    from bnsurgery.harness.matching import load_tensor_map

    for text in ("[1, 2]", "{"):
        (tmp_path / "map.json").write_text(text)
        with pytest.raises(BadInputError) as exc:
            load_tensor_map(str(tmp_path / "map.json"))
        assert exc.value.option == "tensor_map"


def test_api_raises_bad_input_for_a_candidate_with_other_inputs():
    with pytest.raises(BadInputError, match=r"input 'input' is float32 \[\?x64\] in the ref"):
        bnsurgery.compare(SAMPLES / "digits_mlp.onnx", SAMPLES / "digits_cnn.onnx")


def test_scalar_inputs_have_no_batch_axis_and_are_shared_by_every_batch():
    # An If model's rank-0 bool condition: batching must not slice it (regression: IndexError).
    from models import if_bn

    import bnsurgery

    model = if_bn()
    report = bnsurgery.compare(model, bnsurgery.fold(model).model, data="random:6")
    assert report.passed
