"""Saving models atomically, with external data streamed file to file.

Everything is written into a temporary folder beside the target and renamed into place, so a
failure never leaves a partial output behind and never touches the file already there
(`atomic_write` is the same promise for any one file, e.g. a report).

A model with lazily read tensors (bnsurgery.onnxio.lazy) is saved without passing its unchanged
weights through memory or protobuf. Loaded from external data files, it goes to the output's
`.data` file, each lazy tensor copied range by range from its source and each in-memory one
written once, all then turned into lazy references to the written file (saving never holds a
second copy of the weights). Loaded with its weights embedded, it is written as one .onnx file
whose lazy payloads are spliced back from the input file between serialised pieces of the
model (`_save_inline_stream`), the file protobuf itself would have written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import onnx

from bnsurgery.errors import BadInputError
from bnsurgery.onnxio import load, wire
from bnsurgery.onnxio.lazy import (
    PRIVATE_PREFIX,
    all_tensors,
    copy_range,
    file_stamp,
    has_external_files,
    is_lazy,
    lazy_source,
    materialize,
    set_external,
)

# Tensors at least this large go to the .data file when a model is saved with external data.
EXTERNAL_TENSOR_MIN_BYTES = 1024
_ALIGN = 4096  # offsets in written .data files are page-aligned (mmap-friendly), as onnx does
# Whether a model needs external data is decided against load.EXTERNAL_DATA_THRESHOLD, read at
# call time: the checker and the saver share that one protobuf limit.


def atomic_write(
    path: str | os.PathLike[str],
    write: Callable[[BinaryIO], object],
    *,
    option: str | None = None,
) -> Path:
    """Write one file atomically: `write` fills a fresh file beside `path`, which is then
    renamed over `path`. On any failure (`write` raising included) nothing is left behind
    and a file already at `path` is unchanged. Returns the path.

    An OSError becomes a BadInputError naming the target; `option` names the parameter that
    gave the path (e.g. "report"), so the message starts with it.
    """
    target = Path(path)
    with _staging(target, option) as staging:
        staged = staging / target.name
        with open(staged, "wb") as fh:
            write(fh)
        os.replace(staged, target)
    return target


def _output_folder(target: Path, option: str | None) -> Path:
    """The folder `target` goes in; bad input unless it exists and is writable."""
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise _write_error(f"{target}: output folder {folder} does not exist", option)
    if not os.access(folder, os.W_OK):
        raise _write_error(f"{target}: output folder {folder} is not writable", option)
    return folder


@contextlib.contextmanager
def _staging(target: Path, option: str | None = None) -> Iterator[Path]:
    """A temporary folder beside `target` for the files about to replace it, removed on the way
    out whatever happens; an OSError inside is bad input naming `target`."""
    folder = _output_folder(target, option)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=folder))
    except OSError as exc:
        raise _write_error(f"{target}: cannot write to {folder} ({exc.strerror})", option) from None
    try:
        yield staging
    except OSError as exc:
        raise _write_error(f"{target}: cannot write ({exc.strerror})", option) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_error(message: str, option: str | None) -> BadInputError:
    if option is None:
        return BadInputError(message)
    return BadInputError("{option} " + message, option=option)


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
    folder = _output_folder(target, None)
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
    with _staging(target) as staging:
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
            final, stamp = target.resolve(), file_stamp(target.stat())
            for tensor, offset, length in moved:
                set_external(tensor, target.name, offset, length, final, stamp, embedded=True)
    return target


def serialize_if_small(model: onnx.ModelProto) -> bytes | None:
    """The serialised model, or None when it is past EXTERNAL_DATA_THRESHOLD (it then needs
    external data).

    Decides by size without ModelProto.ByteSize(), which costs a full serialisation: the tensor
    payload bounds the size from below, and the one serialisation needed anyway settles the rest.
    """
    if _payload_bytes(model) > load.EXTERNAL_DATA_THRESHOLD:
        return None
    try:
        serialized = model.SerializeToString()
    except ValueError:  # protobuf refuses messages over 2 GiB
        return None
    return serialized if len(serialized) <= load.EXTERNAL_DATA_THRESHOLD else None


def _payload_bytes(model: onnx.ModelProto) -> int:
    """Bytes of raw tensor data in the model (a lower bound of its serialised size)."""
    return sum(len(t.raw_data) for t in all_tensors(model))


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
        for tensor in all_tensors(model):
            source = lazy_source(tensor)
            if source is not None:
                length = source.length
                copy_range(source, out)
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
    stamp = file_stamp(staged_data.stat())  # the rename into place keeps the file as it is
    for tensor, start, length in moves:
        set_external(tensor, data_name, start, length, final_data, stamp)
    staged = onnx.ModelProto()
    staged.CopyFrom(model)  # small now: every large tensor is an external reference
    for tensor in all_tensors(staged):
        if lazy_source(tensor) is not None:
            kept = [e for e in tensor.external_data if not e.key.startswith(PRIVATE_PREFIX)]
            del tensor.external_data[:]
            tensor.external_data.extend(kept)
    with open(staged_model, "wb") as fh:
        fh.write(staged.SerializeToString())


def _inline_streamable(model: onnx.ModelProto) -> bool:
    """Whether save_model can write `model` (lazy, no external files) with its lazy tensors
    spliced back inline: they are all among the main graph's initializers, the whole fits in one
    protobuf, and no message on the way holds fields this onnx does not know (a piecewise write
    would lose them)."""
    from google.protobuf.unknown_fields import UnknownFieldSet

    lazy = {id(t): (t, s) for t in all_tensors(model) if (s := lazy_source(t)) is not None}
    if sum(lazy_source(t) is not None for t in model.graph.initializer) != len(lazy):
        return False
    if (
        _payload_bytes(model) + sum(s.length for _, s in lazy.values())
        > load.EXTERNAL_DATA_THRESHOLD
    ):
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
                copy_range(source, out)
                moved.append((tensor, position, source.length))
                position += source.length
    return moved


def _size(pieces: list) -> int:
    return sum(len(p) if isinstance(p, bytes) else p[0].length for p in pieces)
