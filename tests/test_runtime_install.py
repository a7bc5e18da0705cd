"""Installing bnsurgery keeps the user's ONNX Runtime: no flavour in the core dependencies, one
flavour per extra, and every command that needs ONNX Runtime says what to install (exit 3) when
none is importable. Flavours that overwrite each other are named with the fix."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest
from conftest import REPO

from bnsurgery.runtime import installation as runtime

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
FLAVOURS = {"onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml"}
CNN = str(REPO / "sample_models" / "digits_cnn.onnx")
TRAIN = str(REPO / "sample_models" / "digits_train.npz")


def _names(requirements: list[str]) -> set[str]:
    return {r.split(";")[0].split("[")[0].split(">")[0].split("=")[0].strip() for r in requirements}


def test_the_core_dependencies_name_no_onnxruntime_flavour() -> None:
    assert not _names(PYPROJECT["project"]["dependencies"]) & FLAVOURS


def test_each_flavour_extra_names_exactly_one_flavour_and_test_pulls_in_cpu() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert _names(extras["cpu"]) == {"onnxruntime"}
    assert _names(extras["gpu"]) == {"onnxruntime-gpu"}
    assert _names(extras["openvino"]) == {"onnxruntime-openvino"}
    assert extras["test"] == ["bnsurgery[cpu,testing]"]
    for name, requirements in extras.items():  # no extra pulls in two flavours at once
        assert len(_names(requirements) & FLAVOURS) <= 1, name
    assert not _names(extras["testing"]) & FLAVOURS


def test_the_readme_installs_a_cpu_build_first_and_ci_runs_its_test_command() -> None:
    readme = (REPO / "README.md").read_text()
    first = next(line for line in readme.splitlines() if line.startswith("pip install"))
    assert first.startswith('pip install ".[cpu]"')
    test_command = 'pip install -e ".[test]" && lint-imports && python -m pytest -q'
    assert test_command in readme and test_command in (REPO / ".ci" / "run").read_text()


def _without_onnxruntime(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a process where `import onnxruntime` fails, as in an environment without it."""
    code = (
        "import sys; sys.modules['onnxruntime'] = None\n"
        "from bnsurgery.cli.main import main\n"
        "raise SystemExit(main(sys.argv[1:]))"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "args",
    [
        ["compare", CNN, CNN],
        ["fold", CNN, "-o", "{tmp}/f.onnx"],
        ["validate", CNN],
        ["reestimate", CNN, "--data", TRAIN, "-o", "{tmp}/r.onnx"],
        ["providers"],
    ],
    ids=["compare", "fold", "validate", "reestimate", "providers"],
)
def test_without_onnxruntime_every_command_that_needs_it_exits_3_naming_the_packages(
    args: list[str], tmp_path
) -> None:
    result = _without_onnxruntime(*[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "ONNX Runtime is not installed" in line
    for package in ("bnsurgery[cpu]", "onnxruntime-gpu", "onnxruntime-openvino"):
        assert package in line
    assert not list(tmp_path.iterdir())  # nothing written


def test_without_onnxruntime_commands_that_do_not_run_a_model_still_work(tmp_path) -> None:
    assert _without_onnxruntime("info", CNN).returncode == 0
    out = tmp_path / "f.onnx"
    assert _without_onnxruntime("fold", CNN, "--no-verify", "-o", str(out), "-q").returncode == 0
    assert out.exists()


def test_two_flavours_in_one_onnxruntime_directory_are_named_with_the_fix() -> None:
    shared = "/venv/site-packages/onnxruntime"
    dists = [
        runtime.Distribution("onnxruntime", "1.32.0", shared),
        runtime.Distribution("onnxruntime-openvino", "1.24.1", shared),
        runtime.Distribution("onnxruntime-gpu", "1.31.1", "/other/site-packages/onnxruntime"),
    ]
    (warning,) = runtime.conflicts(dists)
    assert "onnxruntime and onnxruntime-openvino" in warning and shared in warning
    assert warning.endswith(
        "pip uninstall -y onnxruntime onnxruntime-openvino && pip install onnxruntime-openvino"
    )
    assert runtime.conflicts(dists[:1]) == []


def test_this_environment_has_one_flavour_and_providers_says_which(cli) -> None:
    import json

    code, out, _ = cli("providers", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["schema"] == "bnsurgery.providers/1"
    assert [d["name"] for d in doc["distributions"]] == ["onnxruntime"]
    assert (
        doc["warnings"] == []
        and {"name": "CPUExecutionProvider", "alias": "cpu"} in doc["providers"]
    )
    assert any(d["ep_name"] == "CPUExecutionProvider" for d in doc["devices"])
