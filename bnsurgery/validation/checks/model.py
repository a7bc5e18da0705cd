"""Model-wide checks: the ONNX checker and strict shape inference."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx

from bnsurgery.errors import BadInputError, first_line_or_type
from bnsurgery.onnxio import EXTERNAL_DATA_THRESHOLD, check_model
from bnsurgery.validation.checks import Finding, check
from bnsurgery.validation.checks.context import ValidationContext


@check(
    "onnx-checker",
    "error",
    "the model passes onnx.checker.check_model",
    "re-export the model, or run onnx.checker.check_model(model) to see the full error; "
    "runtimes reject models that fail the checker",
)
def onnx_checker(ctx: ValidationContext) -> Iterator[Finding]:
    model = ctx.model
    if model.ByteSize() > EXTERNAL_DATA_THRESHOLD:  # io checks big models by saving them with
        model = _copy(model)  # external data, which rewrites the proto it is given
    try:
        check_model(model)
    except BadInputError as exc:
        ctx.checker_error = str(exc)
        yield onnx_checker.finding(str(exc))


@check(
    "shape-inference",
    "error",
    "strict ONNX shape and type inference succeeds and agrees with the declared types",
    "fix the declared types/shapes (graph outputs, value_info) or re-export; "
    "onnx.shape_inference.infer_shapes(model, strict_mode=True) shows the full error",
)
def shape_inference(ctx: ValidationContext) -> Iterator[Finding]:
    try:
        if ctx.model.ByteSize() > EXTERNAL_DATA_THRESHOLD:
            _infer_large(ctx.model)
        else:
            onnx.shape_inference.infer_shapes(
                ctx.model, check_type=True, strict_mode=True, data_prop=True
            )
    except Exception as exc:  # InferenceError, ValidationError, or a protobuf complaint
        why = first_line_or_type(exc)
        yield shape_inference.finding(f"strict shape inference fails: {why}")


def _infer_large(model: onnx.ModelProto) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "model.onnx", Path(tmp) / "inferred.onnx"
        onnx.save_model(_copy(model), str(src), save_as_external_data=True, location="model.data")
        onnx.shape_inference.infer_shapes_path(
            str(src), str(dst), check_type=True, strict_mode=True, data_prop=True
        )


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy
