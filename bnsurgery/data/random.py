"""`random:N` DATA: seeded synthetic samples shaped from the model's inputs.

Random data is the judge's default (fold, compare and validate check a rewrite on it). Static
dimensions are the model's; a dynamic one is 1, or the batch on axis 0, unless a shape
override fixes it, and `dynamic_shape_notes` says which shape was chosen and how to choose
another. The same seed gives the same samples, so two runs compare like with like.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import onnx

from bnsurgery.data.batches import Batch, DataSource
from bnsurgery.data.specs import InputSpec, input_shape, input_specs, model_inputs
from bnsurgery.errors import DataError

# The judge's default (fold, compare, validate alike): 4 seeded samples. Over 114 correct folds
# of the deep corpus its ratio spread is the same as with 8 (max 2.9x against 3.9x), at half
# the forward passes (docs/verification.md, What it costs).
DEFAULT_RANDOM_SAMPLES = 4
DEFAULT_SEED = 0
# Random data, the judge's default, comes in batches of 4: on image models a smaller batch keeps
# the activations in cache (ResNet-50 at 224: a batch of 4 takes 0.38x the time of a batch of 8),
# and ONNX Runtime's CPU results do not depend on the batch they ran in.
DEFAULT_RANDOM_BATCH_SIZE = 4


def random_spec(model: onnx.ModelProto, samples: int = DEFAULT_RANDOM_SAMPLES) -> str:
    """The DATA spec of the judge's default random data: `random:N` with N the given samples,
    rounded up to a multiple of the model's static batch dimension where it has one."""
    specs = input_specs(model)
    step = next((s.static_batch for s in specs if s.static_batch), 1)  # as batch_size_for cuts
    return f"random:{step * -(-samples // step)}"


def parse_random(spec: str) -> int:
    """N of a `random:N` DATA spec (`random` alone: the default N)."""
    _, _, count = spec.partition(":")
    try:
        samples = int(count) if count else DEFAULT_RANDOM_SAMPLES
    except ValueError:
        raise DataError(
            f"DATA '{spec}': expected random:N with an integer N", option="data"
        ) from None
    if samples < 1:
        raise DataError(f"DATA '{spec}': random:N needs N >= 1", option="data")
    return samples


def random_source(
    model: onnx.ModelProto,
    specs: list[InputSpec],
    samples: int,
    batch_size: int,
    seed: int,
    shapes: Mapping[str, list[int]],
) -> DataSource:
    unknown = set(shapes) - {s.name for s in specs}
    if unknown:
        raise DataError(
            f"{{option}} names unknown input(s): {', '.join(sorted(unknown))}", option="shapes"
        )
    for spec in specs:
        if spec.name in shapes:
            override = shapes[spec.name]
            if spec.dims is not None and len(spec.dims) != len(override):
                raise DataError(
                    f"{{option}} {spec.name}: rank {len(override)}, "
                    f"the model says {spec.describe()}",
                    option="shapes",
                )
            for axis, (want, have) in enumerate(zip(spec.dims or (), override, strict=False)):
                if axis and want is not None and want != have:
                    raise DataError(
                        f"{{option}} {spec.name}: axis {axis} is {have}, the model says {want}",
                        option="shapes",
                    )
    chosen = dynamic_shape_notes(specs, shapes, min(batch_size, samples))
    if samples % batch_size and any(s.static_batch for s in specs):
        raise DataError(
            f"random:{samples} is not a multiple of the model's static batch dimension {batch_size}"
        )

    def chunks() -> Iterator[Batch]:
        for feeds in _random_with_shapes(model, samples, batch_size, seed, shapes):
            yield Batch(feeds)

    # Inputs of different static first dimensions are fed whole, each at its own shape: cutting
    # them into batches along axis 0 would cut the ones that are no batch at all.
    mixed = len({s.static_batch for s in specs if s.static_batch}) > 1
    source = DataSource(
        f"random:{samples} (seed {seed})",
        chunks,
        specs,
        None if mixed else batch_size,
        samples=samples,
        synthetic=True,
    )
    source.notes.extend(chosen)
    return source


def dynamic_shape_notes(
    specs: list[InputSpec], shapes: Mapping[str, list[int]], batch: int
) -> list[str]:
    """One note per input whose non-batch dimensions random data had to choose: which shape it
    uses (dynamic dimensions are 1, the batch axis is the batch) and how to choose another."""
    notes = []
    for spec in specs:
        if spec.name in shapes or not spec.dims or all(d is not None for d in spec.dims[1:]):
            continue
        dims = [batch if i == 0 and d is None else (d or 1) for i, d in enumerate(spec.dims)]
        notes.append(
            f"input '{spec.name}' has dynamic dimensions ({spec.describe()}): random data uses "
            + "x".join(map(str, dims))
            + f"; give --shape {spec.name}:"
            + "x".join(str(d or "D") for d in spec.dims)
            + " to choose"
        )
    return notes


def _random_with_shapes(
    model: onnx.ModelProto, samples: int, batch_size: int, seed: int, shapes: Mapping
) -> Iterator[dict[str, np.ndarray]]:
    """Seeded batches of random samples; a shape override fixes every axis but the batch axis."""
    rng = np.random.default_rng(seed)
    inputs = model_inputs(model)
    done = 0
    while done < samples:
        n = min(batch_size, samples - done)
        feeds = {}
        for value in inputs:
            if value.name in shapes:
                dims = [n, *list(shapes[value.name])[1:]]
                feeds[value.name] = _random_array(value, {value.name: dims}, n, rng)
            else:
                feeds[value.name] = _random_array(value, {}, n, rng)
        yield feeds
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
