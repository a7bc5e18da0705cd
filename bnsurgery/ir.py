"""Public import path of bnsurgery's passes as onnx-ir passes (`from bnsurgery.ir import
FoldPass`); they live in bnsurgery.integrations.onnx_ir. Needs the `ir` extra."""

from bnsurgery.integrations.onnx_ir import (
    AdaptPass,
    FoldPass,
    InsertPass,
    IrPassResult,
    ReestimatePass,
    RegisteredPass,
    ValidatePass,
)

__all__ = [
    "AdaptPass",
    "FoldPass",
    "InsertPass",
    "IrPassResult",
    "ReestimatePass",
    "RegisteredPass",
    "ValidatePass",
]
