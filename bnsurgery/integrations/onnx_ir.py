"""bnsurgery's passes as onnx-ir passes (the optional extra `pip install 'bnsurgery[ir]'`).

    import onnx_ir as ir
    from bnsurgery.integrations.onnx_ir import FoldPass, ValidatePass

    passes = ir.passes.PassManager([ValidatePass(), FoldPass(), ValidatePass(fail_on="warning")])
    result = passes(program.model)          # e.g. torch.onnx.export(..., dynamo=True).model
    program.model = result.model

One adapter, RegisteredPass, wraps every registered bnsurgery pass (built-in or plugin) by its
name; FoldPass, InsertPass, ReestimatePass, AdaptPass and ValidatePass are it with the name
filled in. Semantics, stated honestly:

- The adapter serialises the model to an onnx.ModelProto (onnx_ir.serde), runs the bnsurgery
  pass on it, and reads the result back. The round trip keeps names, metadata, opsets and
  functions; initializers are copied into memory (models over 2 GB cannot take this route).
- A pass that rewrites (fold, insert, reestimate, adapt) is **functional**
  (onnx_ir.passes.FunctionalPass): the input model is never changed and a new onnx_ir.Model
  is returned, made of new Node/Value objects (references into the old model stay with it).
- An analysis pass (validate: bnsurgery's AnalysisPass, in place and input unchanged) is a
  side-effect-only pass, like onnx-ir's own CheckerPass (in_place=True, changes_input=False): it
  returns the same model object, unmodified.
- A pass whose report is not ok (validate's findings reaching `fail_on`) raises, unless built
  with raise_on_failure=False: validate raises bnsurgery.validation.gate.ValidationFailed
  (exit code 1 on the CLI), another pass CheckFailed.
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

from bnsurgery.errors import CheckFailed
from bnsurgery.passes import report_ok
from bnsurgery.passes.base import changes_input
from bnsurgery.pipeline.registry import make_pass


@dataclasses.dataclass
class IrPassResult(ir.passes.PassResult):
    """onnx-ir's PassResult plus the bnsurgery report of what the pass did."""

    report: Any = None


def _is_analysis(bnsurgery_pass: Any) -> bool:
    """Whether a bnsurgery pass only looks: in place, its input unchanged (AnalysisPass)."""
    return bool(getattr(bnsurgery_pass, "in_place", False)) and not changes_input(bnsurgery_pass)


class RegisteredPass(ir.passes.PassBase):
    """The registered bnsurgery pass `pass_name` (its options as keywords) as an onnx-ir pass.

    Functional for a pass that rewrites, side-effect-only for an analysis pass (see the module
    docstring). Options are checked when the pass is built, not when it first runs."""

    pass_name: str = ""

    def __init__(
        self, pass_name: str | None = None, *, raise_on_failure: bool = True, **options: Any
    ) -> None:
        super().__init__()
        self.pass_name = pass_name or self.pass_name
        self.raise_on_failure = raise_on_failure
        self.options = options
        self.last_report: Any = None
        self._pass = make_pass(self.pass_name, **options)
        self._analysis = _is_analysis(self._pass)

    @property
    def in_place(self) -> bool:
        return self._analysis

    @property
    def changes_input(self) -> Literal[False]:
        return False

    def call(self, model: ir.Model) -> IrPassResult:
        result = self._pass(ir.serde.serialize_model(model))
        report = self.last_report = result.report
        if self.raise_on_failure and not report_ok(report):
            raise_for = getattr(report, "raise_for_findings", None)
            if callable(raise_for):
                raise_for()
            raise CheckFailed(f"pass '{self.pass_name}' reported a failure")
        if self._analysis:
            return IrPassResult(model, False, report=report)
        return IrPassResult(ir.serde.deserialize_model(result.model), bool(result.modified),
                            report=report)  # fmt: skip

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({options})"


class _Functional(RegisteredPass, ir.passes.FunctionalPass):
    """A built-in pass that rewrites: functional, and a FunctionalPass to onnx-ir's eyes."""


class FoldPass(_Functional):
    """Fold BatchNormalization (and per-channel affines) into linear ops: bnsurgery fold.

    Options as bnsurgery.fold: backward=True, affine=True."""

    pass_name = "fold"


class InsertPass(_Functional):
    """Insert BatchNormalization after linear ops: bnsurgery insert (its options)."""

    pass_name = "insert"


class ReestimatePass(_Functional):
    """Re-estimate BN statistics on DATA: bnsurgery reestimate (data=..., mode=..., ...)."""

    pass_name = "reestimate"


class AdaptPass(_Functional):
    """Adapt to TARGET's distribution: bnsurgery adapt (target=..., source=..., ...)."""

    pass_name = "adapt"


class ValidatePass(RegisteredPass):
    """bnsurgery validate as an analysis pass: same model back, unmodified; raises
    ValidationFailed when findings reach fail_on (unless raise_on_failure=False)."""

    pass_name = "validate"


__all__ = [
    "AdaptPass",
    "FoldPass",
    "InsertPass",
    "IrPassResult",
    "ReestimatePass",
    "RegisteredPass",
    "ValidatePass",
]
