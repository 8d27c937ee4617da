"""Converters for layer types other forks added: Upsample (SegNet, YOLO ports), ShuffleChannel, Axpy,
ConvolutionDepthwise / DepthwiseConvolution (MobileNet and ShuffleNet forks), CropCenter, ResizeBilinear,
Unpooling (HyeonwooNoh/caffe, deep image matting ports) and Flip (happynear/caffe-windows)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from torch import nn

from caffe2torch.forks import (Axpy, Flip, LabelSpecificAdd, MaxUnpool, ResizeBilinear, ResizeNearest, ShuffleChannel,
                               Squeeze, Unpooling)
from caffe2torch.layers.convolution import convert_convolution
from caffe2torch.limits import check_top
from caffe2torch.layers.registry import (Converted, Shape, converter, expect_blobs, expect_bottoms, image_shape,
                                         layer_error)
from caffe2torch.modules import Crop
from proto import caffe_pb2


@converter("Upsample")
def convert_upsample(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """SegNet's (data, mask) unpooling; with one bottom, the YOLO ports' nearest-neighbour upsampling."""
    expect_bottoms(layer, inputs, 1, 2)
    expect_blobs(layer, blobs, 0)
    param = layer.upsample_param
    shape = image_shape(layer, inputs)
    if len(inputs) == 1:
        if param.HasField("scale_h") or param.HasField("upsample_h"):
            raise layer_error(layer, "with one bottom (nearest-neighbour upsampling) only `scale` is understood")
        if param.scale < 1:
            raise layer_error(layer, f"scale must be at least 1, got {param.scale}")
        return Converted(nn.Upsample(scale_factor=float(param.scale), mode="nearest"),
                         [shape[:2] + (shape[2] * param.scale, shape[3] * param.scale)])
    if tuple(inputs[1]) != shape:
        raise layer_error(layer, f"the mask (bottom 1) has shape {tuple(inputs[1])}, the data {shape}: they must agree")
    if param.HasField("upsample_h") and param.HasField("upsample_w"):
        size = (param.upsample_h, param.upsample_w)
        if min(size) <= 1:
            raise layer_error(layer, "upsample_h and upsample_w must be greater than 1")
        module = MaxUnpool(size, layer=layer.name)
    else:
        if param.HasField("scale_h") != param.HasField("scale_w") or param.HasField("scale_h") and param.HasField("scale"):
            raise layer_error(layer, "give upsample_h and upsample_w, or scale, or scale_h and scale_w")
        scale = (param.scale_h, param.scale_w) if param.HasField("scale_h") else (param.scale, param.scale)
        if min(scale) <= 1:
            raise layer_error(layer, f"scale must be greater than 1, got {scale}")
        pad_out = (param.pad_out_h, param.pad_out_w)
        if any(pad and s != 2 for pad, s in zip(pad_out, scale)):
            raise layer_error(layer, "pad_out_h / pad_out_w need scale 2")
        module = MaxUnpool(None, scale, tuple(int(p) for p in pad_out), layer.name)
    return Converted(module, [shape[:2] + tuple(module.output_size(shape[2:]))])


@converter("ShuffleChannel")
def convert_shuffle_channel(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    expect_bottoms(layer, inputs, 1)
    expect_blobs(layer, blobs, 0)
    shape = tuple(inputs[0])
    group = layer.shuffle_channel_param.group
    if len(shape) < 2 or group < 1 or shape[1] % group:
        raise layer_error(layer, f"group {group} must divide the channels of a bottom of shape {shape}")
    return Converted(ShuffleChannel(group), [shape])


@converter("Axpy")
def convert_axpy(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """Bottoms (a, x, y): a * x + y, a holding one value per image and channel (an SE block's gate)."""
    expect_bottoms(layer, inputs, 3)
    expect_blobs(layer, blobs, 0)
    scale, x, y = (tuple(shape) for shape in inputs)
    if len(x) < 2 or tuple(scale[:2]) != tuple(x[:2]) or math.prod(scale[2:]) != 1:
        raise layer_error(layer, f"bottom 0 (the scale) has shape {scale}: expected {x[0]} x {x[1]} (x 1 x 1) for x {x}")
    if x != y:
        raise layer_error(layer, f"bottoms 1 and 2 must have the same shape, got {x} and {y}")
    return Converted(Axpy(), [x])


@converter("ConvolutionDepthwise")
def convert_convolution_depthwise(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """conv_dw_layer.cpp: one filter per input channel; num_output and group are not read (out = in channels)."""
    if not inputs:
        raise layer_error(layer, "needs a bottom")
    param = layer.convolution_param
    channels = tuple(inputs[0])[param.axis % len(inputs[0])] if inputs[0] else 0
    depthwise = caffe_pb2.LayerParameter()
    depthwise.CopyFrom(layer)
    depthwise.convolution_param.num_output = channels
    depthwise.convolution_param.group = channels
    converted = convert_convolution(depthwise, inputs, blobs)
    if param.HasField("num_output") and param.num_output != channels:
        converted.warnings.append(f"num_output {param.num_output} is not read by this layer type; it has "
                                  f"{channels} outputs, one per input channel")
    return converted


# yonghenglh6/DepthwiseConvolution: a faster kernel for Convolution with group = channels, same meaning.
converter("DepthwiseConvolution")(convert_convolution)


@converter("Padding")
def convert_padding(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """DeepLab v1's Padding (padding_layer.cpp): pad_beg zeros before and pad_end after each spatial axis,
    both >= 0; both <= 0 crops instead (nn.ZeroPad2d takes negative amounts as crops)."""
    expect_bottoms(layer, inputs, 1)
    expect_blobs(layer, blobs, 0)
    shape = image_shape(layer, inputs)
    beg, end = layer.padding_param.pad_beg, layer.padding_param.pad_end
    if (beg < 0 < end) or (end < 0 < beg):
        raise layer_error(layer, f"pad_beg {beg} and pad_end {end} must both be >= 0 or both <= 0")
    size = (shape[2] + beg + end, shape[3] + beg + end)
    if min(size) <= 0:
        raise layer_error(layer, f"padding {beg}, {end} leaves nothing of {shape}")
    return Converted(nn.ZeroPad2d((beg, end, beg, end)), [shape[:2] + size])


@converter("CropCenter")
def convert_crop_center(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """lltcggie/caffe's CropCenter: crop_size[i] elements off both ends of axis i."""
    expect_bottoms(layer, inputs, 1)
    expect_blobs(layer, blobs, 0)
    shape = tuple(inputs[0])
    crop = [int(c) for c in layer.crop_center_param.crop_size]
    if len(crop) != len(shape):
        raise layer_error(layer, f"give one crop_size per axis ({len(shape)} for shape {shape}), got {len(crop)}")
    sizes = tuple(n - 2 * c for n, c in zip(shape, crop))
    if min(sizes) <= 0:
        raise layer_error(layer, f"crop_size {crop} leaves nothing of shape {shape}")
    start = 1 if crop[0] == 0 else 0  # leave the batch axis free unless it is cropped
    return Converted(Crop(start, tuple(crop[start:])), [sizes])


def _resize_geometry(layer, param, inputs: Sequence[Shape], modes: Sequence[str]):
    """synopsys-caffe's resize layers' common Reshape: (top shape, given sizes or None, float32 scales, mode)."""
    if param.data_format not in ("NCHW", "NHWC"):
        raise layer_error(layer, f"data_format {param.data_format!r} is not supported (NCHW and NHWC are)")
    shape = image_shape(layer, inputs)
    chosen = [name for name in modes if getattr(param, name)]
    if len(chosen) > 1:
        raise layer_error(layer, f"{' and '.join(chosen)} exclude each other")
    size = shape[2:] if param.data_format == "NCHW" else shape[1:3]
    out, given_size, scales = [], [], []
    for n, given, field, scale in ((size[0], param.output_height, "output_height", param.scale_height),
                                   (size[1], param.output_width, "output_width", param.scale_width)):
        scales.append(float(np.float32(scale)))
        if param.HasField(field):
            out.append(int(given))
            given_size.append(int(given))
            continue
        if not math.isfinite(scale) or scale <= 0:
            raise layer_error(layer, f"scale {scale} for a missing {field} must be a positive number")
        out.append(math.floor(np.float32(n) * np.float32(scale)))
        given_size.append(None)
    if min(out) <= 0:
        raise layer_error(layer, f"output size {tuple(out)} is not positive")
    top = shape[:2] + tuple(out) if param.data_format == "NCHW" else (shape[0], *out, shape[3])
    check_top(layer, top, inputs)  # before the tables of that size are built
    return top, tuple(given_size), tuple(scales), chosen[0] if chosen else "asymmetric"


@converter("ResizeBilinear")
def convert_resize_bilinear(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """synopsys-caffe's TensorFlow resize: output_height/width, else floor(size * scale) in float32."""
    expect_bottoms(layer, inputs, 1)
    expect_blobs(layer, blobs, 0)
    param = layer.resize_bilinear_param
    top, given, scales, mode = _resize_geometry(layer, param, inputs,
                                                ("align_corners", "half_pixel_centers", "pytorch_half_pixel"))
    return Converted(ResizeBilinear(given, scales, mode, param.data_format), [top])


@converter("ResizeNearestNeighbor")
def convert_resize_nearest(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """synopsys-caffe's resize_nearest_neighbor_layer.cpp: ResizeBilinear's sizes, the nearest input pixel."""
    expect_bottoms(layer, inputs, 1)
    expect_blobs(layer, blobs, 0)
    param = layer.resize_nearest_neighbor_param
    top, given, scales, mode = _resize_geometry(layer, param, inputs,
                                                ("align_corners", "half_pixel_centers", "half_pixel_onnx"))
    return Converted(ResizeNearest(given, scales, mode, param.data_format), [top])


@converter("Squeeze")
def convert_squeeze(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """synopsys-caffe's squeeze_layer.cpp: the axes of size 1 removed (those given, else all); not in place."""
    expect_bottoms(layer, inputs, 1)
    expect_blobs(layer, blobs, 0)
    shape = tuple(inputs[0])
    if layer.bottom and layer.top and layer.bottom[0] == layer.top[0]:
        raise layer_error(layer, "does not work in place (the fork refuses it)")
    axes = []
    for axis in layer.squeeze_param.axis:
        if not -len(shape) <= axis < len(shape):
            raise layer_error(layer, f"axis {axis} is outside a bottom of {len(shape)} axes {shape}")
        axis = axis % len(shape)
        if shape[axis] != 1:
            raise layer_error(layer, f"axis {axis} has size {shape[axis]}: only axes of size 1 can be removed")
        axes.append(axis)
    top = tuple(n for i, n in enumerate(shape) if not (n == 1 and (not axes or i in axes)))
    return Converted(Squeeze(tuple(sorted(set(axes)))), [top])


def _pair(layer, param, name: str, single: str) -> tuple[int, int] | None:
    """`single` for both axes, or `name`_h and `name`_w (the fork's CHECKs: one form, not both)."""
    has_pair = param.HasField(f"{name}_h") or param.HasField(f"{name}_w")
    if has_pair and param.HasField(single):
        raise layer_error(layer, f"give {single} or {name}_h and {name}_w, not both")
    if has_pair:
        if not (param.HasField(f"{name}_h") and param.HasField(f"{name}_w")):
            raise layer_error(layer, f"give both {name}_h and {name}_w")
        return int(getattr(param, f"{name}_h")), int(getattr(param, f"{name}_w"))
    if param.HasField(single):
        return int(getattr(param, single)), int(getattr(param, single))
    return None


@converter("Unpooling")
def convert_unpooling(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """HyeonwooNoh/caffe's unpooling_layer.cpp: MAX (with MAX pooling's mask as bottom 1, or at stride steps), AVE
    or TILE onto a map of unpool_size (or unpool_h, unpool_w)."""
    expect_bottoms(layer, inputs, 1, 2)
    expect_blobs(layer, blobs, 0)
    shape = image_shape(layer, inputs)
    param = layer.unpooling_param
    kernel = _pair(layer, param, "kernel", "kernel_size")
    if kernel is None or min(kernel) <= 0:
        raise layer_error(layer, "needs a positive kernel_size (or kernel_h and kernel_w)")
    stride = _pair(layer, param, "stride", "stride") or (int(param.stride),) * 2
    pad = _pair(layer, param, "pad", "pad") or (0, 0)
    if min(stride) <= 0:
        raise layer_error(layer, f"stride {stride} must be positive")
    if any(pad):
        raise layer_error(layer, f"pad {pad}: the fork allows only zero padding")
    size = _pair(layer, param, "unpool", "unpool_size")
    if size is None or min(size) <= 0:  # the fork CHECKs for one of the two forms
        raise layer_error(layer, "needs unpool_size (or unpool_h and unpool_w): the size of its output map")
    method = caffe_pb2.UnpoolingParameter.UnpoolMethod.Name(param.unpool)
    if len(inputs) == 2 and tuple(inputs[1]) != shape:
        raise layer_error(layer, f"the mask (bottom 1) has shape {tuple(inputs[1])}, the data {shape}: they must agree")
    return Converted(Unpooling(method, kernel, stride, size, layer.name), [shape[:2] + size])


@converter("Flip")
def convert_flip(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """happynear/caffe-windows' flip_layer.cpp: the image reversed along its width and/or height."""
    expect_bottoms(layer, inputs, 1)
    expect_blobs(layer, blobs, 0)
    shape = image_shape(layer, inputs)
    return Converted(Flip(layer.flip_param.flip_width, layer.flip_param.flip_height), [shape])


@converter("LabelSpecificAdd")
def convert_label_specific_add(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """happynear's label_specific_add_layer.cpp (AM-Softmax's margin): scores and labels in, the scores out, the
    ground-truth score plus `bias` in training only."""
    expect_bottoms(layer, inputs, 2)
    expect_blobs(layer, blobs, 0)
    scores, labels = tuple(inputs[0]), tuple(inputs[1])
    if not scores or math.prod(labels) != scores[0]:
        raise layer_error(layer, f"bottom 1 (labels) has shape {labels}: expected one label for each of the "
                                 f"{scores[0] if scores else 0} samples of bottom 0 {scores}")
    return Converted(LabelSpecificAdd(float(np.float32(layer.label_specific_add_param.bias))), [scores])
