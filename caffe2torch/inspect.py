"""Describe a Caffe net: layers with blob names, output shapes and parameter counts, plus totals and md5."""

from __future__ import annotations

from pathlib import Path

from caffe2torch.convert import convert


def describe(file: Path, prototxt: Path | None = None, input_shape=None) -> dict:
    """Everything `caffe2torch inspect` prints, as plain data (JSON-ready)."""
    file = Path(file)
    if file.suffix == ".prototxt" and prototxt is None:
        conversion = convert(None, file, input_shape, on_warning=lambda _: None)
    else:
        conversion = convert(file, prototxt, input_shape, on_warning=lambda _: None)
    net = conversion.net
    layers = []
    for step in net.steps:
        blobs = conversion.trained.get(step.name)
        if blobs is None:  # a prototxt alone: count what Caffe would allocate
            blobs = [t.numpy() for t in net.layer(step.name).state_dict().values()]
        layers.append({
            "name": step.name,
            "type": step.type,
            "bottoms": list(step.bottoms),
            "tops": list(step.tops),
            "top_shapes": [list(shape) for shape in step.top_shapes],
            "parameters": int(sum(blob.size for blob in blobs)),
            "blob_shapes": [list(blob.shape) for blob in blobs],
        })
    return {
        "file": str(file),
        "name": net.name,
        "prototxt": str(conversion.prototxt_path) if conversion.prototxt_path else None,
        "md5": conversion.md5,
        "release": conversion.release.name if conversion.release else None,
        "inputs": {name: list(shape) for name, shape in net.input_shapes.items()},
        "outputs": net.outputs,
        "layers": layers,
        "parameters": sum(layer["parameters"] for layer in layers),
    }
