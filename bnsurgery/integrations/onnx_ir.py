"""bnsurgery's passes as onnx-ir passes (the optional extra `pip install 'bnsurgery[ir]'`).

    import onnx_ir as ir
    from bnsurgery.integrations.onnx_ir import FoldPass, ValidatePass

    passes = ir.passes.PassManager([ValidatePass(), FoldPass(), ValidatePass(fail_on="warning")])
    result = passes(program.model)          # e.g. torch.onnx.export(..., dynamo=True).model
    program.model = result.model

Semantics, stated honestly:

- FoldPass, InsertPass and ReestimatePass are **functional** (onnx_ir.passes.FunctionalPass):
  the input model is never changed and a new onnx_ir.Model is returned. Each one serialises
  the model to an onnx.ModelProto (onnx_ir.serde), runs the bnsurgery pass on it, and
  deserialises the result. The round trip keeps names, metadata, opsets and functions; the
  returned model holds new Node/Value objects (references into the old model stay with the old
  model), and initializers are copied into memory (models over 2 GB cannot take this route).
- ValidatePass is a side-effect-only pass, like onnx-ir's own CheckerPass (in_place=True,
  changes_input=False): it returns the same model object, unmodified. It raises
  bnsurgery.validation.gate.ValidationFailed (exit code 1 on the CLI) when findings reach `fail_on`,
  unless raise_on_failure=False.
- Every result is an IrPassResult, an onnx_ir PassResult that also carries bnsurgery's
  `report` (FoldReport, ValidationReport, ...); the pass keeps the last one as `last_report`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

try:
    import onnx_ir as ir
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "bnsurgery.ir needs onnx-ir: pip install 'bnsurgery[ir]' (or pip install onnx-ir)"
    ) from exc

from bnsurgery.passes import make_pass


@dataclasses.dataclass
class IrPassResult(ir.passes.PassResult):
    """onnx-ir's PassResult plus the bnsurgery report of what the pass did."""

    report: Any = None


def _to_proto(model: ir.Model) -> Any:
    return ir.serde.serialize_model(model)


class _ProtoRoundTrip(ir.passes.FunctionalPass):
    """Run the registered bnsurgery pass `pass_name` on the model's ModelProto."""

    pass_name: str = ""

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = options
        self.last_report: Any = None
        make_pass(self.pass_name, **options)  # bad options fail at construction, not mid-run

    def call(self, model: ir.Model) -> IrPassResult:
        result = make_pass(self.pass_name, **self.options)(_to_proto(model))
        self.last_report = result.report
        return IrPassResult(ir.serde.deserialize_model(result.model), bool(result.modified),
                            report=result.report)  # fmt: skip

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({options})"


class FoldPass(_ProtoRoundTrip):
    """Fold BatchNormalization (and per-channel affines) into linear ops: bnsurgery fold.

    Options as bnsurgery.fold: backward=True, affine=True."""

    pass_name = "fold"


class InsertPass(_ProtoRoundTrip):
    """Insert identity BatchNormalization after linear ops: bnsurgery insert (its options)."""

    pass_name = "insert"


class ReestimatePass(_ProtoRoundTrip):
    """Re-estimate BN statistics on DATA: bnsurgery reestimate (data=..., mode=..., ...)."""

    pass_name = "reestimate"


class ValidatePass(ir.passes.PassBase):
    """bnsurgery validate as an analysis pass: same model back, unmodified; raises
    ValidationFailed when findings reach fail_on (unless raise_on_failure=False)."""

    def __init__(self, *, raise_on_failure: bool = True, **options: Any) -> None:
        super().__init__()
        from bnsurgery.validation.gate import ValidatePass as _Validate

        self.raise_on_failure = raise_on_failure
        self.options = options
        self._inner = _Validate(**options)
        self.last_report: Any = None

    @property
    def in_place(self) -> Literal[True]:
        return True

    @property
    def changes_input(self) -> Literal[False]:
        return False

    def call(self, model: ir.Model) -> IrPassResult:
        report = self._inner(_to_proto(model)).report
        self.last_report = report
        if self.raise_on_failure:
            report.raise_for_findings()  # type: ignore[attr-defined]
        return IrPassResult(model, False, report=report)


__all__ = ["FoldPass", "InsertPass", "IrPassResult", "ReestimatePass", "ValidatePass"]
