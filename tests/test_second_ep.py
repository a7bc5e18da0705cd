"""A real second execution provider: CPU against OpenVINO (onnxruntime-openvino), and the ggml
plugin EP registered through --ep-library, each in its own cached venv (tests/second_ep.py).

A correct fold passes on every provider and a wrong one (every BN's epsilon x100) fails on
every provider, by the one judge; a node left to the CPU provider is a partial fallback (exit
3 naming its op, exit 0 with --allow-fallback and still named); a plugin EP that takes the
whole model runs it, one that takes no node is a full fallback (exit 3).
"""

from __future__ import annotations

import json

import onnx
import pytest
from conftest import REPO
from deep_models import resnet18
from models import conv_bn
from onnx import helper
from second_ep import build_venv, python_in, run_in
from wrong_folds import correct_fold, scale_epsilons

pytestmark = pytest.mark.second_ep
SAMPLES = REPO / "sample_models"
SAMPLE_MODELS = ["digits_cnn", "digits_mlp", "resnet_small", "digits_cnn_nobn"]


@pytest.fixture(scope="session")
def openvino_venv():
    return build_venv("openvino", ["onnxruntime-openvino"], "openvino")


@pytest.fixture(scope="session")
def ggml_venv():
    return build_venv("ggml", ["onnxruntime-ggml"], None)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    """The sample models, a deep ResNet-18 (outputs in the hundreds), each with its correct
    fold and its wrong fold (every BN's epsilon x100), and the partial-placement model."""
    folder = tmp_path_factory.mktemp("second_ep")
    sources = {name: onnx.load(SAMPLES / f"{name}.onnx") for name in SAMPLE_MODELS}
    sources["resnet18"] = resnet18()
    for name, model in sources.items():
        onnx.save(model, folder / f"{name}.onnx")
        onnx.save(correct_fold(model), folder / f"{name}.folded.onnx")
        if any(n.op_type == "BatchNormalization" for n in model.graph.node):
            onnx.save(correct_fold(scale_epsilons(model)), folder / f"{name}.wrong.onnx")
    onnx.save(conv_bn_hardmax_relu(), folder / "hardmax.onnx")
    return folder


def conv_bn_hardmax_relu() -> onnx.ModelProto:
    """Conv -> BN -> Hardmax -> Relu: OpenVINO has no Hardmax, so the CPU provider runs it."""
    model = conv_bn()
    output = model.graph.output[0]
    tail = [
        helper.make_node("Hardmax", [output.name], ["hard"], name="hardmax"),
        helper.make_node("Relu", ["hard"], ["z"], name="relu"),
    ]
    model.graph.node.extend(tail)
    new_output = onnx.ValueInfoProto()
    new_output.CopyFrom(output)
    new_output.name = "z"
    del model.graph.output[:]
    model.graph.output.append(new_output)
    onnx.checker.check_model(model)
    return model


def _compare(venv, *args) -> tuple[int, dict, str]:
    result = run_in(venv, "compare", *args, "--json")
    doc = json.loads(result.stdout) if result.stdout.strip() else {}
    return result.returncode, doc, result.stderr


# -- OpenVINO ----------------------------------------------------------------------------------
def test_installing_bnsurgery_with_the_openvino_extra_keeps_the_openvino_build(openvino_venv):
    providers = python_in(
        openvino_venv, "import onnxruntime as o; print(o.get_available_providers())"
    )
    assert "OpenVINOExecutionProvider" in providers
    result = run_in(openvino_venv, "providers", "--json")
    doc = json.loads(result.stdout)
    assert result.returncode == 0 and doc["warnings"] == []
    assert [d["name"] for d in doc["distributions"]] == ["onnxruntime-openvino"]
    assert {"name": "OpenVINOExecutionProvider", "alias": "openvino"} in doc["providers"]


@pytest.mark.parametrize("name", [*SAMPLE_MODELS, "resnet18"])
def test_a_correct_fold_passes_on_cpu_and_openvino_with_every_node_on_openvino(
    openvino_venv, models_dir, name
):
    code, doc, err = _compare(
        openvino_venv, models_dir / f"{name}.onnx", models_dir / f"{name}.folded.onnx",
        "--providers", "cpu,openvino",
    )  # fmt: skip
    assert code == 0, err
    pairs = {(p["model"], p["provider"]): p for p in doc["comparisons"]}
    assert set(pairs) == {
        ("candidate", "cpu"),
        ("candidate", "openvino"),
        ("reference", "openvino"),
    }
    assert all(p["passed"] for p in pairs.values())
    for model in ("candidate", "reference"):
        session = pairs[model, "openvino"]["session"]
        assert session["ran_on"] == "OpenVINOExecutionProvider" and not session["fallback"]
        placement = session["placement"]
        assert placement["fallback"] == "none" and placement["on_requested"] == placement["nodes"]
    assert doc["fallbacks"] == []


@pytest.mark.parametrize("name", ["digits_cnn", "resnet_small", "resnet18"])
def test_a_wrong_fold_fails_on_every_provider(openvino_venv, models_dir, name):
    code, doc, _ = _compare(
        openvino_venv, models_dir / f"{name}.onnx", models_dir / f"{name}.wrong.onnx",
        "--providers", "cpu,openvino",
    )  # fmt: skip
    assert code == 1
    verdicts = {(p["model"], p["provider"]): p["passed"] for p in doc["comparisons"]}
    assert verdicts == {
        ("candidate", "cpu"): False,
        ("candidate", "openvino"): False,
        ("reference", "openvino"): True,  # the original model agrees across providers
    }


def test_a_node_left_to_the_cpu_is_a_partial_fallback_named_by_its_op(openvino_venv, models_dir):
    model = models_dir / "hardmax.onnx"
    result = run_in(openvino_venv, "compare", model, "--providers", "cpu,openvino")
    assert result.returncode == 3
    line = result.stderr.strip().splitlines()[-1]
    assert "OpenVINOExecutionProvider ran 3 of 4 nodes" in line and "on CPU: Hardmax" in line

    allowed = run_in(
        openvino_venv, "compare", model, "--providers", "cpu,openvino", "--allow-fallback"
    )
    assert allowed.returncode == 0, allowed.stderr
    assert "WARNING: PARTIAL FALLBACK" in allowed.stdout
    assert "reference on openvino: 3 of 4 nodes; on CPU: Hardmax" in allowed.stdout
    assert "(OpenVINOExecutionProvider, PARTIAL FALLBACK)" in allowed.stdout

    code, doc, _ = _compare(
        openvino_venv, model, "--providers", "cpu,openvino", "--allow-fallback"
    )  # fmt: skip
    assert code == 0
    placement = doc["comparisons"][0]["session"]["placement"]
    assert placement["fallback"] == "partial" and placement["on_requested"] == 3
    assert placement["elsewhere"] == {"CPUExecutionProvider": {"Hardmax": 1}}
    assert placement["off_nodes"] == [
        {"node": "hardmax", "op_type": "Hardmax", "provider": "CPUExecutionProvider"}
    ]
    assert any("Hardmax" in f for f in doc["fallbacks"])


def test_openvino_provider_options_pass_through_and_a_bad_one_is_exit_3(openvino_venv, models_dir):
    model = models_dir / "digits_cnn.onnx"
    code, doc, err = _compare(
        openvino_venv, model, "--providers", "cpu,openvino",
        "--provider-option", "openvino:device_type=CPU",
        "--provider-option", "openvino:precision=FP32",
    )  # fmt: skip
    assert code == 0, err
    session = doc["comparisons"][0]["session"]
    assert session["provider_options"] == {"device_type": "CPU", "precision": "FP32"}
    bad = run_in(
        openvino_venv, "compare", model, "--providers", "cpu,openvino",
        "--provider-option", "openvino:no_such_option=1",
    )  # fmt: skip
    assert bad.returncode == 3 and "Traceback" not in bad.stderr
    assert "OpenVINOExecutionProvider could not be created with options no_such_option=1" in (
        bad.stderr
    )
    assert "EP Error" not in bad.stdout  # ONNX Runtime's own silent retry on CPU did not run


# -- ggml, a plugin EP -------------------------------------------------------------------------
def _ggml_library(venv) -> str:
    return python_in(venv, "import onnxruntime_ggml as g; print(g.library_path())").strip()


def test_a_folded_mlp_runs_entirely_on_the_ggml_plugin_ep(ggml_venv, models_dir):
    """The folded model on ggml against itself on CPU (the original, with its BNs, is not a
    model ggml takes: see the next tests)."""
    code, doc, err = _compare(
        ggml_venv, models_dir / "digits_mlp.folded.onnx",
        "--providers", "cpu,ggml", "--ep-library", f"ggml={_ggml_library(ggml_venv)}",
        "--provider-option", "ggml:weights=f32",
    )  # fmt: skip
    assert code == 0, err
    (pair,) = doc["comparisons"]
    assert pair["provider"] == "ggml"
    session = pair["session"]
    assert pair["passed"] and session["ran_on"] == "ggml" and not session["fallback"]
    assert session["placement"]["nodes"] == 5 and session["placement"]["on_requested"] == 5
    assert session["plugin_library"] == _ggml_library(ggml_venv)
    assert session["provider_options"] == {"weights": "f32"}


def test_an_installed_plugin_package_is_found_without_ep_library(ggml_venv, models_dir):
    result = run_in(
        ggml_venv, "compare", models_dir / "digits_mlp.folded.onnx", "--providers", "cpu,ggml",
        "--provider-option", "ggml:weights=f32",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "reference on ggml: 5 of 5 nodes" in result.stdout
    listing = json.loads(run_in(ggml_venv, "providers", "--json").stdout)
    assert [p["ep_name"] for p in listing["plugin_packages"]] == ["ggml"]
    assert any(d["ep_name"] == "ggml" for d in listing["devices"])


def test_a_bn_model_where_ggml_takes_no_node_is_a_full_fallback(ggml_venv, models_dir):
    result = run_in(
        ggml_venv, "compare", models_dir / "digits_mlp.onnx", "--providers", "cpu,ggml",
        "--ep-library", f"ggml={_ggml_library(ggml_venv)}", "--provider-option",
        "ggml:weights=f32",
    )  # fmt: skip
    assert result.returncode == 3
    line = result.stderr.strip().splitlines()[-1]
    assert "ggml took no node of the model: all 7 ran on CPUExecutionProvider" in line
    assert "BatchNormalization" in line


def test_the_original_against_its_fold_on_ggml_is_refused_because_of_the_original(
    ggml_venv, models_dir
):
    """The reference runs on every provider too, and ggml takes no node of the BN model."""
    result = run_in(
        ggml_venv, "compare", models_dir / "digits_mlp.onnx",
        models_dir / "digits_mlp.folded.onnx", "--providers", "cpu,ggml",
        "--provider-option", "ggml:weights=f32",
    )  # fmt: skip
    assert result.returncode == 3 and "ggml took no node" in result.stderr
