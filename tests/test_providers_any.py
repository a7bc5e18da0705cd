"""Any execution provider ONNX Runtime knows, any option, plugin EP libraries, and where every
node ran, on this CPU-only machine: AzureExecutionProvider (in the plain onnxruntime wheel)
claims no node of a model, which is a real full fallback; the CUDA path fails loudly with the
provider unavailable. The OpenVINO and ggml runs are in test_second_ep.py."""

from __future__ import annotations

import json

import onnxruntime as ort
import pytest
from conftest import SAMPLES

import bnsurgery
from bnsurgery.errors import BadInputError, EnvironmentProblem
from bnsurgery.runtime import installation as runtime
from bnsurgery.runtime import placement as PL
from bnsurgery.runtime import providers as P
from bnsurgery.runtime.placement import Placement
from bnsurgery.runtime.providers import ProviderConfig, create_session

CNN = SAMPLES / "digits_cnn.onnx"
HAS_AZURE = "AzureExecutionProvider" in ort.get_available_providers()
needs_azure = pytest.mark.skipif(not HAS_AZURE, reason="this onnxruntime has no Azure EP")
NO_CUDA = "CUDAExecutionProvider" not in ort.get_available_providers()
needs_no_cuda = pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")


# -- names -------------------------------------------------------------------------------------
def test_every_provider_onnxruntime_knows_resolves_by_full_or_short_name():
    for name in ort.get_all_providers():
        assert P.resolve_alias(name) == name
        assert P.resolve_alias(name.upper()) == name
        assert P.resolve_alias(P.alias_of(name)) == name
    assert P.alias_of("XnnpackExecutionProvider") == "xnnpack"
    assert P.parse_providers("cpu,XNNPACK,webgpu") == ["cpu", "xnnpack", "webgpu"]


def test_an_unknown_provider_is_bad_input_listing_what_is_known():
    with pytest.raises(BadInputError, match=r"unknown execution provider 'gpu' \(known: cpu, cuda"):
        P.parse_providers("cpu,gpu")
    with pytest.raises(BadInputError) as exc:
        P.parse_providers("cpu,gpu")
    assert exc.value.option == "providers"


def test_a_known_provider_missing_from_this_build_is_exit_3_with_the_reason(cli):
    code, _, err = cli("compare", CNN, "--providers", "cpu,xnnpack")
    assert code == 3
    assert "XnnpackExecutionProvider (xnnpack) is not available in this onnxruntime build" in err


# -- options -----------------------------------------------------------------------------------
def test_provider_options_parse_from_strings_or_a_table():
    assert P.parse_provider_options(
        ["cuda:use_tf32=1", "CUDA:device_id = 1", "openvino:a=b=c"]
    ) == {
        "CUDAExecutionProvider": {"use_tf32": "1", "device_id": "1"},
        "OpenVINOExecutionProvider": {"a": "b=c"},
    }
    assert P.parse_provider_options({"cuda": {"use_tf32": True, "device_id": 1}}) == {
        "CUDAExecutionProvider": {"use_tf32": "1", "device_id": "1"}
    }
    for bad in ["cuda", "cuda:use_tf32", ":a=1", "cuda:=1"]:
        with pytest.raises(BadInputError, match="expected EP:KEY=VALUE") as exc:
            P.parse_provider_options([bad])
        assert exc.value.option == "provider_options"
    with pytest.raises(BadInputError, match="unknown execution provider 'nope'"):
        P.parse_provider_options(["nope:a=1"])


def test_user_options_override_the_harness_defaults_and_are_recorded():
    config = ProviderConfig("cuda", options={"use_tf32": "1", "gpu_mem_limit": "1000"})
    assert config.provider_options() == {
        "device_id": "0",
        "use_tf32": "1",
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "gpu_mem_limit": "1000",
    }


def test_options_for_a_provider_that_is_not_compared_are_refused(cli):
    code, _, err = cli("compare", CNN, CNN, "--provider-option", "cuda:use_tf32=1")
    assert code == 2 and "provider options for cuda, which is not among the providers" in err


# -- where every node ran ----------------------------------------------------------------------
def test_a_cpu_session_records_every_node_on_cpu():
    _, info = create_session(str(CNN), ProviderConfig("cpu"))
    assert info.placement is not None and info.placement.kind == "none"
    assert info.placement.total == 16 == info.placement.on_requested
    assert info.to_dict()["placement"]["summary"] == "CPU: 16 of 16 nodes"


def test_placement_names_what_fell_back_and_how_much():
    nodes = [("c", "Conv", "X"), ("b", "BatchNormalization", "X"), ("h", "Hardmax", "CPU"),
             ("r", "Relu", "X"), ("h2", "Hardmax", "CPU")]  # fmt: skip
    partial = Placement("X", recorded=True, nodes=nodes)
    assert (
        partial.kind == "partial" and partial.summary("x") == "x: 3 of 5 nodes; on CPU: Hardmax x2"
    )
    assert partial.problem() == "X ran 3 of 5 nodes; 2 fell back (on CPU: Hardmax x2)"
    full = Placement("X", recorded=True, nodes=[(n, op, "CPU") for n, op, _ in nodes])
    assert full.kind == "full" and full.problem().startswith("X took no node of the model: all 5")
    unknown = Placement("X", recorded=False, reason="onnxruntime 1.20 does not report it")
    assert unknown.kind == "unknown" and unknown.problem() is None
    assert "not recorded" in unknown.summary()


@needs_azure
def test_a_provider_that_takes_no_node_is_a_full_fallback_exit_3_naming_the_ops(cli):
    code, _, err = cli("compare", CNN, "--providers", "cpu,azure")
    assert code == 3
    line = err.strip().splitlines()[-1]
    assert (
        "AzureExecutionProvider took no node of the model: all 16 ran on CPUExecutionProvider"
        in line
    )
    assert "BatchNormalization, Conv, Flatten, Gemm, GlobalAveragePool, MaxPool, Relu" in line


@needs_azure
def test_allow_fallback_runs_it_and_says_so_in_text_and_json(cli):
    code, out, err = cli("compare", CNN, "--providers", "cpu,azure", "--allow-fallback")
    assert code == 0
    assert out.startswith("WARNING: FALLBACK: AzureExecutionProvider took no node")
    assert "azure -> CPUExecutionProvider (FALLBACK)" in out
    assert "placement  reference on azure: 0 of 16 nodes; on CPU: BatchNormalization x4" in out
    assert "bnsurgery: WARNING: FALLBACK" in err
    code, out, _ = cli("compare", CNN, "--providers", "cpu,azure", "--allow-fallback", "--json")
    doc = json.loads(out)
    session = doc["comparisons"][0]["session"]
    assert session["fallback"] is True and session["ran_on"] == "CPUExecutionProvider"
    assert session["placement"]["fallback"] == "full" and session["placement"]["nodes"] == 16
    assert doc["fallbacks"] and "took no node" in doc["fallbacks"][0]


@needs_azure
def test_the_python_api_and_validate_and_pipelines_take_the_same_options(tmp_path):
    report = bnsurgery.compare(CNN, providers=("cpu", "azure"), allow_fallback=True)
    assert report.pairs[0].session.placement.kind == "full"
    with pytest.raises(EnvironmentProblem, match="took no node") as exc:
        bnsurgery.compare(CNN, providers=("cpu", "azure"))  # the error crossed the child's pipe
    assert exc.value.option == "allow_fallback" and "allow_fallback runs it anyway" in str(
        exc.value
    )
    with pytest.raises(EnvironmentProblem, match="took no node"):
        bnsurgery.validate(CNN, providers="cpu,azure")
    checked = bnsurgery.validate(CNN, providers="cpu,azure", allow_fallback=True)
    assert any("WARNING: FALLBACK" in note for note in checked.notes)
    pipeline = tmp_path / "gate.toml"
    pipeline.write_text(
        '[[step]]\npass = "validate"\nproviders = ["cpu", "azure"]\nallow_fallback = true\n'
        "provider_options = { azure = { } }\n"
    )
    assert bnsurgery.run_pipeline(pipeline, CNN).report.ok
    pipeline.write_text(
        '[[step]]\npass = "validate"\nproviders = ["cpu", "azure"]\n'
        f'ep_libraries = {{ fake = "{tmp_path / "missing.so"}" }}\n'
    )
    with pytest.raises(BadInputError, match=r"fake=.*missing\.so: no such file"):
        bnsurgery.run_pipeline(pipeline, CNN)


# -- plugin EP libraries -----------------------------------------------------------------------
def test_ep_library_specs_are_checked(tmp_path, cli):
    for bad in (["ggml"], ["=/lib.so"], ["ggml=/no/lib.so"]):
        with pytest.raises(BadInputError) as exc:
            runtime.parse_library_specs(bad)
        assert exc.value.option == "ep_libraries"
    code, _, err = cli("compare", CNN, "--providers", "cpu,ggml", "--ep-library", "ggml=/no/lib.so")
    assert code == 2 and "ggml=/no/lib.so: no such file" in err


def test_a_file_that_is_not_an_ep_library_is_exit_3(tmp_path, cli):
    fake = tmp_path / "libnot_an_ep.so"
    fake.write_bytes(b"not a shared library")
    code, _, err = cli("compare", CNN, "--providers", "cpu,fake", "--ep-library", f"fake={fake}")
    assert code == 3 and f"fake: ONNX Runtime could not register {fake}" in err


def test_a_registered_library_that_reports_no_device_is_one_line_exit_3(monkeypatch, tmp_path):
    monkeypatch.setattr(runtime, "_libraries", {})
    monkeypatch.setattr(ort, "register_execution_provider_library", lambda name, path: None)
    library = tmp_path / "libquiet.so"
    library.write_bytes(b"")
    with pytest.raises(EnvironmentProblem) as info:
        P.parse_providers("cpu,quiet", [f"quiet={library}"])
    assert str(info.value) == "quiet: registered, but it reported no device here"
    assert info.value.exit_code == 3


# -- the CUDA path, with CUDA unavailable ------------------------------------------------------
@needs_no_cuda
def test_cuda_unavailable_fails_loudly_and_never_falls_back_silently(cli):
    code, out, err = cli("compare", CNN, "--providers", "cpu,cuda", "--provider-option",
                         "cuda:use_tf32=1")  # fmt: skip
    assert code == 3 and out == ""
    assert "CUDAExecutionProvider (cuda) is not available" in err and "onnxruntime-gpu" in err
    code, out, _ = cli("compare", CNN, "--providers", "cpu,cuda", "--allow-fallback", "--json")
    session = json.loads(out)["comparisons"][0]["session"]
    assert code == 0 and session["fallback"] is True
    assert session["provider_options"]["use_tf32"] == "0"  # TF32 off unless asked


def test_a_provider_that_cannot_be_created_is_exit_3_not_onnxruntimes_silent_retry(
    monkeypatch, capsys
):
    """ONNX Runtime's Python API retries on CPU when a provider fails to be created, printing
    `EP Error` on stdout; the harness turns that off and says it in one line."""
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(P, "available_providers", lambda: both)
    real = ort.InferenceSession

    def session(payload, sess_options=None, providers=None, **kwargs):
        if providers and "CUDAExecutionProvider" in str(providers):
            raise RuntimeError("/ort/x.cc:12 void f(int) CUDA failure 100: no CUDA-capable device")
        return real(payload, sess_options=sess_options, providers=providers)

    monkeypatch.setattr(ort, "InferenceSession", session)
    with pytest.raises(EnvironmentProblem) as info:
        create_session(str(CNN), ProviderConfig("cuda"))
    assert str(info.value).startswith(
        "execution provider CUDAExecutionProvider could not be created with options device_id=0, "
        "use_tf32=0, cudnn_conv_algo_search=EXHAUSTIVE: CUDA failure 100: no CUDA-capable device"
    )
    _, info = create_session(str(CNN), ProviderConfig("cuda", allow_fallback=True))
    assert info.fallback and info.ran_on == "CPUExecutionProvider"
    assert info.notes[0].startswith("FALLBACK: execution provider CUDAExecutionProvider could not")
    assert "EP Error" not in capsys.readouterr().out


# -- placement on ONNX Runtime before 1.24: from its verbose log ------------------------------
OPENVINO_LOG = """\
2026-12-05 [V:onnxruntime:, session_state.cc:1307 VerifyEachNodeIsAssignedToAnEp] Node placements
2026-12-05 [V:onnxruntime:, session_state.cc:1313 VerifyEachNodeIsAssignedToAnEp]  Node(s) placed on [OpenVINOExecutionProvider]. Number of nodes: 2
2026-12-05 [V:onnxruntime:, session_state.cc:1315 VerifyEachNodeIsAssignedToAnEp]   OpenVINO-EP-subgraph_1 (OpenVINOExecutionProvider_OpenVINO-EP-subgraph_1_0)
2026-12-05 [V:onnxruntime:, session_state.cc:1315 VerifyEachNodeIsAssignedToAnEp]   OpenVINO-EP-subgraph_2 (OpenVINOExecutionProvider_OpenVINO-EP-subgraph_2_1)
2026-12-05 [V:onnxruntime:, session_state.cc:1313 VerifyEachNodeIsAssignedToAnEp]  Node(s) placed on [CPUExecutionProvider]. Number of nodes: 1
2026-12-05 [V:onnxruntime:, session_state.cc:1315 VerifyEachNodeIsAssignedToAnEp]   Hardmax (hardmax)
2026-12-05 [V:onnxruntime:, session_state.cc:175 CreateGraphInfo] SaveMLValueNameIndexMapping
"""  # noqa: E501 (the log as onnxruntime-openvino 1.24.1 wrote it for Conv->BN->Hardmax->Relu)


def test_the_verbose_placement_log_names_the_nodes_off_the_provider():
    nodes = [("conv", "Conv"), ("bn", "BatchNormalization"), ("hardmax", "Hardmax"),
             ("relu", "Relu")]  # fmt: skip
    placement = PL.from_log(OPENVINO_LOG, "OpenVINOExecutionProvider", nodes)
    assert placement.summary("openvino") == "openvino: 3 of 4 nodes; on CPU: Hardmax"
    everything = "x VerifyEachNodeIsAssignedToAnEp]  All nodes placed on [X]. Number of nodes: 4"
    assert PL.from_log(everything, "X", nodes).kind == "none"
    assert PL.from_log(everything, "Y", nodes).kind == "full"
    assert not PL.from_log("nothing", "X", nodes).recorded


@needs_azure
def test_without_the_placement_record_the_log_still_catches_a_full_fallback(monkeypatch):
    from onnxruntime.capi import onnxruntime_inference_collection as collection

    for cls in (collection.Session, collection.InferenceSession):
        monkeypatch.delattr(cls, "get_provider_graph_assignment_info", raising=False)
    with pytest.raises(EnvironmentProblem, match=r"AzureExecutionProvider took no node .* all 16"):
        create_session(str(CNN), ProviderConfig("azure"))
    _, info = create_session(str(CNN), ProviderConfig("azure", allow_fallback=True))
    assert info.placement.recorded and info.placement.kind == "full"
    assert info.placement.off_op_types()["CPUExecutionProvider"]["Conv"] == 3
