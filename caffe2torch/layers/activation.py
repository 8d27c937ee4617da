"""Converters for Caffe's element-wise neuron layers (ReLU, PReLU, Sigmoid, ..., Exp, Log) and Softmax."""

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
    canonical_axis,
    converter,
    expect_blobs,
    expect_bottoms,
)


def _f32(value: float) -> float:
    """Round a parameter to float32 as Caffe's Dtype does; the result is exact as a Python float."""
    return float(np.float32(value))


def _libm(function, x: torch.Tensor) -> torch.Tensor:
    """Evaluate in float64 and round once to float32.

    Caffe calls glibc's expf/logf/powf, which are correctly rounded in practice; torch's vectorised
    float32 versions are off by an ulp here and there, the float64 ones rounded to float32 are not.
    """
    return function(x.double()).to(x.dtype)


def _neuron_setup(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> list[Shape]:
    """Neuron layers take one bottom, no blobs, and keep the shape."""
    expect_bottoms(layer, inputs, 1)
    expect_blobs(layer, blobs, 0)
    return [tuple(inputs[0])]


class ReLU(nn.Module):
    """Caffe ReLU: max(x, 0) + negative_slope * min(x, 0)."""

    def __init__(self, negative_slope: float) -> None:
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.negative_slope == 0.0:
            # Caffe still adds 0 * min(x, 0), which is NaN at -inf; torch.relu alone would give 0 there.
            return torch.relu(x).masked_fill_(x == float("-inf"), float("nan"))
        return x.clamp(min=0) + self.negative_slope * x.clamp(max=0)

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}"


class PReLU(nn.Module):
    """Caffe PReLU: max(x, 0) + slope[c] * min(x, 0), one slope per channel (axis 1) or one shared."""

    def __init__(self, slope: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("slope", torch.from_numpy(np.asarray(slope, dtype=np.float32).reshape(-1).copy()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slope = self.slope.reshape((1, -1) + (1,) * (x.dim() - 2))
        return x.clamp(min=0) + slope * x.clamp(max=0)


class Sigmoid(nn.Module):
    """Caffe computes 1. / (1. + exp(-x)): expf in float32, the rest in double (the literals are double)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        exp_negative = _libm(torch.exp, -x).double()
        return (1.0 / (1.0 + exp_negative)).to(x.dtype)


class TanH(nn.Module):
    """glibc's tanhf is not correctly rounded, so this differs from Caffe by an ulp at some inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)


class ELU(nn.Module):
    """Caffe ELU: max(x, 0) + alpha * (exp(min(x, 0)) - 1) (exp - 1, not expm1, as Caffe writes it)."""

    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=0) + self.alpha * (_libm(torch.exp, x.clamp(max=0)) - 1.0)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


class AbsVal(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.abs(x)


class BNLL(nn.Module):
    """Caffe's stable softplus x > 0 ? x + log(1 + exp(-x)) : log(1 + exp(x)).

    exp runs in float32 (expf); the double literal 1. makes the sum, log and the final add double.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Both branches exponentiate -|x|, so one exp serves both.
        log_term = torch.log(1.0 + _libm(torch.exp, -torch.abs(x)).double())
        return torch.where(x > 0, x.double() + log_term, log_term).to(x.dtype)


class Threshold(nn.Module):
    """1 where x > threshold, else 0 (NaN compares false, so it gives 0)."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x > self.threshold).to(x.dtype)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"


class Identity(nn.Module):
    """Dropout at test time: Caffe copies the bottom (it scales at training time instead)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Power(nn.Module):
    """Caffe Power: (shift + scale * x) ^ power, with Caffe's shortcuts and operation order."""

    def __init__(self, power: float, scale: float, shift: float) -> None:
        super().__init__()
        self.power, self.scale, self.shift = power, scale, shift
        # Caffe ignores the input when power * scale == 0 and fills a constant (even over NaN inputs).
        self.constant: float | None = None
        if _f32(power * scale) == 0.0:
            self.constant = 1.0 if power == 0 else _f32(np.power(np.float32(shift), np.float32(power)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.constant is not None:
            return torch.full_like(x, self.constant)
        y = x
        if self.scale != 1.0:
            y = y * self.scale
        if self.shift != 0.0:
            y = y + self.shift
        if self.power != 1.0:
            y = _libm(lambda wide: torch.pow(wide, self.power), y)
        return y

    def extra_repr(self) -> str:
        return f"power={self.power}, scale={self.scale}, shift={self.shift}"


class Exp(nn.Module):
    """Caffe Exp: outer_scale * exp(inner_scale * x), constants precomputed as Caffe does.

    `zero_output` reproduces the fork's NaN outer factor, which OpenBLAS's sscal turns into zeros.
    """

    def __init__(self, inner_scale: float, outer_scale: float, zero_output: bool = False) -> None:
        super().__init__()
        self.inner_scale, self.outer_scale, self.zero_output = inner_scale, outer_scale, zero_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.zero_output:
            return torch.zeros_like(x)
        y = _libm(torch.exp, x if self.inner_scale == 1.0 else x * self.inner_scale)
        if self.outer_scale != 1.0:
            y = y * self.outer_scale
        return y

    def extra_repr(self) -> str:
        return f"inner_scale={self.inner_scale}, outer_scale={self.outer_scale}, zero_output={self.zero_output}"


class Log(nn.Module):
    """Caffe Log: log(shift + scale * x) * (1 / log(base)), step by step in float32."""

    def __init__(self, scale: float, shift: float, base_scale: float) -> None:
        super().__init__()
        self.scale, self.shift, self.base_scale = scale, shift, base_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.scale != 1.0:
            y = y * self.scale
        if self.shift != 0.0:
            y = y + self.shift
        y = _libm(torch.log, y)
        if self.base_scale != 1.0:
            y = y * self.base_scale
        return y

    def extra_repr(self) -> str:
        return f"scale={self.scale}, shift={self.shift}, base_scale={self.base_scale}"


class Softmax(nn.Module):
    """Caffe Softmax along one axis: subtract the max, exponentiate, divide by the sum."""

    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The channel sum follows torch's order, not OpenBLAS's gemv order: ulp-level differences.
        shifted = _libm(torch.exp, x - x.amax(dim=self.axis, keepdim=True))
        return shifted / shifted.sum(dim=self.axis, keepdim=True)

    def extra_repr(self) -> str:
        return f"axis={self.axis}"


@converter("ReLU")
def convert_relu(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    shapes = _neuron_setup(layer, inputs, blobs)
    return Converted(ReLU(_f32(layer.relu_param.negative_slope)), shapes)


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
    return Converted(PReLU(slope), [shape])


@converter("Sigmoid")
def convert_sigmoid(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    return Converted(Sigmoid(), _neuron_setup(layer, inputs, blobs))


@converter("TanH")
def convert_tanh(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    return Converted(TanH(), _neuron_setup(layer, inputs, blobs))


@converter("ELU")
def convert_elu(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    shapes = _neuron_setup(layer, inputs, blobs)
    return Converted(ELU(_f32(layer.elu_param.alpha)), shapes)


@converter("AbsVal")
def convert_absval(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    return Converted(AbsVal(), _neuron_setup(layer, inputs, blobs))


@converter("BNLL")
def convert_bnll(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    return Converted(BNLL(), _neuron_setup(layer, inputs, blobs))


@converter("Threshold")
def convert_threshold(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    shapes = _neuron_setup(layer, inputs, blobs)
    return Converted(Threshold(_f32(layer.threshold_param.threshold)), shapes)


@converter("Dropout")
def convert_dropout(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    return Converted(Identity(), _neuron_setup(layer, inputs, blobs))


@converter("Power")
def convert_power(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    shapes = _neuron_setup(layer, inputs, blobs)
    param = layer.power_param
    return Converted(Power(_f32(param.power), _f32(param.scale), _f32(param.shift)), shapes)


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
    return Converted(Softmax(axis), shapes)

