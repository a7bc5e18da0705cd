"""DATA for commands that run a model: `load_data` and the sources it opens.

DATA is one of:

- `file.npz`: arrays keyed by model input name; a single-input model also accepts the only
  non-label array under any name, and the source's notes say so ("using the only array 'x'
  for input 'input'"). Labels sit under `label`, or the key given as `labels_key`.
- `file.npy`: one array, for a single-input model.
- a folder: its `*.npz` / `*.npy` files in sorted order, streamed one file at a time.
- `script.py`: defines `load_data()` that yields `{input_name: array}` (Polygraphy's convention);
  a yielded dict may also carry the labels key.
- `random:N`: N seeded synthetic samples shaped from the model (bnsurgery.data.random).

In Python it may also be a DataSource, a mapping of arrays (like an .npz) or an iterable of
feed dicts (like `load_data()`). `load_data` returns a DataSource whose arrays were checked
against the model's inputs; anything that does not fit raises DataError (exit 2).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bnsurgery.data.arrays import DEFAULT_LABELS_KEY, quoted, split_arrays, stand_in_note
from bnsurgery.data.batches import Batch, DataSource
from bnsurgery.data.npfile import load_npy, load_npz, npz_keys
from bnsurgery.data.random import (
    DEFAULT_RANDOM_BATCH_SIZE,
    DEFAULT_RANDOM_SAMPLES,
    DEFAULT_SEED,
    parse_random,
    random_source,
)
from bnsurgery.data.specs import DEFAULT_BATCH_SIZE, InputSpec, batch_size_for, input_specs
from bnsurgery.errors import BadInputError, DataError

DataSpec = Any  # str | os.PathLike | DataSource | Mapping[str, ndarray] | Iterable[Mapping]


def load_data(
    spec: DataSpec,
    model: onnx.ModelProto,
    *,
    batch_size: int | None = None,
    labels_key: str | None = None,
    shapes: Mapping[str, list[int]] | None = None,
    seed: int = DEFAULT_SEED,
) -> DataSource:
    """Open DATA for `model`: a spec string or path, a DataSource, a mapping of arrays (like an
    .npz), or an iterable of feed dicts (like `load_data()`). None means `random:4`, seed 0.

    `labels_key` None means `label` when present; an explicit key must exist. Raises DataError
    (exit 2) on anything that does not fit the model.
    """
    if batch_size is not None and batch_size < 1:
        raise BadInputError(f"{{option}} must be >= 1, got {batch_size}", option="batch_size")
    if isinstance(spec, DataSource):
        return spec
    specs = input_specs(model)
    if not specs:
        raise DataError("the model has no runtime inputs to feed")
    shapes = dict(shapes or {})
    is_random = spec is None or (
        isinstance(spec, str) and (spec.startswith("random:") or spec == "random")
    )
    size = batch_size_for(
        specs,
        batch_size,
        fixed_shapes=is_random,
        default=DEFAULT_RANDOM_BATCH_SIZE if is_random else DEFAULT_BATCH_SIZE,
    )
    if is_random and labels_key is not None:
        raise DataError(
            f"labels key '{labels_key}' not found: random data has no labels", option="labels_key"
        )
    if spec is None:
        source = random_source(model, specs, DEFAULT_RANDOM_SAMPLES, size, seed, shapes)
        source.notes.append(f"no DATA given: using random:{DEFAULT_RANDOM_SAMPLES}, seed {seed}")
        return source
    if isinstance(spec, Mapping):
        return _mapping_source(dict(spec), "<arrays>", specs, size, labels_key)
    if isinstance(spec, str) and (spec.startswith("random:") or spec == "random"):
        return random_source(model, specs, parse_random(str(spec)), size, seed, shapes)
    if isinstance(spec, str | os.PathLike):
        path = Path(spec)
        if not path.exists():
            raise DataError(f"DATA '{spec}': no such file or folder", option="data")
        if path.is_dir():
            return _folder_source(path, specs, size, labels_key)
        suffix = path.suffix.lower()
        if suffix == ".npz":
            return _npz_source(path, specs, size, labels_key)
        if suffix == ".npy":
            return _npy_source(path, specs, size, labels_key)
        if suffix == ".py":
            return _script_source(path, specs, batch_size, labels_key)
        raise DataError(
            f"DATA '{spec}': unknown kind (expected .npz, .npy, a folder, script.py or random:N)",
            option="data",
        )
    if isinstance(spec, Iterable):
        items = list(spec)
        return _iterable_source(lambda: iter(items), "<feeds>", specs, batch_size, labels_key)
    raise BadInputError(f"cannot use {type(spec).__name__} as DATA", option="data")


def _npz_source(
    path: Path, specs: list[InputSpec], batch_size: int, labels_key: str | None
) -> DataSource:
    arrays = load_npz(path)
    first = split_arrays(arrays, str(path), specs, labels_key)

    def chunks() -> Iterator[Batch]:
        yield first

    return DataSource(
        str(path), chunks, specs, batch_size, samples=first.size,
        has_labels=first.labels is not None, notes=_notes(stand_in_note(arrays, specs, labels_key)),
    )  # fmt: skip


def _notes(*notes: str | None) -> list[str]:
    return [n for n in notes if n]


def _npy_arrays(path: Path, specs: list[InputSpec], labels_key: str | None) -> dict:
    if len(specs) != 1:
        raise DataError(
            f"{path}: an .npy holds one array, the model has {len(specs)} inputs "
            f"({quoted([s.name for s in specs])}); use an .npz keyed by input name"
        )
    if labels_key is not None:
        raise DataError(
            f"{path}: labels key '{labels_key}' not found (an .npy holds no labels)",
            option="labels_key",
        )
    return {specs[0].name: load_npy(path)}


def _npy_source(
    path: Path, specs: list[InputSpec], batch_size: int, labels_key: str | None
) -> DataSource:
    first = split_arrays(_npy_arrays(path, specs, labels_key), str(path), specs, None)

    def chunks() -> Iterator[Batch]:
        yield first

    return DataSource(str(path), chunks, specs, batch_size, samples=first.size)


def _mapping_source(
    arrays: dict, where: str, specs: list[InputSpec], batch_size: int, labels_key: str | None
) -> DataSource:
    first = split_arrays(arrays, where, specs, labels_key)
    return DataSource(
        where, lambda: iter([first]), specs, batch_size, samples=first.size,
        has_labels=first.labels is not None, notes=_notes(stand_in_note(arrays, specs, labels_key)),
    )  # fmt: skip


def _folder_source(
    folder: Path, specs: list[InputSpec], batch_size: int, labels_key: str | None
) -> DataSource:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".npz", ".npy"))
    if not files:
        raise DataError(f"DATA '{folder}': the folder holds no .npz or .npy files", option="data")
    key = labels_key or DEFAULT_LABELS_KEY
    # Check keys and sample counts up front without reading the arrays (np.load is lazy for
    # .npz members; .npy headers are read through a memory map).
    with_labels, samples = 0, 0
    stand_ins: set[str] = set()
    for path in files:
        if path.suffix.lower() == ".npz":
            keys = npz_keys(path)
            stand_ins.update(_notes(stand_in_note(keys, specs, labels_key)))
            if labels_key is not None and labels_key not in keys:
                raise DataError(
                    f"{path}: labels key '{labels_key}' not found (keys: "
                    f"{', '.join(repr(k) for k in keys) or 'none'})",
                    option="labels_key",
                )
            with_labels += key in keys and key not in {s.name for s in specs}
        else:
            _npy_arrays(path, specs, labels_key)
        samples += _count_samples(path, specs)
    if 0 < with_labels < len(files):
        raise DataError(
            f"DATA '{folder}': {with_labels} of {len(files)} files have labels '{key}'; "
            "labels must be in every file or in none"
        )

    def chunks() -> Iterator[Batch]:
        for path in files:
            if path.suffix.lower() == ".npz":
                arrays = load_npz(path)
            else:
                arrays = _npy_arrays(path, specs, None)
            yield split_arrays(arrays, str(path), specs, labels_key)

    return DataSource(
        f"{folder}/ ({len(files)} files)", chunks, specs, batch_size, samples=samples,
        has_labels=with_labels == len(files), notes=sorted(stand_ins),
    )  # fmt: skip


def _count_samples(path: Path, specs: list[InputSpec]) -> int:
    try:
        if path.suffix.lower() == ".npy":
            return int(load_npy(path, mmap=True).shape[0])
        with np.load(path, allow_pickle=False) as npz:
            name = next((s.name for s in specs if s.name in npz.files), None)
            if name is None:
                name = next((k for k in npz.files if k != DEFAULT_LABELS_KEY), None)
            if name is None:
                return 0
            return int(npz[name].shape[0]) if npz[name].ndim else 0
    except (OSError, ValueError, EOFError, IndexError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None


def _script_source(
    path: Path, specs: list[InputSpec], batch_size: int | None, labels_key: str | None
) -> DataSource:
    loader = _import_loader(path)

    def feeds() -> Iterator[Mapping[str, Any]]:
        try:
            result = loader()
        except Exception as exc:
            raise DataError(f"{path}: load_data() failed: {type(exc).__name__}: {exc}") from None
        if isinstance(result, Mapping):
            yield result
            return
        if not isinstance(result, Iterable):
            raise DataError(f"{path}: load_data() must yield dicts of arrays, got {result!r}")
        yield from result

    return _iterable_source(feeds, str(path), specs, batch_size, labels_key)


def _import_loader(path: Path) -> Callable[[], Any]:
    name = f"_bnsurgery_data_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise DataError(f"{path}: cannot import as a Python script")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise DataError(
            f"{path}: importing the script failed: {type(exc).__name__}: {exc}"
        ) from None
    finally:
        sys.modules.pop(name, None)
    loader = getattr(module, "load_data", None)
    if not callable(loader):
        raise DataError(f"{path}: the script defines no load_data() function")
    return loader


def _iterable_source(
    make: Callable[[], Iterator[Mapping[str, Any]]],
    where: str,
    specs: list[InputSpec],
    batch_size: int | None,
    labels_key: str | None,
) -> DataSource:
    state: dict[str, Any] = {"labels": None, "notes": set()}

    def chunks() -> Iterator[Batch]:
        seen_labels = None
        for index, item in enumerate(make()):
            if not isinstance(item, Mapping):
                raise DataError(
                    f"{where}: item {index} is a {type(item).__name__}, expected a dict "
                    "{input_name: array}"
                )
            batch = split_arrays(item, f"{where} (item {index})", specs, labels_key)
            state["notes"].update(_notes(stand_in_note(item, specs, labels_key)))
            has = batch.labels is not None
            if seen_labels is None:
                seen_labels = has
                state["labels"] = has
            elif seen_labels != has:
                raise DataError(f"{where}: item {index}: labels must be in every item or none")
            yield batch

    static = {s.static_batch for s in specs if s.static_batch is not None}
    size = static.pop() if static else batch_size
    source = DataSource(where, chunks, specs, size)
    # Peek once to learn whether labels come with the data (scripts are re-run on each pass).
    source.has_labels = any(b.labels is not None for b in _first(chunks()))
    source.notes.extend(sorted(state["notes"]))  # from the first item, as seen by the peek
    return source


def _first(batches: Iterator[Batch]) -> list[Batch]:
    for batch in batches:
        return [batch]
    raise DataError("DATA yielded no samples")
