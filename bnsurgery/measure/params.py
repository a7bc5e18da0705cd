"""Writing measured statistics back into a model's BatchNormalization parameters.

`ParamWriter` first gives each target BN private initializers for the parameters it will
change (a shared or constant-computed parameter is copied), then overwrites them in place, so
that sub-models built after a wave see the new values. Values are float64 until they are
written, and the cast to the stored dtype is checked: a statistic past that dtype's range is
refused rather than written as inf.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnsurgery.errors import DataError
from bnsurgery.measure.targets import BnTarget
from bnsurgery.model.dtypes import cast_checked
from bnsurgery.model.edit import add_initializer, remove_initializers
from bnsurgery.model.graph import NameGenerator, iter_scopes, node_inputs_with_implicit
from bnsurgery.stats import Moments

SLOT_LABELS = {1: "scale", 2: "B", 3: "mean", 4: "var"}


class ParamWriter:
    """Gives each target BN private initializers for the parameters it changes, then writes
    new values into them (in place, so sub-models built later see them)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.names = NameGenerator(model)
        self._inits = {t.name: t for t in model.graph.initializer}
        self._users: dict[str, int] = {}
        for scope in iter_scopes(model):
            for node in scope.nodes:
                for name in node_inputs_with_implicit(node):
                    self._users[name] = self._users.get(name, 0) + 1
        for out in model.graph.output:
            self._users[out.name] = self._users.get(out.name, 0) + 1
        self._unused: set[str] = set()

    def privatise(self, target: BnTarget, slots: Sequence[int]) -> None:
        """Make input `slot` (1 scale, 2 B, 3 mean, 4 var) of the BN a private initializer."""
        values = (target.params.scale, target.params.bias, target.params.mean, target.params.var)
        for slot in slots:
            name = target.node.input[slot]
            if name in self._inits and self._users.get(name, 0) == 1:
                continue
            new_name = self.names(f"{target.key}.{SLOT_LABELS[slot]}")
            value = values[slot - 1]
            np_dtype = helper.tensor_dtype_to_np_dtype(target.dtypes[slot - 1])
            shape = tuple(self._inits[name].dims) if name in self._inits else value.shape
            tensor = numpy_helper.from_array(value.astype(np_dtype).reshape(shape), new_name)
            add_initializer(self.model.graph, tensor, ir_version=self.model.ir_version)
            self._inits[new_name] = self.model.graph.initializer[-1]
            self._users[name] = self._users.get(name, 1) - 1
            self._users[new_name] = 1
            target.node.input[slot] = new_name
            if self._users[name] <= 0:
                self._unused.add(name)

    def write(self, target: BnTarget, slot: int, value: np.ndarray) -> None:
        """Overwrite parameter `slot` of the BN with float64 `value`, cast to its dtype."""
        name = target.node.input[slot]
        tensor = self._inits[name]
        np_dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        label = ("scale", "B", "mean", "variance")[slot - 1]
        try:
            cast = cast_checked(np.asarray(value, dtype=np.float64), np_dtype)
        except ValueError:  # not a floating-point type: no range to cast statistics into
            raise DataError(
                f"BatchNormalization '{target.key}' stores its {label} as "
                f"{np.dtype(np_dtype).name}; statistics need a floating-point type"
            ) from None
        if cast is None:
            raise DataError(
                f"the re-estimated {label} of BatchNormalization '{target.key}' is not finite "
                f"in {np.dtype(np_dtype).name} (the activations at its input overflow it)"
            )
        tensor.CopyFrom(numpy_helper.from_array(cast.reshape(tuple(tensor.dims)), name))

    def finish(self) -> None:
        """Remove the initializers (and Constant nodes) that privatising left unread."""
        graph = self.model.graph
        dead = {n for n in self._unused if self._users.get(n, 0) <= 0}
        dead -= {o.name for o in graph.output}
        if not dead:
            return
        remove_initializers(graph, dead)
        nodes = [
            n
            for n in graph.node
            if not (n.op_type == "Constant" and len(n.output) == 1 and n.output[0] in dead)
        ]
        if len(nodes) != len(graph.node):
            del graph.node[:]
            graph.node.extend(nodes)
        self._inits = {t.name: t for t in graph.initializer}


def blend(
    source_mean: np.ndarray,
    source_var: np.ndarray,
    moments: Moments,
    prior: float | None,
    samples: int,
) -> tuple[np.ndarray, np.ndarray]:
    """New (mean, var): the measured population moments, blended with the source statistics
    when a prior is given (lambda = prior / (prior + samples), Schneider et al. 2020)."""
    mean, var = moments.mean, moments.var
    if prior is None or prior <= 0:
        return mean, var
    lam = prior / (prior + samples)
    return lam * source_mean + (1 - lam) * mean, lam * source_var + (1 - lam) * var
