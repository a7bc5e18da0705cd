"""The pass contract: what a pass declares, what it promises, and how the contract is checked.

Modelled on onnx-ir's `PassBase`. A pass declares two facts about mutation:

- `in_place`: the model it returns is the object it was given, rewritten;
- `changes_input`: it may modify the object it was given (true for every in-place rewrite;
  false for an analysis pass such as validate, which returns its input untouched).

`__call__` runs `requires` (a precondition on the input), `call` (the work), checks the
declared contract against what `call` returned, and runs `ensures` (a postcondition on the
result: fold's verification is one). A pass that breaks its own declaration raises
PassContractError: that is a bug in the pass, not bad input. Each run is logged at INFO with
its duration (`bnsurgery -v`).

Third-party passes may subclass PassBase or only follow the `Pass` protocol (a `name`, an
`in_place` flag and `__call__(model) -> PassResult`); pipelines accept both.
"""

from __future__ import annotations

import abc
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # kept out of `import bnsurgery`: onnx loads in ~0.4 s
    import onnx

logger = logging.getLogger(__name__)


@runtime_checkable
class Report(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


@dataclass
class PassResult:
    """What a pass produced: the rewritten model and a report of what it did."""

    model: onnx.ModelProto
    report: Report
    modified: bool = True


@runtime_checkable
class Pass(Protocol):
    """Anything a pipeline can run: `name` is its registry key; `in_place` its mutation contract."""

    name: str
    in_place: bool

    def __call__(self, model: onnx.ModelProto) -> PassResult: ...


class PassContractError(RuntimeError):
    """A pass did not do what it declared (returned a new model while declaring in_place, or
    the same object while declaring a copy): a bug in that pass."""


class PassBase(abc.ABC):
    """Base class of bnsurgery's passes. Subclasses set `name`, implement `call`, and say how
    they treat their input through `in_place` and `changes_input`."""

    name: str = ""

    @property
    @abc.abstractmethod
    def in_place(self) -> bool:
        """True when the returned model is the given object, rewritten."""

    @property
    def changes_input(self) -> bool:
        """True when the given model may be modified; an in-place pass always may."""
        return self.in_place

    def requires(self, model: onnx.ModelProto) -> None:
        """Precondition on the input; raise a BnSurgeryError to refuse it. Default: none."""
        del model

    def ensures(self, result: PassResult, original: onnx.ModelProto | None) -> None:
        """Postcondition on the result; raise to reject it. `original` is the input model when
        the pass did not change it (`changes_input` is False), else None. Default: none."""
        del result, original

    @abc.abstractmethod
    def call(self, model: onnx.ModelProto) -> PassResult:
        """The work of the pass."""

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        self.requires(model)
        start = time.perf_counter()
        result = self.call(model)
        seconds = time.perf_counter() - start
        self._check_contract(model, result)
        logger.info(
            "pass %s: %s in %.3f s", self.name, "modified" if result.modified else "unchanged",
            seconds,
        )  # fmt: skip
        self.ensures(result, None if self.changes_input else model)
        return result

    def _check_contract(self, model: onnx.ModelProto, result: PassResult) -> None:
        if not isinstance(result, PassResult):
            raise PassContractError(
                f"pass {self.name!r} returned {type(result).__name__}, not a PassResult"
            )
        if self.in_place and result.model is not model:
            raise PassContractError(f"pass {self.name!r} is in place but returned a new model")
        if not self.in_place and result.model is model:
            raise PassContractError(
                f"pass {self.name!r} is not in place but returned the model it was given"
            )


class AnalysisPass(PassBase):
    """A pass that only looks: returns the model it was given, unmodified (onnx-ir's checker
    passes are declared the same way: in place, input unchanged)."""

    @property
    def in_place(self) -> bool:
        return True

    @property
    def changes_input(self) -> bool:
        return False

    def _check_contract(self, model: onnx.ModelProto, result: PassResult) -> None:
        super()._check_contract(model, result)
        if result.modified:
            raise PassContractError(f"analysis pass {self.name!r} reported a modification")


def changes_input(step: Any) -> bool:
    """Whether running `step` may modify its input: the declaration of a PassBase, or, for a
    protocol-only pass, its `in_place` flag."""
    if isinstance(step, PassBase):
        return step.changes_input
    return bool(getattr(step, "changes_input", getattr(step, "in_place", False)))
