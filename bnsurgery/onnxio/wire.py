"""Protobuf wire format, just enough to find where a model file keeps its weights.

`find_embedded_payloads` walks a serialised ModelProto without parsing it into protobuf
objects. It returns the model's bytes with the raw data of its large main-graph initializers
cut out (a skeleton: small, and parsed in no time), and where each cut payload lies in the file.
io.load_model(..., external_data="lazy") uses it so that a model with embedded weights is
loaded like one with external data: the weights stay in the file until a pass reads them.

Only what is certain is cut: a tensor whose only value field is one raw_data of exactly
prod(dims) * itemsize bytes, of a fixed-size element type. Anything unusual (groups, a
repeated graph field, malformed varints) raises WireFormatError, and the caller parses the
whole file as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

# ModelProto.graph, GraphProto.initializer and the TensorProto fields read here (onnx.proto);
# onnxio/load.py writes the same fields back.
MODEL_GRAPH = 7
GRAPH_INITIALIZER = 5
TENSOR_DIMS, TENSOR_DATA_TYPE, TENSOR_RAW_DATA = 1, 2, 9
TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION = 13, 14
_TENSOR_TYPED_FIELDS = frozenset({4, 5, 6, 7, 10, 11})  # float/int32/string/int64/double/uint64

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5

# Element sizes of the TensorProto data types whose raw_data is prod(dims) * itemsize bytes.
# Sub-byte types (int4, float4, ...) and strings are never cut.
ITEMSIZE = {
    1: 4,  # FLOAT
    2: 1,  # UINT8
    3: 1,  # INT8
    4: 2,  # UINT16
    5: 2,  # INT16
    6: 4,  # INT32
    7: 8,  # INT64
    9: 1,  # BOOL
    10: 2,  # FLOAT16
    11: 8,  # DOUBLE
    12: 4,  # UINT32
    13: 8,  # UINT64
    16: 2,  # BFLOAT16
}


class WireFormatError(ValueError):
    """The bytes are not a plain ModelProto this module can walk; parse them normally."""


@dataclass(frozen=True)
class Payload:
    """The raw data of main-graph initializer number `index`, at file bytes [offset, +length)."""

    index: int
    offset: int
    length: int


def read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    """The varint at buf[pos], and the position after it."""
    value, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise WireFormatError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_len_field(number: int, length: int) -> bytes:
    """The tag and length prefix of a length-delimited field `number` of `length` bytes."""
    return encode_varint(number << 3 | _LEN) + encode_varint(length)


@dataclass(frozen=True)
class _Field:
    number: int
    wire_type: int
    start: int  # where the tag begins
    value_start: int  # for LEN fields, after the length prefix
    end: int


def _fields(buf: memoryview, start: int, end: int) -> Iterator[_Field]:
    pos = start
    while pos < end:
        tag, after_tag = read_varint(buf, pos, end)
        number, wire_type = tag >> 3, tag & 7
        if number == 0:
            raise WireFormatError("field number 0")
        if wire_type == _VARINT:
            _, value_end = read_varint(buf, after_tag, end)
            value_start = after_tag
        elif wire_type == _LEN:
            length, value_start = read_varint(buf, after_tag, end)
            value_end = value_start + length
        elif wire_type == _FIXED64:
            value_start, value_end = after_tag, after_tag + 8
        elif wire_type == _FIXED32:
            value_start, value_end = after_tag, after_tag + 4
        else:  # groups: not used by onnx.proto
            raise WireFormatError(f"wire type {wire_type}")
        if value_end > end:
            raise WireFormatError("field runs past its message")
        yield _Field(number, wire_type, pos, value_start, value_end)
        pos = value_end


def _dims(buf: memoryview, field: _Field) -> list[int]:
    if field.wire_type == _VARINT:
        return [read_varint(buf, field.value_start, field.end)[0]]
    if field.wire_type != _LEN:
        raise WireFormatError("dims of an unexpected wire type")
    values, pos = [], field.value_start
    while pos < field.end:  # packed
        value, pos = read_varint(buf, pos, field.end)
        values.append(value)
    return values


def _cuttable_raw_data(buf: memoryview, start: int, end: int, min_bytes: int) -> _Field | None:
    """The raw_data field of the TensorProto in buf[start:end], if it can be cut out."""
    dims: list[int] = []
    data_type = 0
    raw: list[_Field] = []
    for field in _fields(buf, start, end):
        if field.number == TENSOR_DIMS:
            dims.extend(_dims(buf, field))
        elif field.number == TENSOR_DATA_TYPE and field.wire_type == _VARINT:
            data_type = read_varint(buf, field.value_start, field.end)[0]
        elif field.number == TENSOR_RAW_DATA and field.wire_type == _LEN:
            raw.append(field)
        elif field.number in _TENSOR_TYPED_FIELDS or field.number in (
            TENSOR_EXTERNAL_DATA,
            TENSOR_DATA_LOCATION,
        ):
            return None  # external, or data outside raw_data: leave it for the checker
    if len(raw) != 1 or data_type not in ITEMSIZE:
        return None
    count = 1
    for d in dims:
        if d >= 1 << 62:  # a negative dim, as a 64-bit two's complement varint
            return None
        count *= d
    length = raw[0].end - raw[0].value_start
    if length < min_bytes or length != count * ITEMSIZE[data_type]:
        return None
    return raw[0]


def find_embedded_payloads(data: bytes | memoryview, min_bytes: int) -> tuple[bytes, list[Payload]]:
    """The model without the raw data of its large main-graph initializers, and where that
    data is in `data`. The skeleton parses to the same ModelProto but for those tensors, which
    have no value field (their dims, type and name are kept)."""
    buf = memoryview(data)
    end = len(buf)
    graphs = [f for f in _fields(buf, 0, end) if f.number == MODEL_GRAPH]
    if len(graphs) != 1 or graphs[0].wire_type != _LEN:
        raise WireFormatError("not exactly one graph field")
    graph = graphs[0]
    graph_parts: list[bytes | memoryview] = []
    payloads: list[Payload] = []
    kept_from = graph.value_start
    index = 0
    for field in _fields(buf, graph.value_start, graph.end):
        if field.number != GRAPH_INITIALIZER:
            continue
        if field.wire_type != _LEN:
            raise WireFormatError("an initializer that is not length-delimited")
        raw = _cuttable_raw_data(buf, field.value_start, field.end, min_bytes)
        if raw is not None:
            graph_parts.append(buf[kept_from : field.start])
            tensor_length = (field.end - field.value_start) - (raw.end - raw.start)
            graph_parts.append(encode_len_field(GRAPH_INITIALIZER, tensor_length))
            graph_parts.append(buf[field.value_start : raw.start])
            graph_parts.append(buf[raw.end : field.end])
            kept_from = field.end
            payloads.append(Payload(index, raw.value_start, raw.end - raw.value_start))
        index += 1
    graph_parts.append(buf[kept_from : graph.end])
    graph_bytes = b"".join(graph_parts)
    skeleton = b"".join(
        [
            buf[: graph.start],
            encode_len_field(MODEL_GRAPH, len(graph_bytes)),
            graph_bytes,
            buf[graph.end :],
        ]
    )
    return skeleton, payloads
