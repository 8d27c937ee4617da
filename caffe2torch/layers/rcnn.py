"""Converters for the R-CNN family: ROIPooling, PSROIPooling and py-faster-rcnn's Python proposal layer."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from caffe2torch.layers.registry import (Converted, Shape, converter, expect_blobs, expect_bottoms, layer_error,
                                         parse_param_str)
from caffe2torch.rcnn import Proposal, PSROIPool, ROIPool


def _spatial_scale(layer, value: float) -> float:
    """Unchecked by the forks, but an infinite or NaN scale makes their (int) corners undefined."""
    if not math.isfinite(value):
        raise layer_error(layer, f"spatial_scale {value:g} must be a finite number")
    return value


def _rois(layer, inputs: Sequence[Shape]) -> tuple[Shape, int]:
    expect_bottoms(layer, inputs, 2)
    features, rois = tuple(inputs[0]), tuple(inputs[1])
    if len(features) != 4:
        raise layer_error(layer, f"bottom 0 must be a 4-axis feature map, has shape {features}")
    if len(rois) < 2 or rois[1] != 5 or math.prod(rois[2:]) != 1:
        raise layer_error(layer, f"bottom 1 must hold [R, 5] regions (batch index, x1, y1, x2, y2), has shape {rois}")
    return features, rois[0]


@converter("ROIPooling")
def convert_roi_pooling(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """MAX over floor/ceil bins of each region, coordinates rounded after scaling (roi_pooling_layer.cpp); mscnn's
    and cascade-rcnn's pad_ratio grows each region first."""
    expect_blobs(layer, blobs, 0)
    features, count = _rois(layer, inputs)
    param = layer.roi_pooling_param
    if param.pooled_h <= 0 or param.pooled_w <= 0:
        raise layer_error(layer, "pooled_h and pooled_w must be > 0")
    if not math.isfinite(param.pad_ratio):
        raise layer_error(layer, f"pad_ratio {param.pad_ratio:g} must be a finite number")
    module = ROIPool((param.pooled_h, param.pooled_w), _spatial_scale(layer, param.spatial_scale), layer.name,
                     param.pad_ratio)
    return Converted(module, [(count, features[1], param.pooled_h, param.pooled_w)])


@converter("PSROIPooling")
def convert_psroi_pooling(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """Position-sensitive average pooling (R-FCN's psroi_pooling_layer.cu)."""
    expect_blobs(layer, blobs, 0)
    features, count = _rois(layer, inputs)
    param = layer.psroi_pooling_param
    for name in ("spatial_scale", "output_dim", "group_size"):
        if not param.HasField(name):
            raise layer_error(layer, f"psroi_pooling_param.{name} is required")
    if param.output_dim <= 0 or param.group_size <= 0:
        raise layer_error(layer, "output_dim and group_size must be > 0")
    wanted = param.output_dim * param.group_size ** 2
    if features[1] != wanted:
        raise layer_error(layer, f"input has {features[1]} channels; output_dim {param.output_dim} x group_size "
                           f"{param.group_size}^2 needs {wanted}")
    module = PSROIPool(param.output_dim, param.group_size, _spatial_scale(layer, param.spatial_scale), layer.name)
    return Converted(module, [(count, param.output_dim, param.group_size, param.group_size)])


def _number(layer, key: str, value) -> float:
    """A param_str number py-faster-rcnn computes with (YAML gives int or float; a bool or string is not one),
    positive and finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise layer_error(layer, f"param_str's {key!r} must be a number, got {value!r}")
    if not 0 < value < math.inf:
        raise layer_error(layer, f"param_str's {key!r} must be a positive finite number, got {value!r}")
    return float(value)


def _numbers(layer, params: dict, key: str, default: tuple) -> tuple[float, ...]:
    value = params.get(key, default)
    if not isinstance(value, (list, tuple)) or not value:
        raise layer_error(layer, f"param_str's {key!r} must be a non-empty list of numbers, got {value!r}")
    return tuple(_number(layer, key, item) for item in value)


@converter("Python:rpn.proposal_layer.ProposalLayer")
def convert_proposal(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """py-faster-rcnn's RPN proposals with its cfg.TEST values (pre-NMS 6000, post-NMS 300, NMS 0.7,
    min size 16); param_str gives feat_stride, scales and (pva-faster-rcnn) ratios, used as the numbers
    they are (a fractional feat_stride multiplies the shifts as in numpy)."""
    expect_bottoms(layer, inputs, 3)
    expect_blobs(layer, blobs, 0)
    params = parse_param_str(layer, layer.python_param.param_str)
    if "feat_stride" not in params:
        raise layer_error(layer, "param_str must give 'feat_stride'")
    feat_stride = _number(layer, "feat_stride", params["feat_stride"])
    scales, ratios = _numbers(layer, params, "scales", (8, 16, 32)), _numbers(layer, params, "ratios", (0.5, 1, 2))
    scores, deltas, info = (tuple(shape) for shape in inputs)
    anchors = len(ratios) * len(scales)
    if len(scores) != 4 or scores[1] != 2 * anchors:
        raise layer_error(layer, f"bottom 0 (the objectness scores) has shape {scores}: expected 2 x {anchors} channels "
                           f"for {len(scales)} scales and {len(ratios)} ratios")
    if scores[0] != 1:
        raise layer_error(layer, f"bottom 0 has a batch of {scores[0]}: the layer takes single-image batches")
    if len(deltas) != 4 or deltas[1] != 4 * anchors or deltas[2:] != scores[2:]:
        raise layer_error(layer, f"bottom 1 (the box deltas) has shape {deltas}: expected 4 x {anchors} channels on "
                           f"the scores' {scores[2]} x {scores[3]} map")
    if len(info) < 2 or info[1] < 3:  # it reads im_info[0, :3]
        raise layer_error(layer, f"bottom 2 (im_info) has shape {info}: expected [1, 3] (height, width, scale)")
    if len(layer.top) > 2:
        raise layer_error(layer, "has at most two tops (rois, scores)")
    module = Proposal(feat_stride, scales, with_scores=len(layer.top) == 2, ratios=ratios, layer=layer.name)
    return Converted(module, [(1, 5), (1, 1)][:max(1, len(layer.top))])
