"""Describe a Caffe net (a caffemodel, a prototxt or a converted folder): layers with blob names, output shapes and
parameter counts, plus totals and md5."""

from __future__ import annotations

from pathlib import Path

from caffe2torch.conversion import convert
from caffe2torch.errors import CaffeError, ShapelessInput, term
from caffe2torch.fill import placeholder_blobs
from caffe2torch.graph import build_graph
from caffe2torch.model import layer_module


# Sizes tried for an input whose data layer does not say it: ImageNet's crop, CamVid (SegNet), PASCAL VOC (FCN).
ASSUMED_SIZES = ((224, 224), (360, 480), (500, 500))


def describe(file: Path, prototxt: Path | None = None, input_shape=None, stages=()) -> dict:
    """Everything `caffe2torch inspect` prints, as plain data (JSON-ready).

    Parameter counts are Caffe's blobs (BatchNorm's statistics and scale factor included): the
    trained ones, or for a prototxt alone the shapes Caffe would allocate.
    """
    file = Path(file)
    if file.is_dir():
        return _describe_folder(file, prototxt, input_shape, stages)
    if file.suffix in (".prototxt", ".pbtxt") and prototxt is None:
        file_pair = (None, file)
    else:
        file_pair = (file, prototxt)
    try:
        conversion = convert(*file_pair, input_shape, on_warning=lambda _: None, allow_unknown_fields=True,
                             stages=stages)
    except ShapelessInput as shapeless:
        # A train/test net's data layer need not say its image size: describe the net at the first usual
        # size it builds at, with a note (a size that breaks a fixed-size layer, e.g. SegNet's pad_out_h, fails).
        failures = []
        for size in ASSUMED_SIZES:
            try:
                conversion = convert(*file_pair, input_shape, on_warning=lambda _: None, assumed_size=size,
                                     allow_unknown_fields=True, stages=stages)
                break
            except CaffeError as error:
                failures.append((f"at {size[0]}x{size[1]}: {error}", error.warnings))
        else:
            error = CaffeError(f"{file}: a data layer does not say its input size and none of the usual sizes builds "
                               f"({failures[0][0]}); give --input-shape")
            error.warnings = failures[0][1] or shapeless.warnings
            raise error from None
    return _description(conversion.net, conversion.definition, conversion.trained, {
        "file": str(file),
        "prototxt": str(conversion.prototxt_path) if conversion.prototxt_path else None,
        "md5": conversion.md5,
        "release": conversion.release.name if conversion.release else None,
        "warnings": list(conversion.warnings),
        "notes": list(conversion.notes),
    })


def _describe_folder(folder: Path, prototxt: Path | None, input_shape, stages=()) -> dict:
    """A converted folder: its net as load() rebuilds it; parameter counts as Caffe would allocate them."""
    from caffe2torch.folder import DEFINITION, load, read_meta
    from caffe2torch.freeze import frozen_note

    if prototxt is not None or input_shape is not None or stages:
        raise CaffeError(f"{folder}: a converted folder holds its definition (stages included) and input shapes; "
                         f"leave out {term('--prototxt, --input-shape and --stage', 'prototxt, input_shape and stages')}")
    net = load(folder)
    meta = read_meta(folder)
    note = frozen_note(net, by="in this folder (by its definition or by freeze_batchnorm before it was saved")
    return _description(net, net.meta["caffe"].definition, {}, {
        "file": str(folder),
        "prototxt": str(folder / DEFINITION),
        "md5": meta.get("md5") if isinstance(meta.get("md5"), str) else None,  # of the caffemodel it came from
        "release": meta.get("release") if isinstance(meta.get("release"), str) else None,
        "warnings": [],
        "notes": [f"a folder converted from {_printable(meta.get('source', 'an unknown file'))}"] + ([note] if note else []),
    })


def _printable(name) -> str:
    """A file name as text that prints and goes into JSON (a name that is not UTF-8 keeps replacement characters)."""
    return str(name).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _description(net, definition, trained: dict, facts: dict) -> dict:
    info = net.meta["caffe"]
    graph = build_graph(definition, "<definition>", dict(info.inputs))
    layers = []
    for layer in graph.layers:
        blobs = trained.get(layer.name)
        if blobs is None:  # a prototxt alone: what Caffe would allocate
            blobs = placeholder_blobs(layer.param, [info.blob_shapes[b] for b in layer.bottoms]) or [
                p.detach().numpy() for p in layer_module(net, layer.name).parameters()]
        layers.append({
            "name": layer.name,
            "type": layer.type,
            "bottoms": list(layer.bottoms),
            "tops": list(layer.tops),
            "top_shapes": [list(info.blob_shapes[top]) for top in layer.tops],
            "parameters": int(sum(blob.size for blob in blobs)),
            "blob_shapes": [list(blob.shape) for blob in blobs],
        })
    return {
        "file": facts["file"],
        "name": info.name,
        "prototxt": facts["prototxt"],
        "md5": facts["md5"],
        "release": facts["release"],
        "inputs": {name: list(shape) for name, shape in info.inputs.items()},
        "outputs": info.outputs,
        "layers": layers,
        "parameters": sum(layer["parameters"] for layer in layers),
        "warnings": facts["warnings"],
        "notes": facts["notes"],
    }
