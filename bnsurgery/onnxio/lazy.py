"""Lazily read weights: tensors whose bytes stay in a file until someone asks for them.

A lazy tensor is an ONNX external-data reference with a few entries of our own (keys starting
with PRIVATE_PREFIX, never saved): SOURCE_KEY, the resolved absolute path of the file holding
its bytes; STAMP_KEY, that file's identity when the reference was made; and EMBEDDED_KEY on a
tensor whose bytes are raw_data inside a model file rather than in an external data file.
`set_external` makes such a reference, `lazy_source` reads it back.

`tensor_to_array` reads one lazy tensor on demand (one tensor in memory at a time),
`materialize` reads them all into a copy, and `copy_range` streams one into an open file
without passing it through this process (copy_file_range where the OS has it). A file that
changed since the reference was made is refused, never read as garbage.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import _get_all_tensors, uses_external_data

from bnsurgery.errors import BadInputError

# The external_data key under which a lazily loaded tensor records its resolved source file.
SOURCE_KEY = "bnsurgery.source"
# Present (value "1") on a lazy tensor whose bytes are embedded in a model file, not external.
EMBEDDED_KEY = "bnsurgery.embedded"
# The source file's identity when the reference was made (device, inode, size, mtime): a lazy
# read checks it, so a file replaced or rewritten since is refused rather than read as garbage.
STAMP_KEY = "bnsurgery.stamp"
# Every key of ours starts so; a saved model keeps none of them.
PRIVATE_PREFIX = "bnsurgery."
_COPY_CHUNK = 16 << 20  # read/write fallback of copy_range


def all_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Every tensor of the model: initializers and tensor attributes, in every graph."""
    return list(_get_all_tensors(model))


def set_external(
    tensor: onnx.TensorProto,
    location: str,
    offset: int,
    length: int,
    source: Path,
    stamp: str,
    *,
    embedded: bool = False,
) -> None:
    """Make `tensor` a lazy reference (its bytes in `source` at offset/length, `source` as
    file_stamp saw it); `embedded` when `source` is a model file holding them as raw_data, not an
    external data file."""
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    entries = [
        ("location", location),
        ("offset", str(offset)),
        ("length", str(length)),
        (SOURCE_KEY, str(source)),
        (STAMP_KEY, stamp),
    ]
    if embedded:
        entries.append((EMBEDDED_KEY, "1"))
    for key, value in entries:
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL


class LazySource(NamedTuple):
    """Where a lazily loaded tensor's bytes are: `file` at offset/length, as `stamp` saw it."""

    file: Path
    offset: int
    length: int
    stamp: str | None


def lazy_source(tensor: onnx.TensorProto) -> LazySource | None:
    """Where a lazily loaded tensor's bytes are, or None for an in-memory tensor."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    entries = {e.key: e.value for e in tensor.external_data}
    if SOURCE_KEY not in entries:
        return None
    return LazySource(
        Path(entries[SOURCE_KEY]),
        int(entries.get("offset") or 0),
        int(entries["length"]),
        entries.get(STAMP_KEY),
    )


def is_embedded_lazy(tensor: onnx.TensorProto) -> bool:
    """Whether `tensor` is a lazy reference to raw data embedded in a model file."""
    return tensor.data_location == onnx.TensorProto.EXTERNAL and any(
        e.key == EMBEDDED_KEY for e in tensor.external_data
    )


def has_external_files(model: onnx.ModelProto) -> bool:
    """Whether the model keeps tensors in external data files (loaded, lazily or not, from a
    model saved with external data); embedded lazy tensors do not count."""
    return any(uses_external_data(t) and not is_embedded_lazy(t) for t in all_tensors(model))


def is_lazy(model: onnx.ModelProto) -> bool:
    """Whether any tensor of the model still lives in an external file (lazy loading)."""
    return any(lazy_source(t) is not None for t in all_tensors(model))


def file_stamp(stat: os.stat_result) -> str:
    """A file's identity as a lazy reference records it (STAMP_KEY)."""
    return f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}"


def _open_source(file: Path, stamp: str | None):
    """`file` opened for reading, refused if it is not the file a lazy reference was made to."""
    try:
        fh = open(file, "rb")  # closed by the caller's with, or below
    except OSError as exc:
        raise BadInputError(f"{file}: cannot read weights from it ({exc.strerror})") from None
    if stamp is not None and file_stamp(os.fstat(fh.fileno())) != stamp:
        fh.close()
        raise BadInputError(f"{file} changed since the model was loaded; its weights are not read")
    return fh


def _read_range(source: LazySource) -> bytes:
    with _open_source(source.file, source.stamp) as fh:
        fh.seek(source.offset)
        raw = fh.read(source.length)
    if len(raw) != source.length:
        raise BadInputError(f"external data file {source.file} changed while in use (truncated)")
    return raw


def tensor_to_array(tensor: onnx.TensorProto) -> np.ndarray:
    """numpy_helper.to_array, also for lazily loaded external tensors (read from their file)."""
    source = lazy_source(tensor)
    if source is None:
        return numpy_helper.to_array(tensor)
    dtype = _PLAIN_DTYPES.get(tensor.data_type)
    if dtype is not None and np.little_endian:  # read straight into the array: one copy
        count = int(np.prod(tensor.dims, dtype=np.int64))
        if count * dtype.itemsize != source.length:
            raise BadInputError(f"external data of '{tensor.name}' does not match its shape")
        with _open_source(source.file, source.stamp) as fh:
            fh.seek(source.offset)
            array = np.fromfile(fh, dtype=dtype, count=count)
        if array.size != count:
            raise BadInputError(
                f"external data file {source.file} changed while in use (truncated)"
            )
        return array.reshape(tuple(tensor.dims))
    inline = onnx.TensorProto()
    inline.name, inline.data_type = tensor.name, tensor.data_type
    inline.dims.extend(tensor.dims)
    inline.raw_data = _read_range(source)
    return numpy_helper.to_array(inline)


_PLAIN_DTYPES = {
    onnx.TensorProto.FLOAT: np.dtype("<f4"),
    onnx.TensorProto.DOUBLE: np.dtype("<f8"),
    onnx.TensorProto.FLOAT16: np.dtype("<f2"),
    onnx.TensorProto.INT8: np.dtype("i1"),
    onnx.TensorProto.UINT8: np.dtype("u1"),
    onnx.TensorProto.INT16: np.dtype("<i2"),
    onnx.TensorProto.UINT16: np.dtype("<u2"),
    onnx.TensorProto.INT32: np.dtype("<i4"),
    onnx.TensorProto.UINT32: np.dtype("<u4"),
    onnx.TensorProto.INT64: np.dtype("<i8"),
    onnx.TensorProto.UINT64: np.dtype("<u8"),
}  # types whose raw bytes are a plain little-endian numpy array


def materialize(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a lazily loaded model with every external tensor read into memory."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in all_tensors(copy):
        source = lazy_source(tensor)
        if source is not None:
            raw = _read_range(source)
            embedded = is_embedded_lazy(tensor)
            del tensor.external_data[:]
            if embedded:  # as it was in its file, where data_location was never set
                tensor.ClearField("data_location")
            else:
                tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = raw
    return copy


def copy_range(source: LazySource, out) -> None:
    """Append the bytes `source` names to the open file `out`."""
    out.flush()
    with _open_source(source.file, source.stamp) as src:
        remaining, position = source.length, source.offset
        copy_file_range = getattr(os, "copy_file_range", None)
        while remaining and copy_file_range is not None:
            try:
                done = copy_file_range(src.fileno(), out.fileno(), remaining, position)
            except OSError:  # e.g. EXDEV on old kernels: fall back to read/write
                break
            if done == 0:
                break
            remaining -= done
            position += done
        if remaining:
            out.seek(0, os.SEEK_END)
            src.seek(position)
            while remaining:
                chunk = src.read(min(_COPY_CHUNK, remaining))
                if not chunk:
                    raise BadInputError(
                        f"external data file {source.file} is shorter than expected"
                    )
                out.write(chunk)
                remaining -= len(chunk)
    out.seek(0, os.SEEK_END)
