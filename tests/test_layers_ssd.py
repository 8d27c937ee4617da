"""SSD's layers (weiliu89/caffe, branch ssd) against explicit loops of the fork's C++ formulas.

Each reference below walks the fork's CPU code line by line (normalize_layer.cpp,
permute_layer.cpp, prior_box_layer.cpp, detection_output_layer.cpp, bbox_util.cpp) with NumPy
float32 scalars where the C++ uses float and Python floats where it uses double.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from caffe2torch.errors import CaffeError
from caffe2torch.layers import convert_layer
from proto import caffe_pb2
from tests.conftest import layer_from_text, load_standalone, random_net, run_layer

F = np.float32


# ---------------------------------------------------------------- Normalize


def normalize_reference(x: np.ndarray, scale: np.ndarray, across_spatial: bool, channel_shared: bool,
                        eps: float) -> np.ndarray:
    num, channels = x.shape[:2]
    spatial = int(np.prod(x.shape[2:], dtype=np.int64))
    data = x.reshape(num, channels, spatial)
    top = np.empty_like(data)
    for n in range(num):
        square = data[n].astype(np.float64) ** 2
        if across_spatial:
            norm = F(math.sqrt(F(F(square.sum()) + F(eps))))
            top[n] = data[n] * F(1.0 / float(norm))
        else:
            for s in range(spatial):
                norm = F(math.sqrt(F(F(eps) + F(square[:, s].sum()))))
                top[n, :, s] = data[n, :, s] / norm
        if channel_shared:
            top[n] *= F(scale.reshape(-1)[0])
        else:
            top[n] *= scale.reshape(channels, 1)
    return top.reshape(x.shape)


@pytest.mark.parametrize("across_spatial", [True, False])
@pytest.mark.parametrize("channel_shared", [True, False])
@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (3, 6)])
def test_normalize_matches_fork_formula(across_spatial, channel_shared, shape):
    rng = np.random.default_rng(7)
    x = rng.normal(0, 3, shape).astype(F)
    x[0, 0] = 0  # a zero position: eps keeps it finite
    scale = (rng.uniform(1, 30, 1 if channel_shared else shape[1])).astype(F)
    if channel_shared:
        scale = scale.reshape(())  # the fork's blob of shape vector<int>(0)
    layer = layer_from_text(f'name: "n" type: "Normalize" norm_param {{ across_spatial: {str(across_spatial).lower()} '
                   f'channel_shared: {str(channel_shared).lower()} eps: 1e-6 }}')
    converted, out = run_layer(layer, [shape], [scale], x)
    assert converted.top_shapes == [shape]
    expected = normalize_reference(x, scale, across_spatial, channel_shared, F(1e-6))
    np.testing.assert_allclose(out, expected, rtol=2e-6, atol=1e-7)


def test_normalize_half_precision_does_not_overflow():
    layer = layer_from_text('name: "n" type: "Normalize" norm_param { across_spatial: false channel_shared: false }')
    x = np.full((1, 512, 2, 2), 300.0, F)  # the sum of squares, 4.6e7, is far beyond float16's 65504
    converted = convert_layer(layer, [x.shape], [np.full(512, 20.0, F)])
    out = converted.module.half()(torch.from_numpy(x).half())
    assert out.dtype == torch.float16
    np.testing.assert_allclose(out.detach().float().numpy(), np.full(x.shape, 20 / math.sqrt(512), F), rtol=1e-3)


def test_normalize_rejects_a_scale_of_the_wrong_size():
    layer = layer_from_text('name: "n4_3" type: "Normalize" norm_param { channel_shared: false }')
    with pytest.raises(CaffeError, match=r"'n4_3' \(Normalize\): scale blob has 3 values, expected 8"):
        convert_layer(layer, [(1, 8, 2, 2)], [np.ones(3, F)])


# ---------------------------------------------------------------- Permute


def permute_reference(x: np.ndarray, orders: list[int]) -> np.ndarray:
    """permute_layer.cpp's Permute(): index arithmetic over old and new steps."""
    old_shape, new_shape = x.shape, tuple(x.shape[o] for o in orders)
    old_steps = [int(np.prod(old_shape[i + 1:])) for i in range(len(old_shape))]
    new_steps = [int(np.prod(new_shape[i + 1:])) for i in range(len(new_shape))]
    flat, top = x.reshape(-1), np.empty(x.size, x.dtype)
    for i in range(x.size):
        old_idx, idx = 0, i
        for j in range(len(orders)):
            order = orders[j]
            old_idx += (idx // new_steps[j]) * old_steps[order]
            idx %= new_steps[j]
        top[i] = flat[old_idx]
    return top.reshape(new_shape)


@pytest.mark.parametrize("given, full", [([0, 2, 3, 1], [0, 2, 3, 1]), ([3, 1], [3, 1, 0, 2]), ([], [0, 1, 2, 3])])
def test_permute_matches_fork_index_arithmetic(given, full):
    x = np.arange(2 * 3 * 4 * 5, dtype=F).reshape(2, 3, 4, 5)
    layer = layer_from_text('name: "p" type: "Permute" permute_param { ' + " ".join(f"order: {o}" for o in given) + " }")
    converted, out = run_layer(layer, [x.shape], [], x)
    expected = permute_reference(x, full)
    assert converted.top_shapes == [expected.shape]
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("orders, message", [([0, 4], "order 4 out of range"), ([1, 1], "order 1 given twice")])
def test_permute_rejects_bad_orders(orders, message):
    layer = layer_from_text('name: "p" type: "Permute" permute_param { ' + " ".join(f"order: {o}" for o in orders) + " }")
    with pytest.raises(CaffeError, match=message):
        convert_layer(layer, [(1, 2, 3, 4)], [])


# ---------------------------------------------------------------- PriorBox


def prior_box_reference(param, layer_h: int, layer_w: int, image_h: int, image_w: int) -> np.ndarray:
    """prior_box_layer.cpp: LayerSetUp's aspect ratios, then Forward_cpu's loops."""
    ratios = [F(1.0)]
    for ar in param.aspect_ratio:
        ar = F(ar)
        if any(abs(float(ar) - float(known)) < 1e-6 for known in ratios):
            continue
        ratios.append(ar)
        if param.flip:
            ratios.append(F(1.0 / float(ar)))
    min_sizes, max_sizes = [F(v) for v in param.min_size], [F(v) for v in param.max_size]
    num_priors = len(ratios) * len(min_sizes) + len(max_sizes)
    if param.HasField("img_size"):
        image_h = image_w = param.img_size
    if param.HasField("img_h"):
        image_h, image_w = param.img_h, param.img_w
    if param.HasField("step"):
        step_h = step_w = F(param.step)
    elif param.HasField("step_h"):
        step_h, step_w = F(param.step_h), F(param.step_w)
    else:
        step_w, step_h = F(F(image_w) / F(layer_w)), F(F(image_h) / F(layer_h))
    top = []

    def emit(center_x, center_y, box_width, box_height):
        top.extend([F((float(center_x) - float(box_width) / 2.0) / image_w),
                    F((float(center_y) - float(box_height) / 2.0) / image_h),
                    F((float(center_x) + float(box_width) / 2.0) / image_w),
                    F((float(center_y) + float(box_height) / 2.0) / image_h)])

    for h in range(layer_h):
        for w in range(layer_w):
            center_x = F(F(F(w) + F(param.offset)) * step_w)
            center_y = F(F(F(h) + F(param.offset)) * step_h)
            for s in range(len(min_sizes)):
                min_size = int(min_sizes[s])
                emit(center_x, center_y, F(min_size), F(min_size))
                if max_sizes:
                    side = F(math.sqrt(min_size * int(max_sizes[s])))
                    emit(center_x, center_y, side, side)
                for ar in ratios:
                    if abs(float(ar) - 1.0) < 1e-6:
                        continue
                    emit(center_x, center_y, F(min_size * math.sqrt(float(ar))), F(min_size / math.sqrt(float(ar))))
    boxes = np.array(top, F)
    assert boxes.size == layer_h * layer_w * num_priors * 4
    if param.clip:
        boxes = np.minimum(np.maximum(boxes, F(0)), F(1))
    variance = [F(v) for v in param.variance] or [F(0.1)]
    variances = np.full(boxes.size, variance[0], F) if len(variance) == 1 else np.tile(np.array(variance, F),
                                                                                        boxes.size // 4)
    return np.stack([boxes, variances])[None]


PRIOR_BOXES = [
    # SSD300's conv4_3 (min 30, max 60, ratio 2), with its explicit step 8.
    ("min_size: 30 max_size: 60 aspect_ratio: 2 flip: true clip: false variance: 0.1 variance: 0.1 "
     "variance: 0.2 variance: 0.2 step: 8 offset: 0.5", (38, 38), (300, 300)),
    # SSD512-style fractional sizes are truncated to int; no step: image / layer.
    ("min_size: 35.84 max_size: 76.8 aspect_ratio: 2 aspect_ratio: 3 flip: true clip: true variance: 0.1",
     (5, 7), (512, 512)),
    # Two min sizes, no max, a duplicate and a 1.0 ratio (dropped), no flip, image size from the prototxt.
    ("min_size: 16 min_size: 40 aspect_ratio: 1.0 aspect_ratio: 0.5 aspect_ratio: 0.5000001 flip: false "
     "img_h: 120 img_w: 90 step_h: 11.5 step_w: 7.25 offset: 0.25", (9, 13), (200, 200)),
    ("min_size: 21.3 aspect_ratio: 1.7 img_size: 99 clip: true", (6, 4), (33, 33)),
]


@pytest.mark.parametrize("text, layer_size, image_size", PRIOR_BOXES)
def test_prior_box_matches_fork_loops_bit_for_bit(text, layer_size, image_size):
    layer = layer_from_text(f'name: "pb" type: "PriorBox" prior_box_param {{ {text} }}')
    shapes = [(1, 8, *layer_size), (1, 3, *image_size)]
    converted, out = run_layer(layer, shapes, [], np.zeros(shapes[0], F), np.zeros(shapes[1], F))
    expected = prior_box_reference(layer.prior_box_param, *layer_size, *image_size)
    assert converted.top_shapes == [expected.shape]
    np.testing.assert_array_equal(out, expected)


def test_prior_box_first_boxes_by_hand():
    # A 2x2 map of a 100x100 image, step 50, offset 0.5: the first centre is (25, 25).
    layer = layer_from_text('name: "pb" type: "PriorBox" prior_box_param { min_size: 20 max_size: 80 aspect_ratio: 4 '
                   'flip: false variance: 0.1 }')
    _, out = run_layer(layer, [(1, 1, 2, 2), (1, 3, 100, 100)], [], np.zeros((1, 1, 2, 2), F), np.zeros((1, 3, 100, 100), F))
    np.testing.assert_allclose(out[0, 0, :12], [0.15, 0.15, 0.35, 0.35,  # 20 x 20
                                                0.05, 0.05, 0.45, 0.45,  # sqrt(20 * 80) = 40
                                                0.05, 0.2, 0.45, 0.3],  # 20 * 2 wide, 20 / 2 high
                               rtol=0, atol=1e-7)
    assert out.shape == (1, 2, 2 * 2 * 3 * 4) and np.all(out[0, 1] == F(0.1))


@pytest.mark.parametrize("text, message", [
    ("aspect_ratio: 2", "must provide min_size"),
    ("min_size: 30 max_size: 20", "max_size 20 must be greater than min_size 30"),
    ("min_size: 30 variance: 0.1 variance: 0.2", "give 1 or 4 variance values"),
    ("min_size: 30 img_size: 300 img_h: 300 img_w: 300", "either img_size or img_h/img_w"),
])
def test_prior_box_rejects_what_the_fork_checks(text, message):
    layer = layer_from_text(f'name: "pb" type: "PriorBox" prior_box_param {{ {text} }}')
    with pytest.raises(CaffeError, match=message):
        convert_layer(layer, [(1, 8, 4, 4), (1, 3, 32, 32)], [])


# ---------------------------------------------------------------- DetectionOutput


def _decode_reference(prior, variance, loc, code_type, encoded):
    if encoded:
        variance = [F(1)] * 4
    if code_type == "CORNER":
        box = [F(prior[i] + F(variance[i] * loc[i])) for i in range(4)]
    elif code_type == "CENTER_SIZE":
        width, height = F(prior[2] - prior[0]), F(prior[3] - prior[1])
        center_x, center_y = F(float(F(prior[0] + prior[2])) / 2.0), F(float(F(prior[1] + prior[3])) / 2.0)
        if encoded:
            box_x, box_y = F(F(loc[0] * width) + center_x), F(F(loc[1] * height) + center_y)
        else:
            box_x = F(F(F(variance[0] * loc[0]) * width) + center_x)
            box_y = F(F(F(variance[1] * loc[1]) * height) + center_y)
        box_w = F(math.exp(float(F(variance[2] * loc[2]))) * float(width))
        box_h = F(math.exp(float(F(variance[3] * loc[3]))) * float(height))
        box = [F(float(box_x) - float(box_w) / 2.0), F(float(box_y) - float(box_h) / 2.0),
               F(float(box_x) + float(box_w) / 2.0), F(float(box_y) + float(box_h) / 2.0)]
    else:
        width, height = F(prior[2] - prior[0]), F(prior[3] - prior[1])
        box = [F(prior[0] + F(F(variance[0] * loc[0]) * width)), F(prior[1] + F(F(variance[1] * loc[1]) * height)),
               F(prior[2] + F(F(variance[2] * loc[2]) * width)), F(prior[3] + F(F(variance[3] * loc[3]) * height))]
    size = F(0) if box[2] < box[0] or box[3] < box[1] else F(F(box[2] - box[0]) * F(box[3] - box[1]))
    return box, size


def _jaccard_reference(a, a_size, b, b_size):
    if b[0] > a[2] or b[2] < a[0] or b[1] > a[3] or b[3] < a[1]:
        return F(0)
    width = F(min(a[2], b[2]) - max(a[0], b[0]))
    height = F(min(a[3], b[3]) - max(a[1], b[1]))
    if width > 0 and height > 0:
        inter = F(width * height)
        return F(inter / F(F(a_size + b_size) - inter))
    return F(0)


def _nms_reference(boxes, sizes, scores, score_threshold, nms_threshold, eta, top_k):
    ranked = [(scores[i], i) for i in range(len(scores)) if scores[i] > score_threshold]
    ranked = sorted(ranked, key=lambda pair: -pair[0])  # std::stable_sort
    if -1 < top_k < len(ranked):
        ranked = ranked[:top_k]
    kept, threshold = [], F(nms_threshold)
    for _, idx in ranked:
        keep = all(_jaccard_reference(boxes[idx], sizes[idx], boxes[k], sizes[k]) <= threshold for k in kept)
        if keep:
            kept.append(idx)
            if eta < 1 and threshold > 0.5:
                threshold = F(threshold * F(eta))
    return kept


def detection_output_reference(loc, conf, prior, param) -> np.ndarray:
    num, num_priors = loc.shape[0], prior.shape[2] // 4
    classes = param.num_classes
    loc_classes = 1 if param.share_location else classes
    code_type = caffe_pb2.PriorBoxParameter.CodeType.Name(param.code_type)
    nms = param.nms_param
    top_k = nms.top_k if nms.HasField("top_k") else -1
    threshold = F(param.confidence_threshold) if param.HasField("confidence_threshold") else F(-3.4028234663852886e38)
    priors, variances = prior[0, 0].reshape(-1, 4), prior[0, 1].reshape(-1, 4)
    rows = []
    for i in range(num):
        decoded = {}
        for c in range(loc_classes):
            label = -1 if param.share_location else c
            pairs = [_decode_reference(priors[p], variances[p], loc[i].reshape(num_priors, loc_classes, 4)[p, c],
                                       code_type, param.variance_encoded_in_target) for p in range(num_priors)]
            decoded[label] = ([box for box, _ in pairs], [size for _, size in pairs])
        scores = conf[i].reshape(num_priors, classes)
        indices = {}
        for c in range(classes):
            if c == param.background_label_id:
                continue
            boxes, sizes = decoded[-1 if param.share_location else c]
            indices[c] = _nms_reference(boxes, sizes, scores[:, c], threshold, nms.nms_threshold, nms.eta, top_k)
        total = sum(len(v) for v in indices.values())
        if -1 < param.keep_top_k < total:
            pairs = [(scores[idx, label], label, idx) for label in sorted(indices) for idx in indices[label]]
            pairs = sorted(pairs, key=lambda item: -item[0])[:param.keep_top_k]
            indices = {}
            for _, label, idx in pairs:
                indices.setdefault(label, []).append(idx)
        for label in sorted(indices):
            boxes, _ = decoded[-1 if param.share_location else label]
            for idx in indices[label]:
                rows.append([i, label, scores[idx, label], *boxes[idx]])
    if not rows:
        return np.array([[i] + [-1] * 6 for i in range(num)], F).reshape(1, 1, num, 7)
    return np.array(rows, F).reshape(1, 1, -1, 7)


def _detection_inputs(seed: int, num: int, num_priors: int, classes: int, loc_classes: int, ties: bool):
    rng = np.random.default_rng(seed)
    centers = rng.uniform(0.2, 0.8, (num_priors, 2))
    sides = rng.uniform(0.05, 0.4, (num_priors, 2))
    boxes = np.concatenate([centers - sides / 2, centers + sides / 2], axis=1).astype(F)
    prior = np.stack([boxes.reshape(-1), np.tile(np.array([0.1, 0.1, 0.2, 0.2], F), num_priors)])[None]
    loc = rng.normal(0, 1, (num, num_priors * loc_classes * 4)).astype(F)
    logits = rng.normal(0, 2, (num, num_priors, classes))
    if ties:
        logits = np.round(logits)  # many equal scores: the tie rules decide
    conf = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return loc, conf.reshape(num, -1).astype(F), prior.astype(F)


DETECTIONS = [
    ("num_classes: 4 share_location: true background_label_id: 0 code_type: CENTER_SIZE keep_top_k: 30 "
     "confidence_threshold: 0.05 nms_param { nms_threshold: 0.45 top_k: 40 }", 2, 60, True),
    ("num_classes: 3 share_location: false background_label_id: 1 code_type: CORNER keep_top_k: 10 "
     "nms_param { nms_threshold: 0.3 }", 2, 40, True),
    ("num_classes: 5 share_location: true background_label_id: 0 code_type: CORNER_SIZE "
     "confidence_threshold: 0.1 nms_param { nms_threshold: 0.7 eta: 0.8 top_k: 25 }", 1, 50, False),
    ("num_classes: 3 share_location: true background_label_id: 0 code_type: CENTER_SIZE "
     "variance_encoded_in_target: true confidence_threshold: 0.01 nms_param { nms_threshold: 0.5 }", 3, 30, True),
]


@pytest.mark.parametrize("text, num, num_priors, ties", DETECTIONS)
def test_detection_output_matches_fork_loops(text, num, num_priors, ties):
    layer = layer_from_text(f'name: "det" type: "DetectionOutput" detection_output_param {{ {text} }}')
    param = layer.detection_output_param
    loc_classes = 1 if param.share_location else param.num_classes
    for seed in range(3):
        loc, conf, prior = _detection_inputs(seed, num, num_priors, param.num_classes, loc_classes, ties)
        if param.variance_encoded_in_target:
            loc *= F(0.1)
        converted, out = run_layer(layer, [loc.shape, conf.shape, prior.shape], [], loc, conf, prior)
        expected = detection_output_reference(loc, conf, prior, param)
        assert out.shape == expected.shape and out.shape[2] > 0
        np.testing.assert_array_equal(out, expected)
    assert converted.top_shapes == [(1, 1, 1, 7)]


def test_detection_output_suppression_by_hand():
    # Two priors overlap by 0.16 / (0.25 + 0.25 - 0.16) = 0.47: suppressed above 0.45, kept below 0.5.
    prior = np.array([[[0, 0, 0.5, 0.5, 0.1, 0.1, 0.6, 0.6], [1] * 8]], F)
    loc = np.zeros((1, 8), F)
    conf = np.array([[0.1, 0.9, 0.2, 0.8]], F)  # prior 0: label 1 at 0.9; prior 1: label 1 at 0.8
    for threshold, rows in ((0.45, [[0, 1, 0.9, 0, 0, 0.5, 0.5]]),
                            (0.5, [[0, 1, 0.9, 0, 0, 0.5, 0.5], [0, 1, 0.8, 0.1, 0.1, 0.6, 0.6]])):
        layer = layer_from_text('name: "det" type: "DetectionOutput" detection_output_param { num_classes: 2 '
                       f'nms_param {{ nms_threshold: {threshold} }} code_type: CORNER }}')
        _, out = run_layer(layer, [loc.shape, conf.shape, prior.shape], [], loc, conf, prior)
        np.testing.assert_allclose(out[0, 0], np.array(rows, F), rtol=0, atol=1e-7)


def test_detection_output_without_detections_gives_the_forks_placeholder_rows():
    layer = layer_from_text('name: "det" type: "DetectionOutput" detection_output_param { num_classes: 2 '
                   'confidence_threshold: 0.5 nms_param { nms_threshold: 0.45 } }')
    loc, conf, prior = _detection_inputs(0, 3, 10, 2, 1, False)
    conf[:, 1::2] = 0.5  # label 1's score is never strictly above the threshold
    _, out = run_layer(layer, [loc.shape, conf.shape, prior.shape], [], loc, conf, prior)
    np.testing.assert_array_equal(out, np.array([[i, -1, -1, -1, -1, -1, -1] for i in range(3)], F)[None, None])


def test_detection_output_checks_its_bottoms():
    layer = layer_from_text('name: "det" type: "DetectionOutput" detection_output_param { num_classes: 21 }')
    with pytest.raises(CaffeError, match=r"'det' \(DetectionOutput\): bottom 1 \(confidences\) has shape"):
        convert_layer(layer, [(1, 40), (1, 200), (1, 2, 40)], [])
    layer = layer_from_text('name: "det" type: "DetectionOutput" detection_output_param { }')
    with pytest.raises(CaffeError, match="must specify num_classes"):
        convert_layer(layer, [(1, 40), (1, 200), (1, 2, 40)], [])


# ---------------------------------------------------------------- a whole SSD head

SSD_HEAD = """name: "mini_ssd"
input: "data" input_shape { dim: 2 dim: 3 dim: 32 dim: 32 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 8 kernel_size: 3 stride: 4 pad: 1 } }
layer { name: "norm" type: "Normalize" bottom: "conv" top: "norm"
  norm_param { across_spatial: false channel_shared: false scale_filler { type: "constant" value: 20 } } }
layer { name: "loc" type: "Convolution" bottom: "norm" top: "loc" convolution_param { num_output: 16 kernel_size: 1 } }
layer { name: "loc_perm" type: "Permute" bottom: "loc" top: "loc_perm" permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "loc_flat" type: "Flatten" bottom: "loc_perm" top: "loc_flat" }
layer { name: "conf" type: "Convolution" bottom: "norm" top: "conf" convolution_param { num_output: 12 kernel_size: 1 } }
layer { name: "conf_perm" type: "Permute" bottom: "conf" top: "conf_perm" permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "conf_flat" type: "Flatten" bottom: "conf_perm" top: "conf_flat" }
layer { name: "conf_reshape" type: "Reshape" bottom: "conf_flat" top: "conf_reshape" reshape_param { shape { dim: 0 dim: -1 dim: 3 } } }
layer { name: "conf_softmax" type: "Softmax" bottom: "conf_reshape" top: "conf_softmax" softmax_param { axis: 2 } }
layer { name: "conf_sflat" type: "Flatten" bottom: "conf_softmax" top: "conf_sflat" }
layer { name: "prior" type: "PriorBox" bottom: "norm" bottom: "data" top: "prior"
  prior_box_param { min_size: 10 max_size: 20 aspect_ratio: 2 flip: true variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 step: 4 } }
layer { name: "det" type: "DetectionOutput" bottom: "loc_flat" bottom: "conf_sflat" bottom: "prior" top: "det"
  detection_output_param { num_classes: 3 nms_param { nms_threshold: 0.45 top_k: 50 } code_type: CENTER_SIZE
  keep_top_k: 20 confidence_threshold: 0.01 } }
"""


@pytest.fixture
def ssd_net(tmp_path):
    return random_net(tmp_path, SSD_HEAD, std=0.1)


def test_ssd_head_runs_trains_and_runs_in_half(ssd_net):
    x = torch.randn(2, 3, 32, 32)
    out = ssd_net(x)
    assert out.shape[:2] == (1, 1) and out.shape[3] == 7 and out.shape[2] > 0
    assert set(out[0, 0, :, 0].tolist()) == {0.0, 1.0}
    # Training reaches Normalize's scale through the location branch (DetectionOutput is not differentiable).
    loc = dict(ssd_net.named_modules())["loc_flat"]
    grabbed = {}
    loc.register_forward_hook(lambda module, args, output: grabbed.setdefault("loc", output))
    ssd_net(x)
    grabbed["loc"].square().sum().backward()
    assert ssd_net.norm.weight.grad is not None and ssd_net.norm.weight.grad.abs().sum() > 0
    half = ssd_net.half()(x.half())
    assert half.dtype == torch.float16 and half.shape[3] == 7


def test_ssd_head_refuses_fixed_shape_export_and_cuda_graphs(ssd_net, tmp_path):
    from caffe2torch.export import export
    from caffe2torch.fast import cuda_graph

    for fmt in ("onnx", "pt2", "torchscript"):
        with pytest.raises(CaffeError, match=r"layer 'det' \(DetectionOutput\): its output size depends on the data"):
            export(ssd_net, fmt, tmp_path / f"ssd.{fmt}")
        assert not list(tmp_path.glob("ssd.*")) or (tmp_path / "ssd.prototxt").exists()
    with pytest.raises(CaffeError, match="cannot be captured in a CUDA graph"):
        cuda_graph(ssd_net, torch.zeros(2, 3, 32, 32))
    assert export(ssd_net, "safetensors", tmp_path / "ssd.safetensors").outputs == 1


def test_ssd_head_standalone_model_py_matches(ssd_net, tmp_path):
    from caffe2torch.folder import save_net

    save_net(ssd_net, tmp_path / "out")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(load_standalone(tmp_path / "out")(x), ssd_net(x))
    source = (tmp_path / "out" / "model.py").read_text()
    assert not re.search(r"^\s*(from|import) caffe2torch", source, re.M) and "class DetectionOutput" in source


def test_ssd_train_prototxt_fields_parse(tmp_path):
    # The fork's data and loss params (annotated_data_param, multibox_loss_param, its transform_param fields).
    path = tmp_path / "train.prototxt"
    path.write_text('layer { name: "data" type: "AnnotatedData" top: "data" top: "label" include { phase: TRAIN }\n'
                    '  transform_param { mirror: true resize_param { prob: 1 resize_mode: WARP height: 32 width: 32 '
                    'interp_mode: LINEAR } emit_constraint { emit_type: CENTER } distort_param { brightness_prob: 0.5 }'
                    ' expand_param { prob: 0.5 max_expand_ratio: 4 } }\n'
                    '  annotated_data_param { batch_sampler { sampler { min_scale: 0.3 } sample_constraint { '
                    'min_jaccard_overlap: 0.1 } max_sample: 1 max_trials: 50 } label_map_file: "labelmap.prototxt" } }\n'
                    'layer { name: "loss" type: "MultiBoxLoss" bottom: "data" bottom: "label" top: "loss" '
                    'multibox_loss_param { loc_loss_type: SMOOTH_L1 conf_loss_type: SOFTMAX num_classes: 21 '
                    'match_type: PER_PREDICTION mining_type: MAX_NEGATIVE } }\n')
    from caffe2torch.read import read_prototxt

    net = read_prototxt(path)
    assert net.layer[0].annotated_data_param.batch_sampler[0].max_trials == 50
    assert net.layer[0].transform_param.resize_param.height == 32
    assert net.layer[1].multibox_loss_param.num_classes == 21
