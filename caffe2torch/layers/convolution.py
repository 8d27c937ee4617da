"""Converters for Convolution, Deconvolution and InnerProduct, with Caffe's parameter and shape rules."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from caffe2torch.bvlc import Im2col
from caffe2torch.errors import CaffeError
from caffe2torch.layers.registry import (
    Converted,
    Shape,
    assign,
    caffe_int,
    canonical_axis,
    converter,
    expect_blobs,
    expect_bottoms,
    expect_shape,
    on_meta,
)
from caffe2torch.modules import BatchAxes, InnerProduct, SamePad2d, same_padding
from caffe2torch.vendor import ConvSum
from proto import caffe_pb2

# synopsys-caffe's padding per side, read as (top, left) then (bottom, right); Pooling has the same fields.
SIDES = ("pad_t", "pad_l", "pad_b", "pad_r")
_CONV_MODULES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_DECONV_MODULES = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def fit_blob(layer, what: str, blob: np.ndarray, expected: Sequence[int]) -> torch.Tensor:
    """A parameter blob as a float32 tensor of the shape the layer needs.

    Caffe's own loader (Blob::ShapeEquals) also accepts a blob written with the legacy
    num/channels/height/width dims when those equal the needed shape padded on the left
    with 1s to four axes (V1 models store a bias of C values as 1x1x1xC), so we do too.
    """
    expected = tuple(int(d) for d in expected)
    actual = tuple(blob.shape)
    legacy = (1,) * (4 - len(expected)) + expected if len(expected) <= 4 else None
    if actual != expected and not (len(actual) == 4 and actual == legacy):
        expect_shape(layer, what, actual, expected)
    array = np.ascontiguousarray(blob, dtype=np.float32).reshape(expected)
    # Share the reader's array (no second copy of the weights) unless it is read-only.
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _per_axis(layer, values: Sequence[int], name: str, num_spatial: int, default: int | None) -> list[int]:
    """Caffe's rule for repeated kernel_size/pad/stride/dilation: once for all axes or once per axis."""
    values = caffe_int(layer, name, values)
    if len(values) == 0 and default is not None:
        return [default] * num_spatial
    if len(values) == 1:
        return values * num_spatial
    if len(values) == num_spatial and num_spatial > 0:
        return values
    raise CaffeError(
        f"layer {layer.name!r} ({layer.type}): {name} must be given once or once per spatial axis "
        f"(given {len(values)} times; {num_spatial} spatial axes)"
    )


def _hw_or_repeated(layer, param, name: str, num_spatial: int, default: int | None) -> list[int]:
    """Either the `<name>_h`/`<name>_w` pair (2-D only) or the repeated field `<name>` (kernel: kernel_size)."""
    repeated_name = "kernel_size" if name == "kernel" else name
    repeated = list(getattr(param, repeated_name))
    if param.HasField(f"{name}_h") or param.HasField(f"{name}_w"):
        if num_spatial != 2:
            raise CaffeError(f"layer {layer.name!r} ({layer.type}): {name}_h and {name}_w need a 2-D convolution")
        if repeated:
            raise CaffeError(
                f"layer {layer.name!r} ({layer.type}): give either {repeated_name} or {name}_h/{name}_w, not both"
            )
        return caffe_int(layer, f"{name}_h/{name}_w", [getattr(param, f"{name}_h"), getattr(param, f"{name}_w")])
    return _per_axis(layer, repeated, repeated_name, num_spatial, default)


class _ConvGeometry:
    """Kernel, stride, pad, dilation and channel layout of a (de)convolution, checked as Caffe does."""

    def __init__(self, layer, inputs: Sequence[Shape]) -> None:
        param = layer.convolution_param
        if not inputs:
            raise CaffeError(f"layer {layer.name!r} ({layer.type}): needs at least one bottom")
        shape = tuple(inputs[0])
        for other in inputs[1:]:
            if tuple(other) != shape:
                raise CaffeError(
                    f"layer {layer.name!r} ({layer.type}): all bottoms must have the same shape, "
                    f"got {shape} and {tuple(other)}"
                )
        self.axis = canonical_axis(layer, param.axis, len(shape))
        self.num_spatial = len(shape) - self.axis - 1
        if self.num_spatial not in _CONV_MODULES:
            raise CaffeError(
                f"layer {layer.name!r} ({layer.type}): {self.num_spatial} spatial axes after axis {self.axis} "
                f"of a {shape} blob; only 1 to 3 are supported"
            )
        self.kernel = _hw_or_repeated(layer, param, "kernel", self.num_spatial, None)
        self.stride = _hw_or_repeated(layer, param, "stride", self.num_spatial, 1)
        self.pad = _hw_or_repeated(layer, param, "pad", self.num_spatial, 0)
        self.dilation = _per_axis(layer, list(param.dilation), "dilation", self.num_spatial, 1)
        if any(param.HasField(name) for name in ("hole", "hole_h", "hole_w")):  # DeepLab v1's name for dilation
            if param.dilation:
                raise CaffeError(f"layer {layer.name!r} ({layer.type}): give dilation or hole, not both")
            if param.HasField("hole"):
                self.dilation = [int(param.hole)] * self.num_spatial
            elif self.num_spatial == 2:
                self.dilation = [int(param.hole_h), int(param.hole_w)]
            else:
                raise CaffeError(f"layer {layer.name!r} ({layer.type}): hole_h and hole_w need a 2-D convolution")
        for name, values in (("kernel size", self.kernel), ("stride", self.stride), ("dilation", self.dilation)):
            if min(values) < 1:
                raise CaffeError(f"layer {layer.name!r} ({layer.type}): {name} must be positive, got {values}")
        self.pad_end = list(self.pad)  # the far side's padding; differs only with synopsys-caffe's pad_b / pad_r
        self.same = False  # synopsys-caffe's pad_type 1: padding worked out for each input size
        self._side_pads(layer, param, shape)
        self.channels = shape[self.axis]
        self.num_output, self.group = caffe_int(layer, "num_output and group", [param.num_output, param.group])
        if self.num_output <= 0:
            raise CaffeError(f"layer {layer.name!r} ({layer.type}): num_output must be positive")
        if self.group <= 0 or self.channels % self.group or self.num_output % self.group:
            raise CaffeError(
                f"layer {layer.name!r} ({layer.type}): group {self.group} must divide both the input channels "
                f"({self.channels}) and num_output ({self.num_output})"
            )
        self.bias_term = bool(param.bias_term)
        self.shape = shape

    def _side_pads(self, layer, param, shape: Shape) -> None:
        """synopsys-caffe's pad_l/r/t/b (2-D, any sign) and pad_type 1, TensorFlow's "SAME" as its im2col has it:
        ceil(size / stride) outputs, the near side padded by half of what the undilated kernel needs beyond the
        input (rounded down), the far side by whatever the outputs then reach."""
        sided = any(getattr(param, name) for name in SIDES)
        if not sided and param.pad_type == 0:
            return
        where = f"layer {layer.name!r} ({layer.type})"
        if self.num_spatial != 2:
            raise CaffeError(f"{where}: pad_l/r/t/b and pad_type need a 2-D convolution")
        if list(param.pad) or param.pad_h or param.pad_w or sided and param.pad_type:  # base_conv_layer.cpp's CHECKs
            raise CaffeError(f"{where}: give one of pad (or pad_h/pad_w), pad_l/r/t/b and pad_type")
        if sided:
            self.pad = [int(param.pad_t), int(param.pad_l)]
            self.pad_end = [int(param.pad_b), int(param.pad_r)]
            # What a negative pad crops (from the input, or a positive one from a deconvolution's full output)
            # must leave something on that axis; the fork would read outside the blob.
            full = [n if layer.type == "Convolution" else s * (n - 1) + e
                    for n, s, e in zip(shape[self.axis + 1:], self.stride, self.extents())]
            sign = -1 if layer.type == "Convolution" else 1
            for axis, (n, near, far) in enumerate(zip(full, self.pad, self.pad_end)):
                if max(sign * near, 0) + max(sign * far, 0) >= n:
                    raise CaffeError(f"{where}: pad {near} and {far} on axis {'HW'[axis]} crop all {n} rows or "
                                     f"columns away")
            return
        if param.pad_type != 1:
            raise CaffeError(f"{where}: unknown pad_type {param.pad_type} (0: Caffe's, 1: SAME)")
        if layer.type != "Convolution":
            raise CaffeError(f"{where}: pad_type 1 (SAME) is read by synopsys-caffe's Convolution only")
        self.same = True
        for axis, (n, k, s, extent) in enumerate(zip(shape[self.axis + 1:], self.kernel, self.stride,
                                                     self.extents())):
            self.pad[axis] = same_padding(n, k, s) // 2
            self.pad_end[axis] = (-(-n // s) - 1) * s + extent - n - self.pad[axis]

    @property
    def symmetric(self) -> bool:
        return self.pad == self.pad_end and min(self.pad) >= 0

    def extents(self) -> list[int]:
        return [d * (k - 1) + 1 for d, k in zip(self.dilation, self.kernel)]


def _conv_module(layer, blobs: Sequence[np.ndarray], g: _ConvGeometry, transposed: bool) -> nn.Module:
    """nn.ConvNd / nn.ConvTransposeNd with Caffe's weights; axes before `axis` folded into the batch."""
    if transposed:  # Caffe's deconvolution weights are [in, out/group, k...], as PyTorch's
        weight_shape, factory = [g.channels, g.num_output // g.group] + g.kernel, _DECONV_MODULES[g.num_spatial]
    else:
        weight_shape, factory = [g.num_output, g.channels // g.group] + g.kernel, _CONV_MODULES[g.num_spatial]
    expect_blobs(layer, blobs, 1 + g.bias_term)
    weight = fit_blob(layer, "weight blob", blobs[0], weight_shape)
    bias = fit_blob(layer, "bias blob", blobs[1], [g.num_output]) if g.bias_term else None
    padding = tuple(g.pad) if g.symmetric and not g.same else (0,) * g.num_spatial
    conv = on_meta(factory, g.channels, g.num_output, tuple(g.kernel), stride=tuple(g.stride), padding=padding,
                   dilation=tuple(g.dilation), groups=g.group, bias=g.bias_term)
    assign(conv, weight=weight, bias=bias)
    if g.same:  # worked out for the size the net gets, as the fork's Reshape does
        conv = nn.Sequential(SamePad2d(tuple(g.kernel), tuple(g.stride), tuple(g.extents())), conv)
    elif not g.symmetric:  # padding per side: zero-pad (or crop) the input, or crop the transposed output
        (top, left), (bottom, right) = g.pad, g.pad_end
        if transposed and g.bias_term and min(g.pad + g.pad_end) < 0:
            raise CaffeError(f"layer {layer.name!r} (Deconvolution): a negative pad_l/r/t/b with a bias term "
                             f"(outputs beyond the kernel's reach would hold the bias alone) is not supported")
        if transposed:
            conv = nn.Sequential(conv, nn.ZeroPad2d((-left, -right, -top, -bottom)))
        else:
            conv = nn.Sequential(nn.ZeroPad2d((left, right, top, bottom)), conv)
    return conv if g.axis == 1 else BatchAxes(conv, g.axis)


def _activation(relu: bool, slope: float) -> nn.Module | None:
    """Intel Caffe's fused ReLU (MKL-DNN's eltwise_relu post-op, `negative_slope` its alpha)."""
    if not relu:
        return None
    return nn.LeakyReLU(float(np.float32(slope))) if slope else nn.ReLU()


@converter("Convolution")
def convert_convolution(layer, inputs: list[Shape], blobs: list[np.ndarray]) -> Converted:
    """Cross-correlation as torch's; out = floor((H + 2p - (d(k-1)+1)) / s) + 1; each bottom its own top.

    Intel Caffe's fusions (mkldnn_convolution_layer.cpp, its default engine): `relu` applies a ReLU with
    `negative_slope` after the convolution; SUM_FUSION with two bottoms adds bottom 1 (the size of the output) to
    the convolution of bottom 0 before that ReLU, in one top. `coeff` scales only its int8 path.
    """
    param = layer.convolution_param
    fused_sum = param.fusion_type == caffe_pb2.ConvolutionParameter.SUM_FUSION and len(inputs) > 1
    if fused_sum:
        if len(inputs) != 2 or len(layer.top) != 1:
            raise CaffeError(f"layer {layer.name!r} (Convolution): SUM_FUSION takes two bottoms and one top")
        inputs, residual = inputs[:1], tuple(inputs[1])
    g = _ConvGeometry(layer, inputs)
    out_spatial = []
    for size, pad, end, extent, stride in zip(g.shape[g.axis + 1:], g.pad, g.pad_end, g.extents(), g.stride):
        if size + pad + end < extent:
            padding = f"2*{pad}" if pad == end else f"{pad} + {end}"
            raise CaffeError(
                f"layer {layer.name!r} (Convolution): kernel extent {extent} exceeds the padded input "
                f"size {size} + {padding}"
            )
        out_spatial.append((size + pad + end - extent) // stride + 1)
    top = tuple(g.shape[: g.axis]) + (g.num_output,) + tuple(out_spatial)
    module = _conv_module(layer, blobs, g, transposed=False)
    if fused_sum:
        if residual != top:
            raise CaffeError(f"layer {layer.name!r} (Convolution): SUM_FUSION's bottom 1 has shape {residual}, the "
                             f"convolution's output {top}: they must agree")
        return Converted(ConvSum(module, param.relu, float(np.float32(param.negative_slope))), [top])
    activation = _activation(param.relu, param.negative_slope)
    if activation is not None:
        module = nn.Sequential(module, activation)
    return Converted(module, [top] * len(inputs), per_bottom=True)


@converter("Deconvolution")
def convert_deconvolution(layer, inputs: list[Shape], blobs: list[np.ndarray]) -> Converted:
    """Transposed convolution: out = s(H-1) + d(k-1) + 1 - 2p, which is torch's rule too."""
    g = _ConvGeometry(layer, inputs)
    out_spatial = [
        stride * (size - 1) + extent - pad - end
        for size, pad, end, extent, stride in zip(g.shape[g.axis + 1:], g.pad, g.pad_end, g.extents(), g.stride)
    ]
    if min(out_spatial) <= 0:
        raise CaffeError(f"layer {layer.name!r} (Deconvolution): output size {out_spatial} is not positive")
    top = tuple(g.shape[: g.axis]) + (g.num_output,) + tuple(out_spatial)
    return Converted(_conv_module(layer, blobs, g, transposed=True), [top] * len(inputs), per_bottom=True)


@converter("InnerProduct")
def convert_inner_product(layer, inputs: list[Shape], blobs: list[np.ndarray]) -> Converted:
    """nn.Linear on the axes from `axis` on, flattened; weight [N, K] (stored [K, N] with `transpose`); Intel Caffe's
    `relu` (mkldnn_inner_product_layer.cpp) a ReLU with `negative_slope` after it."""
    expect_bottoms(layer, inputs, 1)
    param = layer.inner_product_param
    shape = tuple(inputs[0])
    axis = canonical_axis(layer, param.axis, len(shape))
    num_output = int(param.num_output)
    if num_output <= 0:
        raise CaffeError(f"layer {layer.name!r} (InnerProduct): num_output must be positive")
    k = int(np.prod(shape[axis:], dtype=np.int64))
    expect_blobs(layer, blobs, 1 + bool(param.bias_term))
    if param.transpose:
        weight = fit_blob(layer, "weight blob", blobs[0], [k, num_output]).t().contiguous()
    else:
        weight = fit_blob(layer, "weight blob", blobs[0], [num_output, k])
    bias = fit_blob(layer, "bias blob", blobs[1], [num_output]) if param.bias_term else None
    if axis == len(shape) - 1:
        linear = on_meta(nn.Linear, k, num_output, bias=bool(param.bias_term))
    else:
        linear = on_meta(InnerProduct, k, num_output, bias=bool(param.bias_term), axis=axis)
    module = assign(linear, weight=weight, bias=bias)
    activation = _activation(param.relu, param.negative_slope)
    return Converted(module if activation is None else nn.Sequential(module, activation),
                     [shape[:axis] + (num_output,)])


@converter("Im2col")
def convert_im2col(layer, inputs: list[Shape], blobs: list[np.ndarray]) -> Converted:
    """Each output position's patch as channels (C slowest, then kernel rows and columns): F.unfold, shaped
    [N, C * kh * kw, out_h, out_w] (2-D, axis 1)."""
    expect_bottoms(layer, inputs, 1)
    expect_blobs(layer, blobs, 0)
    param = layer.convolution_param
    shape = tuple(inputs[0])
    if len(shape) != 4 or canonical_axis(layer, param.axis, len(shape)) != 1:
        raise CaffeError(f"layer {layer.name!r} (Im2col): only 2-D inputs (N, C, H, W) with axis 1 are supported, "
                         f"got {shape}")
    kernel = _hw_or_repeated(layer, param, "kernel", 2, None)
    stride = _hw_or_repeated(layer, param, "stride", 2, 1)
    pad = _hw_or_repeated(layer, param, "pad", 2, 0)
    dilation = _per_axis(layer, list(param.dilation), "dilation", 2, 1)
    if min(kernel + stride + dilation) < 1:
        raise CaffeError(f"layer {layer.name!r} (Im2col): kernel, stride and dilation must be positive")
    out = [(n + 2 * p - (d * (k - 1) + 1)) // s + 1 for n, k, s, p, d in zip(shape[2:], kernel, stride, pad, dilation)]
    if min(out) <= 0:
        raise CaffeError(f"layer {layer.name!r} (Im2col): the kernel does not fit the padded {shape[2:]} input")
    module = Im2col(tuple(kernel), tuple(stride), tuple(pad), tuple(dilation))
    return Converted(module, [(shape[0], shape[1] * kernel[0] * kernel[1], *out)])
