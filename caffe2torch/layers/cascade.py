"""Converters for Cascade R-CNN and MS-CNN (zhaoweicai/cascade-rcnn, zhaoweicai/mscnn): DecodeBBox,
BoxGroupOutput, BoxOutput, ROIAlign and ScaleRoute (their ROIPooling's pad_ratio is in layers/rcnn.py)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from caffe2torch.cascade import BoxGroupOutput, BoxOutput, DecodeBBox, ROIAlign, ScaleRoute
from caffe2torch.modules import FLT_MAX
from caffe2torch.layers.registry import (Converted, Shape, converter, expect_blobs, expect_bottoms, image_shape,
                                         layer_error)

NMS_TYPES = ("IOU", "IOMU", "IOFU")


def _mean_std(layer) -> tuple[tuple, tuple] | None:
    """bbox_reg_param's de-normalisation: 4 means and 4 positive stds, or None when either list is empty."""
    param = layer.bbox_reg_param
    if not param.bbox_mean or not param.bbox_std:
        return None
    if len(param.bbox_mean) != 4 or len(param.bbox_std) != 4:
        raise layer_error(layer, f"bbox_reg_param needs 4 bbox_mean and 4 bbox_std values, got "
                          f"{len(param.bbox_mean)} and {len(param.bbox_std)}")
    if not all(v > 0 and math.isfinite(v) for v in param.bbox_std):
        raise layer_error(layer, f"bbox_std {list(param.bbox_std)} must be positive")
    return tuple(param.bbox_mean), tuple(param.bbox_std)


def _regions(layer, shape: Shape, index: int) -> int:
    if len(shape) < 2 or shape[1] != 5 or math.prod(shape[2:]) != 1:
        raise layer_error(layer, f"bottom {index} must hold [R, 5] regions (image, x1, y1, x2, y2), has shape {shape}")
    return shape[0]


@converter("DecodeBBox")
def convert_decode_bbox(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """Regions moved by their foreground regression (decode_bbox_layer.cpp at TEST)."""
    expect_blobs(layer, blobs, 0)
    if len(inputs) == 3:  # Reshape's CHECK(phase == TRAIN) for the matched ground truth
        raise layer_error(layer, "a third bottom (matched ground truth) is for training; Caffe refuses it at TEST")
    expect_bottoms(layer, inputs, 2)
    deltas, rois = tuple(inputs[0]), tuple(inputs[1])
    count = _regions(layer, rois, 1)
    if len(deltas) < 2 or deltas[1] != 8 or deltas[0] != count or math.prod(deltas[2:]) != 1:
        raise layer_error(layer, f"bottom 0 must hold [{count}, 8] class-agnostic deltas (background, foreground), "
                          f"has shape {deltas}")
    mean_std = _mean_std(layer) or ((0.0,) * 4, (1.0,) * 4)
    return Converted(DecodeBBox(*mean_std), [rois])


def _nms(layer, fg_thr: float, iou_thr: float, nms_type: str) -> None:
    if nms_type not in NMS_TYPES:  # the fork's overlap treats any other name as IOU; refused as a likely typo
        raise layer_error(layer, f"nms_type {nms_type!r} is not one of {', '.join(NMS_TYPES)}")
    if not (math.isfinite(fg_thr) and math.isfinite(iou_thr)):
        raise layer_error(layer, "fg_thr and iou_thr must be finite numbers")


@converter("BoxGroupOutput")
def convert_box_group_output(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """cascade-rcnn's RPN proposals from (probabilities, deltas) pairs of maps with groups of anchor fields."""
    expect_blobs(layer, blobs, 0)
    param = layer.box_group_output_param
    if len(inputs) < 2 or len(inputs) % 2:
        raise layer_error(layer, f"takes pairs of bottoms (probabilities, box deltas), got {len(inputs)}")
    if len(param.box_group_param) != len(inputs) // 2:
        raise layer_error(layer, f"{len(inputs) // 2} pairs of bottoms but {len(param.box_group_param)} box_group_param")
    _nms(layer, param.fg_thr, param.iou_thr, param.nms_type)
    fields, strides, images, classes = [], [], None, None
    for level, group in enumerate(param.box_group_param):
        if not group.field_h or len(group.field_h) != len(group.field_w):
            raise layer_error(layer, f"box_group_param {level}: give as many field_w as field_h (at least one)")
        if group.stride <= 0:
            raise layer_error(layer, f"box_group_param {level}: stride must be positive")
        probs, deltas = image_shape(layer, inputs, 2 * level), image_shape(layer, inputs, 2 * level + 1)
        count = len(group.field_h)
        if deltas[1] != 4 or deltas[0] != probs[0] or deltas[2:] != probs[2:] or probs[0] % count:
            raise layer_error(layer, f"bottoms {2 * level} {probs} and {2 * level + 1} {deltas}: expected [N x {count}, "
                              f"C, H, W] probabilities and [N x {count}, 4, H, W] deltas")
        if images not in (None, probs[0] // count) or classes not in (None, probs[1]):
            raise layer_error(layer, f"bottom {2 * level} {probs}: every map needs the same images and classes")
        images, classes = probs[0] // count, probs[1]
        fields.append(tuple(zip(group.field_w, group.field_h)))
        strides.append(group.stride)
    if len(layer.top) not in (1, 2):
        raise layer_error(layer, f"has {len(layer.top)} tops; it makes the regions and optionally their scores")
    mean_std = _mean_std(layer) or ((0.0,) * 4, (1.0,) * 4)
    module = BoxGroupOutput(tuple(fields), tuple(strides), param.fg_thr, param.iou_thr, param.nms_type,
                            param.field_whr, param.field_xyr, param.max_nms_num, param.max_post_nms_num,
                            param.min_size, *mean_std, with_scores=len(layer.top) == 2)
    return Converted(module, [(1, 5), (1, 6)][:len(layer.top)])


@converter("BoxOutput")
def convert_box_output(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """MS-CNN's proposals: one [N, C + 4, H, W] bottom per map, each with its field size and downsample rate."""
    expect_blobs(layer, blobs, 0)
    param = layer.box_output_param
    if not inputs:
        raise layer_error(layer, "needs at least one bottom")
    counts = (len(param.field_h), len(param.field_w), len(param.downsample_rate))
    if counts != (len(inputs),) * 3:
        raise layer_error(layer, f"{len(inputs)} bottoms need as many field_h, field_w and downsample_rate, got "
                          f"{counts[0]}, {counts[1]} and {counts[2]}")
    _nms(layer, param.fg_thr, param.iou_thr, param.nms_type)
    shapes = [image_shape(layer, inputs, i) for i in range(len(inputs))]
    for index, shape in enumerate(shapes):
        if shape[1] < 6 or shape[0] != shapes[0][0]:
            raise layer_error(layer, f"bottom {index} has shape {shape}: expected [{shapes[0][0]}, classes + 4, H, W] "
                              f"with at least 2 classes")
    if len(layer.top) not in (1, 2):
        raise layer_error(layer, f"has {len(layer.top)} tops; it makes the regions and optionally their scores")
    mean_std = _mean_std(layer)
    module = BoxOutput(tuple(zip(param.field_w, param.field_h)), tuple(param.downsample_rate), param.fg_thr,
                       param.iou_thr, param.nms_type, param.field_whr, param.field_xyr, param.max_nms_num,
                       param.max_post_nms_num, param.min_size, *(mean_std or (None, None)),
                       with_scores=len(layer.top) == 2)
    return Converted(module, [(1, 5), (1, 6)][:len(layer.top)])


@converter("ROIAlign")
def convert_roi_align(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """cascade-rcnn / mscnn's ROIAlign: a (pooled + 1)^2 grid of bilinear samples per region (roi_pooling_param)."""
    expect_bottoms(layer, inputs, 2)
    expect_blobs(layer, blobs, 0)
    features = image_shape(layer, inputs, 0)
    count = _regions(layer, tuple(inputs[1]), 1)
    param = layer.roi_pooling_param
    if param.pooled_h <= 0 or param.pooled_w <= 0:
        raise layer_error(layer, "roi_pooling_param's pooled_h and pooled_w must be > 0")
    if not (math.isfinite(param.spatial_scale) and math.isfinite(param.pad_ratio)):
        raise layer_error(layer, "spatial_scale and pad_ratio must be finite numbers")
    module = ROIAlign((param.pooled_h, param.pooled_w), param.spatial_scale, param.pad_ratio, layer.name)
    return Converted(module, [(count, features[1], param.pooled_h + 1, param.pooled_w + 1)])


@converter("ScaleRoute")
def convert_scale_route(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """cascade-rcnn's FPN routing: the rows of every bottom whose region (bottom 0) has a scale in [low, high)."""
    expect_blobs(layer, blobs, 0)
    if not inputs or len(layer.top) != len(inputs):
        raise layer_error(layer, f"needs one top per bottom, got {len(inputs)} bottoms and {len(layer.top)} tops")
    count = _regions(layer, tuple(inputs[0]), 0)
    for index, shape in enumerate(inputs):
        if not shape or shape[0] != count:
            raise layer_error(layer, f"bottom {index} has shape {tuple(shape)}: every bottom needs one row per region")
    param = layer.scale_route_param
    low = param.low_scale if param.HasField("low_scale") else None
    high = param.high_scale if param.HasField("high_scale") else None
    if low is not None and not low > 0 or high is not None and not high < FLT_MAX or \
            low is not None and high is not None and not high >= low:
        raise layer_error(layer, f"low_scale {low} and high_scale {high} must satisfy 0 < low <= high")
    # The number of rows depends on the data: Caffe's setup shape has one.
    return Converted(ScaleRoute(low, high), [(1,) + tuple(shape[1:]) for shape in inputs])
