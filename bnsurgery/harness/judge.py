"""The judge: observations of the comparing runner (harness.runner) in, verdicts out.

Polygraphy's `compare_accuracy` to the runner's `Comparator.run`. Each output of each pair gets
one ErrorAccumulator (harness.metrics) under its rule: the rounding-noise rule by default, or
allclose where the user set atol/rtol for it (harness.tolerances), with the dtype the reference
declares for that output. Layer-wise, each matched intermediate tensor (harness.matching) gets
one too, made on its first batch, at the global atol/rtol when given and under the noise rule
otherwise. Metrics accumulate batch by batch, so the judge holds no batch beyond an update.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from bnsurgery.harness.matching import TensorMatch
from bnsurgery.harness.metrics import ErrorAccumulator, ErrorMetrics
from bnsurgery.harness.runner import Observation
from bnsurgery.harness.tolerances import ToleranceSpec

logger = logging.getLogger(__name__)


def declared_dtypes(model: onnx.ModelProto) -> dict[str, Any]:
    """The numpy dtype each graph output declares; None where it declares none we know."""
    dtypes: dict[str, Any] = {}
    for value in model.graph.output:
        dtypes.setdefault(value.name, None)
        if dtypes[value.name] is None and value.type.tensor_type.elem_type:
            try:
                elem_type = value.type.tensor_type.elem_type
                dtypes[value.name] = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
            except (KeyError, TypeError, ValueError):
                pass
    return dtypes


def needs_noise_run(
    tolerances: ToleranceSpec, output_names: Sequence[str], layerwise: bool
) -> bool:
    """Whether any verdict is by the rounding-noise rule, which needs the noise run: an output
    without tolerances of its own, or layer-wise tensors without global ones."""
    if any(not tolerances.explicit_for(name) for name in output_names):
        return True
    return layerwise and tolerances.atol is None and tolerances.rtol is None


class Judge:
    """Accumulates the observations of `pairs` pairs into verdicts, output by output and,
    given `layer_matches` (the matched tensors of each pair), layer by layer."""

    def __init__(
        self,
        output_names: Sequence[str],
        tolerances: ToleranceSpec,
        dtypes: Mapping[str, Any],
        pairs: int,
        layer_matches: Sequence[Sequence[TensorMatch]] = (),
    ) -> None:
        self.outputs = [
            {
                name: ErrorAccumulator(name, *tolerances.for_output(name, dtypes.get(name)))
                for name in output_names
            }
            for _ in range(pairs)
        ]
        self.layer_matches = [list(matches) for matches in layer_matches]
        self.layers: list[dict[str, ErrorAccumulator]] = [{} for _ in self.layer_matches]
        self.layer_tolerances = ToleranceSpec(tolerances.atol, tolerances.rtol)

    def observe(self, observation: Observation) -> None:
        """One pair's outputs (or intermediate tensors) on one batch into its accumulators."""
        if observation.layers:
            self._observe_layers(observation)
            return
        reference, candidate, noise = (
            observation.reference,
            observation.candidate,
            observation.noise,
        )
        for name, acc in self.outputs[observation.pair].items():
            acc.update(reference[name], candidate[name], observation.labels, noise.get(name))

    def _observe_layers(self, observation: Observation) -> None:
        accs = self.layers[observation.pair]
        for match in self.layer_matches[observation.pair]:
            value = observation.reference[match.reference]
            other = observation.candidate[match.candidate]  # type: ignore[index]
            if not isinstance(value, np.ndarray) or not isinstance(other, np.ndarray):
                continue  # sequences and maps are not compared layer-wise
            acc = accs.get(match.reference)
            if acc is None:
                tol = self.layer_tolerances.for_output(match.reference, value.dtype)
                acc = accs[match.reference] = ErrorAccumulator(match.reference, *tol)
            acc.update(value, other, None, observation.noise.get(match.reference))

    def verdicts(self, pair: int) -> list[ErrorMetrics]:
        """Every output of one pair, judged, in the reference's output order."""
        return [acc.result() for acc in self.outputs[pair].values()]

    def layer_verdicts(self, pair: int) -> dict[str, ErrorMetrics]:
        """Every compared intermediate tensor of one pair, judged, by its reference name."""
        return {name: acc.result() for name, acc in self.layers[pair].items()}


def log_verdicts(label: str, verdicts: Sequence[ErrorMetrics]) -> None:
    """INFO: the verdict on each output of one pair; DEBUG: its numbers."""
    for m in verdicts:
        logger.info("%s, output '%s': %s: %s", label, m.name, "ok" if m.passed else "FAIL",
                    m.verdict())  # fmt: skip
        logger.debug(
            "%s, output '%s': max abs %g, max rel %g, rms %g, noise max abs %s, %d of %d finite",
            label, m.name, m.max_abs, m.max_rel, m.rms, m.noise_max_abs, m.finite, m.count,
        )  # fmt: skip
