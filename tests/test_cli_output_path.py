"""cli.output_path: where a command writes (OUT, `<stem>.<command>.onnx`, --in-place)."""

from __future__ import annotations

import os

import pytest

from bnsurgery.cli.output_path import resolve_output_path
from bnsurgery.errors import UsageError


def test_default_output_is_stem_command_onnx(tmp_path) -> None:
    assert (
        resolve_output_path(tmp_path / "net.onnx", None, "folded") == tmp_path / "net.folded.onnx"
    )


def test_output_equal_to_model_is_refused(tmp_path) -> None:
    with pytest.raises(UsageError):
        resolve_output_path(tmp_path / "net.onnx", tmp_path / "net.onnx", "folded")


def test_output_equal_to_model_through_dotdot_is_refused(tmp_path) -> None:
    (tmp_path / "sub").mkdir()
    with pytest.raises(UsageError):
        resolve_output_path(tmp_path / "net.onnx", tmp_path / "sub" / ".." / "net.onnx", "f")


def test_output_hardlinked_to_model_is_refused(tmp_path) -> None:
    (tmp_path / "net.onnx").write_bytes(b"x")
    os.link(tmp_path / "net.onnx", tmp_path / "other.onnx")
    with pytest.raises(UsageError):
        resolve_output_path(tmp_path / "net.onnx", tmp_path / "other.onnx", "folded")


def test_in_place_returns_the_model_path(tmp_path) -> None:
    got = resolve_output_path(tmp_path / "net.onnx", None, "folded", in_place=True)
    assert got == tmp_path / "net.onnx"


def test_in_place_with_another_output_is_refused(tmp_path) -> None:
    with pytest.raises(UsageError):
        resolve_output_path(tmp_path / "net.onnx", tmp_path / "o.onnx", "folded", in_place=True)


def test_no_model_path_needs_an_output() -> None:
    with pytest.raises(UsageError):
        resolve_output_path(None, None, "folded")
