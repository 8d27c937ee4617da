"""Converters for the YOLO Caffe ports (eric612/MobileNet-YOLO): Reorg, YoloDetectionOutput, Yolov3DetectionOutput."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from caffe2torch.layers.registry import (Converted, Shape, converter, expect_blobs, expect_bottoms, image_shape,
                                         layer_error)
from caffe2torch.yolo import Reorg, YoloV2Output, YoloV3Output


def _maps(layer, inputs: Sequence[Shape]) -> list[Shape]:
    return [image_shape(layer, inputs, index) for index in range(len(inputs))]


@converter("Reorg")
def convert_reorg(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """YOLOv2's passthrough: darknet's reorg, with its channel order (reorg_layer.cpp)."""
    expect_bottoms(layer, inputs, 1)
    expect_blobs(layer, blobs, 0)
    (n, c, h, w), = _maps(layer, inputs)
    param = layer.reorg_param
    if param.stride < 1:  # absent: caffe-yolo9000's default 2 (MobileNet-YOLO and Intel Caffe require one)
        raise layer_error(layer, "reorg_param needs stride >= 1")
    s = int(param.stride)
    if c % (s * s):
        raise layer_error(layer, f"{c} channels are not a multiple of stride^2 = {s * s}")
    if param.reverse:
        top = (n, c // (s * s), h * s, w * s)
    else:
        if h % s or w % s:
            raise layer_error(layer, f"a {h} x {w} map does not divide by stride {s}")
        top = (n, c * s * s, h // s, w // s)
    return Converted(Reorg(s, param.reverse), [top])


def _check_counts(layer, field: str, shapes: list[Shape]) -> None:
    """num_classes given and positive, num_box positive, each map num_box x (5 + classes) channels."""
    param = getattr(layer, field)
    if not param.HasField("num_classes"):
        raise layer_error(layer, f"{field} must give num_classes")
    if param.num_classes < 1 or param.num_box < 1:
        raise layer_error(layer, "num_classes and num_box must be at least 1")
    num_box, num_classes = param.num_box, param.num_classes
    wanted = num_box * (5 + num_classes)
    for index, shape in enumerate(shapes):
        if shape[1] != wanted:
            raise layer_error(layer, f"bottom {index} has {shape[1]} channels: expected num_box {num_box} x "
                               f"(5 + {num_classes} classes) = {wanted}")


@converter("YoloDetectionOutput")
def convert_yolo_detection_output(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """YOLOv2 region boxes from one or two square maps, softmax class, class-agnostic NMS; [1, 1, K, 7]."""
    expect_bottoms(layer, inputs, 1, 2)
    expect_blobs(layer, blobs, 0)
    shapes = _maps(layer, inputs)
    _check_counts(layer, "yolo_detection_output_param", shapes)
    param = layer.yolo_detection_output_param
    if param.coords != 4:
        raise layer_error(layer, f"coords {param.coords}: the fork reads 4")
    for index, shape in enumerate(shapes):
        if shape[2] != shape[3]:
            raise layer_error(layer, f"bottom {index} is {shape[2]} x {shape[3]}: the fork reads a square map")
    if len(param.biases) < 2 * param.num_box:
        raise layer_error(layer, f"{len(param.biases)} biases for {param.num_box} boxes: needs {2 * param.num_box}")
    module = YoloV2Output(param.num_classes, param.num_box, tuple(param.biases), param.confidence_threshold,
                          param.nms_threshold)
    return Converted(module, [(1, 1, 1, 7)])  # Caffe's shape before the first forward: K is data-dependent


@converter("Yolov3DetectionOutput")
def convert_yolov3_detection_output(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """YOLOv3 boxes from one map per scale (anchors chosen by `mask`), per-class sigmoid scores,
    class-agnostic NMS; [1, 1, K, 7]."""
    expect_blobs(layer, blobs, 0)
    if not inputs:
        raise layer_error(layer, "needs at least one bottom (one map per scale)")
    shapes = _maps(layer, inputs)
    param = layer.yolov3_detection_output_param
    if param.gaussian_box:
        raise layer_error(layer, "gaussian_box (Gaussian YOLOv3) is not supported")
    if len(shapes) != param.mask_group_num:
        raise layer_error(layer, f"{len(shapes)} bottoms but mask_group_num {param.mask_group_num}: one map per group")
    _check_counts(layer, "yolov3_detection_output_param", shapes)
    groups = len(param.mask) // len(shapes)
    if groups < param.num_box:
        raise layer_error(layer, f"{len(param.mask)} mask entries for {len(shapes)} maps of {param.num_box} boxes")
    if len(param.anchors_scale) < len(shapes):
        raise layer_error(layer, f"{len(param.anchors_scale)} anchors_scale values for {len(shapes)} maps")
    if 0 in param.anchors_scale[:len(shapes)]:  # the fork divides each box's size by side * anchors_scale
        raise layer_error(layer, f"anchors_scale {list(param.anchors_scale)} must be at least 1 for every map")
    if not param.mask or max(param.mask) >= len(param.biases) // 2:
        raise layer_error(layer, f"mask {max(param.mask)} names a bias pair beyond the {len(param.biases) // 2} given")
    module = YoloV3Output(param.num_classes, param.num_box, tuple(param.biases), tuple(param.anchors_scale),
                          tuple(param.mask), param.confidence_threshold, param.nms_threshold)
    return Converted(module, [(1, 1, 1, 7)])  # Caffe's shape before the first forward: K is data-dependent
