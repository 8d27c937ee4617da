"""Converters for Caffe's reducing layers: Reduction (SUM, ASUM, SUMSQ, MEAN) and MVN."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from caffe2torch.bvlc import MVN, Reduction
from caffe2torch.layers.registry import (Converted, Shape, canonical_axis, converter, expect_blobs, expect_bottoms,
                                         image_shape)
from proto import caffe_pb2

_OPERATIONS = {caffe_pb2.ReductionParameter.SUM: "SUM", caffe_pb2.ReductionParameter.ASUM: "ASUM",
               caffe_pb2.ReductionParameter.SUMSQ: "SUMSQ", caffe_pb2.ReductionParameter.MEAN: "MEAN"}


@converter("Reduction")
def convert_reduction(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """One value per slice from `axis` on (axis 0 by default: the whole blob, a 0-axis top); MEAN scales by
    coeff / count, computed in float32 as reduction_layer.cpp's Reshape."""
    expect_bottoms(layer, inputs, 1)
    expect_blobs(layer, blobs, 0)
    param = layer.reduction_param
    shape = tuple(inputs[0])
    axis = canonical_axis(layer, param.axis, len(shape))
    operation = _OPERATIONS[param.operation]
    # MEAN's coeff / count is worked out for the input the net gets, as Caffe's Reshape does
    return Converted(Reduction(operation, axis, float(np.float32(param.coeff))), [shape[:axis]])


@converter("MVN")
def convert_mvn(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """Mean (and with normalize_variance, standard deviation) normalisation per channel plane or per sample."""
    expect_bottoms(layer, inputs, 1)
    expect_blobs(layer, blobs, 0)
    shape = image_shape(layer, inputs)
    param = layer.mvn_param
    module = MVN(param.normalize_variance, param.across_channels, float(np.float32(param.eps)))
    return Converted(module, [shape])
