"""Read an ONNX file's structure without reading its weights.

Protobuf hands out a tensor's ``raw_data`` only as a fresh ``bytes`` copy, and a parsed
model keeps its own copy too: parsed that way, a 1.2 GB ViT-L file takes 2.4 GB before
the analysis begins.
This module walks the file's wire format instead (protobuf's documented encoding: a
varint tag of field number and wire type, then the field's payload), parses everything
but the big weights' ``raw_data`` (a few hundred kB of graph), and memory-maps each such
weight where it lies in the file, privately (copy-on-write).  Weights in external data
files are mapped by :mod:`.onnx_import` the same way.
"""
from __future__ import annotations

import mmap
from typing import Callable, Iterator, NamedTuple

import numpy as np
import onnx

_LEN = 2                        # wire type of a length-delimited field
_GRAPH, _INITIALIZER, _RAW_DATA = 7, 5, 9   # ModelProto.graph, GraphProto.initializer, TensorProto.raw_data


class _Field(NamedTuple):
    number: int
    wire: int
    start: int      # the tag's first byte
    payload: int    # the payload's first byte (after a length-delimited field's length)
    end: int        # one past the field's last byte


def _varint(buf: mmap.mmap, i: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= end or shift > 63:
            raise ValueError("truncated or malformed varint")
        b = buf[i]
        value |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: mmap.mmap, i: int, end: int) -> Iterator[_Field]:
    """The fields of the message encoded in ``buf[i:end]``, in order."""
    while i < end:
        start = i
        tag, i = _varint(buf, i, end)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _, i = _varint(buf, i, end)
            payload = i
        elif wire == 1 or wire == 5:
            payload, i = i, i + (8 if wire == 1 else 4)
        elif wire == _LEN:
            n, payload = _varint(buf, i, end)
            i = payload + n
        else:  # groups (3, 4) are not used by onnx.proto
            raise ValueError(f"unsupported wire type {wire}")
        if i > end or number == 0:
            raise ValueError("field runs past its message")
        yield _Field(number, wire, start, payload, i)


def read_structure(path: str, mapped_if: Callable[[onnx.TensorProto], bool]) \
        -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """``(model, mapped)``: the model in ``path`` whose top-level initializers that
    ``mapped_if`` accepts (judged on name, type and dims) are stubs without data, and
    those initializers' embedded ``raw_data`` as little-endian arrays mapped from the file
    (copied where unaligned for their type).  Raises ``ValueError`` or protobuf's
    ``DecodeError`` on a file this reader cannot walk; ``onnx.load`` then says why."""
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        model, graph, spots = onnx.ModelProto(), onnx.GraphProto(), []
        for field in _fields(buf, 0, len(buf)):
            if field.number == _GRAPH and field.wire == _LEN:
                spots += _read_graph(buf, field, graph, mapped_if)
            else:
                model.MergeFromString(buf[field.start:field.end])
        model.graph.MergeFrom(graph)
    finally:
        buf.close()
    return model, {t.name: map_tensor(path, offset, t) for t, offset in spots}


def tensor_bytes(t: onnx.TensorProto) -> int:
    """The bytes of ``t``'s data, from its type and dims."""
    return int(np.prod(t.dims)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def map_tensor(path: str, offset: int, t: onnx.TensorProto) -> np.ndarray:
    """``t``'s data at ``offset`` in the file ``path``, little-endian, as a private
    (copy-on-write) memory map; copied where the offset is unaligned for the type, since
    torch needs aligned data."""
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).newbyteorder("<")
    arr = np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=tuple(int(d) for d in t.dims))
    return arr if arr.flags.aligned else np.array(arr, order="C")


def _read_graph(buf: mmap.mmap, graph_field: _Field, graph: onnx.GraphProto,
                mapped_if: Callable[[onnx.TensorProto], bool]) -> list[tuple[onnx.TensorProto, int]]:
    """Merge the graph field into ``graph``, each initializer ``mapped_if`` accepts as a
    stub; returns those stubs with their data's offset in the file.  Runs of other
    fields are merged whole, so order and unknown fields are kept."""
    spots, run = [], graph_field.payload
    for field in _fields(buf, graph_field.payload, graph_field.end):
        if field.number != _INITIALIZER or field.wire != _LEN:
            continue
        stub, raw = onnx.TensorProto(), None
        for sub in _fields(buf, field.payload, field.end):
            if sub.number == _RAW_DATA and sub.wire == _LEN:
                raw = sub
            else:
                stub.MergeFromString(buf[sub.start:sub.end])
        if raw is None or not mapped_if(stub):
            continue
        expected = tensor_bytes(stub)
        if raw.end - raw.payload != expected:
            raise ValueError(f"initializer {stub.name!r} holds {raw.end - raw.payload} bytes, its type and dims "
                             f"say {expected}")
        graph.MergeFromString(buf[run:field.start])
        graph.initializer.add().CopyFrom(stub)
        spots.append((stub, raw.payload))
        run = field.end
    graph.MergeFromString(buf[run:graph_field.end])
    return spots
