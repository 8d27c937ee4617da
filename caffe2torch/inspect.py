"""Describe a Caffe net: layers with blob names, output shapes and parameter counts, plus totals and md5."""

from __future__ import annotations

from pathlib import Path

from caffe2torch.conversion import convert
from caffe2torch.fill import placeholder_blobs
from caffe2torch.graph import build_graph
from caffe2torch.model import layer_module


def describe(file: Path, prototxt: Path | None = None, input_shape=None) -> dict:
    """Everything `caffe2torch inspect` prints, as plain data (JSON-ready).

    Parameter counts are Caffe's blobs (BatchNorm's statistics and scale factor included): the
    trained ones, or for a prototxt alone the shapes Caffe would allocate.
    """
    file = Path(file)
    if file.suffix in (".prototxt", ".pbtxt") and prototxt is None:
        conversion = convert(None, file, input_shape, on_warning=lambda _: None)
    else:
        conversion = convert(file, prototxt, input_shape, on_warning=lambda _: None)
    net = conversion.net
    info = net.meta["caffe"]
    graph = build_graph(conversion.definition, "<definition>", dict(info.inputs))
    layers = []
    for layer in graph.layers:
        blobs = conversion.trained.get(layer.name)
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
        "file": str(file),
        "name": info.name,
        "prototxt": str(conversion.prototxt_path) if conversion.prototxt_path else None,
        "md5": conversion.md5,
        "release": conversion.release.name if conversion.release else None,
        "inputs": {name: list(shape) for name, shape in info.inputs.items()},
        "outputs": info.outputs,
        "layers": layers,
        "parameters": sum(layer["parameters"] for layer in layers),
        "warnings": list(conversion.warnings),
        "notes": list(conversion.notes),
    }
