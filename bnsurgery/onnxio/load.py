"""Loading a model safely, and the ONNX checker.

`load_model` accepts a path, bytes, a ModelProto or an onnx_ir.Model, resolves external data
only inside the model's own folder (bnsurgery.onnxio.external), and turns every failure into a
one-line BadInputError. A model the checker refuses only where ONNX Runtime is lenient comes
back normalised (bnsurgery.onnxio.compat), with a note logged as a warning.

Lazy loading (`load_model(path, external_data="lazy")`) reads no weights: tensors stored in
external files stay there, each a lazy reference to its file (bnsurgery.onnxio.lazy), read on
demand by `tensor_to_array` and streamed file to file by `save_model`. Weights embedded in the
.onnx file are left there too: `wire.find_embedded_payloads` cuts the raw data of the large
main-graph initializers out of the bytes, and those tensors become lazy references into the
model file itself. The checker then runs on the small remainder (our own scan has checked each
cut tensor's size). This is what keeps `bnsurgery fold` on a multi-GB model near 1x the model's
size in memory (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import mmap
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import onnx
from onnx.external_data_helper import uses_external_data

from bnsurgery.errors import BadInputError
from bnsurgery.onnxio import compat, wire
from bnsurgery.onnxio.external import attach_external_data, load_external_data
from bnsurgery.onnxio.lazy import all_tensors, file_stamp, is_embedded_lazy, set_external
from bnsurgery.onnxio.proto_text import first_non_text_name

ModelSource = str | os.PathLike[str] | bytes | onnx.ModelProto  # or an onnx_ir.Model
logger = logging.getLogger(__name__)

# Protobuf cannot serialise a message past 2 GiB; leave headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26
# Embedded initializers at least this large stay in the model file when loading lazily; smaller
# ones (BN parameters, biases) are cheaper parsed than read one by one later.
EMBEDDED_LAZY_MIN_BYTES = 64 << 10


def _from_onnx_ir(source: object) -> object:
    """An onnx_ir.Model becomes its ModelProto (onnx_ir.serde). onnx_ir is never imported here:
    a caller holding an onnx_ir.Model has imported it already."""
    ir = sys.modules.get("onnx_ir")
    if ir is not None and isinstance(source, ir.Model):
        return ir.serde.serialize_model(source)
    return source


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
        if any(uses_external_data(t) for t in all_tensors(model)):
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
    external = [t for t in all_tensors(model) if uses_external_data(t)]
    if lazy:
        attach_external_data(external, path.parent.resolve(), path)
    else:
        load_external_data(external, path.parent.resolve(), path)
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
    external = [t for t in all_tensors(model) if uses_external_data(t)]
    attach_external_data(external, path.parent.resolve(), path)
    source, stamp = path.resolve(), file_stamp(stat)
    for payload in payloads:
        tensor = model.graph.initializer[payload.index]
        set_external(
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
        accepted = compat.accept(model, _check_with_stubs)
        if accepted is None:
            raise failure from None
        fixed, note = accepted
        logger.warning("note: %s: %s", label, note)
        return fixed


def _check_with_stubs(model: onnx.ModelProto) -> None:
    """The checker on the model in memory; each tensor whose data is elsewhere (external or
    left lazily in the file) becomes an empty stub, its location and size checked already."""
    stubbed = [t for t in all_tensors(model) if uses_external_data(t)]
    if not stubbed:
        check_model(model)
        return
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in all_tensors(copy):
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
