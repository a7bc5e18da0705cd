"""What checks look at: the model, its BatchNormalization nodes, the dry-run fold, the data.

Everything is computed once, on first use, and shared by every check (and plugin check): the BN
sites of model.sites (every scope, named as fold's report names them) with their constant
parameters in float64, tensor types from model.shapes, the fold pass's result on a copy of the
model, and the DATA source.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import onnx

from bnsurgery.errors import BnSurgeryError, is_onnxruntime_error
from bnsurgery.model import sites
from bnsurgery.model.bn import BatchNormView, BnParams
from bnsurgery.model.dtypes import is_float_array
from bnsurgery.model.graph import GraphIndex, index_scopes
from bnsurgery.model.shapes import TensorShapes
from bnsurgery.passes import PassResult
from bnsurgery.passes.fold import FoldPass
from bnsurgery.validation.checks import Skip


@dataclass(eq=False)
class BnSite(sites.BnSite):
    """A BN site (node, scope, label) with what the checks read of it, computed once: its
    view and (when constant and well formed) its parameters in float64."""

    view: BatchNormView | None = None
    params: BnParams | None = None  # float64; None when a parameter is not a constant
    param_dtype: int | None = None  # ONNX element type of the stored variance (or scale)
    x_dtype: int | None = None  # ONNX element type of the input X, when known
    problem: str | None = None  # why the view or the parameters are unusable

    @property
    def epsilon(self) -> float:
        return self.view.epsilon if self.view is not None else 1e-5

    def is_float16(self) -> bool:
        return onnx.TensorProto.FLOAT16 in (self.x_dtype, self.param_dtype)

    def in_training_mode(self) -> tuple[bool, str]:
        """(training?, why): the same rule as the fold pass's `training-mode` reason."""
        view = self.view
        if view is None:
            return False, ""
        if view.training_mode:
            if view.opset >= 14:
                return True, "training_mode=1"
            is_test = next((a.i for a in self.node.attribute if a.name == "is_test"), 0)
            if view.opset < 7 and not is_test:
                return True, "is_test=0 (the opset-6 default)"
            return True, "it declares the extra training outputs (running and saved mean/var)"
        if view.extra_outputs_used(lambda n: self.index.use_count(n) > 0):
            return True, "its extra outputs (running mean/var) are used"
        return False, ""


class ValidationContext:
    """The model under validation and everything derived from it, computed lazily."""

    def __init__(
        self,
        model: onnx.ModelProto,
        *,
        label: str = "<model>",
        data: Any = None,
        providers: Sequence[str] = ("cpu",),
        shapes: Mapping[str, list[int]] | None = None,
        seed: int = 0,
        batch_size: int | None = None,
        parity_opt_level: str = "all",
        provider_options: Mapping[str, Mapping[str, str]] | None = None,
        ep_libraries: Any = None,
        allow_fallback: bool = False,
    ) -> None:
        self.model = model
        self.provider_options = {k: dict(v) for k, v in (provider_options or {}).items()}
        self.ep_libraries = ep_libraries
        self.allow_fallback = allow_fallback
        self.label = label
        self.data = data
        self.providers = list(providers)
        self.shapes = dict(shapes or {})
        self.seed = seed
        self.batch_size = batch_size
        self.parity_opt_level = parity_opt_level
        self.checker_error: str | None = None  # set by the onnx-checker check
        self.notes: list[str] = []
        self.details: dict[str, Any] = {}  # per check name: what it measured (for the report)
        self._data_source: Any = None
        self._data_problem: str | None = None
        self.data_label: str | None = None  # what the model ran on, once it ran

    # -- scopes and BNs --------------------------------------------------------------------
    @cached_property
    def indexes(self) -> list[GraphIndex]:
        """One GraphIndex per scope, enclosing scopes first (model.graph.index_scopes)."""
        return index_scopes(self.model)

    @cached_property
    def tensor_shapes(self) -> TensorShapes:
        """Declared and (permissively) inferred shapes and types: the shape-inference check
        judges inference itself."""
        return TensorShapes(self.model)

    def batchnorms(self) -> list[BnSite]:
        return self._batchnorms

    @cached_property
    def _batchnorms(self) -> list[BnSite]:
        return [self._site(site) for site in sites.sites_of(self.indexes)]

    def _site(self, site: sites.BnSite) -> BnSite:
        node, index = site.node, site.index
        x_dtype = self.tensor_shapes.elem_type(node.input[0]) if node.input else None
        try:
            view = site.view()
        except BnSurgeryError as exc:
            return BnSite(node, index, x_dtype=x_dtype, problem=str(exc))
        if x_dtype is None:
            x_dtype = index.tensor_dtype(view.x)
        names = view.param_names
        known = BnSite(node, index, view, None, None, x_dtype)
        known.param_dtype = index.tensor_dtype(names[3]) or index.tensor_dtype(names[0])
        values = site.param_values(view)
        if any(v is None for v in values):
            return known
        if not all(is_float_array(v) for v in values):  # type: ignore[arg-type]
            known.problem = "parameters are not floating point"
            return known
        try:
            known.params = sites.float64_params(view, values, name=view.name)
        except BnSurgeryError as exc:
            known.problem = str(exc)
        return known

    # -- the dry-run fold ------------------------------------------------------------------
    @cached_property
    def _fold(self) -> PassResult | BnSurgeryError:
        try:
            return FoldPass()(self.model)
        except BnSurgeryError as exc:
            return exc

    def fold(self) -> PassResult:
        """The fold pass's result on a copy (its report is `bnsurgery info`'s dry run).

        Raises Skip when the fold pass refuses the model (for example wrongly shaped BN
        parameters, which `bn-invalid-params` reports)."""
        outcome = self._fold
        if isinstance(outcome, BnSurgeryError):
            raise Skip(f"the fold pass refused the model: {outcome}")
        return outcome

    # -- running ---------------------------------------------------------------------------
    def require_runnable(self) -> None:
        """Raise Skip when the model cannot be run meaningfully (fails the ONNX checker)."""
        if self.checker_error is not None:
            raise Skip("the model fails the ONNX checker")

    def compare(self, candidate: Any, providers: Sequence[str], **options: Any) -> Any:
        """The harness comparison (bnsurgery.harness.compare) of this model, the reference,
        with CANDIDATE (None: itself on other providers) on this context's data.

        Returns the CompareReport, or the exception when onnxruntime itself cannot load or run
        a model (a kernel it lacks, a model it rejects), for the check to report; any other
        error propagates (a bug on our side is reported as check-crashed, naming the check)."""
        from bnsurgery.harness.compare import compare

        try:
            from bnsurgery.runtime.providers import alias_of

            wanted = set(providers)
            provider_options = {
                k: v for k, v in self.provider_options.items() if alias_of(k) in wanted
            }
            return compare(
                self.model, candidate, providers=providers, data=self.data_source(),
                shapes=self.shapes, seed=self.seed, show_progress=None,
                provider_options=provider_options, ep_libraries=self.ep_libraries,
                allow_fallback=self.allow_fallback, **options,
            )  # fmt: skip
        except Exception as exc:
            if not is_onnxruntime_error(exc):
                raise
            return exc

    def data_source(self) -> Any:
        """DATA opened for this model. Without DATA: the judge's random data (data.random_spec:
        4 seeded samples, or the next multiple of a static batch dimension). DATA that does
        not fit raises DataError (exit 2); random data that cannot feed the model raises Skip
        for the checks that need it."""
        if self._data_source is None:
            from bnsurgery.data import load_data, random_spec
            from bnsurgery.errors import DataError

            if self._data_problem is not None:
                raise Skip(self._data_problem)
            options = dict(batch_size=self.batch_size, shapes=self.shapes, seed=self.seed)
            if self.data is not None:
                self._data_source = load_data(self.data, self.model, **options)
                self.data_label = _describe(self.data)
            else:
                spec = random_spec(self.model)  # the same data fold's verification uses
                self.data_label = f"{spec} (seed {self.seed})"
                try:
                    self._data_source = load_data(spec, self.model, **options)
                except DataError as exc:
                    self._data_problem = f"random data cannot feed this model ({exc}); give DATA"
                    raise Skip(self._data_problem) from None
                self.notes.append(f"no DATA given: using {spec}, seed {self.seed}")
            for note in getattr(self._data_source, "notes", []):
                if note not in self.notes:
                    self.notes.append(note)
        return self._data_source


def _describe(data: Any) -> str:
    import os

    if isinstance(data, str | os.PathLike):
        return str(data)
    return f"<{type(data).__name__}>"


def describe_mismatch(metrics: Any) -> str:
    """How an output (harness ErrorMetrics) misses the judge's limit, for a finding's message."""
    text = (
        f"{metrics.verdict()}; max abs error {metrics.max_abs:.3g}, max rel error "
        f"{metrics.max_rel:.3g}"
    )
    if metrics.top1_agreement is not None:
        text += f"; top-1 agreement {metrics.top1_agreement:.1%}"
    if metrics.note:
        text += f"; {metrics.note}"
    return text
