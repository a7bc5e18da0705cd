"""One chunk of named arrays (an .npz, a mapping, a yielded dict) turned into a checked Batch.

The arrays are matched to the model's inputs by name (a single-input model also takes the only
other array under any name, and `stand_in_note` says so), the labels are taken from the labels
key, and everything is checked against the model's InputSpecs: a mismatch is a DataError naming
the input, what the model expects and what came.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from bnsurgery.data.batches import Batch
from bnsurgery.data.specs import InputSpec
from bnsurgery.errors import DataError

DEFAULT_LABELS_KEY = "label"


def split_arrays(
    arrays: Mapping[str, Any],
    where: str,
    specs: list[InputSpec],
    labels_key: str | None,
) -> Batch:
    """Arrays of one file (or mapping) -> a checked Batch (one chunk, any number of samples)."""
    key = labels_key or DEFAULT_LABELS_KEY
    names = [s.name for s in specs]
    if labels_key is not None and labels_key not in arrays:
        raise DataError(
            f"{where}: labels key '{labels_key}' not found (keys: {keys_text(arrays)})",
            option="labels_key",
        )
    labels = np.asarray(arrays[key]) if key in arrays and key not in names else None
    rest = {k: v for k, v in arrays.items() if not (k == key and labels is not None)}
    feeds: dict[str, np.ndarray] = {}
    if len(specs) == 1 and specs[0].name not in rest:
        if len(rest) != 1:
            raise DataError(
                f"{where}: input '{specs[0].name}' is missing, and there is no single other "
                f"array to use for it (keys: {keys_text(arrays)})"
            )
        feeds[specs[0].name] = np.asarray(next(iter(rest.values())))
    else:
        missing = [n for n in names if n not in rest]
        if missing:
            raise DataError(
                f"{where}: input {quoted(missing)} missing (keys: {keys_text(arrays)}; the model's "
                f"inputs: {quoted(names)})"
            )
        extra = [k for k in rest if k not in names]
        if extra:
            raise DataError(
                f"{where}: array {quoted(extra)} matches no model input (the model's inputs: "
                f"{quoted(names)}; labels key: '{key}')"
            )
        feeds = {n: np.asarray(rest[n]) for n in names}
    return _checked_batch(Batch(feeds, labels), where, specs, key)


def stand_in_note(
    keys: Iterable[str], specs: list[InputSpec], labels_key: str | None
) -> str | None:
    """The note said when a single-input model takes the only array of an .npz (or mapping)
    whose key is not the input's name; None when the key matches (or nothing can stand in)."""
    label = labels_key or DEFAULT_LABELS_KEY
    rest = [k for k in keys if k != label or k == specs[0].name] if len(specs) == 1 else []
    if len(rest) != 1 or rest[0] == specs[0].name:
        return None
    return f"using the only array '{rest[0]}' for input '{specs[0].name}'"


def _checked_batch(batch: Batch, where: str, specs: list[InputSpec], key: str) -> Batch:
    sizes = set()
    for spec in specs:
        array = batch.feeds[spec.name]
        if array.ndim == 0:
            raise DataError(
                f"{where}: input '{spec.name}' expects {spec.describe()}, got a scalar "
                "(axis 0 is the batch axis)"
            )
        spec.check(array, where)
        sizes.add(array.shape[0])
    if len(sizes) > 1:
        raise DataError(
            f"{where}: inputs have different numbers of samples on axis 0: "
            + ", ".join(f"{s.name}={batch.feeds[s.name].shape[0]}" for s in specs)
        )
    if batch.labels is not None:
        n = sizes.pop()
        if batch.labels.ndim == 0 or batch.labels.shape[0] != n:
            raise DataError(
                f"{where}: labels '{key}' have shape {list(batch.labels.shape)}, expected "
                f"{n} labels (one per sample)"
            )
        if not np.issubdtype(batch.labels.dtype, np.integer):
            raise DataError(
                f"{where}: labels '{key}' have dtype {batch.labels.dtype.name}; class indices "
                "must be integers"
            )
        if batch.labels.ndim != 1:
            raise DataError(
                f"{where}: labels '{key}' have shape {list(batch.labels.shape)}; expected one "
                "class index per sample"
            )
    return batch


def keys_text(arrays: Iterable[str]) -> str:
    """The keys as an error message quotes them: 'a', 'b' (or none)."""
    return ", ".join(f"'{k}'" for k in arrays) or "none"


def quoted(names: list[str]) -> str:
    """'a', 'b'"""
    return ", ".join(f"'{n}'" for n in names)
