"""Converter for Caffe's Eltwise layer (SUM with coefficients, PROD, MAX over two or more bottoms)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from proto import caffe_pb2
from caffe2torch.errors import CaffeError
from caffe2torch.layers.registry import Converted, Shape, converter, expect_blobs


class EltwiseSum(nn.Module):
    """y = 0; y += coeff_i * x_i in bottom order, in float32, as Caffe's caffe_set + caffe_axpy loop."""

    def __init__(self, coeffs: Sequence[float]) -> None:
        super().__init__()
        self.coeffs = [float(c) for c in coeffs]

    def forward(self, *bottoms: torch.Tensor) -> torch.Tensor:
        # Starting from an explicit 0 (not from the first bottom) keeps Caffe's 0 + (-0) = +0.
        total = torch.zeros_like(bottoms[0])
        for coeff, bottom in zip(self.coeffs, bottoms):
            # add with alpha fuses coeff * x + y like BLAS axpy; with coeff 1 it is a plain sum.
            total.add_(bottom, alpha=coeff)
        return total

    def extra_repr(self) -> str:
        return f"coeffs={self.coeffs}"


class EltwiseProd(nn.Module):
    """Product of the bottoms, multiplied in bottom order."""

    def forward(self, *bottoms: torch.Tensor) -> torch.Tensor:
        product = bottoms[0] * bottoms[1]
        for bottom in bottoms[2:]:
            product = product * bottom
        return product


class EltwiseMax(nn.Module):
    """Maximum of the bottoms with Caffe's comparisons, which decide where NaNs end up.

    Caffe takes a > b ? a : b for the first two bottoms, then keeps the running value unless a later
    bottom is strictly greater; torch.maximum would propagate every NaN instead.
    """

    def forward(self, *bottoms: torch.Tensor) -> torch.Tensor:
        first, second = bottoms[0], bottoms[1]
        running = torch.where(first > second, first, second)
        for bottom in bottoms[2:]:
            running = torch.where(bottom > running, bottom, running)
        return running


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
        module: nn.Module = EltwiseSum([float(np.float32(c)) for c in coeffs] or [1.0] * len(inputs))
    elif operation == caffe_pb2.EltwiseParameter.PROD:
        if coeffs:
            raise CaffeError(f"layer {layer.name!r} (Eltwise): coefficients are only allowed for SUM, not PROD")
        module = EltwiseProd()
    elif operation == caffe_pb2.EltwiseParameter.MAX:
        # Caffe accepts and ignores coefficients for MAX.
        module = EltwiseMax()
    else:
        raise CaffeError(f"layer {layer.name!r} (Eltwise): unknown operation {operation}")
    return Converted(module, [first])
