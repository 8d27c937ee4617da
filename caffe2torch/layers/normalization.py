"""Converters for BatchNorm, the fork's BN, Scale, Bias and LRN: torch's norm modules holding Caffe's statistics."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from caffe2torch.errors import CaffeError
from caffe2torch.forks import BatchStatNorm
from caffe2torch.layers.convolution import fit_blob
from caffe2torch.layers.registry import (Converted, Shape, assign, caffe_int, canonical_axis, converter,
                                         expect_blobs, expect_bottoms, image_shape, on_meta)
from caffe2torch.limits import check_top
from caffe2torch.modules import (AddOperand, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d,
                                 LRNAcrossChannels, LRNWithinChannel, Scale)
from proto import caffe_pb2

# Blob rank -> the torch norm module for it (normal, frozen); axis 1 holds the channels.
_NORMS = {2: (nn.BatchNorm1d, FrozenBatchNorm1d), 3: (nn.BatchNorm1d, FrozenBatchNorm1d),
          4: (nn.BatchNorm2d, FrozenBatchNorm2d), 5: (nn.BatchNorm3d, FrozenBatchNorm3d)}


def _as_float32(value: float) -> float:
    """A proto float as the float32 Caffe holds (Python would otherwise keep the double)."""
    return float(np.float32(value))


def _norm_module(layer, shape: Shape, frozen: bool, **options) -> nn.Module:
    if len(shape) not in _NORMS:
        raise CaffeError(f"layer {layer.name!r} ({layer.type}): input must have 2 to 5 axes (N, C, ...), got {shape}")
    if not options["eps"] >= 0:  # Caffe would take the square root of a negative variance: NaN everywhere
        raise CaffeError(f"layer {layer.name!r} ({layer.type}): eps must not be negative, got {options['eps']}")
    normal, frozen_kind = _NORMS[len(shape)]
    return on_meta(frozen_kind if frozen else normal, shape[1], **options)


def batch_norm_fork(param) -> str | None:
    """Which fork's BatchNorm the layer's fields say it is: "NVCaffe" (scale_bias or one of its fillers, which
    imply it), "Intel Caffe" (use_weight_bias, bias_term, relu, or an MKL engine), else None (BVLC's)."""
    norm = param.batch_norm_param
    if norm.scale_bias or norm.HasField("scale_filler") or norm.HasField("bias_filler"):
        return "NVCaffe"
    if any(norm.HasField(name) for name in ("use_weight_bias", "bias_term", "relu")) or norm.engine in (
            caffe_pb2.BatchNormParameter.MKL2017, caffe_pb2.BatchNormParameter.MKLDNN):
        return "Intel Caffe"
    return None


@converter("BatchNorm")
def convert_batch_norm(layer, inputs: list[Shape], blobs: list[np.ndarray]) -> Converted:
    """nn.BatchNorm (no affine: a Scale follows) with Caffe's mean = blobs[0]/s and var = blobs[1]/s.

    s = blobs[2][0], and a zero s (statistics never updated) gives factor 0, not inf, as in
    Caffe. `moving_average_fraction` becomes momentum 1 - fraction; `use_global_stats: true`
    keeps the stored statistics in training (a frozen module), `false` normalises with batch
    statistics at test time too (no running statistics).

    NVCaffe's (caffe-0.17 batch_norm_layer.cpp and its cuDNN twin; `scale_bias`, or either filler, which imply
    it): blobs 3 and 4 are a scale and a bias applied after normalising; at test time the stored mean and variance
    are used as they are (blobs[2] is never read), whatever use_global_stats says, and eps is at least 1e-5.
    Intel Caffe's (its default MKL-DNN engine, mkldnn_batch_norm_layer.cpp): blob 3 a scale when use_weight_bias
    (default true), blob 4 a bias when bias_term too, statistics divided by s as BVLC's, and `relu` a ReLU after it.
    """
    expect_bottoms(layer, inputs, 1)
    param = layer.batch_norm_param
    fork = batch_norm_fork(layer)
    shape = tuple(inputs[0])
    channels = shape[1] if len(shape) > 1 else 1
    scale_bias = {"NVCaffe": (True, True), "Intel Caffe": (param.use_weight_bias,
                                                          param.use_weight_bias and param.bias_term)}.get(fork)
    has_scale, has_bias = scale_bias or (False, False)
    warnings = []
    if not blobs:
        # Caffe's initial blobs: zero statistics (NVCaffe's factor 1), the scale and bias from their fillers.
        blobs = [np.zeros(channels, np.float32), np.zeros(channels, np.float32),
                 np.full(1, 1.0 if fork == "NVCaffe" else 0.0, np.float32)]
        # (Intel's scale filler is its field `filler`, which this schema does not read: its default, 1.)
        fillers = (("scale", "scale_filler" if fork == "NVCaffe" else None, 1.0), ("bias", "bias_filler", 0.0))
        for (what, name, default), wanted in zip(fillers, (has_scale, has_bias)):
            if wanted:
                given = name is not None and param.HasField(name)
                blobs.append(_filled(layer, what, getattr(param, name) if given else None, given, default,
                                     [channels]))
        warnings.append("has no weights; using Caffe's zero statistics")
    expect_blobs(layer, blobs, 3 + has_scale + has_bias)
    mean, variance = (fit_blob(layer, f"{what} blob", blob, [channels]) for what, blob in zip(("mean", "variance"), blobs))
    stored = fit_blob(layer, "scale factor blob", blobs[2], [1])
    affine = {}
    if has_scale:
        affine["weight"] = fit_blob(layer, "scale blob", blobs[3], [channels])
        affine["bias"] = fit_blob(layer, "bias blob", blobs[4], [channels]) if has_bias else torch.zeros(channels)
    eps = _as_float32(param.eps)
    if fork == "NVCaffe":
        factor, batch_statistics = torch.ones(1), False
        eps = max(eps, _as_float32(1e-5))  # std::max<float>(param.eps(), 0.00001f)
    else:
        # Caffe scales the stored sums by the factor in float32.
        factor = torch.where(stored == 0, torch.zeros_like(stored), 1 / stored)
        batch_statistics = param.HasField("use_global_stats") and not param.use_global_stats
    module = _norm_module(layer, shape, frozen=param.use_global_stats, eps=eps,
                          momentum=_as_float32(1 - _as_float32(param.moving_average_fraction)), affine=has_scale,
                          track_running_stats=not batch_statistics)
    if not batch_statistics:
        affine.update(running_mean=factor * mean, running_var=factor * variance, num_batches_tracked=torch.tensor(0))
    module = assign(module, **affine)
    if fork == "Intel Caffe" and param.relu:
        module = nn.Sequential(module, nn.ReLU())
    return Converted(module, [shape], warnings)


@converter("BN")
def convert_bn(layer, inputs: list[Shape], blobs: list[np.ndarray]) -> Converted:
    """The PSPNet fork's BN: nn.BatchNorm2d with weight = slope, bias, running mean and variance.

    TEST phase: y = slope * (x - mean) / sqrt(variance + eps) + bias, which BatchNorm2d computes
    in another order (a few ulp apart). Training: batch statistics, running averages with
    momentum 1 - bn_param.momentum; `frozen: true` keeps statistics and affine fixed, as the fork.
    """
    expect_bottoms(layer, inputs, 1)
    if is_segnet_bn(layer, blobs):
        return _segnet_bn(layer, tuple(inputs[0]), blobs)
    expect_blobs(layer, blobs, 4)
    shape = tuple(inputs[0])
    if not 2 <= len(shape) <= 4:
        raise CaffeError(f"layer {layer.name!r} (BN): input must have 2 to 4 axes, got {shape}")
    expected = [1, shape[1], 1, 1]
    slope, bias, mean, variance = (
        fit_blob(layer, f"{what} blob", blob, expected).reshape(-1)
        for what, blob in zip(("slope", "bias", "mean", "variance"), blobs)
    )
    param = layer.bn_param
    module = _norm_module(layer, shape, frozen=param.frozen, eps=_as_float32(param.eps),
                          momentum=_as_float32(1 - _as_float32(param.momentum)))
    assign(module, weight=slope, bias=bias, running_mean=mean, running_var=variance,
           num_batches_tracked=torch.tensor(0))
    if param.frozen:  # the fork sets lr_mult 0 for slope and bias too
        module.requires_grad_(False)
    return Converted(module, [shape])


def is_segnet_bn(layer, blobs: Sequence[np.ndarray] | None = None) -> bool:
    """SegNet's BN (2 blobs: scale, shift; a bn_mode) rather than PSPNet's (4 blobs) under the same type name."""
    param = layer.bn_param
    return (layer.HasField("segnet_bn_param") or any(param.HasField(name) for name in ("bn_mode", "scale_filler",
                                                                                        "shift_filler"))
            or blobs is not None and len(blobs) == 2)


def _segnet_bn(layer, shape: Shape, blobs: Sequence[np.ndarray]) -> Converted:
    """SegNet's BN (alexgkendall/caffe-segnet bn_layer.cpp): INFERENCE is scale * x + shift per channel
    (statistics folded in offline); LEARN normalises with the batch's own statistics, even at test time."""
    mode = layer.segnet_bn_param.bn_mode if layer.HasField("segnet_bn_param") else layer.bn_param.bn_mode
    expect_blobs(layer, blobs, 2)
    if len(shape) != 4:
        raise CaffeError(f"layer {layer.name!r} (BN): SegNet's BN needs a 4-axis input, got {shape}")
    scale, shift = (fit_blob(layer, f"{what} blob", blob, [1, shape[1], 1, 1]).reshape(-1)
                    for what, blob in zip(("scale", "shift"), blobs))
    if mode == caffe_pb2.SegNetBNParameter.INFERENCE:
        if len(layer.top) > 1:
            raise CaffeError(f"layer {layer.name!r} (BN): INFERENCE mode has one top")
        module = on_meta(Scale, (shape[1],), (shape[1],), trailing=2, bias_trailing=2)
        return Converted(assign(module, weight=scale, bias=shift), [shape])
    if len(layer.top) > 3:
        raise CaffeError(f"layer {layer.name!r} (BN): at most 3 tops (the output, the batch mean and variance)")
    # DeconvNet's bn_layer.cpp: tops 1 and 2 are the batch mean and variance, [1, C, 1, 1].
    tops = max(len(layer.top), 1)
    module = assign(on_meta(BatchStatNorm, shape[1], tops=tops), weight=scale, bias=shift)
    stats = [(1, shape[1], 1, 1)] * (tops - 1)
    return Converted(module, [shape] + stats, ["bn_mode LEARN normalises with each batch's own statistics at test "
                                               "time too, as SegNet's fork does (its compute_bn_statistics.py "
                                               "makes an INFERENCE model)"])


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


def _trailing(layer, shape: Shape, operand: Shape, axis: int, what: str) -> int:
    """Caffe's Reshape check (the operand equals the bottom's axes from `axis`, axis 0 for a scalar);
    returns how many bottom axes follow the operand."""
    axis = 0 if len(operand) == 0 else canonical_axis(layer, axis, len(shape))
    if tuple(shape[axis:axis + len(operand)]) != tuple(operand):
        raise CaffeError(
            f"layer {layer.name!r} ({layer.type}): {what} of shape {tuple(operand)} does not match "
            f"bottom shape {tuple(shape)} from axis {axis}"
        )
    return len(shape) - axis - len(operand)


@converter("Scale")
def convert_scale(layer, inputs: list[Shape], blobs: list[np.ndarray]) -> Converted:
    """y = x * s [+ b], s learned or the second bottom, broadcast over the axes it does not cover."""
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
    trailing = _trailing(layer, shape, scale_shape, param.axis, "scale")
    bias_trailing = _trailing(layer, shape, bias_shape, param.axis, "bias") if param.bias_term else 0
    module = on_meta(Scale, None if two_bottoms else scale_shape, bias_shape, trailing, bias_trailing)
    assign(module, weight=None if two_bottoms else fit_blob(layer, "scale blob", blobs[0], scale_shape),
           bias=fit_blob(layer, "bias blob", blobs[-1], bias_shape) if param.bias_term else None)
    return Converted(module, [shape], warnings)


@converter("Bias")
def convert_bias(layer, inputs: list[Shape], blobs: list[np.ndarray]) -> Converted:
    """y = x + b, b learned or the second bottom, broadcast over the axes it does not cover."""
    expect_bottoms(layer, inputs, 1, 2)
    param = layer.bias_param
    shape = tuple(inputs[0])
    warnings = []
    if len(inputs) == 2:
        expect_blobs(layer, blobs, 0)
        return Converted(AddOperand(_trailing(layer, shape, tuple(inputs[1]), param.axis, "bias")), [shape])
    bias_shape = _blob_shape(layer, shape, param.axis, param.num_axes)
    if not blobs:
        blobs = [_filled(layer, "bias", param.filler, param.HasField("filler"), 0.0, bias_shape)]
        warnings.append("has no weights; using its constant filler")
    expect_blobs(layer, blobs, 1)
    module = on_meta(Scale, None, bias_shape, 0, _trailing(layer, shape, bias_shape, param.axis, "bias"))
    assign(module, bias=fit_blob(layer, "bias blob", blobs[0], bias_shape))
    return Converted(module, [shape], warnings)


@converter("LRN")
def convert_lrn(layer, inputs: list[Shape], blobs: list[np.ndarray]) -> Converted:
    """ACROSS_CHANNELS: torch's local_response_norm (x * (k + alpha/size * window sum of x^2)^-beta), in float32
    for half precision; WITHIN_CHANNEL: Caffe's AVE-pooled form, which has no torch module."""
    expect_bottoms(layer, inputs, 1)
    expect_blobs(layer, blobs, 0)
    param = layer.lrn_param
    shape = image_shape(layer, inputs)
    if param.local_size % 2 != 1:
        raise CaffeError(f"layer {layer.name!r} (LRN): local_size must be odd, got {param.local_size}")
    (size,), alpha, beta = caffe_int(layer, "local_size", [param.local_size]), _as_float32(param.alpha), \
        _as_float32(param.beta)
    across = param.norm_region == caffe_pb2.LRNParameter.ACROSS_CHANNELS
    # Both forms pad by local_size - 1 (channels, or rows and columns) before they sum: that copy must fit.
    n, c, h, w = shape
    check_top(layer, (n, c + size - 1, h, w) if across else (n, c, h + size - 1, w + size - 1),
              what="padded copy")
    if across:
        return Converted(LRNAcrossChannels(size, alpha=alpha, beta=beta, k=_as_float32(param.k)), [shape])
    return Converted(LRNWithinChannel(size, alpha, beta), [shape])
