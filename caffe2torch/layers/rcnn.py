"""Converters for the R-CNN family: ROIPooling, PSROIPooling and py-faster-rcnn's Python proposal layer."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from caffe2torch.layers.registry import (Converted, Shape, converter, expect_blobs, expect_bottoms, layer_error,
                                         parse_param_str)
from caffe2torch.rcnn import Proposal, PSROIPool, ROIPool


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
    """MAX over floor/ceil bins of each region, coordinates rounded after scaling (roi_pooling_layer.cpp)."""
    expect_blobs(layer, blobs, 0)
    features, count = _rois(layer, inputs)
    param = layer.roi_pooling_param
    if param.pooled_h <= 0 or param.pooled_w <= 0:
        raise layer_error(layer, "pooled_h and pooled_w must be > 0")
    module = ROIPool((param.pooled_h, param.pooled_w), param.spatial_scale)
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
    module = PSROIPool(param.output_dim, param.group_size, param.spatial_scale)
    return Converted(module, [(count, param.output_dim, param.group_size, param.group_size)])


@converter("Python:rpn.proposal_layer.ProposalLayer")
def convert_proposal(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """py-faster-rcnn's RPN proposals with its cfg.TEST values (pre-NMS 6000, post-NMS 300, NMS 0.7,
    min size 16); param_str gives feat_stride, scales and (pva-faster-rcnn) ratios."""
    expect_bottoms(layer, inputs, 3)
    expect_blobs(layer, blobs, 0)
    params = parse_param_str(layer, layer.python_param.param_str)
    if "feat_stride" not in params:
        raise layer_error(layer, "param_str must give 'feat_stride'")
    scales, ratios = params.get("scales", (8, 16, 32)), params.get("ratios", (0.5, 1, 2))
    try:
        scales, ratios = tuple(float(v) for v in scales), tuple(float(v) for v in ratios)
    except (TypeError, ValueError):
        raise layer_error(layer, f"param_str's scales {scales!r} and ratios {ratios!r} must be lists of numbers") from None
    if not scales or not ratios or min(scales + ratios) <= 0:
        raise layer_error(layer, "param_str's scales and ratios must be non-empty lists of positive numbers")
    scores, deltas = tuple(inputs[0]), tuple(inputs[1])
    anchors = len(ratios) * len(scales)
    if len(scores) != 4 or scores[1] != 2 * anchors:
        raise layer_error(layer, f"bottom 0 (the objectness scores) has shape {scores}: expected 2 x {anchors} channels "
                           f"for {len(scales)} scales and {len(ratios)} ratios")
    if len(deltas) != 4 or deltas[1] != 4 * anchors or deltas[2:] != scores[2:]:
        raise layer_error(layer, f"bottom 1 (the box deltas) has shape {deltas}: expected 4 x {anchors} channels on "
                           f"the scores' {scores[2]} x {scores[3]} map")
    if len(layer.top) > 2:
        raise layer_error(layer, "has at most two tops (rois, scores)")
    module = Proposal(int(params["feat_stride"]), scales, with_scores=len(layer.top) == 2, ratios=ratios)
    return Converted(module, [(1, 5), (1, 1)][:max(1, len(layer.top))])
