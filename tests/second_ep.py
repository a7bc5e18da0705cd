"""Virtual environments with another ONNX Runtime, built once and cached, for the second_ep tests.

A venv is built the way a user would: first the runtime package (`onnxruntime-openvino`, or the
plugin EP `onnxruntime-ggml` with the onnxruntime it pulls in), then bnsurgery from this
checkout with `pip install -e ".[EXTRA]"`, which must keep that runtime. It lives under
$BNSURGERY_TEST_CACHE, else bench/.cache/test-venvs (git-ignored), keyed by the Python version,
this checkout's path and the packages; a `ready` file marks a finished build. Only a runtime
package that cannot be installed here skips the tests (with pip's reason); anything else fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

CACHE = Path(os.environ.get("BNSURGERY_TEST_CACHE") or REPO / "bench" / ".cache" / "test-venvs")
PIP = ["-m", "pip", "install", "-q", "--disable-pip-version-check"]


def _tail(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if not line.startswith("WARNING: Location")]
    return lines[-1] if lines else "no output"


def build_venv(name: str, runtime_packages: list[str], extra: str | None) -> Path:
    """A venv with `runtime_packages`, then bnsurgery (editable, with `extra`); cached."""
    key = json.dumps([sys.version_info[:2], str(REPO), runtime_packages, extra, 1])
    target = CACHE / f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    python = target / "bin" / "python"
    if (target / "ready").exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(target)], check=True, timeout=300)
    step = subprocess.run(
        [str(python), *PIP, *runtime_packages], capture_output=True, text=True, timeout=900
    )
    if step.returncode != 0:
        shutil.rmtree(target, ignore_errors=True)
        pytest.skip(f"{' '.join(runtime_packages)} cannot be installed here: {_tail(step.stderr)}")
    spec = f"{REPO}[{extra}]" if extra else str(REPO)
    step = subprocess.run(
        [str(python), *PIP, "-e", spec], capture_output=True, text=True, timeout=900
    )
    assert step.returncode == 0, f"pip install -e {spec} failed: {step.stderr[-2000:]}"
    (target / "ready").write_text(key)
    return target


def run_in(venv: Path, *args: str | Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """`bnsurgery ARGS` with the venv's Python."""
    return subprocess.run(
        [str(venv / "bin" / "python"), "-m", "bnsurgery", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def python_in(venv: Path, code: str) -> str:
    """What `python -c CODE` prints in the venv."""
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout
