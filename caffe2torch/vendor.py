"""Torch modules for NVCaffe (NVIDIA/caffe caffe-0.17) and Intel Caffe (intel/caffe) layers where no torch module
computes the same (DeconvNet's Unpooling is caffe2torch.forks.Unpooling).

The same contract as caffe2torch.modules (torch only, and caffe2torch.errors, so a standalone `model.py` can embed
them; `extra_repr` is the constructor's keyword arguments). Each
follows its fork's forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from caffe2torch.modules import _kwargs


class ScaledELU(nn.Module):
    """NVCaffe's ELU with `lambda`: lambda * (max(x, 0) + alpha * (exp(min(x, 0)) - 1))."""

    def __init__(self, alpha: float = 1.0, scale: float = 1.0) -> None:
        super().__init__()
        self.alpha, self.scale = float(alpha), float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(x, self.alpha) * self.scale

    def extra_repr(self) -> str:
        return _kwargs(alpha=self.alpha, scale=self.scale)


class ReLUMask(nn.Module):
    """DeconvNet's ReLU with a second top: the ReLU, and a mask of 1 where the value is above 0, else 0.

    The fork writes the output before it reads the value for the mask, so in place (`in_place`) the mask is of the
    output, otherwise of the input; the two differ only for a negative slope below 0.
    """

    def __init__(self, negative_slope: float = 0.0, in_place: bool = False) -> None:
        super().__init__()
        self.negative_slope, self.in_place = float(negative_slope), bool(in_place)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = F.leaky_relu(x, self.negative_slope) if self.negative_slope else torch.relu(x)
        return y, ((y if self.in_place else x) > 0).to(x.dtype)

    def extra_repr(self) -> str:
        return _kwargs(negative_slope=self.negative_slope, in_place=self.in_place)


class FlattenConcat(nn.Module):
    """Intel Caffe's Concat with `per_fla_fuse` (its MKL-DNN engine, axis 1): each bottom flattened from axis 1 (its
    C x H x W values in memory order) and concatenated there, the axes after 1 kept as 1 (SSD's mbox heads without
    their Flatten layers)."""

    def __init__(self, rank: int = 4) -> None:
        super().__init__()
        self.rank = int(rank)

    def forward(self, *bottoms: torch.Tensor) -> torch.Tensor:
        y = torch.cat([b.flatten(1) for b in bottoms], dim=1)
        return y[(...,) + (None,) * (self.rank - 2)]

    def extra_repr(self) -> str:
        return _kwargs(rank=self.rank)


class ConvSum(nn.Module):
    """Intel Caffe's convolution with SUM_FUSION and two bottoms (its MKL-DNN engine): conv(bottom 0) + bottom 1,
    then the fused ReLU (`negative_slope`) when `relu`. (`coeff` scales only its int8 path.)"""

    def __init__(self, inner: nn.Module, relu: bool = False, negative_slope: float = 0.0) -> None:
        super().__init__()
        self.inner = inner
        self.relu, self.negative_slope = bool(relu), float(negative_slope)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        y = self.inner(x) + residual
        if not self.relu:
            return y
        return F.leaky_relu(y, self.negative_slope) if self.negative_slope else torch.relu(y)

    def extra_repr(self) -> str:
        return _kwargs(relu=self.relu, negative_slope=self.negative_slope)
