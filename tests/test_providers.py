"""Execution providers: aliases, verified placement, CUDA options (no GPU here)."""

from __future__ import annotations

import onnxruntime as ort
import pytest
from models import make, vi
from onnx import helper

from bnsurgery.errors import BadInputError, EnvironmentProblem
from bnsurgery.runtime import providers as P
from bnsurgery.runtime.providers import ProviderConfig, create_session, parse_providers

CUDA_MISSING = "CUDAExecutionProvider" not in P.available_providers()
needs_no_cuda = pytest.mark.skipif(not CUDA_MISSING, reason="this machine has CUDA")


def relu():
    node = helper.make_node("Relu", ["x"], ["y"])
    return make([node], [vi("x", ["N", 4])], [vi("y", ["N", 4])])


def test_aliases_map_to_ort_provider_names():
    assert P.resolve_alias("cpu") == "CPUExecutionProvider"
    assert P.resolve_alias("CUDA") == "CUDAExecutionProvider"
    assert P.resolve_alias("tensorrt") == "TensorrtExecutionProvider"
    assert P.resolve_alias("openvino") == "OpenVINOExecutionProvider"
    assert P.resolve_alias("dml") == "DmlExecutionProvider"
    assert P.resolve_alias("coreml") == "CoreMLExecutionProvider"
    assert P.resolve_alias("CUDAExecutionProvider") == "CUDAExecutionProvider"


def test_parse_providers_keeps_order_and_refuses_unknown_or_repeated():
    assert parse_providers("cpu, cuda") == ["cpu", "cuda"]
    assert parse_providers(["CPUExecutionProvider"]) == ["cpu"]
    with pytest.raises(BadInputError, match=r"unknown execution provider 'gpu'"):
        parse_providers("cpu,gpu")
    with pytest.raises(BadInputError, match="given twice") as exc:
        parse_providers("cpu,CPUExecutionProvider")
    assert exc.value.option == "providers"
    with pytest.raises(BadInputError, match="no execution provider") as exc:
        parse_providers(" , ")
    assert exc.value.option == "providers"


def test_cpu_session_records_what_ran():
    _, info = create_session(relu(), ProviderConfig("cpu", intra_op_threads=2))
    d = info.to_dict()
    assert d["active"] == ["CPUExecutionProvider"] and d["ran_on"] == "CPUExecutionProvider"
    assert d["fallback"] is False and d["graph_optimization_level"] == "ORT_DISABLE_ALL"
    assert d["intra_op_threads"] == 2 and d["onnxruntime_version"]


def test_optimisation_level_is_selectable_and_validated():
    _, info = create_session(relu(), ProviderConfig("cpu", opt_level="all"))
    assert info.opt_level == "ORT_ENABLE_ALL"
    with pytest.raises(BadInputError, match="optimization level"):
        create_session(relu(), ProviderConfig("cpu", opt_level="max"))


def test_execution_order_is_selectable_validated_and_recorded():
    from bnsurgery.runtime.providers import session_options

    config = ProviderConfig("cpu", execution_order="priority_based")
    assert session_options(config).execution_order == ort.ExecutionOrder.PRIORITY_BASED
    _, info = create_session(relu(), config)
    assert info.to_dict()["execution_order"] == "PRIORITY_BASED"
    assert create_session(relu())[1].execution_order == "DEFAULT"
    with pytest.raises(BadInputError, match="unknown execution order 'random'"):
        create_session(relu(), ProviderConfig("cpu", execution_order="random"))


def test_cuda_options_tf32_off_by_default_and_recorded():
    assert ProviderConfig("cuda").provider_options() == {
        "device_id": "0",
        "use_tf32": "0",
        "cudnn_conv_algo_search": "EXHAUSTIVE",
    }
    options = ProviderConfig(
        "cuda", cuda_tf32=True, cudnn_conv_algo_search="HEURISTIC", device_id=1
    ).provider_options()
    assert options == {"device_id": "1", "use_tf32": "1", "cudnn_conv_algo_search": "HEURISTIC"}
    with pytest.raises(BadInputError, match="cudnn_conv_algo_search"):
        ProviderConfig("cuda", cudnn_conv_algo_search="FAST").validate()


@needs_no_cuda
def test_unavailable_cuda_is_an_environment_problem_with_the_reason():
    with pytest.raises(EnvironmentProblem, match=r"CUDAExecutionProvider .* not available") as exc:
        create_session(relu(), ProviderConfig("cuda"))
    assert exc.value.exit_code == 3 and "onnxruntime-gpu" in str(exc.value)


@needs_no_cuda
def test_allow_fallback_runs_on_cpu_and_states_it():
    _, info = create_session(relu(), ProviderConfig("cuda", allow_fallback=True, cuda_tf32=False))
    assert info.fallback is True and info.active == ["CPUExecutionProvider"]
    assert info.describe() == "cuda -> CPUExecutionProvider (FALLBACK)"
    assert info.notes and info.notes[0].startswith("FALLBACK:")
    assert info.to_dict()["provider_options"]["use_tf32"] == "0"  # what was asked, recorded


def test_a_provider_that_does_not_load_is_caught_after_session_creation(monkeypatch):
    """ORT silently drops a provider whose libraries fail to load: placement is checked."""
    monkeypatch.setattr(
        P, "available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    import onnxruntime as ort

    real = ort.InferenceSession

    def session(payload, sess_options=None, providers=None, **kwargs):
        return real(payload, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "InferenceSession", session)
    with pytest.raises(EnvironmentProblem, match="did not load"):
        create_session(relu(), ProviderConfig("cuda"))
    _, info = create_session(relu(), ProviderConfig("cuda", allow_fallback=True))
    assert info.fallback and "did not load" in info.notes[0]
