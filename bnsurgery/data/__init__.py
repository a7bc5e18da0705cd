"""Data for commands that run a model (docs/design.md, the data contract).

`load_data(spec, model)` opens DATA (file.npz, file.npy, a folder, script.py, random:N, or in
Python a mapping of arrays or an iterable of feed dicts) as a DataSource: a re-iterable stream
of Batch objects (feeds plus labels) whose arrays were checked against the model's inputs.
Axis 0 is the batch axis. Anything that does not fit raises DataError (exit 2) naming the
input, what the model expects and what came.

- specs: what the model expects of each input (InputSpec), shape overrides, the batch size;
- batches: Batch, DataSource and rebatching;
- arrays: one chunk of named arrays to a checked Batch;
- random: `random:N`, seeded synthetic samples shaped from the model;
- sources: `load_data` and the file, folder, script and iterable sources;
- npfile: reading .npz/.npy files with one clear error for anything else.
"""

from bnsurgery.data.arrays import DEFAULT_LABELS_KEY, split_arrays
from bnsurgery.data.batches import Batch, DataSource
from bnsurgery.data.random import (
    DEFAULT_RANDOM_BATCH_SIZE,
    DEFAULT_RANDOM_SAMPLES,
    DEFAULT_SEED,
    random_spec,
)
from bnsurgery.data.sources import DataSpec, load_data
from bnsurgery.data.specs import (
    DEFAULT_BATCH_SIZE,
    InputSpec,
    batch_size_for,
    input_specs,
    model_inputs,
    parse_shape_overrides,
)

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_LABELS_KEY",
    "DEFAULT_RANDOM_BATCH_SIZE",
    "DEFAULT_RANDOM_SAMPLES",
    "DEFAULT_SEED",
    "Batch",
    "DataSource",
    "DataSpec",
    "InputSpec",
    "batch_size_for",
    "input_specs",
    "load_data",
    "model_inputs",
    "parse_shape_overrides",
    "random_spec",
    "split_arrays",
]
