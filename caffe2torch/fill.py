"""Parameter blobs for a net definition without weights: Caffe's blob shapes, filled with zeros (or identity).

Used where only the structure matters (inspecting a prototxt, shape checks on public
architectures); a conversion for use always copies trained blobs instead.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from caffe2torch.errors import CaffeError

Shape = tuple[int, ...]


def _spatial(param, name: str, count: int, default: int) -> list[int]:
    single = "kernel_size" if name == "kernel" else name
    if param.HasField(f"{name}_h"):
        return [int(getattr(param, f"{name}_h")), int(getattr(param, f"{name}_w"))]
    values = list(getattr(param, single))
    if not values:
        return [default] * count
    return values * count if len(values) == 1 else values


def _channels(layer, shapes: Sequence[Shape], axis: int = 1) -> int:
    if not shapes:
        raise CaffeError(f"layer {layer.name!r} ({layer.type}): needs a bottom")
    return int(shapes[0][axis % len(shapes[0])])


def placeholder_blobs(layer, shapes: Sequence[Shape]) -> list[np.ndarray]:
    """Blobs of the shapes Caffe's LayerSetUp would allocate for `layer` on bottoms of `shapes`."""
    kind = layer.type
    if kind in ("Convolution", "Deconvolution"):
        param = layer.convolution_param
        axis = param.axis if param.HasField("axis") else 1
        channels = _channels(layer, shapes, axis)
        spatial = len(shapes[0]) - (axis % len(shapes[0])) - 1
        kernel = _spatial(param, "kernel", spatial, 1)
        group = param.group or 1
        if kind == "Convolution":
            weight = (param.num_output, channels // group, *kernel)
        else:
            weight = (channels, param.num_output // group, *kernel)
        blobs = [np.zeros(weight, np.float32)]
        if param.bias_term:
            blobs.append(np.zeros(param.num_output, np.float32))
        return blobs
    if kind == "InnerProduct":
        param = layer.inner_product_param
        axis = (param.axis if param.HasField("axis") else 1) % len(shapes[0])
        inputs = int(np.prod(shapes[0][axis:]))
        weight = (inputs, param.num_output) if param.transpose else (param.num_output, inputs)
        blobs = [np.zeros(weight, np.float32)]
        if param.bias_term:
            blobs.append(np.zeros(param.num_output, np.float32))
        return blobs
    if kind == "BatchNorm":
        channels = _channels(layer, shapes)
        return [np.zeros(channels, np.float32), np.ones(channels, np.float32), np.ones(1, np.float32)]
    if kind == "BN":
        channels = _channels(layer, shapes)
        ones, zeros = np.ones((1, channels, 1, 1), np.float32), np.zeros((1, channels, 1, 1), np.float32)
        return [ones, zeros, zeros.copy(), ones.copy()]
    if kind == "PReLU":
        channels = 1 if layer.prelu_param.channel_shared else _channels(layer, shapes)
        return [np.full(channels, 0.25, np.float32)]
    if kind in ("Scale", "Bias") and len(shapes) == 1:
        return _scale_bias_placeholders(layer, shapes[0])
    # Every other type has no parameters.
    return []


def _scale_bias_placeholders(layer, shape: Shape) -> list[np.ndarray]:
    """Scale and Bias fill themselves from constant fillers; a random filler gets gamma 1 / beta 0 here."""
    param = layer.scale_param if layer.type == "Scale" else layer.bias_param
    fillers = [("filler", param.filler)]
    if layer.type == "Scale" and param.bias_term:
        fillers.append(("bias_filler", param.bias_filler))
    if all(not param.HasField(name) or filler.type == "constant" for name, filler in fillers):
        return []
    rank = len(shape)
    axis = param.axis % rank if -rank <= param.axis < rank else param.axis  # the converter reports a bad axis
    blob = tuple(shape[axis:]) if param.num_axes == -1 else tuple(shape[axis:axis + param.num_axes])
    if layer.type == "Bias":
        return [np.zeros(blob, np.float32)]
    return [np.ones(blob, np.float32)] + ([np.zeros(blob, np.float32)] if param.bias_term else [])
