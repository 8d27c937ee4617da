"""Converter for Caffe's Eltwise layer (SUM with coefficients, PROD, MAX over two or more bottoms)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from caffe2torch.errors import CaffeError
from caffe2torch.layers.registry import Converted, Shape, converter, expect_blobs
from caffe2torch.modules import Eltwise
from proto import caffe_pb2


@converter("Eltwise")
def convert_eltwise(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    expect_blobs(layer, blobs, 0)
    if len(inputs) < 2:
        raise CaffeError(f"layer {layer.name!r} (Eltwise): needs at least 2 bottoms, got {len(inputs)}")
    first = tuple(inputs[0])
    for index, shape in enumerate(inputs[1:], start=1):
        if tuple(shape) != first:
            raise CaffeError(
                f"layer {layer.name!r} (Eltwise): bottom {index} has shape {tuple(shape)}, bottom 0 has {first}"
            )
    param = layer.eltwise_param
    coeffs = list(param.coeff)
    if coeffs and len(coeffs) != len(inputs):
        raise CaffeError(
            f"layer {layer.name!r} (Eltwise): {len(coeffs)} coefficients for {len(inputs)} bottoms "
            f"(one per bottom or none)"
        )
    operation = param.operation
    if operation == caffe_pb2.EltwiseParameter.SUM:
        # Caffe's coefficients are float32 values.
        module = Eltwise("SUM", tuple(float(np.float32(c)) for c in coeffs) or (1.0,) * len(inputs))
    elif operation == caffe_pb2.EltwiseParameter.PROD:
        if coeffs:
            raise CaffeError(f"layer {layer.name!r} (Eltwise): coefficients are only allowed for SUM, not PROD")
        module = Eltwise("PROD")
    elif operation == caffe_pb2.EltwiseParameter.MAX:
        module = Eltwise("MAX")  # Caffe accepts and ignores coefficients for MAX
    else:
        raise CaffeError(f"layer {layer.name!r} (Eltwise): unknown operation {operation}")
    return Converted(module, [first])
