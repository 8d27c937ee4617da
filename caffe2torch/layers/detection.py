"""Converters for SSD's layers (weiliu89/caffe, branch ssd): Normalize, Permute, PriorBox, DetectionOutput."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from caffe2torch.detection import (LOWEST_FLOAT, ChannelNormalize, DetectionOutput, Normalize, Permute, PriorBox,
                                   text_values)
from caffe2torch.layers.registry import (Converted, Shape, assign, converter, expect_blobs, expect_bottoms, layer_error,
                                         on_meta)
from caffe2torch.limits import check_top
from proto import caffe_pb2


@converter("Normalize")
def convert_normalize(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """L2 norm over channels (or the whole item), eps inside the square root, then a scale blob."""
    expect_bottoms(layer, inputs, 1)
    if layer.HasField("normalize_param"):
        return _convert_happynear_normalize(layer, inputs, blobs)
    expect_blobs(layer, blobs, 1)
    shape = tuple(inputs[0])
    if not 2 <= len(shape) <= 4:  # the fork reads num/channels/height/width
        raise layer_error(layer, f"needs a bottom of 2 to 4 axes, has shape {shape}")
    param = layer.norm_param
    scale = np.asarray(blobs[0], dtype=np.float32).reshape(-1)
    wanted = 1 if param.channel_shared else shape[1]
    if scale.size != wanted:
        kind = "channel_shared" if param.channel_shared else f"{shape[1]} channels"
        raise layer_error(layer, f"scale blob has {scale.size} values, expected {wanted} ({kind})")
    module = on_meta(Normalize, shape[1], across_spatial=param.across_spatial, channel_shared=param.channel_shared,
                     eps=param.eps)
    return Converted(assign(module, weight=torch.from_numpy(scale.copy())), [shape])


def _convert_happynear_normalize(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """happynear/caffe-windows' normalize_layer.cpp (NormFace): each pixel's channel vector over its L2 norm
    sqrt(sum x^2 + 1e-6) or its L1 norm sum |x| + 1e-6; no scale blob."""
    expect_blobs(layer, blobs, 0)
    shape = tuple(inputs[0])
    if not 2 <= len(shape) <= 4:
        raise layer_error(layer, f"needs a bottom of 2 to 4 axes, has shape {shape}")
    kind = layer.normalize_param.normalize_type
    if kind not in ("L2", "L1"):
        raise layer_error(layer, f"normalize_type {kind!r}: the fork implements L2 and L1")
    if len(layer.top) > 1:
        raise layer_error(layer, "its second top (the norms) is not converted; give the layer one top")
    return Converted(ChannelNormalize(kind), [shape])


@converter("Permute")
def convert_permute(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """The listed axes first, then the others in their order (PermuteLayer::LayerSetUp)."""
    expect_bottoms(layer, inputs, 1)
    expect_blobs(layer, blobs, 0)
    shape = tuple(inputs[0])
    order: list[int] = []
    for axis in layer.permute_param.order:
        if axis >= len(shape):
            raise layer_error(layer, f"order {axis} out of range for a {len(shape)}-axis bottom")
        if axis in order:
            raise layer_error(layer, f"order {axis} given twice")
        order.append(int(axis))
    order += [axis for axis in range(len(shape)) if axis not in order]
    return Converted(Permute(tuple(order)), [tuple(shape[axis] for axis in order)])


def _float32(value: float) -> float:
    return float(np.float32(value))


# The fork truncates min_size and max_size to int and multiplies them as ints (sqrt(min_size_ * max_size_)), and
# keeps img_size / img_h / img_w in ints: past this its C++ is undefined or negative, so such values are refused.
INT_LIMIT = 2 ** 31


# FaceBoxes' prior_box_layer.cpp: min_size 32 -> 4 x 4 anchors 8 apart, 64 -> 2 x 2 anchors 16 apart.
_DENSITY = {32: (4, 8), 64: (2, 16)}


def prior_sizes(layer) -> tuple[list[float], int]:
    """The (width, height) of each prior of one cell and how many priors (see prior_layout)."""
    sizes, _, count = prior_layout(layer)
    return sizes, count


def prior_layout(layer) -> tuple[list[float], list[float], int]:
    """The (width, height) of each prior of one cell, in the fork's order, their (dx, dy) centre shifts (FaceBoxes'
    densified anchors; zeros otherwise) and how many priors.

    Sizes are truncated to int (`int min_size_ = min_sizes_[s]`); libm's double sqrt; each value
    stored as a float32. LayerSetUp's CHECKs are written so that NaN fails them, as it fails the fork's.
    """
    param = layer.prior_box_param
    if not param.min_size:
        raise layer_error(layer, "must provide min_size")
    for size in param.min_size:
        if not 0 < size < INT_LIMIT:
            raise layer_error(layer, f"min_size {size:g} must be positive (and below 2^31: the fork makes it an int)")
    if param.max_size and len(param.max_size) != len(param.min_size):
        raise layer_error(layer, f"{len(param.max_size)} max_size for {len(param.min_size)} min_size; give one each")
    for low, high in zip(param.min_size, param.max_size):
        if not high > low:
            raise layer_error(layer, f"max_size {high:g} must be greater than min_size {low:g}")
        if not (high < INT_LIMIT and int(low) * int(high) < INT_LIMIT):
            raise layer_error(layer, f"min_size {low:g} x max_size {high:g} overflows the fork's int product")
    ratios = [1.0]
    for ratio in param.aspect_ratio:
        if any(abs(ratio - known) < 1e-6 for known in ratios):
            continue
        if not 0 < ratio < math.inf:  # the fork takes sqrt(ratio) and, with flip, 1 / ratio
            raise layer_error(layer, f"aspect_ratio {ratio:g} must be a positive number")
        ratios.append(ratio)
        if param.flip:
            ratios.append(_float32(1.0 / ratio))
    sizes: list[float] = []
    shifts: list[float] = []
    for index, low in enumerate(param.min_size):
        low = int(low)
        if param.faceboxes_anchors:  # (centre + shift -/+ (side - 1) / 2.): boxes of side min_size - 1
            density, spacing = _DENSITY.get(low, (1, 0))
            for i in range(-(density // 2), density - density // 2):  # dy outer, dx inner, as the fork's loops
                for j in range(-(density // 2), density - density // 2):
                    sizes += [float(low - 1), float(low - 1)]
                    shifts += [float(j * spacing), float(i * spacing)]
        else:
            sizes += [float(low), float(low)]
            shifts += [0.0, 0.0]
        if param.max_size:
            side = _float32(math.sqrt(low * int(param.max_size[index])))
            sizes += [side, side]
            shifts += [0.0, 0.0]
        for ratio in ratios:
            if abs(ratio - 1.0) < 1e-6:
                continue
            sizes += [_float32(low * math.sqrt(ratio)), _float32(low / math.sqrt(ratio))]
            shifts += [0.0, 0.0]
    return sizes, shifts, len(sizes) // 2


def _pair_or_single(layer, prefix: str, single: str) -> tuple | None:
    """PriorBox's `<prefix>_h` and `<prefix>_w`, or `single` for both, as LayerSetUp checks them (NaN fails,
    and an infinite step, which would put every centre at infinity); None if unset."""
    param = layer.prior_box_param
    if param.HasField(f"{prefix}_h") or param.HasField(f"{prefix}_w"):
        if param.HasField(single):
            raise layer_error(layer, f"either {single} or {prefix}_h/{prefix}_w should be specified; not both")
        names = (f"{prefix}_h", f"{prefix}_w")
    elif param.HasField(single):
        names = (single, single)
    else:
        return None
    value = tuple(getattr(param, name) for name in names)
    for name, number in zip(names, value):
        if not 0 < number < math.inf:
            raise layer_error(layer, f"{name} should be larger than 0, got {number:g}")
        if prefix == "img" and number >= INT_LIMIT:  # a uint32 the fork keeps in an int: negative there
            raise layer_error(layer, f"{name} {number} is negative as the fork's int")
    return value


@converter("PriorBox")
def convert_prior_box(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """Default boxes of bottom 0's grid, normalised by the image size (img_size, or bottom 1's)."""
    expect_bottoms(layer, inputs, 1, 2)
    expect_blobs(layer, blobs, 0)
    param = layer.prior_box_param
    feature = tuple(inputs[0])
    if len(feature) != 4:
        raise layer_error(layer, f"needs a 4-axis bottom 0, has shape {feature}")
    sizes, shifts, priors = prior_layout(layer)
    if param.faceboxes_anchors and param.denser_prior_boxes:
        raise layer_error(layer, "faceboxes_anchors and denser_prior_boxes come from two forks: give one")
    if param.faceboxes_anchors and len(param.min_size) == 3 and priors != 21:  # LayerSetUp's num_priors_ = 21
        raise layer_error(layer, f"FaceBoxes' fork allocates 21 priors a cell for 3 min_size values and would "
                                 f"write {priors}: its buffer overflows (only 32, 64 and one more size fit)")
    image = given_image = _pair_or_single(layer, "img", "img_size")
    if image is None:
        if len(inputs) != 2 or len(inputs[1]) != 4:
            raise layer_error(layer, "needs the image as bottom 1 (or img_size / img_h, img_w) to scale its boxes")
        image = (inputs[1][2], inputs[1][3])
    step = _pair_or_single(layer, "step", "step")  # None: image / grid, worked out for the sizes the net gets
    variance = [float(v) for v in param.variance] or [_float32(0.1)]
    if len(variance) not in (1, 4):
        raise layer_error(layer, f"give 1 or 4 variance values, not {len(variance)}")
    for value in variance:
        if not 0 < value < math.inf:  # CHECK_GT(variance, 0); an infinite one would decode every box to infinity
            raise layer_error(layer, f"variance {value:g} must be a positive number")
    if not math.isfinite(param.offset):  # unchecked by the fork: every centre would be NaN or infinite
        raise layer_error(layer, f"offset {param.offset:g} must be a finite number")
    denser = bool(param.denser_prior_boxes)  # TextBoxes++: each prior twice, the copy half a cell lower
    top = (1, 2, feature[2] * feature[3] * priors * (2 if denser else 1) * 4)
    check_top(layer, top, inputs)  # before the table of that size is built
    module = PriorBox(given_image, step, param.offset, tuple(sizes), param.clip, tuple(variance), denser,
                      tuple(shifts) if param.faceboxes_anchors else ())
    return Converted(module, [top])


@converter("DetectionOutput")
def convert_detection_output(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """Decode + per-class NMS + keep_top_k; the top's row count depends on the data ([1, 1, 1, 7] here)."""
    expect_bottoms(layer, inputs, 3, 4)
    expect_blobs(layer, blobs, 0)
    param = layer.detection_output_param
    if not param.HasField("num_classes"):
        raise layer_error(layer, "must specify num_classes")
    loc, conf, prior = (tuple(shape) for shape in inputs[:3])
    if len(prior) < 3 or prior[0] != 1 or prior[1] != 2 or prior[2] % 4:
        raise layer_error(layer, f"bottom 2 must be PriorBox's [1, 2, priors*4] top, has shape {prior}")
    count = prior[2] // 4
    loc_classes = 1 if param.share_location else param.num_classes
    extra = _text_boxes(layer, math.prod(loc[1:]), count * loc_classes)
    per_prior = 4 + text_values(extra)
    if math.prod(loc[1:]) != count * loc_classes * per_prior:
        raise layer_error(layer, f"bottom 0 (locations) has shape {loc}: expected {count * loc_classes * per_prior} "
                          f"values per image for {count} priors")
    if math.prod(conf[1:]) != count * param.num_classes or conf[0] != loc[0]:
        raise layer_error(layer, f"bottom 1 (confidences) has shape {conf}: expected {loc[0]} x "
                           f"{count * param.num_classes} for {count} priors and {param.num_classes} classes")
    nms = param.nms_param
    if not 0 < nms.eta <= 1:
        raise layer_error(layer, f"nms_param.eta {nms.eta:g} must be in (0, 1]")
    if not nms.nms_threshold >= 0:  # CHECK_GE: NaN fails it
        raise layer_error(layer, f"nms_threshold must be non negative, got {nms.nms_threshold:g}")
    warnings = []
    if param.HasField("save_output_param") and param.save_output_param.output_directory:
        warnings.append("save_output_param (the fork's result files) is not reproduced; the detections are the "
                        "layer's output")
    module = DetectionOutput(
        param.num_classes, share_location=param.share_location, background_label_id=param.background_label_id,
        nms_threshold=nms.nms_threshold, top_k=nms.top_k if nms.HasField("top_k") else -1, eta=nms.eta,
        keep_top_k=param.keep_top_k, code_type=caffe_pb2.PriorBoxParameter.CodeType.Name(param.code_type),
        variance_encoded_in_target=param.variance_encoded_in_target,
        confidence_threshold=param.confidence_threshold if param.HasField("confidence_threshold") else LOWEST_FLOAT,
        extra=extra)
    return Converted(module, [(1, 1, 1, 7 + text_values(extra))], warnings)


def _text_boxes(layer, values: int, predictions: int) -> str:
    """TextBoxes++'s extra location values ("polygon": 12 a prediction, "rbox": 9), told from SSD's 4 by the
    shapes where use_polygon is not given (the fork's default, true, would refuse an SSD net's shapes)."""
    param = layer.detection_output_param
    if param.HasField("use_polygon"):
        extra = "polygon" if param.use_polygon else "rbox"
    else:
        extra = {predictions * 12: "polygon", predictions * 9: "rbox"}.get(values, "")
    if extra and (param.code_type != caffe_pb2.PriorBoxParameter.CENTER_SIZE or param.variance_encoded_in_target):
        raise layer_error(layer, f"TextBoxes++'s {extra} outputs are decoded for code_type CENTER_SIZE with the "
                          f"variance in the prior only (the fork leaves them unset otherwise)")
    return extra
