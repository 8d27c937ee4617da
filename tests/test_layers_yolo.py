"""The YOLO ports' layers (eric612/MobileNet-YOLO) against loops of the fork's CPU forward.

reorg_layer.hpp's reorg_cpu, yolo_detection_output_layer.cpp and yolov3_detection_output_layer.cpp
(get_region_box, class_index_and_score, the sort, ApplyNms with box_iou, the [1, 1, K, 7] rows).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from caffe2torch.errors import CaffeError
from caffe2torch.layers import convert_layer
from tests.conftest import layer_from_text, load_standalone, random_net, run_layer

F = np.float32


@pytest.mark.parametrize("reverse, shape", [(False, (2, 8, 4, 6)), (True, (1, 8, 3, 2))])
def test_reorg_is_darknets_reorg_cpu(reverse, shape):
    x = np.arange(np.prod(shape), dtype=F).reshape(shape)
    layer = layer_from_text(f'name: "r" type: "Reorg" reorg_param {{ stride: 2 reverse: {str(reverse).lower()} }}')
    converted, out = run_layer(layer, [shape], [], x)
    b_n, b_c, b_h, b_w = shape
    stride, flat, top = 2, x.reshape(-1), np.zeros(x.size, F)
    t_c, t_w, t_h = b_c // 4, b_w * stride, b_h * stride
    for n in range(b_n):  # reorg_cpu(bottom, w, h, c, n, stride, forward = reverse, top)
        for c in range(b_c):
            for h in range(b_h):
                for w in range(b_w):
                    bottom_index = w + b_w * (h + b_h * (c + b_c * n))
                    offset = c // t_c
                    top_index = (w * stride + offset % stride) + t_w * ((h * stride + offset // stride)
                                                                       + t_h * (c % t_c + t_c * n))
                    if reverse:
                        top[top_index] = flat[bottom_index]
                    else:
                        top[bottom_index] = flat[top_index]
    expected_shape = (b_n, b_c // 4, b_h * 2, b_w * 2) if reverse else (b_n, b_c * 4, b_h // 2, b_w // 2)
    assert converted.top_shapes == [expected_shape]
    np.testing.assert_array_equal(out, top.reshape(expected_shape))


def sigmoid(v):
    return 1.0 / (1.0 + math.exp(-float(v)))


def box_iou(a, b):
    """The fork's box_iou on (x, y, w, h)."""
    def overlap(x1, w1, x2, w2):
        return min(x1 + w1 / 2, x2 + w2 / 2) - max(x1 - w1 / 2, x2 - w2 / 2)
    w, h = overlap(a[0], a[2], b[0], b[2]), overlap(a[1], a[3], b[1], b[3])
    inter = 0.0 if w < 0 or h < 0 else w * h
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def rows_reference(predicts, threshold, batch):
    """std::sort by confidence (descending), ApplyNms (all classes together, IoU >= threshold), the rows."""
    predicts = sorted(predicts, key=lambda p: -p[5])  # Python's sort is stable: ties as ours
    dropped = set()
    for i in range(len(predicts) - 1):
        if i in dropped:
            continue
        for j in range(i + 1, len(predicts)):
            if j not in dropped and box_iou(predicts[i][:4], predicts[j][:4]) >= threshold:
                dropped.add(j)
    kept = [p for i, p in enumerate(predicts) if i not in dropped]
    if not kept:
        rows = np.full((batch, 7), -1.0, F)
        rows[:, 0] = np.arange(batch)
        return rows.reshape(1, 1, batch, 7)
    return np.array([[0, label + 1, conf, x - w / 2, y - h / 2, x + w / 2, y + h / 2]
                     for x, y, w, h, label, conf in kept], F).reshape(1, 1, -1, 7)


def yolov2_reference(maps, num_box, classes, biases, threshold, nms):
    predicts = []
    for features in maps:
        n_, channels, side, _ = features.shape
        # swap[b, h*W + w, n, k] = bottom[b, n*(C/num_box) + k, h, w]
        swap = features.transpose(0, 2, 3, 1).reshape(n_, side * side, num_box, channels // num_box)
        for b in range(n_):
            for j in range(side):
                for i in range(side):
                    for n in range(num_box):
                        v = swap[b, j * side + i, n].astype(np.float64)
                        x, y = (i + sigmoid(v[0])) / side, (j + sigmoid(v[1])) / side
                        w, h = math.exp(v[2]) * biases[2 * n] / side, math.exp(v[3]) * biases[2 * n + 1] / side
                        e = np.exp(v[5:5 + classes] - v[5:5 + classes].max())
                        p = e / e.sum()
                        label = int(np.argmax(p))  # the first maximum
                        confidence = sigmoid(v[4]) * p[label]
                        if confidence >= threshold:
                            predicts.append((x, y, w, h, label, confidence))
    return rows_reference(predicts, nms, maps[0].shape[0])


def yolov3_reference(maps, num_box, classes, biases, scales, mask, threshold, nms):
    predicts, groups = [], len(mask) // len(maps)
    for t, features in enumerate(maps):
        n_, _, height, width = features.shape
        data = features.reshape(n_, num_box, 5 + classes, height * width).astype(np.float64)
        for b in range(n_):
            for s in range(height * width):
                for n in range(num_box):
                    v = data[b, n, :, s]
                    objectness = sigmoid(v[4])
                    m = mask[n + t * groups]
                    for c in range(classes):
                        score = sigmoid(v[5 + c]) * objectness
                        if score > threshold:
                            x, y = (s % width + sigmoid(v[0])) / width, (s // width + sigmoid(v[1])) / height
                            w = math.exp(v[2]) * biases[2 * m] / (width * scales[t])
                            h = math.exp(v[3]) * biases[2 * m + 1] / (height * scales[t])
                            predicts.append((x, y, w, h, c, score))  # correct_yolo_boxes: identity here
    return rows_reference(predicts, nms, maps[-1].shape[0])


def _compare(out, expected):
    assert out.shape == expected.shape
    np.testing.assert_array_equal(out[..., :2], expected[..., :2])  # image and label exactly
    np.testing.assert_allclose(out[..., 2:], expected[..., 2:], rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("threshold", [0.3, 0.05, 0.999])
def test_yolov2_detection_output_matches_the_fork(threshold):
    rng = np.random.default_rng(11)
    maps = [rng.normal(0, 1.5, (1, 2 * 8, 5, 5)).astype(F), rng.normal(0, 1.5, (1, 2 * 8, 3, 3)).astype(F)]
    layer = layer_from_text(f'name: "det" type: "YoloDetectionOutput" yolo_detection_output_param {{ num_classes: 3 '
                            f'num_box: 2 confidence_threshold: {threshold} nms_threshold: 0.45 biases: 1.08 '
                            f'biases: 1.19 biases: 3.42 biases: 4.41 }}')
    converted, out = run_layer(layer, [m.shape for m in maps], [], *maps)
    assert converted.top_shapes == [(1, 1, 1, 7)]
    expected = yolov2_reference(maps, 2, 3, [1.08, 1.19, 3.42, 4.41], F(threshold), F(0.45))
    _compare(out, expected)
    assert (out.shape[2] > 3) if threshold < 0.5 else (out[0, 0, 0, 1] == -1)


@pytest.mark.parametrize("threshold, batch", [(0.2, 1), (0.6, 1), (0.4, 2)])
def test_yolov3_detection_output_matches_the_fork(threshold, batch):
    """With a batch of 2, both images' boxes land in one list at image index 0, as in the fork."""
    rng = np.random.default_rng(12)
    maps = [rng.normal(0, 1.5, (batch, 3 * 7, 4, 6)).astype(F), rng.normal(0, 1.5, (batch, 3 * 7, 8, 12)).astype(F)]
    biases = [10, 14, 23, 27, 37, 58, 81, 82, 135, 169, 344, 319]
    layer = layer_from_text(f'name: "det" type: "Yolov3DetectionOutput" yolov3_detection_output_param {{ '
                            f'num_classes: 2 confidence_threshold: {threshold} nms_threshold: 0.45 '
                            + " ".join(f"biases: {b}" for b in biases) +
                            ' anchors_scale: 32 anchors_scale: 16 mask_group_num: 2 mask: 3 mask: 4 mask: 5 '
                            'mask: 0 mask: 1 mask: 2 }')
    converted, out = run_layer(layer, [m.shape for m in maps], [], *maps)
    expected = yolov3_reference(maps, 3, 2, biases, [32, 16], [3, 4, 5, 0, 1, 2], F(threshold), F(0.45))
    _compare(out, expected)
    assert out.shape[2] > 3


def test_yolo_outputs_check_their_bottoms():
    for text, shapes, match in [
        ('type: "YoloDetectionOutput" yolo_detection_output_param { num_classes: 3 num_box: 2 biases: 1 biases: 1 '
         'biases: 2 biases: 2 }', [(1, 15, 5, 5)], "bottom 0 has 15 channels: expected num_box 2 x \\(5 \\+ 3"),
        ('type: "YoloDetectionOutput" yolo_detection_output_param { num_classes: 3 num_box: 2 biases: 1 biases: 1 '
         'biases: 2 biases: 2 }', [(1, 16, 5, 4)], "bottom 0 is 5 x 4: the fork reads a square map"),
        ('type: "Yolov3DetectionOutput" yolov3_detection_output_param { num_classes: 2 mask_group_num: 2 }',
         [(1, 21, 4, 4)], "1 bottoms but mask_group_num 2"),
        ('type: "Yolov3DetectionOutput" yolov3_detection_output_param { num_classes: 2 mask_group_num: 1 '
         'anchors_scale: 8 mask: 0 mask: 1 mask: 2 biases: 1 biases: 2 }', [(1, 21, 4, 4)],
         "mask 2 names a bias pair beyond the 1 given"),
        ('type: "Reorg" reorg_param { stride: 2 }', [(1, 6, 4, 4)], "6 channels are not a multiple of stride"),
        ('type: "Yolov3DetectionOutput" yolov3_detection_output_param { num_classes: 2 }', [],
         "needs at least one bottom"),
        ('type: "YoloDetectionOutput" yolo_detection_output_param { num_classes: 2 num_box: 0 }', [(1, 0, 3, 3)],
         "num_classes and num_box must be at least 1"),
    ]:
        layer = layer_from_text(f'name: "x" {text}')
        with pytest.raises(CaffeError, match=f"layer 'x' \\({layer.type}\\): {match}"):
            convert_layer(layer, shapes, [])


TINY_YOLO = """name: "tiny"
input: "data" input_shape { dim: 1 dim: 3 dim: 32 dim: 32 }
layer { name: "c1" type: "Convolution" bottom: "data" top: "c1" convolution_param { num_output: 8 kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "reorg" type: "Reorg" bottom: "c1" top: "r" reorg_param { stride: 2 } }
layer { name: "head" type: "Convolution" bottom: "r" top: "head" convolution_param { num_output: 14 kernel_size: 1 } }
layer { name: "det" type: "YoloDetectionOutput" bottom: "head" top: "det" yolo_detection_output_param { num_classes: 2 num_box: 2 biases: 1 biases: 1 biases: 2 biases: 3 confidence_threshold: 0.2 } }
"""


def test_a_yolo_net_runs_and_says_why_it_has_no_fixed_shape_export(tmp_path):
    from caffe2torch.export import export

    from caffe2torch.folder import save_net

    net = random_net(tmp_path, TINY_YOLO, std=0.5)
    x = torch.randn(1, 3, 32, 32)
    out = net(x)
    assert out.shape[:2] == (1, 1) and out.shape[3] == 7
    save_net(net, tmp_path / "folder")
    assert torch.equal(load_standalone(tmp_path / "folder")(x), out)
    with pytest.raises(CaffeError, match="det.*its output size depends on the data"):
        export(net, "onnx", tmp_path / "net.onnx")
