"""A plugin converter as a user would write one (README 'Plugins'): Swish, y = x * sigmoid(beta * x)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import caffe2torch


class Swish(nn.Module):
    """x * sigmoid(beta * x); `extra_repr` is the constructor's arguments, so model.py can rebuild it."""

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        self.beta = float(beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.beta * x)

    def extra_repr(self) -> str:
        return f"beta={self.beta!r}"


def register() -> None:
    @caffe2torch.register_converter("Swish", replace=True)
    def swish(layer, inputs, blobs):
        if len(inputs) != 1 or blobs:
            raise caffe2torch.CaffeError(f"layer {layer.name!r} (Swish): one bottom and no blobs")
        return caffe2torch.Converted(Swish(float(np.float32(layer.swish_param.beta))), [tuple(inputs[0])])

    @caffe2torch.register_converter("Python:rpn.scale_layer.ScaleLayer", replace=True)
    def scale_by_param_str(layer, inputs, blobs):  # a Python layer, told apart by module.layer
        factor = float(layer.python_param.param_str or "1")
        return caffe2torch.Converted(Swish(factor), [tuple(inputs[0])])
