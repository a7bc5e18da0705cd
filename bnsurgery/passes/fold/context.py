"""What a fold rule reads: one scope of the model being folded, through its GraphIndex.

`FoldState` is shared by every scope of one run (options, fresh names, the constants folds
detached, shapes of the original model); `ScopeContext` is one scope's view, handed to every
rule: its constants and weights, the single-consumer checks rules share, and the cast of
float64 results back to the stored dtypes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from bnsurgery.model.dtypes import is_float_array
from bnsurgery.model.graph import GraphIndex, NameGenerator
from bnsurgery.model.shapes import Shape, TensorShapes
from bnsurgery.passes.fold import arithmetic as fm
from bnsurgery.passes.fold.plan import Refusal, Write


@dataclass
class FoldState:
    """Model-wide state of one fold run."""

    names: NameGenerator
    # Shapes of the original model. Names keep their meaning and shape when folded, so they
    # stay valid for the model being rewritten (in place, that is the same object).
    shapes: TensorShapes
    backward: bool = True
    affine: bool = True
    detached: set[str] = field(default_factory=set)  # inputs a fold stopped reading
    rewritten: set[str] = field(default_factory=set)  # initializers rewritten: value_info stale


class ScopeContext:
    """One scope of the model being folded, as the rules see it."""

    def __init__(self, state: FoldState, index: GraphIndex) -> None:
        self.state = state
        self.index = index
        self.scope = index.scope

    # -- shapes -----------------------------------------------------------------------------
    def shape(self, name: str) -> Shape | None:
        return self.state.shapes.shape(name)

    def rank(self, name: str) -> int | None:
        return self.state.shapes.rank(name)

    # -- constants --------------------------------------------------------------------------
    def weight(self, node: onnx.NodeProto, index: int) -> np.ndarray:
        """A floating-point constant input of a node, or Refusal."""
        name = node.input[index] if len(node.input) > index else ""
        value = self.index.constant(name) if name else None
        if value is None:
            raise Refusal("not-constant", f"{node.op_type} '{node.name}' input '{name}'")
        if not is_float_array(value):
            raise Refusal("unsupported-dtype", f"{node.op_type} weight dtype {value.dtype}")
        return value

    def optional_const(self, node: onnx.NodeProto, index: int) -> np.ndarray | None:
        if len(node.input) <= index or not node.input[index]:
            return None
        return self.weight(node, index)

    def writes(self, node: onnx.NodeProto, *items) -> list[Write]:
        """Cast float64 results to their stored dtypes; refuse with `overflow` if out of range.
        Each item is (input index, value, stored dtype, name hint)."""
        staged = []
        for index, value, dtype, hint in items:
            cast = fm.cast_checked(value, np.dtype(dtype))
            if cast is None:
                raise Refusal("overflow", f"folded {hint} of '{node.name}' overflows {dtype}")
            staged.append(Write(node, index, cast, hint))
        return staged

    # -- consumers --------------------------------------------------------------------------
    def require_single_use(self, name: str, producer: onnx.NodeProto) -> None:
        """Forward folds rewrite the producer: its output must feed the BN alone."""
        if self.index.is_graph_output(name):
            raise Refusal("producer-is-graph-output", f"'{name}' of {producer.op_type} is output")
        users = len(self.index.consumers_of(name))
        if users != 1:
            raise Refusal(
                "producer-has-other-consumers", f"'{name}' of {producer.op_type} has {users} users"
            )

    def single_consumer(self, name: str) -> tuple[onnx.NodeProto, int]:
        """Backward folds rewrite the consumer: the one node reading `name`, and where."""
        if self.index.is_graph_output(name):
            raise Refusal("no-linear-neighbour", f"'{name}' is a graph output")
        users = self.index.consumers_of(name)
        if len(users) != 1:
            raise Refusal("no-linear-neighbour", f"'{name}' has {len(users)} consumers")
        user = users[0]
        positions = [i for i, n in enumerate(user.input) if n == name]
        if len(positions) != 1:
            raise Refusal("no-linear-neighbour", f"'{name}' is read implicitly or twice")
        return user, positions[0]
