"""Converters for Caffe's element-wise neuron layers (ReLU, ReLU6, Clip, Swish, PReLU, Sigmoid, ..., Log) and Softmax."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from caffe2torch.errors import CaffeError
from caffe2torch.layers.registry import (
    Converted,
    Shape,
    assign,
    canonical_axis,
    converter,
    expect_blobs,
    expect_bottoms,
    on_meta,
    parse_param_str,
)
from caffe2torch.bvlc import Clip, Swish
from caffe2torch.forks import BoundedReLU, DropoutScaledAtTest
from caffe2torch.modules import AbsVal, Exp, Log, Power, Threshold
from caffe2torch.vendor import ReLUMask, ScaledELU


def _f32(value: float) -> float:
    """Round a parameter to float32 as Caffe's Dtype does; the result is exact as a Python float."""
    return float(np.float32(value))


def _neuron_setup(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> list[Shape]:
    """Neuron layers take one bottom, no blobs, and keep the shape."""
    expect_bottoms(layer, inputs, 1)
    expect_blobs(layer, blobs, 0)
    return [tuple(inputs[0])]


def _slope(layer, value: float) -> float:
    """negative_slope as a float32; an infinite or NaN one is refused: Caffe's max(x, 0) + slope * min(x, 0)
    is then NaN for every x >= 0 (inf * 0), where torch's leaky ReLU passes x."""
    if not math.isfinite(value):
        raise CaffeError(f"layer {layer.name!r} ({layer.type}): negative_slope {value:g} must be a finite number")
    return _f32(value)


@converter("ReLU")
def convert_relu(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """max(x, 0) + negative_slope * min(x, 0): nn.ReLU, or nn.LeakyReLU with a slope.

    Caffe's ReLU(-inf) is NaN (0 * -inf); torch's is 0, the only difference. DeconvNet's second top is a mask,
    1 where the value is above 0 (relu_layer.cpp there). Intel Caffe's `fuse` (its MKL-DNN ReLU after a convolution
    that applies it) passes the bottom on unchanged (mkldnn_relu_layer.cpp).
    """
    if len(layer.top) == 2:  # DeconvNet / DecoupledNet
        expect_bottoms(layer, inputs, 1)
        expect_blobs(layer, blobs, 0)
        in_place = layer.top[0] == layer.bottom[0]
        return Converted(ReLUMask(_slope(layer, layer.relu_param.negative_slope), in_place), [tuple(inputs[0])] * 2)
    shapes = _neuron_setup(layer, inputs, blobs)
    param = layer.relu_param
    if param.fuse:
        return Converted(nn.Identity(), shapes)
    slope = _slope(layer, param.negative_slope)
    if param.relu6 or param.maximum > 0 or param.minimum != 0:  # synopsys-caffe's bounded ReLU
        caps = ([6.0] if param.relu6 else []) + ([_f32(param.maximum)] if param.maximum > 0 else [])
        # std::max(y, minimum) leaves y as it is for a NaN minimum (torch.clamp would give NaN)
        lower = None if param.minimum == 0 or math.isnan(param.minimum) else _f32(param.minimum)
        return Converted(BoundedReLU(slope, min(caps) if caps else None, lower), shapes)
    return Converted(nn.LeakyReLU(slope) if slope else nn.ReLU(), shapes)


@converter("ReLU6")
def convert_relu6(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """MobileNet forks' min(max(x, 0) + negative_slope * min(x, 0), 6): nn.ReLU6, or a clamped nn.LeakyReLU.

    The slope is relu6_param's (MobileNet-YOLO, SSD forks) or relu_param's (NVCaffe).
    """
    shapes = _neuron_setup(layer, inputs, blobs)
    slope = _slope(layer, layer.relu6_param.negative_slope if layer.HasField("relu6_param")
                   else layer.relu_param.negative_slope)
    if not slope:
        return Converted(nn.ReLU6(), shapes)
    return Converted(nn.Sequential(nn.LeakyReLU(slope), nn.Hardtanh(-math.inf, 6.0)), shapes)


@converter("Clip")
def convert_clip(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """std::max(min, std::min(x, max)): NaN becomes min, unlike torch.clamp."""
    shapes = _neuron_setup(layer, inputs, blobs)
    param = layer.clip_param
    if not (param.HasField("min") and param.HasField("max")):
        raise CaffeError(f"layer {layer.name!r} (Clip): clip_param needs min and max")
    low, high = _f32(param.min), _f32(param.max)
    if not low <= high:
        raise CaffeError(f"layer {layer.name!r} (Clip): min {low} exceeds max {high}")
    return Converted(Clip(low, high), shapes)


@converter("Swish")
def convert_swish(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """x * sigmoid(beta * x): nn.SiLU for beta 1."""
    shapes = _neuron_setup(layer, inputs, blobs)
    beta = _f32(layer.swish_param.beta)
    return Converted(nn.SiLU() if beta == 1.0 else Swish(beta), shapes)


@converter("PReLU")
def convert_prelu(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    expect_bottoms(layer, inputs, 1)
    expect_blobs(layer, blobs, 1)
    shape = tuple(inputs[0])
    if len(shape) < 2:
        raise CaffeError(f"layer {layer.name!r} (PReLU): bottom needs at least 2 axes, has shape {shape}")
    slope = np.asarray(blobs[0], dtype=np.float32)
    wanted = 1 if layer.prelu_param.channel_shared else shape[1]
    if slope.size != wanted:
        kind = "channel_shared" if layer.prelu_param.channel_shared else f"{shape[1]} channels"
        raise CaffeError(
            f"layer {layer.name!r} (PReLU): slope blob has {slope.size} values, expected {wanted} ({kind})"
        )
    module = on_meta(nn.PReLU, num_parameters=slope.size)
    return Converted(assign(module, weight=torch.from_numpy(slope.reshape(-1).copy())), [shape])


@converter("Sigmoid")
def convert_sigmoid(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    return Converted(nn.Sigmoid(), _neuron_setup(layer, inputs, blobs))


@converter("TanH")
def convert_tanh(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    return Converted(nn.Tanh(), _neuron_setup(layer, inputs, blobs))


@converter("ELU")
def convert_elu(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """max(x, 0) + alpha * (exp(min(x, 0)) - 1), times NVCaffe's `lambda` (elu_layer.cpp there)."""
    shapes = _neuron_setup(layer, inputs, blobs)
    alpha, scale = _f32(layer.elu_param.alpha), _f32(getattr(layer.elu_param, "lambda"))
    return Converted(nn.ELU(alpha) if scale == 1.0 else ScaledELU(alpha, scale), shapes)


@converter("AbsVal")
def convert_absval(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    return Converted(AbsVal(), _neuron_setup(layer, inputs, blobs))


@converter("BNLL")
def convert_bnll(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """Caffe's log(1 + e^x) in its stable form is torch's softplus."""
    return Converted(nn.Softplus(), _neuron_setup(layer, inputs, blobs))


@converter("Threshold")
def convert_threshold(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    shapes = _neuron_setup(layer, inputs, blobs)
    return Converted(Threshold(_f32(layer.threshold_param.threshold)), shapes)


@converter("Dropout")
def convert_dropout(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """Identity at test time; in training both Caffe and torch scale the kept values by 1 / (1 - ratio)."""
    shapes = _neuron_setup(layer, inputs, blobs)
    ratio = _f32(layer.dropout_param.dropout_ratio)
    if not 0.0 <= ratio < 1.0:
        raise CaffeError(f"layer {layer.name!r} (Dropout): dropout_ratio must be in [0, 1), got {ratio}")
    if not layer.dropout_param.scale_train:  # caffe-fast-rcnn: scale at test time by 1. / scale_, in float
        scale = np.float32(1.0 / (1.0 - float(ratio)))
        return Converted(DropoutScaledAtTest(ratio, float(np.float32(1.0 / float(scale)))), shapes)
    return Converted(nn.Dropout(ratio), shapes)


@converter("Mish")
def convert_mish(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """x * tanh(softplus(x)), the YOLOv4 ports' activation (nn.Mish)."""
    return Converted(nn.Mish(), _neuron_setup(layer, inputs, blobs))


@converter("Python:spatial_dropout.SpatialDropoutLayer")
def convert_spatial_dropout(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """ENet's Python SpatialDropout: whole channels dropped in training (nn.Dropout2d), identity at test time.

    param_str is a dict like "{'phase': 'TEST', 'p': '0.01'}"; `p` is the drop probability.
    """
    shapes = _neuron_setup(layer, inputs, blobs)
    try:
        ratio = float(parse_param_str(layer, layer.python_param.param_str).get("p", 0.5))
    except (TypeError, ValueError):
        raise CaffeError(f"layer {layer.name!r} (Python): param_str 'p' must be a number") from None
    if not 0.0 <= ratio < 1.0:
        raise CaffeError(f"layer {layer.name!r} (Python): dropout probability p must be in [0, 1), got {ratio}")
    return Converted(nn.Dropout2d(ratio), shapes)


@converter("Power")
def convert_power(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    shapes = _neuron_setup(layer, inputs, blobs)
    param = layer.power_param
    power, scale, shift = _f32(param.power), _f32(param.scale), _f32(param.shift)
    # Caffe ignores the input when power * scale == 0 and fills a constant (even over NaN inputs).
    constant = None
    if _f32(power * scale) == 0.0:
        with np.errstate(divide="ignore", invalid="ignore"):  # powf(0, -1) = inf, as Caffe gets it
            constant = 1.0 if power == 0 else _f32(np.power(np.float32(shift), np.float32(power)))
    return Converted(Power(power, scale, shift, constant), shapes)


def _log_of_base(layer, base: float) -> float:
    """Caffe's log_base: 1 exactly for the default base -1 (e), else log(base) in float32."""
    if base == -1.0:
        return 1.0
    if not base > 0:
        raise CaffeError(f"layer {layer.name!r} ({layer.type}): base must be strictly positive or -1 (e), got {base}")
    log_base = _f32(np.log(np.float32(base)))
    if not math.isfinite(log_base):
        raise CaffeError(f"layer {layer.name!r} ({layer.type}): log(base) = log({base}) = {log_base} is not finite")
    return log_base


@converter("Exp")
def convert_exp(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    shapes = _neuron_setup(layer, inputs, blobs)
    param = layer.exp_param
    base, scale, shift = _f32(param.base), _f32(param.scale), _f32(param.shift)
    inner_scale = _f32(_log_of_base(layer, base) * scale)
    warnings: list[str] = []
    if shift == 0.0:
        outer_scale = 1.0
    elif base == -1.0:
        # The fork computes the outer factor as pow(base, shift) even for the default base -1 (e):
        # pow(-1, shift) is +-1 for an integral shift and NaN otherwise.
        if shift.is_integer():
            outer_scale = -1.0 if shift % 2 else 1.0
            warnings.append(
                f"base -1 (e) with shift {shift:.7g}: Caffe (this fork) uses "
                f"pow(-1, shift) = {outer_scale:g} as the outer factor instead of e^shift; reproduced as Caffe computes it"
            )
        else:
            warnings.append(
                f"base -1 (e) with non-zero shift {shift:.7g}: Caffe (this fork) computes "
                f"the outer factor as pow(-1, shift) = NaN and multiplies by it with cblas_sscal, which in OpenBLAS "
                f"writes 0; the output is all zeros (mathematically it would be NaN, intended e^(shift + scale*x)); "
                f"reproduced as zeros"
            )
            return Converted(Exp(inner_scale, 1.0, zero_output=True), shapes, warnings)
    else:
        outer_scale = _f32(np.power(np.float32(base), np.float32(shift)))
    return Converted(Exp(inner_scale, outer_scale), shapes, warnings)


@converter("Log")
def convert_log(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    shapes = _neuron_setup(layer, inputs, blobs)
    param = layer.log_param
    log_base = _log_of_base(layer, _f32(param.base))
    if log_base == 0.0:
        raise CaffeError(f"layer {layer.name!r} (Log): base {param.base} has log(base) = 0, so 1/log(base) is infinite")
    base_scale = _f32(1.0 / log_base)
    return Converted(Log(_f32(param.scale), _f32(param.shift), base_scale), shapes)


@converter("Softmax")
def convert_softmax(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    shapes = _neuron_setup(layer, inputs, blobs)
    axis = canonical_axis(layer, layer.softmax_param.axis, len(shapes[0]))
    return Converted(nn.Softmax(dim=axis), shapes)

