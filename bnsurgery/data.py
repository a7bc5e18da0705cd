"""Data sources for commands that run a model (DESIGN.md §3).

A source is a plain iterable of `{input_name: array}` batches (Polygraphy's convention).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import onnx

from bnsurgery.errors import BadInputError, DataError

DEFAULT_RANDOM_SAMPLES = 8
DEFAULT_SEED = 0


def parse_shape_overrides(specs: list[str] | tuple[str, ...] | None) -> dict[str, list[int]]:
    """`name:1x3x224x224` strings to {name: [1, 3, 224, 224]}."""
    shapes: dict[str, list[int]] = {}
    for spec in specs or ():
        name, sep, dims = spec.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.lower().split("x")]
        except ValueError:
            raise BadInputError(f"bad --shape '{spec}': expected NAME:DxDxD") from None
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


def random_batches(
    model: onnx.ModelProto,
    samples: int = DEFAULT_RANDOM_SAMPLES,
    *,
    batch_size: int | None = None,
    seed: int = DEFAULT_SEED,
    shapes: Mapping[str, list[int]] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """`random:N`: seeded synthetic batches shaped from the model's inputs."""
    if samples < 1:
        raise DataError("random:N needs N >= 1")
    shapes = shapes or {}
    rng = np.random.default_rng(seed)
    batch_size = batch_size or samples
    inputs = model_inputs(model)
    unknown = set(shapes) - {i.name for i in inputs}
    if unknown:
        raise DataError(f"--shape names unknown input(s): {', '.join(sorted(unknown))}")
    done = 0
    while done < samples:
        n = min(batch_size, samples - done)
        yield {value.name: _random_array(value, shapes, n, rng) for value in inputs}
        done += n


def _random_array(
    value: onnx.ValueInfoProto, shapes: Mapping[str, list[int]], n: int, rng: np.random.Generator
) -> np.ndarray:
    elem_type = value.type.tensor_type.elem_type
    if not value.type.HasField("tensor_type"):
        raise DataError(f"input '{value.name}' is not a tensor; random data cannot feed it")
    shape = input_shape(value, shapes, n)
    if value.name not in shapes and shape:
        shape[0] = n if not _static_batch(value) else shape[0]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    if np.issubdtype(dtype, np.floating) or elem_type == onnx.TensorProto.BFLOAT16:
        return rng.standard_normal(shape).astype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(np.bool_)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, 8, shape).astype(dtype)
    raise DataError(f"input '{value.name}' has dtype {dtype}; random data cannot feed it")


def _static_batch(value: onnx.ValueInfoProto) -> bool:
    dims = value.type.tensor_type.shape.dim
    return bool(dims) and dims[0].HasField("dim_value") and dims[0].dim_value > 0
