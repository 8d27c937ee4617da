"""Torch modules for BVLC layer types no torch module means exactly: Clip, Swish, Tile, Reduction, Im2col, MVN, SPP,
Embed, Parameter, BatchReindex.

The same contract as caffe2torch.modules (torch only, so a standalone `model.py` can embed them;
`extra_repr` is the constructor's keyword arguments). Each follows BVLC Caffe's CPU forward.
"""

from __future__ import annotations

import torch
from torch import nn

from caffe2torch.modules import _concrete, _float32_if_half, _kwargs, add_epsilon, caffe_pool2d, dims


class Clip(nn.Module):
    """clip_layer.cpp: std::max(min, std::min(x, max)), which makes NaN `min` (torch.clamp keeps NaN)."""

    def __init__(self, min: float, max: float) -> None:
        super().__init__()
        self.min, self.max = float(min), float(max)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Bounds as tensors of x's dtype: a bound past float16's range becomes +-inf there, as a cast would.
        low, high = x.new_tensor(self.min), x.new_tensor(self.max)
        return torch.where(torch.isnan(x), low, torch.clamp(x, low, high))

    def extra_repr(self) -> str:
        return _kwargs(min=self.min, max=self.max)


class Swish(nn.Module):
    """swish_layer.cpp: x * sigmoid(beta * x) (beta 1 is nn.SiLU)."""

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = float(beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x * self.beta)

    def extra_repr(self) -> str:
        return _kwargs(beta=self.beta)


class Tile(nn.Module):
    """tile_layer.cpp: the axes from `axis` on, repeated `tiles` times along `axis`."""

    def __init__(self, axis: int, tiles: int) -> None:
        super().__init__()
        self.axis, self.tiles = int(axis), int(tiles)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        repeats = [1] * x.dim()
        repeats[self.axis] = self.tiles
        return x.repeat(repeats)

    def extra_repr(self) -> str:
        return _kwargs(axis=self.axis, tiles=self.tiles)


class Reduction(nn.Module):
    """reduction_layer.cpp: each slice from `axis` on reduced to one value (SUM, ASUM, SUMSQ or MEAN), times
    `coeff` (MEAN: coeff / count of the input it gets, in float32 as the layer's Reshape stores it). The top keeps
    the axes before `axis`."""

    def __init__(self, operation: str, axis: int, coeff: float) -> None:
        super().__init__()
        if operation not in ("SUM", "ASUM", "SUMSQ", "MEAN"):
            raise ValueError(f"unknown reduction {operation!r}")
        self.operation, self.axis, self.coeff = operation, int(axis), float(coeff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return caffe_reduction(x, self.operation, self.axis, self.coeff)

    def extra_repr(self) -> str:
        return _kwargs(operation=self.operation, axis=self.axis, coeff=self.coeff)


def _float32_quotient(numerator: float, count):
    """float32(numerator) / float32(count), rounded once to float32 as Caffe's Dtype arithmetic: a Python float
    holding that float32 value (a tensor where the count is symbolic)."""
    quotient = torch.tensor(numerator, dtype=torch.float32) / torch.full((), count, dtype=torch.float32)
    return float(quotient) if _concrete(count) else quotient


@torch.fx.wrap
def caffe_reduction(x: torch.Tensor, operation: str, axis: int, coeff: float) -> torch.Tensor:
    flat = _float32_if_half(x).reshape(x.shape[:axis] + (-1,))  # half precision sums in float32, then back
    if operation == "ASUM":
        flat = flat.abs()
    elif operation == "SUMSQ":
        flat = flat * flat
    total = flat.sum(-1)
    if operation == "MEAN":
        count = 1
        for n in dims(x, *range(axis, x.dim())):
            count = count * n
        coeff = _float32_quotient(coeff, count)
    return (total * coeff if not _concrete(coeff) or coeff != 1.0 else total).to(x.dtype)


class Im2col(nn.Module):
    """im2col_layer.cpp (2-D, axis 1): each output position's patch as channels (C slowest, then kernel rows and
    columns), [N, C * kh * kw, out_h, out_w], out sized from the input it gets as a convolution's."""

    def __init__(self, kernel: tuple, stride: tuple, pad: tuple, dilation: tuple) -> None:
        super().__init__()
        self.kernel, self.stride, self.pad, self.dilation = (tuple(int(v) for v in t)
                                                             for t in (kernel, stride, pad, dilation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return caffe_im2col(x, self.kernel, self.stride, self.pad, self.dilation)

    def extra_repr(self) -> str:
        return _kwargs(kernel=self.kernel, stride=self.stride, pad=self.pad, dilation=self.dilation)


@torch.fx.wrap
def caffe_im2col(x: torch.Tensor, kernel: tuple, stride: tuple, pad: tuple, dilation: tuple) -> torch.Tensor:
    out = [(n + 2 * p - (d * (k - 1) + 1)) // s + 1 for n, k, s, p, d in zip(dims(x, 2, 3), kernel, stride, pad,
                                                                               dilation)]
    columns = nn.functional.unfold(x, kernel, dilation=dilation, padding=pad, stride=stride)
    return columns.unflatten(2, (out[0], out[1]))


class MVN(nn.Module):
    """mvn_layer.cpp: x - mean over each channel's plane (or each sample, `across_channels`); with
    `normalize_variance`, divided by sqrt(E[(x - mean)^2]) + eps (the biased variance, eps outside the root).
    The means are sums times float32(1 / count), count the plane (or sample) of the input it gets, as the
    layer's gemv."""

    def __init__(self, normalize_variance: bool, across_channels: bool, eps: float) -> None:
        super().__init__()
        self.normalize_variance, self.across_channels = bool(normalize_variance), bool(across_channels)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return caffe_mvn(x, self.normalize_variance, self.across_channels, self.eps)

    def extra_repr(self) -> str:
        return _kwargs(normalize_variance=self.normalize_variance, across_channels=self.across_channels,
                       eps=self.eps)


@torch.fx.wrap
def caffe_mvn(x: torch.Tensor, normalize_variance: bool, across_channels: bool, eps: float) -> torch.Tensor:
    axes = (1, 2, 3) if across_channels else (2, 3)
    count = 1
    for n in dims(x, *axes):
        count = count * n
    work = _float32_if_half(x)  # half precision: float32 sums (a plane's sum of squares overflows float16)
    # float32(1 / count), the double quotient rounded once (Caffe's Dtype(1. / dim))
    inverse = torch.full((), 1.0 / count, dtype=torch.float32, device=x.device).to(work.dtype)
    centred = work - work.sum(axes, keepdim=True) * inverse
    if normalize_variance:
        variance = (centred * centred).sum(axes, keepdim=True) * inverse
        centred = centred / add_epsilon(torch.sqrt(variance), eps)
    return centred.to(x.dtype)


def spp_level(size: int, level: int) -> tuple[int, int]:
    """spp_layer.cpp's GetPoolingParam along one axis: (kernel = stride, pad) for 2^level bins."""
    bins = 2 ** level
    kernel = (size + bins - 1) // bins  # a ceiling (of a non-negative size: no negative floor division to export)
    return kernel, (kernel * bins - size + 1) // 2


class SPP(nn.Module):
    """spp_layer.cpp: Caffe pooling at 1, 2, 4, ... bins per axis of the input it gets (kernel = stride =
    ceil(size / bins)), each flattened, concatenated on the channels; a pyramid of height 1 is the one pooling,
    unflattened ([N, C, 1, 1])."""

    # torch's pooling takes no symbolic window: an export keeps the height and width of its example
    fixed_export_sizes = "its pooling windows are worked out from the input's size"

    def __init__(self, method: str, pyramid_height: int) -> None:
        super().__init__()
        self.method, self.pyramid_height = method, int(pyramid_height)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return caffe_spp(x, self.method, self.pyramid_height)

    def extra_repr(self) -> str:
        return _kwargs(method=self.method, pyramid_height=self.pyramid_height)


@torch.fx.wrap
def caffe_spp(x: torch.Tensor, method: str, pyramid_height: int) -> torch.Tensor:
    pooled = []
    for level in range(pyramid_height):
        (kh, ph), (kw, pw) = (spp_level(n, level) for n in dims(x, -2, -1))
        if _concrete(kh, kw, ph, pw) and (ph and ph >= kh or pw and pw >= kw):  # PoolingLayer's CHECK_LT(pad, kernel)
            raise ValueError(f"SPP level {level} of a {x.shape[-2]} x {x.shape[-1]} input needs pad {(ph, pw)} with "
                             f"kernel {(kh, kw)}; Caffe refuses it")
        pooled.append(caffe_pool2d(x, method, (kh, kw), (kh, kw), (ph, pw), (ph, pw)))
    return pooled[0] if pyramid_height == 1 else torch.cat([p.flatten(1) for p in pooled], dim=1)


class Embed(nn.Module):
    """embed_layer.cpp: each input value, truncated to an integer, picks a row of `weight` [input_dim, num_output]
    (plus `bias`); the top gains a last axis of num_output."""

    def __init__(self, input_dim: int, num_output: int, bias: bool = True) -> None:
        super().__init__()
        self.input_dim, self.num_output = int(input_dim), int(num_output)
        self.weight = nn.Parameter(torch.empty(self.input_dim, self.num_output))
        self.register_parameter("bias", nn.Parameter(torch.empty(self.num_output)) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.embedding(x.long(), self.weight)
        return out + self.bias if self.bias is not None else out

    def extra_repr(self) -> str:
        return _kwargs(input_dim=self.input_dim, num_output=self.num_output, bias=self.bias is not None)


class ParameterBlob(nn.Module):
    """parameter_layer.hpp: a layer with no bottom whose top is its one (learnable) blob."""

    def __init__(self, shape: tuple) -> None:
        super().__init__()
        self.shape = tuple(int(d) for d in shape)
        self.value = nn.Parameter(torch.empty(self.shape))

    def forward(self) -> torch.Tensor:
        return self.value.clone()  # a tensor of its own, as a layer's output (in-place layers after it stay local)

    def extra_repr(self) -> str:
        return _kwargs(shape=self.shape)


class BatchReindex(nn.Module):
    """batch_reindex_layer.cpp: the rows of the first bottom at the indices of the second (truncated to integers)."""

    def forward(self, x: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
        return x.index_select(0, permutation.reshape(-1).long())
