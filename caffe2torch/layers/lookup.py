"""Converters for layers that hand out stored or indexed values: Embed, Parameter and BatchReindex."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from caffe2torch.bvlc import BatchReindex, Embed, ParameterBlob
from caffe2torch.errors import CaffeError
from caffe2torch.layers.convolution import fit_blob
from caffe2torch.layers.registry import Converted, Shape, assign, converter, expect_blobs, expect_bottoms, on_meta


@converter("Embed")
def convert_embed(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """A row of the [input_dim, num_output] weight per input value (an integer index), plus the bias."""
    expect_bottoms(layer, inputs, 1)
    param = layer.embed_param
    if param.num_output <= 0 or param.input_dim <= 0:
        raise CaffeError(f"layer {layer.name!r} (Embed): num_output and input_dim must be positive")
    expect_blobs(layer, blobs, 1 + bool(param.bias_term))
    weight = fit_blob(layer, "weight blob", blobs[0], [param.input_dim, param.num_output])
    bias = fit_blob(layer, "bias blob", blobs[1], [param.num_output]) if param.bias_term else None
    module = assign(on_meta(Embed, param.input_dim, param.num_output, bias=bool(param.bias_term)),
                    weight=weight, bias=bias)
    return Converted(module, [tuple(inputs[0]) + (int(param.num_output),)])


@converter("Parameter")
def convert_parameter(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """No bottom; the top is the layer's one blob, of parameter_param's shape."""
    expect_bottoms(layer, inputs, 0)
    shape = tuple(int(d) for d in layer.parameter_param.shape.dim)
    if not shape or min(shape) <= 0:
        raise CaffeError(f"layer {layer.name!r} (Parameter): parameter_param needs a shape of positive sizes, "
                         f"got {shape}")
    expect_blobs(layer, blobs, 1)
    value = fit_blob(layer, "blob", blobs[0], shape)
    return Converted(assign(on_meta(ParameterBlob, shape), value=value), [shape])


@converter("BatchReindex")
def convert_batch_reindex(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """Rows of the first bottom picked by the values of the second (a vector of indices)."""
    expect_bottoms(layer, inputs, 2)
    expect_blobs(layer, blobs, 0)
    data, permutation = tuple(inputs[0]), tuple(inputs[1])
    if len(permutation) != 1:
        raise CaffeError(f"layer {layer.name!r} (BatchReindex): the indices must be a vector, got {permutation}")
    return Converted(BatchReindex(), [permutation + data[1:]])
