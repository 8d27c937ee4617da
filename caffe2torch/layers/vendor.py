"""Converters for layer types of DeconvNet / DecoupledNet (HyeonwooNoh/caffe: DropoutChannel; its Unpooling is in
layers/forks.py), Intel Caffe (intel/caffe) and NVCaffe (DIGITS' DetectNet clustering, a Python layer of NVIDIA/caffe).

(NVCaffe's and Intel Caffe's fields of BVLC types are read by those types' own converters: BatchNorm, ELU, ReLU,
Concat, Convolution, InnerProduct, Pooling.)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from torch import nn

from caffe2torch.layers.registry import (Converted, Shape, converter, expect_blobs, expect_bottoms,
                                         image_shape, layer_error)
from caffe2torch.detectnet import MAX_BOXES, ClusterDetections

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
