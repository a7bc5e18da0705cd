"""External data: where a model's tensors live outside its .onnx file, checked before any read.

An external-data location is trusted only inside the model's own folder (`safe_external_path`:
no absolute path, no '..', no link that leaves it), and its offset and length must lie inside
the file. `load_external_data` then reads the bytes into the tensors; `attach_external_data`
reads nothing and makes each tensor a lazy reference to its file (bnsurgery.onnxio.lazy).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import onnx
from onnx.external_data_helper import ExternalDataInfo

from bnsurgery.errors import BadInputError, UnsafePathError
from bnsurgery.onnxio.lazy import file_stamp, set_external


def external_info(tensor: onnx.TensorProto, model_path: Path) -> ExternalDataInfo:
    """The tensor's external_data entries, a malformed one (an offset that is not a
    non-negative integer, ...) being bad input."""
    try:
        return ExternalDataInfo(tensor)
    except ValueError as exc:
        raise BadInputError(
            f"{model_path}: external data of '{tensor.name}' is malformed ({exc})"
        ) from None


def safe_external_path(base_dir: Path, location: str, model_path: Path | str) -> Path:
    """Resolve an external-data location, refusing anything that leaves the model's folder."""
    if not location:
        raise UnsafePathError(f"{model_path}: external data with an empty location")
    if "\0" in location:
        raise UnsafePathError(f"{model_path}: external data path contains a NUL character")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or ":" in location:
        raise UnsafePathError(f"{model_path}: external data path '{location}' is absolute")
    if ".." in Path(location.replace("\\", "/")).parts:
        raise UnsafePathError(f"{model_path}: external data path '{location}' contains '..'")
    resolved = (base_dir / location).resolve()
    if base_dir != resolved and base_dir not in resolved.parents:
        raise UnsafePathError(
            f"{model_path}: external data path '{location}' leaves the model's folder"
        )
    if not resolved.is_file():
        raise BadInputError(f"{model_path}: external data file '{location}' is missing")
    return resolved


def load_external_data(tensors: list[onnx.TensorProto], base_dir: Path, model_path: Path) -> None:
    """Read every external tensor's bytes into it (its location checked first)."""
    if not tensors:
        return
    handles: dict[Path, BinaryIO] = {}
    try:
        for tensor in tensors:
            info = external_info(tensor, model_path)
            file = safe_external_path(base_dir, info.location, model_path)
            if file not in handles:
                handles[file] = open(file, "rb")
            fh = handles[file]
            fh.seek(info.offset or 0)
            raw = fh.read(info.length) if info.length else fh.read()
            if info.length and len(raw) != info.length:
                raise BadInputError(
                    f"{model_path}: external data for '{tensor.name}' is truncated "
                    f"in '{info.location}'"
                )
            tensor.raw_data = raw
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    finally:
        for fh in handles.values():
            fh.close()


def attach_external_data(tensors: list[onnx.TensorProto], base_dir: Path, model_path: Path) -> None:
    """Lazy loading: check every external reference and record its file, reading no data."""
    stats: dict[Path, os.stat_result] = {}
    for tensor in tensors:
        info = external_info(tensor, model_path)
        file = safe_external_path(base_dir, info.location, model_path)
        if file not in stats:
            stats[file] = file.stat()
        size = stats[file].st_size
        offset = int(info.offset or 0)
        length = int(info.length) if info.length else size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise BadInputError(
                f"{model_path}: external data for '{tensor.name}' is truncated in '{info.location}'"
            )
        set_external(tensor, info.location, offset, length, file, file_stamp(stats[file]))
