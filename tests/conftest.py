"""Shared fixtures. tests/ is put on sys.path so test modules can `import models`."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

REPO = TESTS.parent
SAMPLES = REPO / "sample_models"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def write_model(tmp_path: Path) -> Callable[..., Path]:
    """Save a ModelProto (or raw bytes) under tmp_path and return the path."""

    def write(model: onnx.ModelProto | bytes, name: str = "net.onnx") -> Path:
        path = tmp_path / name
        data = model if isinstance(model, bytes) else model.SerializeToString()
        path.write_bytes(data)
        return path

    return write


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """Run `bnsurgery ARGS...` in-process; returns (exit code, stdout, stderr)."""
    from bnsurgery.cli.main import main

    def invoke(*args: str | Path) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return invoke
