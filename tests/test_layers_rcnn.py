"""The R-CNN family against loops of each fork's code: caffe-fast-rcnn's roi_pooling_layer.cpp,
caffe-rfcn's psroi_pooling_layer.cu and py-faster-rcnn's proposal_layer.py (with generate_anchors,
bbox_transform_inv, clip_boxes and the GPU NMS kernel), in NumPy as the originals compute."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from caffe2torch.errors import CaffeError
from caffe2torch.layers import convert_layer
from caffe2torch.layers.rcnn import parse_param_str
from tests.conftest import layer_from_text, load_standalone, random_net, run_layer
from proto import caffe_pb2

F = np.float32


def _run_without_blobs(layer, shapes, *inputs):
    return run_layer(layer, shapes, [], *inputs)


def c_round(x: float) -> float:
    return math.copysign(math.floor(abs(x) + 0.5), x)


def roi_pooling_reference(x, rois, pooled_h, pooled_w, scale):
    _, channels, height, width = x.shape
    top = np.full((len(rois), channels, pooled_h, pooled_w), np.finfo(F).min, F)
    for n, roi in enumerate(rois):
        batch = int(roi[0])
        start_w, start_h, end_w, end_h = (int(c_round(float(F(v * F(scale))))) for v in roi[1:])
        roi_h, roi_w = max(end_h - start_h + 1, 1), max(end_w - start_w + 1, 1)
        bin_h, bin_w = F(F(roi_h) / F(pooled_h)), F(F(roi_w) / F(pooled_w))
        for c in range(channels):
            for ph in range(pooled_h):
                for pw in range(pooled_w):
                    hstart = min(max(int(math.floor(F(ph) * bin_h)) + start_h, 0), height)
                    hend = min(max(int(math.ceil(F(ph + 1) * bin_h)) + start_h, 0), height)
                    wstart = min(max(int(math.floor(F(pw) * bin_w)) + start_w, 0), width)
                    wend = min(max(int(math.ceil(F(pw + 1) * bin_w)) + start_w, 0), width)
                    if hend <= hstart or wend <= wstart:
                        top[n, c, ph, pw] = 0
                    for h in range(hstart, hend):
                        for w in range(wstart, wend):
                            if x[batch, c, h, w] > top[n, c, ph, pw]:
                                top[n, c, ph, pw] = x[batch, c, h, w]
    return top


ROIS = np.array([[0, 3, 5, 40, 30], [1, 0, 0, 63, 47], [0, 10.5, 7.5, 12, 9], [1, -20, -8, 5, 70],
                 [0, 60, 44, 200, 90], [1, 30, 20, 30, 20]], F)


def test_roi_pooling_matches_fork_loop():
    rng = np.random.default_rng(0)
    x = np.round(rng.normal(0, 2, (2, 3, 12, 16))).astype(F)
    x[0, 1, 2:4, 2:4] = np.nan
    layer = layer_from_text('name: "roi_pool5" type: "ROIPooling" roi_pooling_param { pooled_h: 3 pooled_w: 4 '
                   'spatial_scale: 0.25 }')
    converted, out = _run_without_blobs(layer, [x.shape, ROIS.shape], x, ROIS)
    assert converted.top_shapes == [(6, 3, 3, 4)]
    np.testing.assert_array_equal(out, roi_pooling_reference(x, ROIS, 3, 4, 0.25))
    # R-FCN's deploy nets feed the regions as [R, 5, 1, 1]: the same values.
    rois4 = ROIS.reshape(-1, 5, 1, 1)
    _, out4 = _run_without_blobs(layer, [x.shape, rois4.shape], x, rois4)
    np.testing.assert_array_equal(out4, out)


def psroi_reference(x, rois, output_dim, group, scale):
    """The kernel, with nvcc's fused multiply-add for p * bin + start."""
    _, channels, height, width = x.shape
    top = np.zeros((len(rois), output_dim, group, group), np.float64)
    for n, roi in enumerate(rois):
        batch = int(roi[0])
        start_w, start_h = F(F(c_round(roi[1])) * F(scale)), F(F(c_round(roi[2])) * F(scale))
        end_w, end_h = F(F(c_round(roi[3]) + 1.0) * F(scale)), F(F(c_round(roi[4]) + 1.0) * F(scale))
        bin_w, bin_h = F(max(end_w - start_w, 0.1) / F(group)), F(max(end_h - start_h, 0.1) / F(group))
        for ctop in range(output_dim):
            for ph in range(group):
                for pw in range(group):
                    hstart = min(max(math.floor(F(ph * float(bin_h) + float(start_h))), 0), height)
                    hend = min(max(math.ceil(F((ph + 1) * float(bin_h) + float(start_h))), 0), height)
                    wstart = min(max(math.floor(F(pw * float(bin_w) + float(start_w))), 0), width)
                    wend = min(max(math.ceil(F((pw + 1) * float(bin_w) + float(start_w))), 0), width)
                    if hend <= hstart or wend <= wstart:
                        continue
                    c = (ctop * group + ph) * group + pw
                    top[n, ctop, ph, pw] = x[batch, c, hstart:hend, wstart:wend].astype(np.float64).sum() / (
                        (hend - hstart) * (wend - wstart))
    return top


def test_psroi_pooling_matches_fork_kernel():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (2, 2 * 3 * 3, 12, 16)).astype(F)
    layer = layer_from_text('name: "psroi" type: "PSROIPooling" psroi_pooling_param { spatial_scale: 0.25 output_dim: 2 '
                   'group_size: 3 }')
    converted, out = _run_without_blobs(layer, [x.shape, ROIS.shape], x, ROIS)
    assert converted.top_shapes == [(6, 2, 3, 3)]
    np.testing.assert_allclose(out, psroi_reference(x, ROIS, 2, 3, 0.25), rtol=1e-6, atol=1e-6)
    rois4 = ROIS.reshape(-1, 5, 1, 1)  # R-FCN's deploy nets feed the regions as [R, 5, 1, 1]
    _, out4 = _run_without_blobs(layer, [x.shape, rois4.shape], x, rois4)
    np.testing.assert_array_equal(out4, out)
    with pytest.raises(CaffeError, match="input has 18 channels; output_dim 3 x group_size 3"):
        convert_layer(layer_from_text('name: "p" type: "PSROIPooling" psroi_pooling_param { spatial_scale: 1 output_dim: 3 '
                             'group_size: 3 }'), [x.shape, ROIS.shape], [])


# ---------------------------------------------------------------- the RPN proposal layer


def generate_anchors_reference(scales, ratios=(0.5, 1, 2), base_size=16):
    def whctrs(a):
        w, h = a[2] - a[0] + 1, a[3] - a[1] + 1
        return w, h, a[0] + 0.5 * (w - 1), a[1] + 0.5 * (h - 1)

    def mk(ws, hs, x, y):
        ws, hs = ws[:, None], hs[:, None]
        return np.hstack((x - 0.5 * (ws - 1), y - 0.5 * (hs - 1), x + 0.5 * (ws - 1), y + 0.5 * (hs - 1)))

    base = np.array([1, 1, base_size, base_size]) - 1
    w, h, x, y = whctrs(base)
    ws = np.round(np.sqrt(w * h / np.array(ratios)))
    ratio_anchors = mk(ws, np.round(ws * np.array(ratios)), x, y)
    out = []
    for anchor in ratio_anchors:
        w, h, x, y = whctrs(anchor)
        out.append(mk(w * np.array(scales), h * np.array(scales), x, y))
    return np.vstack(out)


def proposal_reference(scores, deltas, im_info, feat_stride, scales, pre=6000, post=300, thresh=0.7, min_size=16,
                       ratios=(0.5, 1, 2)):
    anchors0 = generate_anchors_reference(scales, ratios)
    count = anchors0.shape[0]
    scores = scores[:, count:]
    height, width = scores.shape[-2:]
    shift_x, shift_y = np.meshgrid(np.arange(width) * feat_stride, np.arange(height) * feat_stride)
    shifts = np.vstack((shift_x.ravel(), shift_y.ravel(), shift_x.ravel(), shift_y.ravel())).transpose()
    anchors = (anchors0.reshape((1, count, 4)) + shifts.reshape((1, -1, 4)).transpose((1, 0, 2))).reshape(-1, 4)
    deltas = deltas.transpose((0, 2, 3, 1)).reshape((-1, 4))
    scores = scores.transpose((0, 2, 3, 1)).reshape((-1, 1))
    boxes = anchors.astype(deltas.dtype)
    widths, heights = boxes[:, 2] - boxes[:, 0] + 1.0, boxes[:, 3] - boxes[:, 1] + 1.0
    ctr_x, ctr_y = boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights
    px, py = deltas[:, 0] * widths + ctr_x, deltas[:, 1] * heights + ctr_y
    pw, ph = np.exp(deltas[:, 2]) * widths, np.exp(deltas[:, 3]) * heights
    proposals = np.stack([px - 0.5 * pw, py - 0.5 * ph, px + 0.5 * pw, py + 0.5 * ph], 1)
    info = im_info[0]
    proposals[:, 0::2] = np.maximum(np.minimum(proposals[:, 0::2], info[1] - 1), 0)
    proposals[:, 1::2] = np.maximum(np.minimum(proposals[:, 1::2], info[0] - 1), 0)
    smallest = min_size * info[2]
    keep = np.where(((proposals[:, 2] - proposals[:, 0] + 1) >= smallest)
                    & ((proposals[:, 3] - proposals[:, 1] + 1) >= smallest))[0]
    proposals, scores = proposals[keep], scores[keep]
    order = scores.ravel().argsort(kind="stable")[::-1][:pre]
    proposals, scores = proposals[order], scores[order]
    kept = []
    for i in range(len(proposals)):  # the GPU kernel's greedy sweep: IoU > thresh suppresses
        a = proposals[i]
        if any(_iou_plus_one(proposals[k], a) > F(thresh) for k in kept):
            continue
        kept.append(i)
    kept = kept[:post]
    return np.hstack((np.zeros((len(kept), 1), F), proposals[kept].astype(F))), scores[kept]


def _iou_plus_one(a, b):
    width = max(F(min(a[2], b[2]) - max(a[0], b[0])) + F(1), F(0))
    height = max(F(min(a[3], b[3]) - max(a[1], b[1])) + F(1), F(0))
    inter = F(width * height)
    size_a = F(F(a[2] - a[0] + 1) * F(a[3] - a[1] + 1))
    size_b = F(F(b[2] - b[0] + 1) * F(b[3] - b[1] + 1))
    return F(inter / F(F(size_a + size_b) - inter))


@pytest.mark.parametrize("param_str, scales, ratios", [
    ("'feat_stride': 16", (8, 16, 32), (0.5, 1, 2)),
    ("{'feat_stride': 8, 'scales': [4, 8]}", (4, 8), (0.5, 1, 2)),
    # pva-faster-rcnn's proposal_layer.py also reads 'ratios'
    ("{'feat_stride': 16, 'ratios': [0.333, 0.5, 0.667, 1, 1.5, 2, 3], 'scales': [2, 3, 5]}", (2, 3, 5),
     (0.333, 0.5, 0.667, 1, 1.5, 2, 3)),
    # A fractional stride and scale: numpy multiplies by the floats (shifts of 12.7 px), nothing is truncated.
    ("{'feat_stride': 12.7, 'scales': [4, 8.5, 16]}", (4, 8.5, 16), (0.5, 1, 2)),
])
def test_proposal_layer_matches_py_faster_rcnn(param_str, scales, ratios):
    rng = np.random.default_rng(2)
    anchors = len(ratios) * len(scales)
    height, width = 9, 12
    logits = rng.normal(0, 2, (1, anchors, height, width))
    foreground = 1 / (1 + np.exp(-logits))
    scores = np.concatenate([1 - foreground, foreground], axis=1).astype(F)
    deltas = rng.normal(0, 0.3, (1, 4 * anchors, height, width)).astype(F)
    im_info = np.array([[height * 16, width * 16, 1.2]], F)
    layer = caffe_pb2.LayerParameter(name="proposal", type="Python", top=["rois", "scores"])
    layer.python_param.module, layer.python_param.layer = "rpn.proposal_layer", "ProposalLayer"
    layer.python_param.param_str = param_str
    converted, (rois, kept_scores) = _run_without_blobs(layer, [scores.shape, deltas.shape, im_info.shape], scores, deltas, im_info)
    expected_rois, expected_scores = proposal_reference(scores, deltas, im_info, parse_param_str(layer, param_str)
                                                        ["feat_stride"], scales, ratios=np.array(ratios))
    assert converted.top_shapes == [(1, 5), (1, 1)]
    assert rois.shape == expected_rois.shape and rois.shape[0] > 10
    np.testing.assert_allclose(rois, expected_rois, rtol=1e-6, atol=1e-4)  # exp: numpy's and torch's differ by an ulp
    np.testing.assert_array_equal(kept_scores, expected_scores)


def test_generate_anchors_gives_py_faster_rcnns_defaults():
    from caffe2torch.rcnn import generate_anchors

    np.testing.assert_array_equal(generate_anchors((8, 16, 32)).numpy(), [
        [-84, -40, 99, 55], [-176, -88, 191, 103], [-360, -184, 375, 199], [-56, -56, 71, 71],
        [-120, -120, 135, 135], [-248, -248, 263, 263], [-36, -80, 51, 95], [-80, -168, 95, 183],
        [-168, -344, 183, 359]])


@pytest.mark.parametrize("text, expected", [
    ("'feat_stride': 16", {"feat_stride": 16}),
    ("feat_stride: 16\nscales: !!python/tuple [4, 8, 16, 32]", {"feat_stride": 16, "scales": (4, 8, 16, 32)}),
    ("{'feat_stride': 16, 'scales': [8]}", {"feat_stride": 16, "scales": [8]}),
])
def test_param_str_is_read_without_yaml(text, expected):
    value = parse_param_str(layer_from_text('name: "p"'), text)
    assert {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in value.items()} == \
        {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in expected.items()}


def test_proposal_layer_errors_name_thelayer_from_text():
    layer = caffe_pb2.LayerParameter(name="proposal", type="Python", top=["rois"])
    layer.python_param.module, layer.python_param.layer = "rpn.proposal_layer", "ProposalLayer"
    layer.python_param.param_str = "'scales': [8]"
    with pytest.raises(CaffeError, match=r"'proposal' \(Python\): param_str must give 'feat_stride'"):
        convert_layer(layer, [(1, 18, 4, 4), (1, 36, 4, 4), (1, 3)], [])
    layer.python_param.param_str = "'feat_stride': 16"
    with pytest.raises(CaffeError, match="bottom 0 \\(the objectness scores\\) has shape"):
        convert_layer(layer, [(1, 16, 4, 4), (1, 36, 4, 4), (1, 3)], [])


FASTER_RCNN_HEAD = """name: "mini_faster_rcnn"
input: "data" input_shape { dim: 1 dim: 3 dim: 64 dim: 80 }
input: "im_info" input_shape { dim: 1 dim: 3 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 8 kernel_size: 4 stride: 4 } }
layer { name: "rpn_cls_score" type: "Convolution" bottom: "conv" top: "rpn_cls_score" convolution_param { num_output: 18 kernel_size: 1 } }
layer { name: "rpn_bbox_pred" type: "Convolution" bottom: "conv" top: "rpn_bbox_pred" convolution_param { num_output: 36 kernel_size: 1 } }
layer { name: "rpn_cls_score_reshape" type: "Reshape" bottom: "rpn_cls_score" top: "rpn_cls_score_reshape" reshape_param { shape { dim: 0 dim: 2 dim: -1 dim: 0 } } }
layer { name: "rpn_cls_prob" type: "Softmax" bottom: "rpn_cls_score_reshape" top: "rpn_cls_prob" }
layer { name: "rpn_cls_prob_reshape" type: "Reshape" bottom: "rpn_cls_prob" top: "rpn_cls_prob_reshape" reshape_param { shape { dim: 0 dim: 18 dim: -1 dim: 0 } } }
layer { name: "proposal" type: "Python" bottom: "rpn_cls_prob_reshape" bottom: "rpn_bbox_pred" bottom: "im_info" top: "rois"
  python_param { module: "rpn.proposal_layer" layer: "ProposalLayer" param_str: "'feat_stride': 4" } }
layer { name: "roi_pool5" type: "ROIPooling" bottom: "conv" bottom: "rois" top: "pool5" roi_pooling_param { pooled_w: 3 pooled_h: 3 spatial_scale: 0.25 } }
layer { name: "cls_score" type: "InnerProduct" bottom: "pool5" top: "cls_score" inner_product_param { num_output: 5 } }
layer { name: "cls_prob" type: "Softmax" bottom: "cls_score" top: "cls_prob" }
"""


def test_faster_rcnn_head_runs_and_says_where_it_cannot_go(tmp_path):
    from caffe2torch.export import export
    from caffe2torch.fast import cuda_graph
    from caffe2torch.folder import save_net

    net = random_net(tmp_path, FASTER_RCNN_HEAD, std=0.2)
    data, info = torch.randn(1, 3, 64, 80), torch.tensor([[64.0, 80.0, 0.25]])
    probabilities = net(data, info)
    assert probabilities.shape[1] == 5 and probabilities.shape[0] > 1  # one row per proposal, not Caffe's 1
    torch.testing.assert_close(probabilities.sum(1), torch.ones(probabilities.shape[0]))
    with pytest.raises(CaffeError, match=r"layer 'proposal' \(Python\): its output size depends on the data, so it "
                                         r"has no onnx export"):
        export(net, "onnx", tmp_path / "net.onnx")
    assert not (tmp_path / "net.onnx").exists()
    with pytest.raises(CaffeError, match="cannot be captured in a CUDA graph"):
        cuda_graph(net, [data, info])
    save_net(net, tmp_path / "folder")
    assert torch.equal(load_standalone(tmp_path / "folder")(data, info), probabilities)


def test_faster_rcnn_converts_once_and_runs_images_of_different_sizes(tmp_path):
    """py-faster-rcnn reshapes for every test image (shorter side 600, longer up to 1000): one converted net takes
    image after image of its own size with their im_info; each one's proposals and pooled regions equal loops of
    the fork's forward at that size."""
    from caffe2torch.model import blobs

    net = random_net(tmp_path, FASTER_RCNN_HEAD, std=0.2)  # converted at 64 x 80
    for height, width, scale in ((96, 128, 1.5), (72, 56, 0.8), (64, 80, 1.0)):
        data = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(height))
        info = torch.tensor([[float(height), float(width), scale]])
        with torch.no_grad():
            values = blobs(net, data, info)
        scores, deltas = values["rpn_cls_prob_reshape"].numpy(), values["rpn_bbox_pred"].numpy()
        assert scores.shape[2:] == (height // 4, width // 4)
        expected_rois, _ = proposal_reference(scores, deltas, info.numpy(), 4, (8, 16, 32))
        rois = values["rois"].numpy()
        assert rois.shape == expected_rois.shape and len(rois) > 5
        np.testing.assert_allclose(rois, expected_rois, rtol=1e-6, atol=1e-4)
        pooled = roi_pooling_reference(values["conv"].numpy(), rois, 3, 3, 0.25)
        np.testing.assert_array_equal(values["pool5"].numpy(), pooled)
        assert values["cls_prob"].shape == (len(rois), 5)
