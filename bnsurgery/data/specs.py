"""What a model expects of its inputs, and how DATA is cut for it.

`model_inputs` lists the graph inputs fed at run time (initializer-backed inputs excluded),
`InputSpec` says what one of them accepts (dtype, dims with None where dynamic) and checks an
array against it, `batch_size_for` picks the batch DATA is cut into, and
`parse_shape_overrides` reads the `name:1x3x224x224` strings that fix dynamic dimensions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from bnsurgery.errors import BadInputError, DataError

DEFAULT_BATCH_SIZE = 64


def parse_shape_overrides(specs: list[str] | tuple[str, ...] | None) -> dict[str, list[int]]:
    """`name:1x3x224x224` strings to {name: [1, 3, 224, 224]}."""
    shapes: dict[str, list[int]] = {}
    for spec in specs or ():
        name, sep, dims = spec.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.lower().split("x")]
            if any(d < 1 for d in shapes[name]):
                raise ValueError
        except ValueError:
            raise BadInputError(
                f"bad {{option}} '{spec}': expected NAME:DxDxD", option="shapes"
            ) from None
    return shapes


def model_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are fed at run time (initializer-backed inputs excluded)."""
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def input_shape(
    value: onnx.ValueInfoProto, overrides: Mapping[str, list[int]], batch: int
) -> list[int]:
    """A concrete shape: the override, else static dims with dynamic ones -> 1 (batch -> batch)."""
    if value.name in overrides:
        return list(overrides[value.name])
    dims = []
    for i, dim in enumerate(value.type.tensor_type.shape.dim):
        if dim.HasField("dim_value") and dim.dim_value > 0:
            dims.append(int(dim.dim_value))
        else:
            dims.append(batch if i == 0 else 1)
    return dims


@dataclass(frozen=True)
class InputSpec:
    """One fed input: its name, numpy dtype, and dims (None where dynamic, None rank if unknown)."""

    name: str
    dtype: np.dtype | None
    dims: tuple[int | None, ...] | None

    @classmethod
    def from_value_info(cls, value: onnx.ValueInfoProto) -> InputSpec:
        dtype = None
        dims: tuple[int | None, ...] | None = None
        if value.type.HasField("tensor_type"):
            tensor = value.type.tensor_type
            if tensor.elem_type:
                try:
                    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
                except (KeyError, TypeError, ValueError):
                    dtype = None
            if tensor.HasField("shape"):
                dims = tuple(
                    int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None
                    for d in tensor.shape.dim
                )
        return cls(value.name, dtype, dims)

    @property
    def static_batch(self) -> int | None:
        return self.dims[0] if self.dims else None

    def describe(self) -> str:
        dtype = self.dtype.name if self.dtype is not None else "any dtype"
        if self.dims is None:
            return f"{dtype}, any shape"
        dims = "x".join("?" if d is None else str(d) for d in self.dims)
        return f"{dtype} [{dims}]"

    def check(self, array: np.ndarray, where: str) -> None:
        """Raise DataError unless `array` (a whole chunk, batch axis first) fits this input."""
        got = f"got {array.dtype.name} [{'x'.join(str(d) for d in array.shape)}]"
        if self.dtype is not None and array.dtype != self.dtype:
            raise DataError(
                f"{where}: input '{self.name}' expects {self.describe()}, {got} (wrong dtype; "
                f"convert the data with .astype(np.{self.dtype.name}))"
            )
        if self.dims is None:
            return
        if array.ndim != len(self.dims):
            raise DataError(
                f"{where}: input '{self.name}' expects rank {len(self.dims)} "
                f"({self.describe()}), {got}"
            )
        for axis, (want, have) in enumerate(zip(self.dims, array.shape, strict=True)):
            if axis == 0:
                continue  # the batch axis is checked per batch, after batching
            if want is not None and want != have:
                raise DataError(
                    f"{where}: input '{self.name}' expects {self.describe()}, {got} "
                    f"(axis {axis} is {have}, the model says {want})"
                )


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """What the model expects of each fed input, in the order of its graph inputs."""
    return [InputSpec.from_value_info(v) for v in model_inputs(model)]


def batch_size_for(
    specs: list[InputSpec],
    requested: int | None,
    *,
    fixed_shapes: bool = False,
    default: int = DEFAULT_BATCH_SIZE,
) -> int:
    """The batch size DATA is cut into: the model's static batch dimension where it has one.
    Inputs of different static first dimensions (BN parameters fed as inputs, say) cannot be
    batched, except by random data, which feeds each at its own fixed shape (fixed_shapes)."""
    static = {s.static_batch for s in specs if s.static_batch is not None}
    if static:
        fixed = static.pop()
        if static and fixed_shapes:
            return next(s.static_batch for s in specs if s.static_batch is not None)
        if static:
            raise DataError("the model's inputs have different static batch dimensions")
        if requested is not None and requested != fixed:
            raise BadInputError(
                f"{{option}} {requested} conflicts with the model's static batch dimension {fixed}",
                option="batch_size",
            )
        return fixed
    return requested or default
