"""Writing files safely: atomic replacement with ordinary permissions, and binary caffemodels from blobs."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from proto import caffe_pb2

_BLOB_DATA_FIELD = caffe_pb2.BlobProto.DESCRIPTOR.fields_by_name["data"].number


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def weights_stem(model: str | os.PathLike) -> str:
    """A weights file's name without .caffemodel / .h5 / .hdf5, to name what is written from it."""
    name = Path(model).name
    for suffix in (".h5", ".hdf5", ".caffemodel"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write beside the target and rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.chmod(temporary, 0o666 & ~current_umask())  # mkstemp makes 0600; give what open() would
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _packed_floats(field: int, array: np.ndarray) -> bytes:
    """The wire form of a packed float field; protobuf's extend() would convert value by value (seconds for ICNet)."""
    payload = np.ascontiguousarray(array, dtype="<f4").tobytes()
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def with_blobs(definition: caffe_pb2.NetParameter, blobs: Mapping[str, Sequence[np.ndarray]]) -> caffe_pb2.NetParameter:
    """A binary-caffemodel NetParameter: the definition with each layer's blobs (with `shape`), as Net::ToProto."""
    net = caffe_pb2.NetParameter()
    net.CopyFrom(definition)
    for layer in net.layer:
        del layer.blobs[:]
        for array in blobs.get(layer.name, []):
            blob = layer.blobs.add()
            blob.shape.dim.extend(int(d) for d in np.shape(array))
            blob.MergeFromString(_packed_floats(_BLOB_DATA_FIELD, array))
    return net
