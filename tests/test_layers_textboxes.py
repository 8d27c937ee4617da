"""TextBoxes++ (MhLiao/TextBoxes_plusplus): PriorBox's denser_prior_boxes and DetectionOutput's quadrilaterals and
rotated boxes, against loops of its prior_box_layer.cpp, detection_output_layer.cpp and bbox_util.cpp
(DecodeBBoxPolygon, DecodeBBoxRBox, GetLocPredictions); NMS and decoding of the boxes are SSD's (test_layers_ssd)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from caffe2torch.errors import CaffeError
from caffe2torch.layers import convert_layer
from tests.conftest import layer_from_text, load_standalone, random_net, run_layer
from tests.test_layers_ssd import _decode_reference, _nms_reference

F = np.float32


def denser_prior_reference(min_size: int, max_size: int, ratios: list[float], layer_h: int, layer_w: int,
                           image: int, step: float, offset: float) -> np.ndarray:
    """TextBoxes++'s PriorBoxLayer::Forward_cpu with denser_prior_boxes (flip, no clip, four variances)."""
    top = []

    def emit(cx, cy, w, h):
        top.extend([F((float(cx) - float(w) / 2.0) / image), F((float(cy) - float(h) / 2.0) / image),
                    F((float(cx) + float(w) / 2.0) / image), F((float(cy) + float(h) / 2.0) / image)])

    all_ratios = [1.0]
    for ar in ratios:
        all_ratios += [ar, float(F(1.0 / ar))]
    for h in range(layer_h):
        for w in range(layer_w):
            cx, cy = F(F(w + F(offset)) * F(step)), F(F(h + F(offset)) * F(step))
            cy1 = F((h + 1.0) * float(F(step)))  # center_y_offset_1
            sizes = [(F(min_size), F(min_size)), (F(math.sqrt(min_size * max_size)),) * 2]
            sizes += [(F(min_size * math.sqrt(ar)), F(min_size / math.sqrt(ar))) for ar in all_ratios[1:]]
            for width, height in sizes:
                emit(cx, cy, width, height)
                emit(cx, cy1, width, height)
    boxes = np.array(top, F)
    return np.stack([boxes, np.tile(np.array([0.1, 0.1, 0.2, 0.2], F), boxes.size // 4)])[None]


def test_denser_prior_boxes_match_the_fork_loops():
    layer = layer_from_text('name: "pb" type: "PriorBox" prior_box_param { min_size: 30 max_size: 60 aspect_ratio: 2 '
                            'aspect_ratio: 5 flip: true clip: false variance: 0.1 variance: 0.1 variance: 0.2 '
                            'variance: 0.2 step: 8 offset: 0.5 denser_prior_boxes: true }')
    shapes = [(1, 8, 5, 6), (1, 3, 48, 48)]
    converted, out = run_layer(layer, shapes, [], np.zeros(shapes[0], F), np.zeros(shapes[1], F))
    expected = denser_prior_reference(30, 60, [2.0, 5.0], 5, 6, 48, 8.0, 0.5)
    assert converted.top_shapes == [expected.shape] == [(1, 2, 5 * 6 * 12 * 4)]
    np.testing.assert_array_equal(out, expected)


def _text_reference(loc, conf, prior, kind: str, threshold: float, nms_threshold: float, keep_top_k: int):
    """DetectionOutputLayer::Forward_cpu with use_polygon (kind "polygon") or not ("rbox"), one shared location,
    CENTER_SIZE: SSD's decoding and NMS of the boxes, each kept box's row extended by its decoded text shape."""
    values = 12 if kind == "polygon" else 9
    num, num_priors = loc.shape[0], prior.shape[2] // 4
    priors, variances = prior[0, 0].reshape(-1, 4), prior[0, 1].reshape(-1, 4)
    rows = []
    for i in range(num):
        preds = loc[i].reshape(num_priors, values)
        boxes, sizes, shapes = [], [], []
        for p in range(num_priors):
            box, size = _decode_reference(priors[p], variances[p], preds[p, :4], "CENTER_SIZE", False)
            boxes.append(box)
            sizes.append(size)
            xmin, ymin, xmax, ymax = priors[p]
            v, o = variances[p], preds[p, 4:]
            width, height = F(xmax - xmin), F(ymax - ymin)
            if kind == "polygon":  # DecodeBBoxPolygon: corners from the prior's corners, clockwise from top left
                corners = [(xmin, ymin), (xmax, ymin), (xmax, ymax), (xmin, ymax)]
                shape = []
                for k, (cx, cy) in enumerate(corners):
                    shape += [F(F(F(v[0] * o[2 * k]) * width) + cx), F(F(F(v[1] * o[2 * k + 1]) * height) + cy)]
            else:  # DecodeBBoxRBox: two points from the prior's centre and a height
                cx, cy = F(float(F(xmin + xmax)) / 2.0), F(float(F(ymin + ymax)) / 2.0)
                shape = [F(F(F(v[0] * o[0]) * width) + cx), F(F(F(v[1] * o[1]) * height) + cy),
                         F(F(F(v[0] * o[2]) * width) + cx), F(F(F(v[1] * o[3]) * height) + cy),
                         F(math.exp(float(F(v[3] * o[4]))) * float(height))]
            shapes.append(shape)
        scores = conf[i].reshape(num_priors, 2)
        kept = _nms_reference(boxes, sizes, scores[:, 1], F(threshold), nms_threshold, 1.0, -1)
        if -1 < keep_top_k < len(kept):
            kept = [idx for _, idx in sorted(((scores[idx, 1], idx) for idx in kept), key=lambda p: -p[0])][:keep_top_k]
        for idx in kept:
            rows.append([i, 1, scores[idx, 1], *boxes[idx], *shapes[idx]])
    return np.array(rows, F).reshape(1, 1, -1, 3 + 4 + values - 4)


@pytest.mark.parametrize("kind, use_polygon", [("polygon", None), ("polygon", True), ("rbox", None), ("rbox", False)])
def test_text_detection_output_matches_the_fork_loops(kind, use_polygon):
    values = 12 if kind == "polygon" else 9
    rng = np.random.default_rng(11)
    num_priors = 40
    centers = rng.uniform(0.2, 0.8, (num_priors, 2))
    sides = rng.uniform(0.05, 0.4, (num_priors, 2))
    boxes = np.concatenate([centers - sides / 2, centers + sides / 2], axis=1).astype(F)
    prior = np.stack([boxes.reshape(-1), np.tile(np.array([0.1, 0.1, 0.2, 0.2], F), num_priors)])[None].astype(F)
    loc = rng.normal(0, 1, (2, num_priors * values)).astype(F)
    logits = rng.normal(0, 2, (2, num_priors, 2))
    conf = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).reshape(2, -1).astype(F)
    flag = "" if use_polygon is None else f"use_polygon: {str(use_polygon).lower()} "
    layer = layer_from_text('name: "det" type: "DetectionOutput" detection_output_param { num_classes: 2 '
                            'share_location: true background_label_id: 0 code_type: CENTER_SIZE keep_top_k: 12 '
                            f'confidence_threshold: 0.2 nms_param {{ nms_threshold: 0.45 }} {flag}}}')
    converted, out = run_layer(layer, [loc.shape, conf.shape, prior.shape], [], loc, conf, prior)
    expected = _text_reference(loc, conf, prior, kind, 0.2, 0.45, 12)
    assert converted.top_shapes == [(1, 1, 1, 3 + values)]
    assert out.shape == expected.shape and out.shape[2] > 4
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("text, loc_values, message", [
    ("use_polygon: true code_type: CENTER_SIZE", 9, r"expected 480 values per image"),
    ("use_polygon: false code_type: CENTER_SIZE", 12, r"expected 360 values per image"),
    ("code_type: CORNER", 12, r"TextBoxes\+\+'s polygon outputs are decoded for code_type CENTER_SIZE"),
])
def test_text_detection_output_checks_its_shapes(text, loc_values, message):
    layer = layer_from_text(f'name: "det" type: "DetectionOutput" detection_output_param {{ num_classes: 2 {text} }}')
    with pytest.raises(CaffeError, match=message):
        convert_layer(layer, [(1, 40 * loc_values), (1, 80), (1, 2, 160)], [])


HEAD = '''
name: "textboxes_head"
input: "data" input_shape { dim: 1 dim: 3 dim: 32 dim: 32 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 4 kernel_size: 3 stride: 4 pad: 1 } }
layer { name: "loc" type: "Convolution" bottom: "conv" top: "loc" convolution_param { num_output: 48 kernel_size: 1 } }
layer { name: "loc_perm" type: "Permute" bottom: "loc" top: "loc_perm" permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "loc_flat" type: "Flatten" bottom: "loc_perm" top: "loc_flat" flatten_param { axis: 1 } }
layer { name: "conf" type: "Convolution" bottom: "conv" top: "conf" convolution_param { num_output: 8 kernel_size: 1 } }
layer { name: "conf_perm" type: "Permute" bottom: "conf" top: "conf_perm" permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "conf_flat" type: "Flatten" bottom: "conf_perm" top: "conf_flat" flatten_param { axis: 1 } }
layer { name: "conf_reshape" type: "Reshape" bottom: "conf_flat" top: "conf_reshape" reshape_param { shape { dim: 0 dim: -1 dim: 2 } } }
layer { name: "conf_softmax" type: "Softmax" bottom: "conf_reshape" top: "conf_softmax" softmax_param { axis: 2 } }
layer { name: "conf_out" type: "Flatten" bottom: "conf_softmax" top: "conf_out" flatten_param { axis: 1 } }
layer { name: "prior" type: "PriorBox" bottom: "conv" bottom: "data" top: "prior" prior_box_param { min_size: 8
  aspect_ratio: 3 flip: false variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 denser_prior_boxes: true } }
layer { name: "det" type: "DetectionOutput" bottom: "loc_flat" bottom: "conf_out" bottom: "prior" top: "det"
  detection_output_param { num_classes: 2 code_type: CENTER_SIZE keep_top_k: 20 confidence_threshold: 0.3
  nms_param { nms_threshold: 0.45 top_k: 100 } } }
'''


def test_textboxes_head_runs_and_runs_standalone(tmp_path):
    from caffe2torch.folder import save_net

    net = random_net(tmp_path, HEAD, 0.3)
    data = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    det = net(data)
    assert det.shape[-1] == 15 and det.shape[2] > 0  # 4 priors a cell: 2 sizes, each twice; 12 values each
    save_net(net, tmp_path / "folder")
    with torch.no_grad():
        assert torch.equal(load_standalone(tmp_path / "folder")(data), det)


def _head_v1(loc_outputs: int, conf_outputs: int, share: bool) -> str:
    """A TextBoxes (v1) style head without denser_prior_boxes: 2 priors a cell for SSD (min size, one ratio)."""
    return (HEAD.replace("denser_prior_boxes: true", "")
            .replace("num_output: 48", f"num_output: {loc_outputs}").replace("num_output: 8 kernel_size: 1",
                                                                            f"num_output: {conf_outputs} kernel_size: 1")
            .replace("num_classes: 2 code_type", f"num_classes: 2 share_location: {str(share).lower()} code_type"))


def test_textboxes_v1_priors_are_told_apart_by_the_prediction_convolutions(tmp_path):
    from caffe2torch.conversion import convert

    path = tmp_path / "v1.prototxt"
    path.write_text(_head_v1(16, 8, True))  # 2 SSD priors a cell, twice over: TextBoxes' hard-coded denser boxes
    conversion = convert(None, path)
    assert conversion.net.meta["caffe"].blob_shapes["prior"] == (1, 2, 8 * 8 * 4 * 4)
    assert any("TextBoxes' (MhLiao/TextBoxes) denser boxes" in note for note in conversion.notes)
    assert conversion.net(torch.randn(1, 3, 32, 32)).shape[-1] == 7
    # SSD's own layout with 2 classes and a location per class has the same 16 outputs: it stays SSD.
    path.write_text(_head_v1(16, 4, False))
    conversion = convert(None, path)
    assert conversion.net.meta["caffe"].blob_shapes["prior"] == (1, 2, 8 * 8 * 2 * 4)
    assert not any("TextBoxes" in note for note in conversion.notes)
