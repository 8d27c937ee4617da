"""Cascade R-CNN and MS-CNN (zhaoweicai/cascade-rcnn, zhaoweicai/mscnn) against loops of their CPU code:
decode_bbox_layer.cpp with bbox_util.cpp's DecodeBBoxesWithPrior, box_group_output_layer.cpp with DecodeGroupBBoxes,
ClipBBox, JaccardOverlap and ApplyNMS, box_output_layer.cpp with BoxIOU and nmsMax, roi_align_layer.cpp,
scale_route_layer.cpp and roi_pooling_layer.cpp's pad_ratio. Float32 scalars where the C++ uses float, Python
floats (double) for libm's exp / log / sqrt of a float."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from caffe2torch.errors import CaffeError
from caffe2torch.layers import convert_layer
from tests.conftest import layer_from_text, load_standalone, random_net, run_layer
from tests.test_layers_rcnn import roi_pooling_reference

F = np.float32
FLT_MAX = F(3.4028234663852886e38)


def cpp_max(a, b):
    return b if a < b else a


def cpp_min(a, b):
    return b if b < a else a


def decode_reference(deltas: np.ndarray, rois: np.ndarray, mean, std) -> np.ndarray:
    out = rois.copy()
    for i, roi in enumerate(rois):
        pw, ph = F(F(roi[3] - roi[1]) + 1), F(F(roi[4] - roi[2]) + 1)
        cx, cy = F(0.5 * float(F(roi[3] + roi[1]))), F(0.5 * float(F(roi[4] + roi[2])))
        b = [F(F(deltas[i, 4 + k] * F(std[k])) + F(mean[k])) for k in range(4)]
        tx, ty = F(F(b[0] * pw) + cx), F(F(b[1] * ph) + cy)
        tw, th = F(float(pw) * math.exp(float(b[2]))), F(float(ph) * math.exp(float(b[3])))
        tx, ty = F(tx - F(F(tw - 1) / 2)), F(ty - F(F(th - 1) / 2))
        out[i, 1:] = [tx, ty, F(F(tx + tw) - 1), F(F(ty + th) - 1)]
    return out


def test_decode_bbox_matches_the_fork_loop():
    rng = np.random.default_rng(0)
    rois = np.concatenate([rng.integers(0, 2, (7, 1)), rng.uniform(0, 100, (7, 2)), rng.uniform(100, 300, (7, 2))],
                          axis=1).astype(F)
    deltas = rng.normal(0, 1, (7, 8)).astype(F)
    layer = layer_from_text('name: "proposals_2nd" type: "DecodeBBox" bbox_reg_param { bbox_mean: 0 bbox_mean: 0.1 '
                            'bbox_mean: 0 bbox_mean: 0 bbox_std: 0.1 bbox_std: 0.1 bbox_std: 0.2 bbox_std: 0.2 }')
    converted, out = run_layer(layer, [deltas.shape, rois.shape], [], deltas, rois)
    assert converted.top_shapes == [(7, 5)]
    np.testing.assert_array_equal(out, decode_reference(deltas, rois, [0, 0.1, 0, 0], [0.1, 0.1, 0.2, 0.2]))


def cascade_iou(a, b, mode="IOU") -> np.float32:
    """bbox_util.cpp's JaccardOverlap(BBox, BBox, mode)."""
    if a[2] < a[0] or a[3] < a[1] or b[2] < b[0] or b[3] < b[1]:
        return F(0)
    ix1, iy1, ix2, iy2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = F(0) if ix1 > ix2 or iy1 >= iy2 else F(F(F(ix2 - ix1) + 1) * F(F(iy2 - iy1) + 1))
    s1, s2 = (F(F(F(x[2] - x[0]) + 1) * F(F(x[3] - x[1]) + 1)) for x in (a, b))
    union = min(s1, s2) if mode == "IOMU" else s1 if mode == "IOFU" else F(F(s1 + s2) - inter)
    return F(0) if union <= 0 else F(inter / union)


def greedy(boxes, iou, threshold):
    kept = [True] * len(boxes)
    for i in range(len(boxes)):
        if not kept[i]:
            continue
        for j in range(i + 1, len(boxes)):
            if kept[j] and iou(boxes[i], boxes[j]) > F(threshold):
                kept[j] = False
    return [i for i in range(len(boxes)) if kept[i]]


def box_group_reference(bottoms, fields, strides, fg_thr, iou_thr, whr, xyr, max_nms, max_post, min_size, mean, std):
    groups = len(fields[0])
    num = bottoms[0].shape[0] // groups
    bounds = [F(F(-1) / F(xyr)), F(F(1) / F(xyr)), F(math.log(float(F(F(1) / F(whr))))), F(math.log(float(F(whr))))]
    rows = []
    for i in range(num):
        boxes = []
        for level, (group, stride) in enumerate(zip(fields, strides)):
            probs, deltas = bottoms[2 * level], bottoms[2 * level + 1]
            height, width = probs.shape[2:]
            for k, (fw, fh) in enumerate(group):
                for s in range(height * width):
                    h, w = divmod(s, width)
                    idx = i * len(group) + k
                    score = F(1 - probs[idx, 0, h, w])
                    d = [F(F(deltas[idx, c, h, w] * F(std[c])) + F(mean[c])) for c in range(4)]
                    bx = cpp_min(bounds[1], cpp_max(bounds[0], d[0]))
                    by = cpp_min(bounds[1], cpp_max(bounds[0], d[1]))
                    bw = cpp_min(bounds[3], cpp_max(bounds[2], d[2]))
                    bh = cpp_min(bounds[3], cpp_max(bounds[2], d[3]))
                    bx = F(F(bx * F(fw)) + F(F(w + F(0.5)) * F(stride)))
                    by = F(F(by * F(fh)) + F(F(h + F(0.5)) * F(stride)))
                    bw, bh = F(float(F(fw)) * math.exp(float(bw))), F(float(F(fh)) * math.exp(float(bh)))
                    bx, by = F(bx - F(bw / 2)), F(by - F(bh / 2))
                    box = [bx, by, F(F(bx + bw) - 1), F(F(by + bh) - 1)]
                    box = [cpp_max(F(0), box[0]), cpp_max(F(0), box[1]), cpp_min(F(width * stride), box[2]),
                           cpp_min(F(height * stride), box[3])]
                    if score >= F(fg_thr) and F(F(box[2] - box[0]) + 1) >= F(min_size) and \
                            F(F(box[3] - box[1]) + 1) >= F(min_size):
                        boxes.append((box, score))
        boxes = sorted(boxes, key=lambda item: -item[1])  # stable: ties keep the collection order
        if 0 < max_nms < len(boxes):
            boxes = boxes[:max_nms]
        kept = greedy([b for b, _ in boxes], cascade_iou, iou_thr)
        if max_post > 0:
            kept = kept[:max_post]
        rows += [[i, *boxes[k][0], boxes[k][1]] for k in kept]
    if not rows:
        return np.array([[0, 1, 1, 10, 10]], F), np.zeros((1, 6), F)
    table = np.array(rows, F)
    return table[:, :5], table


def _box_group_bottoms(seed):
    rng = np.random.default_rng(seed)
    bottoms = []
    for groups, (height, width) in ((3, (4, 5)), (2, (2, 3))):
        logits = rng.normal(0, 1.5, (2 * groups, 2, height, width))
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        bottoms += [probs.astype(F), rng.normal(0, 0.7, (2 * groups, 4, height, width)).astype(F)]
    return bottoms


BOX_GROUP = '''name: "proposals" type: "BoxGroupOutput" top: "proposals" top: "scored"
box_group_output_param { fg_thr: 0.3 iou_thr: 0.5 nms_type: "IOU" field_whr: 4 field_xyr: 2 max_nms_num: 40
  max_post_nms_num: 12 min_size: 4
  box_group_param { field_w: 16 field_w: 24 field_w: 12 field_h: 16 field_h: 12 field_h: 24 stride: 8 }
  box_group_param { field_w: 48 field_w: 32 field_h: 32 field_h: 48 stride: 16 } }
bbox_reg_param { bbox_mean: 0 bbox_mean: 0 bbox_mean: 0 bbox_mean: 0 bbox_std: 0.1 bbox_std: 0.1 bbox_std: 0.2 bbox_std: 0.2 }'''


@pytest.mark.parametrize("seed", [0, 1])
def test_box_group_output_matches_the_fork_loops(seed):
    bottoms = _box_group_bottoms(seed)
    layer = layer_from_text(BOX_GROUP)
    converted, (rois, scored) = run_layer(layer, [b.shape for b in bottoms], [], *bottoms)
    want_rois, want_scored = box_group_reference(bottoms, [[(16, 16), (24, 12), (12, 24)], [(48, 32), (32, 48)]],
                                                 [8, 16], 0.3, 0.5, 4, 2, 40, 12, 4, [0] * 4, [0.1, 0.1, 0.2, 0.2])
    assert converted.top_shapes == [(1, 5), (1, 6)]
    assert rois.shape[0] > 12  # both images kept boxes
    np.testing.assert_array_equal(rois, want_rois)
    np.testing.assert_array_equal(scored, want_scored)


def test_box_group_output_gives_the_forks_placeholder_without_boxes():
    bottoms = _box_group_bottoms(0)
    layer = layer_from_text(BOX_GROUP.replace("fg_thr: 0.3", "fg_thr: 2"))
    _, (rois, scored) = run_layer(layer, [b.shape for b in bottoms], [], *bottoms)
    assert rois.tolist() == [[0, 1, 1, 10, 10]] and scored.tolist() == [[0] * 6]


def mscnn_iou(a, b) -> np.float32:
    """mscnn's BoxIOU on (x, y, w, h)."""
    if a[2] <= 0 or a[3] <= 0 or b[2] <= 0 or b[3] <= 0:
        return F(0)
    tlx, tly = max(a[0], b[0]), max(a[1], b[1])
    brx, bry = min(F(a[0] + a[2]), F(b[0] + b[2])), min(F(a[1] + a[3]), F(b[1] + b[3]))
    over = F(0) if tlx >= brx or tly >= bry else F(F(brx - tlx) * F(bry - tly))
    return F(over / F(F(F(a[2] * a[3]) + F(b[2] * b[3])) - over))


def box_output_reference(bottoms, fields, rates, fg_thr, iou_thr, whr, xyr, max_nms, max_post, min_size):
    num = bottoms[0].shape[0]
    min_whr, max_whr = F(math.log(float(F(F(1) / F(whr))))), F(math.log(float(F(whr))))
    min_xyr, max_xyr = F(F(-1) / F(xyr)), F(F(1) / F(xyr))
    rows = []
    for i in range(num):
        boxes, pairs = [], []
        for j, x in enumerate(bottoms):
            classes = x.shape[1] - 4
            height, width = x.shape[2:]
            fw, fh = fields[j]
            for s in range(height * width):
                h, w = divmod(s, width)
                score = -FLT_MAX
                for k in range(1, classes):
                    score = cpp_max(score, x[i, k, h, w])
                score = F(score - x[i, 0, h, w])
                if score < F(fg_thr):
                    continue
                bx, by, bw, bh = (x[i, classes + c, h, w] for c in range(4))
                bx, by = cpp_min(max_xyr, cpp_max(min_xyr, bx)), cpp_min(max_xyr, cpp_max(min_xyr, by))
                bx = F(F(bx * F(fw)) + F(F(w + F(0.5)) * F(rates[j])))
                by = F(F(by * F(fh)) + F(F(h + F(0.5)) * F(rates[j])))
                bw, bh = cpp_min(max_whr, cpp_max(min_whr, bw)), cpp_min(max_whr, cpp_max(min_whr, bh))
                bw, bh = F(float(fw) * math.exp(float(bw))), F(float(fh) * math.exp(float(bh)))
                bx, by = F(bx - F(bw / 2)), F(by - F(bh / 2))
                bx, by = cpp_max(bx, F(0)), cpp_max(by, F(0))
                bw, bh = cpp_min(bw, F(width * rates[j] - bx)), cpp_min(bh, F(height * rates[j] - by))
                if bw >= F(min_size) and bh >= F(min_size):
                    pairs.append((score, len(boxes)))
                    boxes.append(([bx, by, bw, bh], score))
        order = [index for _, index in sorted(pairs, reverse=True)]  # std::greater on (score, index)
        boxes = [boxes[k] for k in order]
        if 0 < max_nms < len(boxes):
            boxes = boxes[:max_nms]
        kept = greedy([b for b, _ in boxes], mscnn_iou, iou_thr)
        if max_post > 0:
            kept = kept[:max_post]
        for k in kept:
            (x0, y0, bw, bh), score = boxes[k]
            rows.append([i, x0, y0, F(x0 + bw), F(y0 + bh)])
    return np.array(rows, F) if rows else np.array([[0, 1, 1, 10, 10]], F)


def test_box_output_matches_the_fork_loops():
    rng = np.random.default_rng(5)
    bottoms = [rng.normal(0, 1, (2, 3 + 4, 6, 7)).astype(F), rng.normal(0, 1, (2, 3 + 4, 3, 4)).astype(F)]
    bottoms[0][0, 1, 0, :3] = bottoms[0][0, 0, 0, :3] + 1  # equal scores: the later box first
    layer = layer_from_text('name: "proposals" type: "BoxOutput" top: "proposals" box_output_param { fg_thr: 0.2 '
                            'iou_thr: 0.6 field_w: 20 field_w: 40 field_h: 30 field_h: 60 downsample_rate: 8 '
                            'downsample_rate: 16 field_whr: 2 field_xyr: 2 max_nms_num: 30 max_post_nms_num: 15 '
                            'min_size: 6 }')
    converted, out = run_layer(layer, [b.shape for b in bottoms], [], *bottoms)
    expected = box_output_reference(bottoms, [(20, 30), (40, 60)], [8, 16], 0.2, 0.6, 2, 2, 30, 15, 6)
    assert converted.top_shapes == [(1, 5)] and out.shape[0] > 15
    np.testing.assert_array_equal(out, expected)


def roi_align_reference(x, rois, pooled_h, pooled_w, scale, pad_ratio):
    num, channels, height, width = x.shape
    top = np.zeros((len(rois), channels, pooled_h + 1, pooled_w + 1), F)
    for n, roi in enumerate(rois):
        batch = int(roi[0])
        pad_w, pad_h = F(F(F(roi[3] - roi[1]) + 1) * F(pad_ratio)), F(F(F(roi[4] - roi[2]) + 1) * F(pad_ratio))
        start_w, start_h = F(F(F(roi[1] - pad_w) * F(scale)) - 0.5), F(F(F(roi[2] - pad_h) * F(scale)) - 0.5)
        end_w, end_h = F(F(F(roi[3] + pad_w) * F(scale)) - 0.5), F(F(F(roi[4] + pad_h) * F(scale)) - 0.5)
        roi_h, roi_w = F(end_h - start_h), F(end_w - start_w)
        bin_h, bin_w = F(roi_h / F(pooled_h)), F(roi_w / F(pooled_w))
        for c in range(channels):
            for ph in range(pooled_h + 1):
                for pw in range(pooled_w + 1):
                    if roi_h <= 0 or roi_w <= 0:
                        continue
                    h, w = F(start_h + F(F(ph) * bin_h)), F(start_w + F(F(pw) * bin_w))
                    if h < -0.5 or h > height - 0.5 or w < -0.5 or w > width - 0.5:
                        continue
                    hf, wf = math.floor(h), math.floor(w)
                    hc, wc = hf + 1, wf + 1
                    h, w = min(max(h, F(0)), F(height - 1)), min(max(w, F(0)), F(width - 1))
                    hf, wf = min(max(hf, 0), height - 1), min(max(wf, 0), width - 1)
                    hc, wc = min(max(hc, 0), height - 1), min(max(wc, 0), width - 1)
                    lh, lw = F(h - hf), F(w - wf)
                    hh, hw = F(1 - lh), F(1 - lw)
                    plane = x[batch, c]
                    value = F(F(F(F(hw * hh) * plane[hf, wf]) + F(F(lw * hh) * plane[hf, wc])) +
                              F(F(hw * lh) * plane[hc, wf]))
                    top[n, c, ph, pw] = F(value + F(F(lw * lh) * plane[hc, wc]))
    return top


@pytest.mark.parametrize("pad_ratio", [0.0, 0.25])
def test_roi_align_matches_the_fork_loop(pad_ratio):
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, (2, 3, 9, 11)).astype(F)
    rois = np.array([[0, 3, 5, 40, 30], [1, 0, 0, 43, 35], [0, 10.5, 7.5, 12, 9], [1, -20, -8, 5, 70],
                     [0, 30, 20, 28, 20]], F)  # the last one reversed: zeros
    layer = layer_from_text(f'name: "roi_grid" type: "ROIAlign" roi_pooling_param {{ pooled_h: 3 pooled_w: 2 '
                            f'spatial_scale: 0.25 pad_ratio: {pad_ratio} }}')
    converted, out = run_layer(layer, [x.shape, rois.shape], [], x, rois)
    assert converted.top_shapes == [(5, 3, 4, 3)]
    np.testing.assert_allclose(out, roi_align_reference(x, rois, 3, 2, 0.25, pad_ratio), rtol=0, atol=1e-6)
    assert not out[4].any() and out[1].any()


def test_roi_pooling_pad_ratio_grows_each_region():
    rng = np.random.default_rng(3)
    x = np.round(rng.normal(0, 2, (2, 3, 12, 16))).astype(F)
    rois = np.array([[0, 3, 5, 40, 30], [1, 10.5, 7.5, 12, 9], [0, 30, 20, 30, 20]], F)
    layer = layer_from_text('name: "roi_pool" type: "ROIPooling" roi_pooling_param { pooled_h: 3 pooled_w: 4 '
                            'spatial_scale: 0.25 pad_ratio: 0.25 }')
    _, out = run_layer(layer, [x.shape, rois.shape], [], x, rois)
    pad = np.stack([(rois[:, 3] - rois[:, 1] + 1) * F(0.25), (rois[:, 4] - rois[:, 2] + 1) * F(0.25)], 1).astype(F)
    grown = np.concatenate([rois[:, :1], rois[:, 1:3] - pad, rois[:, 3:] + pad], axis=1).astype(F)
    np.testing.assert_array_equal(out, roi_pooling_reference(x, grown, 3, 4, 0.25))


def test_scale_route_picks_the_regions_of_its_scales():
    rois = np.array([[0, 0, 0, 9, 9], [0, 0, 0, 99, 99], [0, 0, 0, 149, 149], [0, 5, 5, 4, 4]], F)
    features = np.arange(4 * 3, dtype=F).reshape(4, 3)
    layer = layer_from_text('name: "route" type: "ScaleRoute" top: "r" top: "f" scale_route_param { low_scale: 50 '
                            'high_scale: 120 }')
    _, (routed, picked) = run_layer(layer, [rois.shape, features.shape], [], rois, features)
    np.testing.assert_array_equal(routed, rois[[1]])
    np.testing.assert_array_equal(picked, features[[1]])
    # None in [200, 400): the one nearest the middle scale sqrt(200 * 400) ~ 283 in log2, the 150-pixel region.
    layer = layer_from_text('name: "route" type: "ScaleRoute" top: "r" scale_route_param { low_scale: 200 '
                            'high_scale: 400 }')
    _, routed = run_layer(layer, [rois.shape], [], rois)
    np.testing.assert_array_equal(routed, rois[[2]])


@pytest.mark.parametrize("text, shapes, message", [
    ('type: "DecodeBBox"', [(4, 12), (4, 5)], r"\[4, 8\] class-agnostic deltas"),
    ('type: "DecodeBBox"', [(4, 8), (4, 5), (4, 6)], r"Caffe refuses it at TEST"),
    ('type: "BoxGroupOutput" box_group_output_param { box_group_param { field_w: 4 field_h: 4 stride: 8 } '
     'nms_type: "NMS" }', [(1, 2, 3, 3), (1, 4, 3, 3)], r"nms_type 'NMS' is not one of IOU, IOMU, IOFU"),
    ('type: "BoxOutput" box_output_param { field_w: 4 field_h: 4 }', [(1, 6, 3, 3)], r"1 bottoms need as many"),
    ('type: "ROIAlign"', [(1, 2, 3, 3), (4, 5)], r"pooled_h and pooled_w must be > 0"),
])
def test_cascade_layers_refuse_what_the_forks_refuse(text, shapes, message):
    with pytest.raises(CaffeError, match=message):
        convert_layer(layer_from_text(f'name: "l" {text}'), shapes, [])


CASCADE = '''
name: "cascade_head"
input: "data" input_shape { dim: 1 dim: 3 dim: 64 dim: 80 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 8 kernel_size: 3 stride: 8 pad: 1 } }
layer { name: "rpn_prob" type: "Convolution" bottom: "conv" top: "rpn_prob" convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "rpn_bbox" type: "Convolution" bottom: "conv" top: "rpn_bbox" convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "rpn_softmax" type: "Softmax" bottom: "rpn_prob" top: "rpn_softmax" }
layer { name: "proposals" type: "BoxGroupOutput" bottom: "rpn_softmax" bottom: "rpn_bbox" top: "proposals"
  box_group_output_param { fg_thr: 0.1 iou_thr: 0.7 max_nms_num: 100 max_post_nms_num: 20 min_size: 2
  box_group_param { field_w: 24 field_h: 24 stride: 8 } } }
layer { name: "roi_pool" type: "ROIPooling" bottom: "conv" bottom: "proposals" top: "roi_pool"
  roi_pooling_param { pooled_w: 3 pooled_h: 3 spatial_scale: 0.125 pad_ratio: 0.1 } }
layer { name: "roi_grid" type: "ROIAlign" bottom: "conv" bottom: "proposals" top: "roi_grid"
  roi_pooling_param { pooled_w: 3 pooled_h: 3 spatial_scale: 0.125 } }
layer { name: "fc" type: "InnerProduct" bottom: "roi_grid" top: "fc" inner_product_param { num_output: 8 } }
layer { name: "cls" type: "InnerProduct" bottom: "fc" top: "cls" inner_product_param { num_output: 3 } }
layer { name: "bbox_pred" type: "InnerProduct" bottom: "roi_pool" top: "bbox_pred" inner_product_param { num_output: 8 } }
layer { name: "proposals_2nd" type: "DecodeBBox" bottom: "bbox_pred" bottom: "proposals" top: "proposals_2nd"
  bbox_reg_param { bbox_mean: 0 bbox_mean: 0 bbox_mean: 0 bbox_mean: 0 bbox_std: 0.1 bbox_std: 0.1 bbox_std: 0.2 bbox_std: 0.2 } }
'''


def test_cascade_head_runs_and_runs_standalone(tmp_path):
    from caffe2torch.folder import save_net
    from caffe2torch.model import unexportable_layers

    net = random_net(tmp_path, CASCADE, 0.3)
    data = torch.randn(1, 3, 64, 80, generator=torch.Generator().manual_seed(0))
    cls, boxes = net(data)
    assert cls.shape[1] == 3 and boxes.shape == (cls.shape[0], 5) and cls.shape[0] > 1
    # ROIAlign and DecodeBBox compute with tensor ops alone; the proposals and the fork's ROIPooling do not.
    assert [layer for layer, _ in unexportable_layers(net)] == ["'proposals' (BoxGroupOutput)", "'roi_pool' (ROIPooling)"]
    save_net(net, tmp_path / "folder")
    with torch.no_grad():
        again = load_standalone(tmp_path / "folder")(data)
    assert all(torch.equal(a, b) for a, b in zip(again, (cls, boxes)))


ALIGN = '''
name: "align"
input: "conv" input_shape { dim: 2 dim: 4 dim: 8 dim: 10 }
input: "rois" input_shape { dim: 6 dim: 5 }
layer { name: "roi_grid" type: "ROIAlign" bottom: "conv" bottom: "rois" top: "roi_grid"
  roi_pooling_param { pooled_w: 3 pooled_h: 3 spatial_scale: 0.125 pad_ratio: 0.1 } }
layer { name: "bbox_pred" type: "InnerProduct" bottom: "roi_grid" top: "bbox_pred" inner_product_param { num_output: 8 } }
layer { name: "decoded" type: "DecodeBBox" bottom: "bbox_pred" bottom: "rois" top: "decoded" }
'''


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript-based ONNX exporter, kept for speed
def test_roi_align_and_decode_bbox_export_with_tensor_ops(tmp_path):
    """Regions of images in the batch (reference-style random inputs would not be regions: exported directly)."""
    import onnxruntime

    net = random_net(tmp_path, ALIGN, 0.3)
    generator = torch.Generator().manual_seed(4)
    conv = torch.randn(2, 4, 8, 10, generator=generator)
    rois = torch.tensor([[0, 3, 5, 40, 30], [1, 0, 0, 63, 47], [0, 10.5, 7.5, 12, 9], [1, -20, -8, 5, 70],
                         [0, 60, 44, 200, 90], [1, 30, 20, 28, 20]])
    with torch.no_grad():
        expected = net(conv, rois)
        program = torch.export.export(net, (conv, rois))
        torch.testing.assert_close(program.module()(conv, rois), expected, rtol=0, atol=0)
        torch.onnx.export(net, (conv, rois), str(tmp_path / "net.onnx"), input_names=["conv", "rois"], dynamo=False)
    session = onnxruntime.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"conv": conv.numpy(), "rois": rois.numpy()})
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-5)
