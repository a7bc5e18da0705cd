"""Loading and saving models safely.

Loading accepts a path, bytes or a ModelProto, resolves external data only inside the model's
own folder, and turns every failure into a one-line BadInputError. Saving is atomic: the model
(and its external data, when it is large or when asked) is written to a temporary folder beside
the target and renamed into place, so a failure never leaves a partial output behind.

Lazy external data (`load_model(path, external_data="lazy")`): tensors stored in external files
stay there. Their locations are checked as usual, and each gets one extra external_data entry,
`bnsurgery.source`, the resolved absolute path of its file; `tensor_to_array` reads such a tensor
on demand (one tensor in memory at a time) and `save_model` streams it from its source file into
the output's `.data` file without passing it through memory. Tensors a pass rewrote are ordinary
in-memory tensors; when a model that has lazy tensors is saved, they are written to the output's
`.data` file and turned into lazy references to it, so saving never holds a second copy of the
weights. This is what keeps `bnsurgery fold` on a multi-GB model near 1x the model's size in
memory (docs/benchmarks.md).

Lazy loading also applies to weights embedded in the .onnx file: `wire.find_embedded_payloads`
cuts the raw data of the large main-graph initializers out of the bytes, and those tensors
become lazy references into the model file itself (marked `bnsurgery.embedded`). The checker
then runs on the small remainder (our own scan has checked each cut tensor's size). Saving such
a model without external data splices each payload back from the file (`_save_inline_stream`),
so neither the load nor the save passes the unchanged weights through protobuf.
"""

from __future__ import annotations

import logging
import mmap
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Literal, NamedTuple

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from bnsurgery.errors import BadInputError, UnsafePathError, UsageError
from bnsurgery.onnxio import wire
from bnsurgery.onnxio.proto_text import first_non_text_name

ModelSource = str | os.PathLike[str] | bytes | onnx.ModelProto  # or an onnx_ir.Model
log = logging.getLogger("bnsurgery")


def _from_onnx_ir(source: object) -> object:
    """An onnx_ir.Model becomes its ModelProto (onnx_ir.serde). onnx_ir is never imported here:
    a caller holding an onnx_ir.Model has imported it already."""
    import sys

    ir = sys.modules.get("onnx_ir")
    if ir is not None and isinstance(source, ir.Model):
        return ir.serde.serialize_model(source)
    return source


# Protobuf cannot serialise a message past 2 GiB; leave headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26
# The external_data key under which a lazily loaded tensor records its resolved source file.
SOURCE_KEY = "bnsurgery.source"
# Present (value "1") on a lazy tensor whose bytes are embedded in a model file, not external.
EMBEDDED_KEY = "bnsurgery.embedded"
# The source file's identity when the reference was made (device, inode, size, mtime): a lazy
# read checks it, so a file replaced or rewritten since is refused rather than read as garbage.
STAMP_KEY = "bnsurgery.stamp"
_PRIVATE_PREFIX = "bnsurgery."
# Tensors at least this large go to the .data file when a model is saved with external data.
EXTERNAL_TENSOR_MIN_BYTES = 1024
# Embedded initializers at least this large stay in the model file when loading lazily; smaller
# ones (BN parameters, biases) are cheaper parsed than read one by one later.
EMBEDDED_LAZY_MIN_BYTES = 64 << 10
_ALIGN = 4096  # offsets in written .data files are page-aligned (mmap-friendly), as onnx does
_COPY_CHUNK = 16 << 20


def load_model(
    source: ModelSource,
    *,
    check: bool = True,
    external_data: Literal["load", "lazy"] = "load",
) -> onnx.ModelProto:
    """Load a model from a path, bytes or a ModelProto (returned as is), with external data.

    external_data="load" reads every external tensor into the model; "lazy" leaves them in
    their files (checked, and read on demand by tensor_to_array; see the module docstring).
    """
    if external_data not in ("load", "lazy"):
        raise ValueError(f"external_data must be 'load' or 'lazy', not {external_data!r}")
    source = _from_onnx_ir(source)  # type: ignore[assignment]
    if isinstance(source, onnx.ModelProto):
        model = source
        if check:
            model = _checked(model, "model", lambda: check_model(source))
    elif isinstance(source, bytes | bytearray):
        data = bytes(source)
        model = _parse_bytes(data, "<bytes>")
        if any(uses_external_data(t) for t in _all_tensors(model)):
            raise BadInputError("model given as bytes refers to external data; pass its path")
        if check:
            model = _checked(model, "<bytes>", lambda: _check_serialized(data))
    else:
        model = _load_path(Path(source), check=check, lazy=external_data == "lazy")
    return model


def _load_path(path: Path, *, check: bool, lazy: bool) -> onnx.ModelProto:
    if not path.exists():
        raise BadInputError(f"{path}: no such file")
    if path.is_dir():
        raise BadInputError(f"{path}: is a directory, expected an .onnx file")
    if lazy:
        embedded = _load_embedded_lazily(path, check=check)
        if embedded is not None:
            return embedded
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read ({exc.strerror})") from None
    if not data:
        raise BadInputError(f"{path}: empty file, not an ONNX model")
    model = _parse_bytes(data, str(path))
    external = [t for t in _all_tensors(model) if uses_external_data(t)]
    if lazy:
        _attach_external_data(external, path.parent.resolve(), path)
    else:
        _load_external_data(external, path.parent.resolve(), path)
    if check:
        # The bytes just read are the model, so the checker parses them instead of a fresh
        # serialisation of the loaded model (which costs as much as writing it). With external
        # data the file is checked by path, after our own checks of every location above.
        if external:
            model = _checked(model, str(path), lambda: _check_path(path))
        else:
            model = _checked(model, str(path), lambda: _check_serialized(data))
    return model


def _load_embedded_lazily(path: Path, *, check: bool) -> onnx.ModelProto | None:
    """The model with its large embedded initializers left in the file, or None when the
    file is anything but a plain model with such tensors (the caller then parses it whole,
    and reports whatever is wrong with it)."""
    try:
        with open(path, "rb") as fh:
            stat = os.fstat(fh.fileno())
            if stat.st_size == 0:
                return None
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                try:
                    found = wire.find_embedded_payloads(mapped, EMBEDDED_LAZY_MIN_BYTES)
                except wire.WireFormatError:
                    found = None
    except (OSError, ValueError):
        return None
    if found is None or not found[1]:
        return None
    skeleton, payloads = found
    try:
        model = _parse_bytes(skeleton, str(path))
    except BadInputError:
        return None
    if len(model.graph.initializer) <= payloads[-1].index:
        return None
    external = [t for t in _all_tensors(model) if uses_external_data(t)]
    _attach_external_data(external, path.parent.resolve(), path)
    source, stamp = path.resolve(), _stamp(stat)
    for payload in payloads:
        tensor = model.graph.initializer[payload.index]
        _set_external(
            tensor, path.name, payload.offset, payload.length, source, stamp, embedded=True
        )
    if check:
        if external:
            model = _checked(model, str(path), lambda: _check_path(path))
        else:
            skeleton = _checkable_skeleton(model).SerializeToString()
            model = _checked(model, str(path), lambda: _check_serialized(skeleton))
    return model


def _checked(
    model: onnx.ModelProto, label: str, run_checker: Callable[[], None]
) -> onnx.ModelProto:
    """`model` if the checker accepts it. A model it refuses only where ONNX Runtime is
    lenient (onnxio.compat) comes back normalised, with a note on stderr (the CLI prints it
    unless --quiet); anything else is the checker's failure, as bad input."""
    try:
        run_checker()
        return model
    except BadInputError as failure:
        from bnsurgery.onnxio import compat

        accepted = compat.accept(model, _check_with_stubs)
        if accepted is None:
            raise failure from None
        fixed, note = accepted
        log.warning("note: %s: %s", label, note)
        return fixed


def _check_with_stubs(model: onnx.ModelProto) -> None:
    """The checker on the model in memory; each tensor whose data is elsewhere (external or
    left lazily in the file) becomes an empty stub, its location and size checked already."""
    stubbed = [t for t in _all_tensors(model) if uses_external_data(t)]
    if not stubbed:
        check_model(model)
        return
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in _all_tensors(copy):
        if uses_external_data(tensor):
            del tensor.dims[:]
            tensor.dims.append(0)
            del tensor.external_data[:]
            tensor.ClearField("data_location")
    check_model(copy)


def _checkable_skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy the checker accepts in place of the whole file: each embedded lazy tensor becomes
    an empty one (dims [0]). Its size, the one thing the checker verifies of its data, was
    checked exactly by the scan (wire.find_embedded_payloads)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in copy.graph.initializer:
        if is_embedded_lazy(tensor):
            del tensor.dims[:]
            tensor.dims.append(0)
            del tensor.external_data[:]
            tensor.ClearField("data_location")
    return copy


def _parse_bytes(data: bytes, label: str) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception:  # protobuf raises DecodeError or RuntimeError depending on backend
        raise BadInputError(f"{label}: not an ONNX model (protobuf parse failed)") from None
    if not model.HasField("graph") or not model.opset_import:
        raise BadInputError(f"{label}: not an ONNX model (no graph or no opset_import)")
    damaged = first_non_text_name(model)
    if damaged is not None:
        raise BadInputError(f"{label}: not a valid ONNX model (the {damaged} is not UTF-8 text)")
    return model


def _all_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    from onnx.external_data_helper import _get_all_tensors

    return list(_get_all_tensors(model))


def _external_info(tensor: onnx.TensorProto, model_path: Path) -> ExternalDataInfo:
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


def _load_external_data(tensors: list[onnx.TensorProto], base_dir: Path, model_path: Path) -> None:
    if not tensors:
        return
    handles: dict[Path, object] = {}
    try:
        for tensor in tensors:
            info = _external_info(tensor, model_path)
            file = safe_external_path(base_dir, info.location, model_path)
            if file not in handles:
                handles[file] = open(file, "rb")
            fh = handles[file]
            fh.seek(info.offset or 0)  # type: ignore[attr-defined]
            raw = fh.read(info.length) if info.length else fh.read()  # type: ignore[attr-defined]
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
            fh.close()  # type: ignore[attr-defined]


def _attach_external_data(
    tensors: list[onnx.TensorProto], base_dir: Path, model_path: Path
) -> None:
    """Lazy loading: check every external reference and record its file, reading no data."""
    stats: dict[Path, os.stat_result] = {}
    for tensor in tensors:
        info = _external_info(tensor, model_path)
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
        _set_external(tensor, info.location, offset, length, file, _stamp(stats[file]))


def _set_external(
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
    _stamp saw it); `embedded` when `source` is a model file holding them as raw_data, not an
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
    return any(uses_external_data(t) and not is_embedded_lazy(t) for t in _all_tensors(model))


def is_lazy(model: onnx.ModelProto) -> bool:
    """Whether any tensor of the model still lives in an external file (lazy loading)."""
    return any(lazy_source(t) is not None for t in _all_tensors(model))


def _stamp(stat: os.stat_result) -> str:
    return f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}"


def _open_source(file: Path, stamp: str | None):
    """`file` opened for reading, refused if it is not the file a lazy reference was made to."""
    try:
        fh = open(file, "rb")  # closed by the caller's with, or below
    except OSError as exc:
        raise BadInputError(f"{file}: cannot read weights from it ({exc.strerror})") from None
    if stamp is not None and _stamp(os.fstat(fh.fileno())) != stamp:
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
    for tensor in _all_tensors(copy):
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


# What the checker raises on a bad model: its own error, or, when its message quotes bytes of
# the model that are not UTF-8, pybind11's failure to decode that message.
_CHECKER_ERRORS = (onnx.checker.ValidationError, UnicodeDecodeError)


def _check_serialized(data: bytes) -> None:
    try:
        onnx.checker.check_model(data)
    except _CHECKER_ERRORS as exc:
        raise _checker_failure(exc) from None


def _check_path(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path))
    except _CHECKER_ERRORS as exc:
        raise _checker_failure(exc) from None


def _checker_failure(exc: Exception) -> BadInputError:
    if isinstance(exc, UnicodeDecodeError):  # the checker's error text, decoded, was not UTF-8
        return BadInputError(
            "model fails the ONNX checker, whose message quotes bytes that are not UTF-8 "
            "(a damaged name or string)"
        )
    message = " ".join(str(exc).split()) or "invalid model"  # one line, all of it
    if len(message) > 400:
        message = message[:397] + "..."
    return BadInputError(f"model fails the ONNX checker: {message}")


def check_model(model: onnx.ModelProto) -> None:
    """Run the ONNX checker; a failure is bad input (exit 2)."""
    try:
        if model.ByteSize() > EXTERNAL_DATA_THRESHOLD:
            _check_large(model)
        else:
            onnx.checker.check_model(model)
    except _CHECKER_ERRORS as exc:
        raise _checker_failure(exc) from None


def _check_large(model: onnx.ModelProto) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True, location="model.data")
        onnx.checker.check_model(str(path))


def resolve_output_path(
    model_path: str | os.PathLike[str] | None,
    out: str | os.PathLike[str] | None,
    command: str,
    *,
    in_place: bool = False,
) -> Path:
    """The output path of a command: OUT, or `<stem>.<command>.onnx` beside MODEL."""
    if in_place:
        if model_path is None:
            raise UsageError("--in-place needs a model path")
        if out is not None and Path(out).resolve() != Path(model_path).resolve():
            raise UsageError("--in-place and -o/--output name different files")
        return Path(model_path)
    if out is None:
        if model_path is None:
            raise UsageError("an output path is needed when the model is not a file")
        src = Path(model_path)
        return src.with_name(f"{src.stem}.{command}.onnx")
    target = Path(out)
    if model_path is not None and target.exists() and _same_file(target, Path(model_path)):
        raise UsageError(f"output {target} is the input model; use --in-place to overwrite it")
    if model_path is not None and target.resolve() == Path(model_path).resolve():
        raise UsageError(f"output {target} is the input model; use --in-place to overwrite it")
    return target


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    stream: bool = False,
) -> Path:
    """Write a model atomically; external data goes to `<name>.data` beside it when used.

    external_data=None decides by size (over ~2 GB); True or False forces the choice. A model
    with lazily loaded tensors (load_model(..., external_data="lazy")) is saved by streaming:
    - loaded from external data files (or external_data=True): with external data, its lazy
      tensors copied file to file, its in-memory tensors written once and then turned into lazy
      references to the written file (the model stays usable and equal; only where its bytes
      live changes). external_data=False on such a model reads everything into memory first.
    - loaded with its weights embedded: embedded again, each lazy tensor's bytes copied from
      the input file into the output, and then a lazy reference to the output.
    stream=True saves any model that goes to external data the first way (no copy of the
    model; its tensors become references to the written file).
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise BadInputError(f"{target}: output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise BadInputError(f"{target}: output folder {folder} is not writable")
    lazy = is_lazy(model)
    inline_stream = False
    if lazy and external_data is not True and not has_external_files(model):
        # Weights embedded in the input stay embedded: spliced back from the input file, or
        # (rarely, see _inline_streamable) read into a copy that is saved the ordinary way.
        if _inline_streamable(model):
            inline_stream = True
        else:
            model, lazy = materialize(model), False
    if lazy and not inline_stream and external_data is False:
        model, lazy = materialize(model), False
    serialized: bytes | None = None
    if inline_stream:
        use_external = False
    elif lazy:
        use_external = True
        stream = True
    elif external_data is None:
        serialized = serialize_if_small(model)
        use_external = serialized is None
    else:
        use_external = external_data
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=folder))
    except OSError as exc:
        raise BadInputError(f"{target}: cannot write to {folder} ({exc.strerror})") from None
    try:
        staged_model = staging / target.name
        data_name = f"{target.name}.data"
        if use_external and stream:
            _save_streaming(model, staged_model, data_name, folder / data_name)
            os.replace(staging / data_name, folder / data_name)
        elif use_external:
            to_save = onnx.ModelProto()
            to_save.CopyFrom(model)
            onnx.save_model(
                to_save,
                str(staged_model),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=EXTERNAL_TENSOR_MIN_BYTES,
            )
            if (staging / data_name).exists():  # every tensor under the threshold: none
                os.replace(staging / data_name, folder / data_name)
        elif inline_stream:
            moved = _save_inline_stream(model, staged_model)
        else:
            with open(staged_model, "wb") as fh:
                fh.write(serialized if serialized is not None else model.SerializeToString())
        os.replace(staged_model, target)
        if inline_stream:  # the lazy tensors now live in the written file
            final, stamp = target.resolve(), _stamp(target.stat())
            for tensor, offset, length in moved:
                _set_external(tensor, target.name, offset, length, final, stamp, embedded=True)
    except OSError as exc:
        raise BadInputError(f"{target}: cannot write ({exc.strerror})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def atomic_write(
    path: str | os.PathLike[str],
    write: Callable[[BinaryIO], object],
    *,
    option: str | None = None,
) -> Path:
    """Write one file atomically: `write` fills a fresh file in a temporary folder beside
    `path`, which is then renamed over `path`. On any failure (`write` raising included)
    nothing is left behind and a file already at `path` is unchanged. Returns the path.

    A missing or unwritable folder, or an OSError while writing, is a BadInputError naming the
    target; `option` names the parameter that gave the path (e.g. "report") and starts the
    message."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")

    def fail(message: str) -> BadInputError:
        if option is None:
            return BadInputError(message)
        return BadInputError("{option} " + message, option=option)

    if not folder.is_dir():
        raise fail(f"{target}: output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise fail(f"{target}: output folder {folder} is not writable")
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=folder))
    except OSError as exc:
        raise fail(f"{target}: cannot write to {folder} ({exc.strerror})") from None
    try:
        staged = staging / target.name
        with open(staged, "wb") as fh:
            write(fh)
        os.replace(staged, target)
    except OSError as exc:
        raise fail(f"{target}: cannot write ({exc.strerror})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def serialize_if_small(model: onnx.ModelProto) -> bytes | None:
    """The serialised model, or None when it is past EXTERNAL_DATA_THRESHOLD (it then needs
    external data).

    Decides by size without ModelProto.ByteSize(), which costs a full serialisation: the tensor
    payload bounds the size from below, and the one serialisation needed anyway settles the rest.
    """
    if _payload_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        return None
    try:
        serialized = model.SerializeToString()
    except ValueError:  # protobuf refuses messages over 2 GiB
        return None
    return serialized if len(serialized) <= EXTERNAL_DATA_THRESHOLD else None


def _payload_bytes(model: onnx.ModelProto) -> int:
    """Bytes of raw tensor data in the model (a lower bound of its serialised size)."""
    return sum(len(t.raw_data) for t in _all_tensors(model))


def _save_streaming(
    model: onnx.ModelProto, staged_model: Path, data_name: str, final_data: Path
) -> None:
    """Write the model with all tensor data in staged_model's folder/data_name, streaming.

    Lazy tensors are copied from their source files range by range (copy_file_range where the
    OS has it: the bytes never enter this process). In-memory tensors of at least
    EXTERNAL_TENSOR_MIN_BYTES are written and turned into lazy references to `final_data`,
    where the data file will be once the caller has moved it into place.
    """
    staged_data = staged_model.parent / data_name
    moves: list[tuple[onnx.TensorProto, int, int]] = []
    with open(staged_data, "wb") as out:
        offset = 0
        for tensor in _all_tensors(model):
            source = lazy_source(tensor)
            if source is not None:
                length = source.length
                _copy_range(source, out)
            elif tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_TENSOR_MIN_BYTES:
                raw = tensor.raw_data
                length = len(raw)
                out.write(raw)
                del raw
            else:
                continue
            moves.append((tensor, offset, length))
            offset += length
            pad = (-offset) % _ALIGN
            if pad:
                out.write(b"\0" * pad)
                offset += pad
    stamp = _stamp(staged_data.stat())  # the rename into place keeps the file as it is
    for tensor, start, length in moves:
        _set_external(tensor, data_name, start, length, final_data, stamp)
    staged = onnx.ModelProto()
    staged.CopyFrom(model)  # small now: every large tensor is an external reference
    for tensor in _all_tensors(staged):
        if lazy_source(tensor) is not None:
            kept = [e for e in tensor.external_data if not e.key.startswith(_PRIVATE_PREFIX)]
            del tensor.external_data[:]
            tensor.external_data.extend(kept)
    with open(staged_model, "wb") as fh:
        fh.write(staged.SerializeToString())


def _inline_streamable(model: onnx.ModelProto) -> bool:
    """Whether save_model can write `model` (lazy, no external files) with its lazy tensors
    spliced back inline: they are all among the main graph's initializers, the whole fits in one
    protobuf,
    and no message on the way holds fields this onnx does not know (a piecewise write would
    lose them)."""
    from google.protobuf.unknown_fields import UnknownFieldSet

    lazy = {id(t): (t, s) for t in _all_tensors(model) if (s := lazy_source(t)) is not None}
    if sum(lazy_source(t) is not None for t in model.graph.initializer) != len(lazy):
        return False
    if _payload_bytes(model) + sum(s.length for _, s in lazy.values()) > EXTERNAL_DATA_THRESHOLD:
        return False
    messages = (model, model.graph, *(t for t, _ in lazy.values()))
    return not any(len(UnknownFieldSet(m)) for m in messages)


def _fields_between(message, low: int, high: int, skip: frozenset[int] = frozenset()) -> bytes:
    """The serialisation of `message`'s fields numbered in [low, high), but `skip`.

    Protobuf writes fields in number order, so these pieces, concatenated in order around the
    fields written separately, are the message's own serialisation.
    """
    part = type(message)()
    for field, value in message.ListFields():
        if not low <= field.number < high or field.number in skip:
            continue
        if _is_repeated(field):
            getattr(part, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(part, field.name).CopyFrom(value)
        else:
            setattr(part, field.name, value)
    return part.SerializeToString()


def _is_repeated(field) -> bool:
    repeated = getattr(field, "is_repeated", None)  # protobuf >= 5.29; `label` is gone in 7
    return bool(repeated) if repeated is not None else field.label == field.LABEL_REPEATED


_NO_FIELD = 1 << 29  # past the largest protobuf field number
# external_data and data_location: the lazy reference, dropped when written inline
_TENSOR_LAZY_FIELDS = frozenset({wire.TENSOR_EXTERNAL_DATA, wire.TENSOR_DATA_LOCATION})


def _save_inline_stream(
    model: onnx.ModelProto, staged_model: Path
) -> list[tuple[onnx.TensorProto, int, int]]:
    """Write `model` as one .onnx file, each lazy tensor's payload copied from its source
    file into its raw_data (copy_file_range: the bytes never enter this process). Returns, per
    lazy tensor, where its payload now is in the written file."""
    # Each piece is bytes, or a lazy tensor's payload: (its LazySource, the tensor).
    tensors: list[list] = []
    for tensor in model.graph.initializer:
        source = lazy_source(tensor)
        if source is None:
            tensors.append([tensor.SerializeToString()])
            continue
        tensors.append(
            [
                _fields_between(tensor, 0, wire.TENSOR_RAW_DATA),
                wire.encode_len_field(wire.TENSOR_RAW_DATA, source.length),
                (source, tensor),
                _fields_between(tensor, wire.TENSOR_RAW_DATA + 1, _NO_FIELD, _TENSOR_LAZY_FIELDS),
            ]
        )
    graph_pieces: list = [_fields_between(model.graph, 0, wire.GRAPH_INITIALIZER)]
    for pieces in tensors:
        graph_pieces.append(wire.encode_len_field(wire.GRAPH_INITIALIZER, _size(pieces)))
        graph_pieces.extend(pieces)
    graph_pieces.append(_fields_between(model.graph, wire.GRAPH_INITIALIZER + 1, _NO_FIELD))
    pieces = [
        _fields_between(model, 0, wire.MODEL_GRAPH),
        wire.encode_len_field(wire.MODEL_GRAPH, _size(graph_pieces)),
        *graph_pieces,
        _fields_between(model, wire.MODEL_GRAPH + 1, _NO_FIELD),
    ]
    moved: list[tuple[onnx.TensorProto, int, int]] = []
    position = 0
    with open(staged_model, "wb") as out:
        for piece in pieces:
            if isinstance(piece, bytes):
                out.write(piece)
                position += len(piece)
            else:
                source, tensor = piece
                _copy_range(source, out)
                moved.append((tensor, position, source.length))
                position += source.length
    return moved


def _size(pieces: list) -> int:
    return sum(len(p) if isinstance(p, bytes) else p[0].length for p in pieces)


def _copy_range(source: LazySource, out) -> None:
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
