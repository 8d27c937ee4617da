"""Torch modules for NVCaffe (NVIDIA/caffe caffe-0.17), Intel Caffe (intel/caffe) and DeconvNet / DecoupledNet
(HyeonwooNoh/caffe) layers where no torch module computes the same.

The same contract as caffe2torch.modules (torch only, and caffe2torch.errors, so a standalone `model.py` can embed
them; `extra_repr` is the constructor's keyword arguments; sizes are read in `torch.fx.wrap` functions). Each
follows its fork's forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from caffe2torch.forks import max_unpool
from caffe2torch.modules import TableCache, _kwargs, dims


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


def unpooled_size(size: tuple, kernel: tuple, stride: tuple) -> tuple:
    """DeconvNet's unpooled size when none is given: max((h - 1) * s + k, h * s + 1) per axis (its pad is 0)."""
    return tuple(max((n - 1) * s + k, n * s + 1) for n, k, s in zip(size, kernel, stride))


def _unpool_table(size: tuple, out: tuple, stride: tuple, device) -> torch.Tensor:
    """MAX unpooling without a mask: for each output position, the last input (in the fork's loop order) placed
    there (at its window's corner, clipped into the output), or -1."""
    rows = torch.clamp(torch.arange(size[0], device=device) * stride[0], max=out[0] - 1)
    cols = torch.clamp(torch.arange(size[1], device=device) * stride[1], max=out[1] - 1)
    target = (rows[:, None] * out[1] + cols[None, :]).reshape(-1)
    source = torch.full((out[0] * out[1],), -1, dtype=torch.long, device=device)
    # scatter_reduce's amax keeps the last (largest) source index of each target, as the fork's loop does.
    return source.scatter_reduce(0, target, torch.arange(target.numel(), device=device), reduce="amax")


@torch.fx.wrap
def deconvnet_unpool(x: torch.Tensor, mask: torch.Tensor | None, method: str, kernel: tuple, stride: tuple,
                     size: tuple | None, layer: str = "") -> torch.Tensor:
    h, w = dims(x, -2, -1)
    out = size if size is not None else unpooled_size((h, w), kernel, stride)
    if method == "MAX" and mask is not None:
        return max_unpool(x, mask, out, layer, "Unpooling")
    if method == "MAX":
        n, c = x.shape[:2]
        source = TableCache.get(("deconvnet_unpool", (h, w), out, stride, x.device),
                                lambda: _unpool_table((h, w), out, stride, x.device), x, h, w)
        flat = torch.cat([x.reshape(n, c, -1), x.new_zeros(n, c, 1)], dim=2)  # -1: the zero at the end
        return flat[:, :, source].reshape(n, c, out[0], out[1])
    # AVE spreads each value over its window divided by the window's size within the output (clipped), TILE copies
    # it: a transposed convolution with a kernel of ones, cut (or zero-padded) to the output size.
    c = x.shape[1]
    if method == "AVE":
        rows = torch.clamp(torch.arange(h, device=x.device) * stride[0] + kernel[0], max=out[0]) \
            - torch.arange(h, device=x.device) * stride[0]
        cols = torch.clamp(torch.arange(w, device=x.device) * stride[1] + kernel[1], max=out[1]) \
            - torch.arange(w, device=x.device) * stride[1]
        x = x / (rows[:, None] * cols[None, :]).to(x.dtype)
    ones = x.new_ones(c, 1, kernel[0], kernel[1])
    y = F.conv_transpose2d(x, ones, stride=stride, groups=c)
    full_h, full_w = (h - 1) * stride[0] + kernel[0], (w - 1) * stride[1] + kernel[1]
    return F.pad(y, (0, out[1] - full_w, 0, out[0] - full_h))


class Unpool(nn.Module):
    """DeconvNet / DecoupledNet's Unpooling (unpooling_layer.cpp; its pad must be 0).

    MAX with a mask (MAX pooling's second top): each value written at its mask index, as SegNet's Upsample; MAX
    without one: at its window's corner, clipped into the output. AVE adds each value divided by its window's size
    (clipped at the output's far edge) over its window; TILE adds it unchanged. The output is `size`, else
    max((h - 1) * stride + kernel, h * stride + 1) per axis. The fork's AVE and TILE add onto its top without clearing
    it: the result of its first forward (onto zeros) is reproduced; and it works the size out at its first Reshape
    only (here: for each input).
    """

    def __init__(self, method: str = "MAX", kernel: tuple = (2, 2), stride: tuple = (2, 2), size: tuple | None = None,
                 layer: str = "") -> None:
        super().__init__()
        self.method, self.layer = str(method), str(layer)
        self.kernel, self.stride = tuple(int(k) for k in kernel), tuple(int(s) for s in stride)
        self.size = None if size is None else tuple(int(n) for n in size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return deconvnet_unpool(x, mask, self.method, self.kernel, self.stride, self.size, self.layer)

    def extra_repr(self) -> str:
        return _kwargs(method=self.method, kernel=self.kernel, stride=self.stride, size=self.size, layer=self.layer)
