"""The Caffe reference files (.ref.h5): every recorded layer top, read with bounded sizes in a guarded child.

Layout in ../shared/reference/README.md. A damaged file gives one CaffeError within seconds:
sizes are checked before anything is read (attributes against the file size, datasets against
the memory limit) and the whole read runs under `guard.run_bounded`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np

from caffe2torch.errors import CaffeError
from caffe2torch.guard import run_bounded, time_limit
from caffe2torch.limits import format_bytes, memory_limit
from caffe2torch.read import h5_name


@dataclass
class TopRecord:
    """What the reference stores of one top of one recorded layer."""

    shape: tuple[int, ...]
    sample_index: np.ndarray
    sample_value: np.ndarray
    data: np.ndarray | None


@dataclass
class LayerRecord:
    index: int
    name: str
    type: str
    tops: list[str]
    values: list[TopRecord]


@dataclass
class Reference:
    path: Path
    prototxt: str | None
    caffemodel: str | None
    inputs: dict[str, np.ndarray]
    layers: list[LayerRecord]
    final_argmax: np.ndarray | None
    argmax_source: str | None


class _Bounded:
    """Reads of one open HDF5 file that first check the size of what they read."""

    def __init__(self, path: Path, file) -> None:
        self.path, self.file = path, file
        self.file_size = path.stat().st_size
        self.limit = memory_limit()

    def attribute(self, node, name: str):
        import h5py

        if name not in node.attrs:
            raise CaffeError(f"{self.path}: {node.name} has no attribute {name!r}")
        handle = h5py.h5a.open(node.id, name.encode())
        if handle.get_storage_size() > self.file_size:
            raise CaffeError(f"{self.path}: attribute {name!r} of {node.name} claims {handle.get_storage_size()} "
                             f"bytes in a {self.file_size}-byte file (damaged)")
        return node.attrs[name]

    def text(self, node, name: str) -> str:
        return self.decoded(self.attribute(node, name), f"attribute {name!r} of {node.name}")

    def decoded(self, value, what: str) -> str:
        """A string attribute: bytes must be UTF-8 (one line naming the file and the bytes otherwise)."""
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value.item()
        if isinstance(value, bytes):
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                h5_name(value, what, self.path)
        return str(value)

    def array(self, node, name: str, dtype) -> np.ndarray:
        import h5py

        dataset = node[name]
        if not isinstance(dataset, h5py.Dataset):
            raise CaffeError(f"{self.path}: {node.name}/{name} is not a dataset")
        size = int(np.prod(dataset.shape, dtype=object)) * dataset.dtype.itemsize
        if size > self.limit:
            raise CaffeError(f"{self.path}: {dataset.name} would take {format_bytes(size)}, more than the memory limit")
        return np.asarray(dataset[()], dtype=dtype)


def _check_record(path: Path, where: str, record: TopRecord) -> None:
    """A record verify can use: stored values that fit the shape, samples that lie inside it."""
    if any(d < 0 for d in record.shape):
        raise CaffeError(f"{path}: {where} has a negative size in shape {record.shape}")
    count = int(np.prod(record.shape, dtype=object))
    if record.data is not None and record.data.size != count:
        raise CaffeError(f"{path}: {where} stores {record.data.size} values for shape {record.shape}")
    index = record.sample_index.reshape(-1)
    if index.size != record.sample_value.size:
        raise CaffeError(f"{path}: {where} has {index.size} sample indices but {record.sample_value.size} values")
    if index.size and (index.min() < 0 or index.max() >= count):
        raise CaffeError(f"{path}: {where} has sample indices outside its {count} values (damaged file)")
    if count and record.data is None and not index.size:
        raise CaffeError(f"{path}: {where} stores neither values nor samples: nothing to compare")


def _read(path: Path) -> Reference:
    import h5py

    try:
        with h5py.File(path, "r") as file:
            if "layers" not in file or "input" not in file:
                raise CaffeError(f"{path}: not a reference file (needs /input and /layers)")
            read = _Bounded(path, file)
            inputs = {h5_name(name, "the input name", path): read.array(file["input"], name, np.float32)
                      for name in file["input"]}
            layers = []
            for key in sorted(h5_name(key, "the record name in /layers", path) for key in file["layers"].keys()):
                group = file["layers"][key]
                if not key.isdigit():
                    raise CaffeError(f"{path}: /layers/{key} is not a numbered layer record")
                tops = [read.decoded(t, f"a top name of {group.name}") for t in read.attribute(group, "tops")]
                values = []
                for k in range(len(tops)):
                    if str(k) not in group:
                        raise CaffeError(f"{path}: layer record {key} names {len(tops)} tops but has no group {k}")
                    top = group[str(k)]
                    record = TopRecord(
                        shape=tuple(int(d) for d in read.attribute(top, "shape")),
                        sample_index=read.array(top, "sample_index", np.int64),
                        sample_value=read.array(top, "sample_value", np.float32),
                        data=read.array(top, "data", np.float32) if "data" in top else None,
                    )
                    _check_record(path, f"layer record {key} top {k}", record)
                    values.append(record)
                layers.append(LayerRecord(int(key), read.text(group, "name"), read.text(group, "type"), tops, values))
            argmax = source = None
            if "final" in file and "argmax" in file["final"]:
                argmax = read.array(file["final"], "argmax", np.uint8)
                final = file["final"]["argmax"]
                # The argmax is over the last recorded layer's output unless the file names another.
                source = read.text(final, "source_layer") if "source_layer" in final.attrs else \
                    (layers[-1].name if layers else None)
            prototxt = read.text(file, "prototxt") if "prototxt" in file.attrs else None
            caffemodel = read.text(file, "caffemodel") if "caffemodel" in file.attrs else None
            return Reference(path, prototxt, caffemodel, inputs, layers, argmax, source)
    except CaffeError:
        raise
    except Exception as error:  # noqa: BLE001 - corrupt HDF5 fails in many ways
        reason = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise CaffeError(f"{path}: not a readable reference file ({reason})") from None


def definition_beside(reference: Reference) -> tuple[Path | None, str | None]:
    """The net definition a reference names in its `prototxt` attribute, and a note when that name is ignored.

    A reference names its definition relative to itself: only a plain relative name that stays inside
    the reference's own folder (no absolute path, no `..`, no symbolic link leading out) is used, so a
    file given to verify cannot make it read a definition from anywhere else. A name that does not
    qualify is ignored with a note (give --prototxt); one that is simply not there is ignored quietly.
    """
    name = reference.prototxt
    if not name:
        return None, None
    folder = reference.path.parent
    ignored = f"{reference.path}: its prototxt attribute {name!r} is ignored"
    if "\0" in name:
        return None, f"{ignored} (not a file name)"
    if PurePath(name).is_absolute():
        return None, f"{ignored} (an absolute path; a reference names its definition relative to itself)"
    if ".." in PurePath(name).parts:
        return None, f"{ignored} (it leads out of the reference's folder)"
    candidate = folder / name
    try:
        inside = folder.resolve() in candidate.resolve().parents
    except (OSError, RuntimeError):  # a symbolic link loop
        inside = False
    if not inside:
        return None, f"{ignored} (it resolves outside the reference's folder)"
    return (candidate, None) if candidate.is_file() else (None, None)


def read_reference(path: str | Path) -> Reference:
    """Read a .ref.h5 file; a damaged one is a CaffeError within seconds, never a hang."""
    path = Path(path)
    if not path.is_file():
        raise CaffeError(f"{path}: no such file")
    return run_bounded(_read, (path,), time_limit(path.stat().st_size), str(path))
