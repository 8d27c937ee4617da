"""Converters for layer types of DeconvNet / DecoupledNet (HyeonwooNoh/caffe), Intel Caffe (intel/caffe) and NVCaffe
(DIGITS' DetectNet clustering, a Python layer of NVIDIA/caffe).

(NVCaffe's and Intel Caffe's fields of BVLC types are read by those types' own converters: BatchNorm, ELU, ReLU,
Concat, Convolution, InnerProduct, Pooling.)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from torch import nn

from caffe2torch.layers.registry import (Converted, Shape, caffe_int, converter, expect_blobs, expect_bottoms,
                                         image_shape, layer_error)
from caffe2torch.detectnet import MAX_BOXES, ClusterDetections
from caffe2torch.vendor import Unpool, unpooled_size
from proto import caffe_pb2

_METHODS = {caffe_pb2.UnpoolingParameter.MAX: "MAX", caffe_pb2.UnpoolingParameter.AVE: "AVE",
            caffe_pb2.UnpoolingParameter.TILE: "TILE"}


def _pair(layer, param, name: str, single: str, default: int | None) -> tuple[int, int] | None:
    """`single` for both axes or `name`_h and `name`_w, as unpooling_layer.cpp's CHECKs allow."""
    has_h, has_w = param.HasField(f"{name}_h"), param.HasField(f"{name}_w")
    if has_h or has_w:
        if param.HasField(single) or not (has_h and has_w):
            raise layer_error(layer, f"give {single} or both {name}_h and {name}_w")
        return tuple(caffe_int(layer, f"{name}_h/{name}_w", [getattr(param, f"{name}_h"), getattr(param, f"{name}_w")]))
    if param.HasField(single) or default is not None:
        value, = caffe_int(layer, single, [getattr(param, single) if param.HasField(single) else default])
        return value, value
    return None


@converter("Unpooling")
def convert_unpooling(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """DeconvNet's UNPOOLING (unpooling_layer.cpp): MAX at a pooling mask's indices (second bottom) or at each
    window's corner, AVE and TILE spreading each value over its window (see vendor.Unpool)."""
    expect_bottoms(layer, inputs, 1, 2)
    expect_blobs(layer, blobs, 0)
    param = layer.unpooling_param
    shape = image_shape(layer, inputs)
    kernel = _pair(layer, param, "kernel", "kernel_size", None)
    if kernel is None:
        raise layer_error(layer, "kernel_size (or kernel_h and kernel_w) is required")
    stride = _pair(layer, param, "stride", "stride", 1)
    pad = _pair(layer, param, "pad", "pad", 0)
    if min(kernel) < 1 or min(stride) < 1:
        raise layer_error(layer, f"kernel {kernel} and stride {stride} must be positive")
    if pad != (0, 0):
        raise layer_error(layer, f"pad {pad}: the fork allows only zero padding")
    if param.HasField("unpool_size") and (param.HasField("unpool_h") or param.HasField("unpool_w")) or \
            param.HasField("unpool_h") != param.HasField("unpool_w"):
        raise layer_error(layer, "give unpool_size or both unpool_h and unpool_w")
    size = None
    if param.HasField("unpool_size"):
        size = tuple(caffe_int(layer, "unpool_size", [param.unpool_size])) * 2
    elif param.HasField("unpool_h"):
        size = tuple(caffe_int(layer, "unpool_h/unpool_w", [param.unpool_h, param.unpool_w]))
    if size is not None and min(size) < 1:
        raise layer_error(layer, f"unpooled size {size} must be positive")
    method = _METHODS.get(param.unpool)
    if method is None:
        raise layer_error(layer, f"unknown unpool method {param.unpool}")
    if len(inputs) == 2:
        if method != "MAX":
            raise layer_error(layer, f"{method} unpooling takes one bottom (a mask is MAX's)")
        if tuple(inputs[1]) != shape:
            raise layer_error(layer, f"the mask (bottom 1) has shape {tuple(inputs[1])}, the data {shape}: they must "
                                     f"agree")
    out = size if size is not None else unpooled_size(shape[2:], kernel, stride)
    return Converted(Unpool(method, kernel, stride, size, layer.name), [shape[:2] + tuple(out)])


@converter("DropoutChannel", "SpatialDropout")
def convert_channel_dropout(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """Whole channels dropped in training, identity at test time: DeconvNet's DROPOUT_CHANNEL (dropout_param) and
    Intel Caffe's SpatialDropout (spatial_dropout_param); both scale the kept channels by 1 / (1 - ratio)."""
    expect_bottoms(layer, inputs, 1)
    expect_blobs(layer, blobs, 0)
    param = layer.spatial_dropout_param if layer.type == "SpatialDropout" else layer.dropout_param
    ratio = float(np.float32(param.dropout_ratio))
    if not 0.0 <= ratio < 1.0:
        raise layer_error(layer, f"dropout_ratio must be in [0, 1), got {ratio}")
    return Converted(nn.Dropout2d(ratio), [tuple(inputs[0])])


@converter("Python:caffe.layers.detectnet.clustering.ClusterDetections")
def convert_cluster_detections(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """DetectNet's clustering (NVCaffe's python/caffe/layers/detectnet/clustering.py): param_str "image_size_x,
    image_size_y, stride, coverage threshold, rect threshold, rect eps, min_height[, num_classes]"; bottoms
    coverage [N, classes, H, W] and boxes [N, 4, H, W]; one [N, 50, 5] top per class (see detectnet.py)."""
    expect_bottoms(layer, inputs, 2)
    expect_blobs(layer, blobs, 0)
    text = layer.python_param.param_str
    parts = [part.strip() for part in text.split(",")]
    try:
        values = [int(parts[0]), int(parts[1]), int(parts[2]), float(parts[3]), int(parts[4]), float(parts[5]),
                  int(parts[6])] + ([int(parts[7])] if len(parts) > 7 else [1])
    except (ValueError, IndexError):
        raise layer_error(layer, f"param_str {text!r}: expected 'image_size_x, image_size_y, stride, threshold, "
                                 f"rect_threshold, eps, min_height[, num_classes]' (ints and floats), as the layer "
                                 f"reads it") from None
    size_x, size_y, stride, threshold, rect_threshold, eps, min_height, classes = values
    if stride < 1 or size_x < stride or size_y < stride or classes < 1:
        raise layer_error(layer, f"param_str {text!r}: the image size must hold at least one stride and there must "
                                 f"be at least one class")
    coverage, boxes = (image_shape(layer, inputs, index) for index in (0, 1))
    if coverage[1] != classes or len(layer.top) != classes:
        raise layer_error(layer, f"{classes} classes: the coverage (bottom 0) has {coverage[1]} channels and the layer "
                                 f"{len(layer.top)} tops; the fork wants one of each per class")
    if boxes[0] != coverage[0] or boxes[1] < 4:
        raise layer_error(layer, f"the boxes (bottom 1) {boxes} need the coverage's batch and at least 4 channels")
    module = ClusterDetections((size_x, size_y), stride, threshold, rect_threshold, eps, min_height, classes,
                               layer.name)
    return Converted(module, [(coverage[0], MAX_BOXES, 5)] * classes)
