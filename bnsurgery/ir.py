"""Public import path of bnsurgery's passes as onnx-ir passes (`from bnsurgery.ir import
FoldPass`); they live in bnsurgery.integrations.onnx_ir. Needs the `ir` extra."""

from bnsurgery.integrations.onnx_ir import (
    FoldPass,
    InsertPass,
    IrPassResult,
    ReestimatePass,
    ValidatePass,
)

__all__ = ["FoldPass", "InsertPass", "IrPassResult", "ReestimatePass", "ValidatePass"]
