"""compare() on model files makes its ONNX Runtime sessions from the files (no serialized copy
of the weights in the process), and its rounding-noise copy through a temporary file with
external data; the verdicts are those of the same models given in memory."""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
import pytest
from conftest import SAMPLES

import bnsurgery
from bnsurgery.runtime import runner as runtime_runner

CNN = SAMPLES / "digits_cnn.onnx"


def _verdicts(report: object) -> list[dict]:
    payload = report.to_dict()  # type: ignore[attr-defined]
    keep = ("ratio", "noise_max_abs", "noise_rms", "max_abs", "rms", "verdict")
    return [
        {k: output[k] for k in keep if k in output}
        for pair in payload["comparisons"]
        for output in pair["outputs"]
    ]


@pytest.fixture
def folded(tmp_path: Path) -> Path:
    path = tmp_path / "folded.onnx"
    onnx.save(bnsurgery.fold(str(CNN), verify=False).model, path)
    return path


def test_files_and_protos_get_the_same_verdicts(folded: Path) -> None:
    from_files = bnsurgery.compare(str(CNN), str(folded), data="random:8")
    in_memory = bnsurgery.compare(onnx.load(CNN), onnx.load(folded), data="random:8")
    assert from_files.passed and in_memory.passed
    assert _verdicts(from_files) == _verdicts(in_memory)


def test_sessions_of_files_are_made_from_the_files(
    folded: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made_from: list[object] = []
    real = runtime_runner.create_session

    def spy(model, config=None):  # type: ignore[no-untyped-def]
        made_from.append(model)
        return real(model, config)

    monkeypatch.setattr(runtime_runner, "create_session", spy)
    from bnsurgery.harness.compare import compare_models

    reference, candidate = bnsurgery.load_model(str(CNN)), bnsurgery.load_model(str(folded))
    files = {"reference": CNN, "candidate": folded}
    report = compare_models(reference, candidate, data="random:4", model_files=files)
    assert report.passed
    # reference and candidate from their own files, the noise copy from a temporary one
    assert made_from[0] == str(CNN) and made_from[-1] == str(folded)
    noise_path = Path(str(made_from[1]))
    assert noise_path.name == "noise.onnx" and not noise_path.exists()  # cleaned up
    assert not list(Path(tempfile.gettempdir()).glob(f"{noise_path.parent.name}*"))


def test_a_layerwise_comparison_keeps_its_models_in_memory(
    folded: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made_from: list[object] = []
    real = runtime_runner.create_session
    monkeypatch.setattr(
        runtime_runner, "create_session",
        lambda model, config=None: made_from.append(model) or real(model, config),
    )  # fmt: skip
    from bnsurgery.harness.compare import compare_models

    reference, candidate = bnsurgery.load_model(str(CNN)), bnsurgery.load_model(str(folded))
    files = {"reference": CNN, "candidate": folded}
    compare_models(reference, candidate, data="random:4", layerwise=True, model_files=files)
    assert made_from and not any(isinstance(m, str) for m in made_from)
