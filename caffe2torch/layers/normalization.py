"""Converters for BatchNorm, the fork's BN, Scale, Bias and LRN, computed in Caffe's order of float32 operations."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from caffe2torch.errors import CaffeError
from caffe2torch.layers.convolution import fit_blob
from caffe2torch.layers.pooling import AVE, PoolGeometry, caffe_pool2d, pooled_size
from caffe2torch.layers.registry import Converted, Shape, canonical_axis, converter, expect_blobs, expect_bottoms
from proto import caffe_pb2


def _channel_view(values: torch.Tensor, rank: int) -> torch.Tensor:
    """Per-channel values shaped to broadcast along axis 1 of a blob of the given rank."""
    return values.reshape((-1,) + (1,) * max(rank - 2, 0))


def _as_float32(value: float) -> float:
    """A proto float as the float32 Caffe holds (Python would otherwise keep the double)."""
    return float(np.float32(value))


class CaffeBatchNorm(nn.Module):
    """Standard Caffe BatchNorm with stored statistics: y = (x - mean/s) / sqrt(var/s + eps)."""

    def __init__(self, mean: torch.Tensor, variance: torch.Tensor, scale_factor: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("variance", variance)
        self.register_buffer("scale_factor", scale_factor)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stored = self.scale_factor[0]
        # Caffe's guard: a zero scale factor (never-updated statistics) gives factor 0, not inf.
        factor = torch.where(stored == 0, torch.zeros_like(stored), 1 / stored)
        mean = factor * self.mean
        # Square root in double, rounded once: the correctly rounded float32 result Caffe's libm
        # gives (PyTorch's float32 CPU sqrt can be 1 ulp off).
        std = torch.sqrt((factor * self.variance + self.eps).double()).float()
        centred = x - _channel_view(mean, x.dim())
        return centred.div_(_channel_view(std, x.dim()))


@converter("BatchNorm")
def convert_batch_norm(layer, inputs: list[Shape], blobs: list[np.ndarray]) -> Converted:
    expect_bottoms(layer, inputs, 1)
    param = layer.batch_norm_param
    if param.HasField("use_global_stats") and not param.use_global_stats:
        raise CaffeError(
            f"layer {layer.name!r} (BatchNorm): use_global_stats: false normalises with batch statistics "
            f"at test time; not supported (remove it to use the stored statistics)"
        )
    shape = tuple(inputs[0])
    channels = 1 if len(shape) == 1 else shape[1]
    warnings = []
    if not blobs:
        # Caffe's initial blobs are all zero; the scale factor 0 then means mean 0 and variance 0.
        blobs = [np.zeros(channels, np.float32), np.zeros(channels, np.float32), np.zeros(1, np.float32)]
        warnings.append("has no weights; using Caffe's zero statistics")
    expect_blobs(layer, blobs, 3)
    module = CaffeBatchNorm(
        fit_blob(layer, "mean blob", blobs[0], [channels]),
        fit_blob(layer, "variance blob", blobs[1], [channels]),
        fit_blob(layer, "scale factor blob", blobs[2], [1]),
        _as_float32(param.eps),
    )
    return Converted(module, [shape], warnings)


class CaffeBN(nn.Module):
    """The PSPNet fork's BN in TEST phase: y = ((x - mean) * (var + eps)^-0.5) * slope + bias."""

    def __init__(self, slope: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, variance: torch.Tensor,
                 eps: float) -> None:
        super().__init__()
        self.slope = nn.Parameter(slope)
        self.bias = nn.Parameter(bias)
        self.register_buffer("mean", mean)
        self.register_buffer("variance", variance)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rank = x.dim()
        inv_std = torch.pow((self.variance + self.eps).double(), -0.5).float()  # powf, rounded once
        normalised = (x - _channel_view(self.mean, rank)).mul_(_channel_view(inv_std, rank))
        slope, bias = _channel_view(self.slope, rank), _channel_view(self.bias, rank)
        if torch.is_grad_enabled():  # autograd needs the pre-slope values kept for the slope's gradient
            return normalised * slope + bias
        # In place on big activations: same float32 operations in Caffe's order, fewer temporaries.
        return normalised.mul_(slope).add_(bias)


@converter("BN")
def convert_bn(layer, inputs: list[Shape], blobs: list[np.ndarray]) -> Converted:
    expect_bottoms(layer, inputs, 1)
    expect_blobs(layer, blobs, 4)
    shape = tuple(inputs[0])
    if not 2 <= len(shape) <= 4:
        raise CaffeError(f"layer {layer.name!r} (BN): input must have 2 to 4 axes, got {shape}")
    expected = [1, shape[1], 1, 1]
    slope, bias, mean, variance = (
        fit_blob(layer, f"{what} blob", blob, expected).reshape(-1)
        for what, blob in zip(("slope", "bias", "mean", "variance"), blobs)
    )
    return Converted(CaffeBN(slope, bias, mean, variance, _as_float32(layer.bn_param.eps)), [shape])


def _filled(layer, what: str, filler, has_filler: bool, default: float, shape: Sequence[int]) -> np.ndarray:
    """The initial blob Caffe makes when the weights file has none: only constant fillers are reproducible."""
    if has_filler and filler.type != "constant":
        raise CaffeError(
            f"layer {layer.name!r} ({layer.type}): no {what} in the weights and its {filler.type!r} filler "
            f"is random; only constant fillers can be reproduced"
        )
    value = filler.value if has_filler else default
    return np.full(tuple(shape), value, dtype=np.float32)


def _blob_shape(layer, shape: Shape, axis: int, num_axes: int) -> tuple[int, ...]:
    """Shape of a learned Scale/Bias blob: bottom axes axis .. axis+num_axes (-1: to the end)."""
    axis = canonical_axis(layer, axis, len(shape))
    if num_axes < -1:
        raise CaffeError(f"layer {layer.name!r} ({layer.type}): num_axes must be >= -1, got {num_axes}")
    if num_axes >= 0 and axis + num_axes > len(shape):
        raise CaffeError(
            f"layer {layer.name!r} ({layer.type}): {num_axes} axes from axis {axis} extend past a {shape} bottom"
        )
    return tuple(shape[axis:]) if num_axes == -1 else tuple(shape[axis:axis + num_axes])


def _broadcast_axis(layer, shape: Shape, operand: Shape, axis: int, what: str) -> int:
    """Caffe's Reshape check: the operand must equal the bottom's axes from `axis` (axis 0 for a scalar)."""
    axis = 0 if len(operand) == 0 else canonical_axis(layer, axis, len(shape))
    if tuple(shape[axis:axis + len(operand)]) != tuple(operand):
        raise CaffeError(
            f"layer {layer.name!r} ({layer.type}): {what} of shape {tuple(operand)} does not match "
            f"bottom shape {tuple(shape)} from axis {axis}"
        )
    return axis


class CaffeScaleBias(nn.Module):
    """Scale (y = x * s [+ b]) or Bias (y = x + b); s or b may come from a second bottom.

    Each operand covers bottom axes axis .. axis+ndim and is broadcast over the others.
    """

    def __init__(self, scale: torch.Tensor | None, scale_axis: int | None, bias: torch.Tensor | None,
                 bias_axis: int | None, operand_from_bottom: str | None) -> None:
        super().__init__()
        self.scale = nn.Parameter(scale) if scale is not None else None
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.scale_axis, self.bias_axis = scale_axis, bias_axis
        self.operand_from_bottom = operand_from_bottom  # "scale", "bias" or None

    @staticmethod
    def _view(operand: torch.Tensor, axis: int, rank: int) -> torch.Tensor:
        return operand.reshape(tuple(operand.shape) + (1,) * (rank - axis - operand.dim()))

    def forward(self, x: torch.Tensor, operand: torch.Tensor | None = None) -> torch.Tensor:
        scale = operand if self.operand_from_bottom == "scale" else self.scale
        bias = operand if self.operand_from_bottom == "bias" else self.bias
        if self.scale_axis is not None:
            x = x * self._view(scale, self.scale_axis, x.dim())
            if self.bias_axis is not None and not torch.is_grad_enabled():
                return x.add_(self._view(bias, self.bias_axis, x.dim()))  # fresh tensor: add in place
        if self.bias_axis is not None:
            x = x + self._view(bias, self.bias_axis, x.dim())
        return x


@converter("Scale")
def convert_scale(layer, inputs: list[Shape], blobs: list[np.ndarray]) -> Converted:
    expect_bottoms(layer, inputs, 1, 2)
    param = layer.scale_param
    shape = tuple(inputs[0])
    two_bottoms = len(inputs) == 2
    scale_shape = tuple(inputs[1]) if two_bottoms else _blob_shape(layer, shape, param.axis, param.num_axes)
    bias_num_axes = len(inputs[1]) if two_bottoms else param.num_axes
    bias_shape = _blob_shape(layer, shape, param.axis, bias_num_axes) if param.bias_term else None
    wanted = (0 if two_bottoms else 1) + bool(param.bias_term)
    warnings = []
    if not blobs and wanted:
        blobs = [] if two_bottoms else [
            _filled(layer, "scale", param.filler, param.HasField("filler"), 1.0, scale_shape)
        ]
        if param.bias_term:
            blobs.append(_filled(layer, "bias", param.bias_filler, param.HasField("bias_filler"), 0.0, bias_shape))
        warnings.append("has no weights; using its constant fillers")
    expect_blobs(layer, blobs, wanted)
    scale = None if two_bottoms else fit_blob(layer, "scale blob", blobs[0], scale_shape)
    scale_axis = _broadcast_axis(layer, shape, scale_shape, param.axis, "scale")
    bias, bias_axis = None, None
    if param.bias_term:
        bias = fit_blob(layer, "bias blob", blobs[-1], bias_shape)
        bias_axis = _broadcast_axis(layer, shape, bias_shape, param.axis, "bias")
    module = CaffeScaleBias(scale, scale_axis, bias, bias_axis, "scale" if two_bottoms else None)
    return Converted(module, [shape], warnings)


@converter("Bias")
def convert_bias(layer, inputs: list[Shape], blobs: list[np.ndarray]) -> Converted:
    expect_bottoms(layer, inputs, 1, 2)
    param = layer.bias_param
    shape = tuple(inputs[0])
    warnings = []
    if len(inputs) == 2:
        expect_blobs(layer, blobs, 0)
        axis = _broadcast_axis(layer, shape, tuple(inputs[1]), param.axis, "bias")
        return Converted(CaffeScaleBias(None, None, None, axis, "bias"), [shape])
    bias_shape = _blob_shape(layer, shape, param.axis, param.num_axes)
    if not blobs:
        blobs = [_filled(layer, "bias", param.filler, param.HasField("filler"), 0.0, bias_shape)]
        warnings.append("has no weights; using its constant filler")
    expect_blobs(layer, blobs, 1)
    bias = fit_blob(layer, "bias blob", blobs[0], bias_shape)
    axis = _broadcast_axis(layer, shape, bias_shape, param.axis, "bias")
    return Converted(CaffeScaleBias(None, None, bias, axis, None), [shape], warnings)


class CaffeLRN(nn.Module):
    """Caffe LRN.

    ACROSS_CHANNELS: y = x * (k + alpha/size * sum of x^2 over `size` centred channels)^-beta.
    WITHIN_CHANNEL: y = x * (1 + alpha * A)^-beta, A = Caffe AVE pooling of x^2 (kernel size,
    stride 1, pad (size-1)/2; padded zeros count in the divisor); k is not used there.
    """

    def __init__(self, size: int, alpha: float, beta: float, k: float, across_channels: bool) -> None:
        super().__init__()
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k
        self.across_channels = across_channels
        self.alpha_over_size = _as_float32(np.float32(alpha) / np.float32(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squares = x * x
        half = (self.size - 1) // 2
        if self.across_channels:
            # Zero channels on both sides (as Caffe's padded_square); pooling's own padding
            # would refuse a window wider than the channel count.
            padded = F.pad(squares, (0, 0, 0, 0, half, half)).unsqueeze(1)
            window_sums = F.avg_pool3d(padded, (self.size, 1, 1), stride=1, divisor_override=1).squeeze(1)
            return torch.pow(window_sums * self.alpha_over_size + self.k, -self.beta) * x
        size = (int(x.shape[-2]), int(x.shape[-1]))
        out = tuple(pooled_size(n, self.size, 1, half, half > 0) for n in size)
        geometry = PoolGeometry((self.size,) * 2, (1, 1), (half, half), out, size)
        averages = caffe_pool2d(squares, AVE, geometry)
        return x * torch.pow(averages * self.alpha + 1, -self.beta)


@converter("LRN")
def convert_lrn(layer, inputs: list[Shape], blobs: list[np.ndarray]) -> Converted:
    expect_bottoms(layer, inputs, 1)
    expect_blobs(layer, blobs, 0)
    param = layer.lrn_param
    shape = tuple(inputs[0])
    if len(shape) != 4:
        raise CaffeError(f"layer {layer.name!r} (LRN): input must have 4 axes (N, C, H, W), got {shape}")
    if param.local_size % 2 != 1:
        raise CaffeError(f"layer {layer.name!r} (LRN): local_size must be odd, got {param.local_size}")
    across = param.norm_region == caffe_pb2.LRNParameter.ACROSS_CHANNELS
    module = CaffeLRN(int(param.local_size), _as_float32(param.alpha), _as_float32(param.beta),
                      _as_float32(param.k), across)
    return Converted(module, [shape])
