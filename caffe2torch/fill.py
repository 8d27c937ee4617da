"""Parameter blobs for a net definition without weights: Caffe's blob shapes, filled with zeros (or identity).

Used where only the structure matters (inspecting a prototxt, shape checks on public
architectures); a conversion for use always copies trained blobs instead.
"""

from __future__ import annotations

import math
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


def _axis(layer, shapes: Sequence[Shape], axis: int) -> int:
    """Bottom 0's axis `axis` as Caffe's CanonicalAxisIndex gives it (out of range: the converter's error)."""
    from caffe2torch.layers.registry import canonical_axis

    if not shapes:
        raise CaffeError(f"layer {layer.name!r} ({layer.type}): needs a bottom")
    return canonical_axis(layer, axis, len(shapes[0]))


def _channels(layer, shapes: Sequence[Shape], axis: int = 1) -> int:
    axis = _axis(layer, shapes, axis)
    return int(shapes[0][axis])


def placeholder_specs(layer, shapes: Sequence[Shape]) -> list[tuple[Shape, float]]:
    """(shape, fill value) of each blob Caffe's LayerSetUp would allocate for `layer` on bottoms of `shapes`.

    A shape with a negative size (a negative dimension in the file) is refused naming the layer.
    """
    specs = _specs(layer, shapes)
    for shape, _ in specs:
        if any(d < 0 for d in shape):
            raise CaffeError(f"layer {layer.name!r} ({layer.type}): its parameter blob would have shape {shape}")
    return specs


def _specs(layer, shapes: Sequence[Shape]) -> list[tuple[Shape, float]]:
    kind = layer.type
    if kind in ("Convolution", "Deconvolution", "DepthwiseConvolution", "ConvolutionDepthwise"):
        param = layer.convolution_param
        axis = _axis(layer, shapes, param.axis if param.HasField("axis") else 1)
        channels = _channels(layer, shapes, axis)
        spatial = len(shapes[0]) - axis - 1
        kernel = _spatial(param, "kernel", spatial, 1)
        group = param.group or 1
        if kind == "ConvolutionDepthwise":  # one filter per channel, whatever num_output says
            return [((channels, 1, *kernel), 0.0)] + ([((channels,), 0.0)] if param.bias_term else [])
        if kind != "Deconvolution":
            weight = (param.num_output, channels // group, *kernel)
        else:
            weight = (channels, param.num_output // group, *kernel)
        return [(weight, 0.0)] + ([((param.num_output,), 0.0)] if param.bias_term else [])
    if kind == "InnerProduct":
        param = layer.inner_product_param
        axis = _axis(layer, shapes, param.axis if param.HasField("axis") else 1)
        inputs = math.prod(shapes[0][axis:])
        weight = (inputs, param.num_output) if param.transpose else (param.num_output, inputs)
        return [(weight, 0.0)] + ([((param.num_output,), 0.0)] if param.bias_term else [])
    if kind == "BatchNorm":
        channels = _channels(layer, shapes)
        from caffe2torch.layers.normalization import batch_norm_fork

        norm, fork = layer.batch_norm_param, batch_norm_fork(layer)
        # NVCaffe's and Intel Caffe's own scale and bias (blobs 3 and 4)
        affine = 2 if fork == "NVCaffe" else (norm.use_weight_bias + (norm.use_weight_bias and norm.bias_term)
                                              if fork == "Intel Caffe" else 0)
        return [((channels,), 0.0), ((channels,), 1.0), ((1,), 1.0)] + [((channels,), 1.0), ((channels,), 0.0)][:affine]
    if kind == "BN":
        channel_shape = (1, _channels(layer, shapes), 1, 1)
        from caffe2torch.layers.normalization import is_segnet_bn

        if is_segnet_bn(layer):  # SegNet's: scale and shift
            return [(channel_shape, 1.0), (channel_shape, 0.0)]
        return [(channel_shape, 1.0), (channel_shape, 0.0), (channel_shape, 0.0), (channel_shape, 1.0)]
    if kind == "PReLU":
        channels = 1 if layer.prelu_param.channel_shared else _channels(layer, shapes)
        return [((channels,), 0.25)]
    if kind == "Normalize" and layer.HasField("normalize_param"):  # happynear's: no blobs
        return []
    if kind == "Normalize":
        param = layer.norm_param
        filler = param.scale_filler
        value = filler.value if param.HasField("scale_filler") and filler.type == "constant" else 1.0
        return [((() if param.channel_shared else (_channels(layer, shapes),)), value)]
    if kind == "Embed":
        param = layer.embed_param
        return [((param.input_dim, param.num_output), 0.0)] + ([((param.num_output,), 0.0)] if param.bias_term else [])
    if kind == "Parameter":
        return [(tuple(int(d) for d in layer.parameter_param.shape.dim), 0.0)]
    if kind in ("Scale", "Bias") and len(shapes) == 1:
        return _scale_bias_specs(layer, shapes[0])
    if kind in ("LSTM", "RNN", "Lstm"):
        from caffe2torch.layers.recurrent import recurrent_blob_shapes

        return [(shape, 0.0) for shape in recurrent_blob_shapes(layer, shapes)]
    if kind == "DenseBlock":
        from caffe2torch.layers.text import dense_block_blob_shapes

        return [(shape, 0.0) for shape in dense_block_blob_shapes(layer, shapes)]
    # Every other type has no parameters.
    return []


def placeholder_blobs(layer, shapes: Sequence[Shape]) -> list[np.ndarray]:
    """Blobs of the shapes Caffe's LayerSetUp would allocate for `layer`, filled with zeros (or identity)."""
    return [np.full(shape, value, np.float32) for shape, value in placeholder_specs(layer, shapes)]


def placeholder_bytes(layer, shapes: Sequence[Shape]) -> int:
    """What `placeholder_blobs` would allocate, without allocating it."""
    return 4 * sum(math.prod(shape) for shape, _ in placeholder_specs(layer, shapes))


def _scale_bias_specs(layer, shape: Shape) -> list[tuple[Shape, float]]:
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
        return [(blob, 0.0)]
    return [(blob, 1.0)] + ([(blob, 0.0)] if param.bias_term else [])
