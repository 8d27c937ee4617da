"""A plugin converter as a user would write one (README 'Plugins'): MobileNetV3 forks' HSwish, x * relu6(x + 3) / 6,
and a Python layer that scales by its param_str."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

import caffe2torch


class HSwish(nn.Module):
    """x * relu6(x + 3) / 6; no arguments, so `extra_repr` is empty and model.py rebuilds it as HSwish()."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.relu6(x + 3.0) / 6.0


class Scaled(nn.Module):
    """x * factor; `extra_repr` is the constructor's arguments, so model.py can rebuild it."""

    def __init__(self, factor: float = 1.0) -> None:
        super().__init__()
        self.factor = float(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor!r}"


def register() -> None:
    @caffe2torch.register_converter("HSwish", replace=True)
    def hswish(layer, inputs, blobs):
        if len(inputs) != 1 or blobs:
            raise caffe2torch.CaffeError(f"layer {layer.name!r} (HSwish): one bottom and no blobs")
        return caffe2torch.Converted(HSwish(), [tuple(inputs[0])])

    @caffe2torch.register_converter("Python:rpn.scale_layer.ScaleLayer", replace=True)
    def scale_by_param_str(layer, inputs, blobs):  # a Python layer, told apart by module.layer
        factor = float(layer.python_param.param_str or "1")
        return caffe2torch.Converted(Scaled(factor), [tuple(inputs[0])])
