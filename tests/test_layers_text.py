"""Text forks: the CTC greedy decoder (BVLC's ctc branch, senlinuc/caffe_ocr) and CTPN's text proposal layer,
against loops of ctc_decoder_layer.cpp and of text_proposal_layer.py / anchor.py / other.py (Python 2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from caffe2torch.errors import CaffeError
from caffe2torch.layers import convert_layer
from tests.conftest import layer_from_text, load_standalone, random_net, run_layer

F = np.float32


def greedy_reference(probs: np.ndarray, indicators: np.ndarray | None, blank: int, merge: bool):
    """CTCGreedyDecoderLayer::Decode and CTCDecoderLayer::Forward_cpu's copy into the -1 filled [N, T] top."""
    steps, num, classes = probs.shape
    blank = classes - 1 if blank < 0 else blank
    top = np.full((num, steps), -1, F)
    scores = np.zeros(num, F)
    for n in range(num):
        prev, labels, t = -1, [], 0
        while True:
            best, best_value = 0, probs[t, n, 0]
            for c in range(1, classes):
                if probs[t, n, c] > best_value:
                    best, best_value = c, probs[t, n, c]
            scores[n] = F(scores[n] + -best_value)
            if best != blank and not (merge and best == prev):
                labels.append(best)
            prev = best
            if indicators is None:
                if t + 1 == steps:
                    break
            elif t + 1 == steps or indicators[t + 1, n] == 0:
                break
            t += 1
        top[n, :len(labels)] = labels
    return top.reshape(num, steps, 1, 1), scores.reshape(num, 1, 1, 1)


def _probs():
    rng = np.random.default_rng(0)
    probs = rng.random((8, 3, 5)).astype(F)
    probs[2, 0] = probs[1, 0]  # a repeat
    probs[4, 1, :] = [0.5, 0.5, 0.1, 0.5, 0.2]  # ties: the first maximum
    probs[5, 2, 0] = np.nan  # a NaN first value keeps class 0
    probs[6, 2, 3] = np.nan  # a later NaN never wins
    return probs


@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("blank", [None, 0, 3])
def test_greedy_decoder_of_senlinuc_caffe_ocr(merge, blank):
    probs = _probs()
    blank_text = "" if blank is None else f"blank_index: {blank} "
    layer = layer_from_text(f'name: "result" type: "CTCGreedyDecoder" top: "result" ctc_decoder_param {{ '
                            f'{blank_text}ctc_merge_repeated: {str(merge).lower()} }}')
    converted, out = run_layer(layer, [probs.shape], [], probs)
    expected, _ = greedy_reference(probs, None, 0 if blank is None else blank, merge)  # the fork's default blank: 0
    assert converted.top_shapes == [(3, 8, 1, 1)]
    np.testing.assert_array_equal(out, expected)
    assert (out >= 0).sum() > 3


def test_greedy_decoder_of_the_ctc_branch_with_indicators_and_scores():
    probs = _probs()
    probs[5, 2, 0] = 0.3  # the scores sum what was chosen: no NaN here
    indicators = np.ones((8, 3), F)
    indicators[0] = 0
    indicators[5, 0] = 0  # stream 0 ends after t = 4
    indicators[2, 2] = 0  # stream 2 after t = 1
    layer = layer_from_text('name: "d" type: "CTCGreedyDecoder" top: "seq" top: "score"')
    converted, (out, scores) = run_layer(layer, [probs.shape, indicators.shape], [], probs, indicators)
    expected, expected_scores = greedy_reference(probs, indicators, -1, True)  # the branch's default: the last class
    assert converted.top_shapes == [(3, 8, 1, 1), (3, 1, 1, 1)]
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(scores, expected_scores)


def test_greedy_decoder_refuses_labels_as_bottom_1():
    layer = layer_from_text('name: "acc" type: "CTCGreedyDecoder" top: "acc"')
    with pytest.raises(CaffeError, match=r"'acc' \(CTCGreedyDecoder\): bottom 1 has shape \(2, 10\).*accuracy"):
        convert_layer(layer, [(8, 2, 5), (2, 10)], [])


def ctpn_reference(scores: np.ndarray, deltas: np.ndarray, im_info: np.ndarray, feat_stride: int):
    """text_proposal_layer.py's forward with anchor.py and other.py, as Python 2 (integer h / 2) runs them."""
    basic = np.zeros((10, 4), np.int32)
    for index, h in enumerate([11, 16, 23, 33, 48, 68, 97, 139, 198, 283]):
        x_ctr = y_ctr = (0 + 15) * 0.5
        basic[index] = [x_ctr - 16 // 2, y_ctr - h // 2, x_ctr + 16 // 2, y_ctr + h // 2]  # int32 truncates
    height, width = scores.shape[-2:]
    anchors = np.zeros((10 * height * width, 4), np.int32)
    index = 0
    for y in range(height):
        for x in range(width):
            anchors[index:index + 10] = basic + np.array([x, y, x, y]) * feat_stride
            index += 10
    fg = scores[:, 10:].transpose((0, 2, 3, 1)).reshape(-1, 1)
    delta = deltas.transpose((0, 2, 3, 1)).reshape((-1, 2))
    y_ctr = (anchors[:, 1] + anchors[:, 3]) / 2.
    anchor_h = anchors[:, 3] - anchors[:, 1] + 1.
    coords = np.zeros_like(delta, np.float32)
    coords[:, 1] = np.exp(delta[:, 1]) * anchor_h
    coords[:, 0] = delta[:, 0] * anchor_h + y_ctr - coords[:, 1] / 2.
    boxes = np.hstack((anchors[:, [0]], coords[:, [0]], anchors[:, [2]], coords[:, [0]] + coords[:, [1]])).astype(F)
    boxes[:, 0::2] = np.maximum(np.minimum(boxes[:, 0::2], im_info[0, 1] - 1), 0)
    boxes[:, 1::2] = np.maximum(np.minimum(boxes[:, 1::2], im_info[0, 0] - 1), 0)
    return boxes, fg


def test_ctpn_text_proposals_match_the_python_layer():
    rng = np.random.default_rng(2)
    scores = rng.random((1, 20, 4, 6)).astype(F)
    deltas = rng.normal(0, 0.5, (1, 20, 4, 6)).astype(F)
    im_info = np.array([[60.0, 90.0, 1.0]], F)
    layer = layer_from_text('name: "proposal" type: "Python" top: "rois" top: "scores" python_param { '
                            'module: "layers.text_proposal_layer" layer: "ProposalLayer" param_str: "\'feat_stride\': 16" }')
    converted, (boxes, fg) = run_layer(layer, [scores.shape, deltas.shape, im_info.shape], [], scores, deltas, im_info)
    want_boxes, want_fg = ctpn_reference(scores, deltas, im_info, 16)
    assert converted.top_shapes == [(240, 4), (240, 1)]
    np.testing.assert_array_equal(fg, want_fg)
    np.testing.assert_allclose(boxes, want_boxes, rtol=1e-6, atol=1e-5)  # numpy's and torch's float32 exp
    assert boxes[:10, 1].tolist() != boxes[10:20, 1].tolist()


CTPN = '''
name: "ctpn_head"
input: "data" input_shape { dim: 1 dim: 8 dim: 3 dim: 5 }
input: "im_info" input_shape { dim: 1 dim: 3 }
layer { name: "im2col" type: "Im2col" bottom: "data" top: "im2col" convolution_param { pad: 1 kernel_size: 3 } }
layer { name: "im2col_transpose" type: "Transpose" bottom: "im2col" top: "im2col_transpose"
  transpose_param { dim: 3 dim: 2 dim: 0 dim: 1 } }
layer { name: "lstm_input" type: "Reshape" bottom: "im2col_transpose" top: "lstm_input"
  reshape_param { shape { dim: -1 } axis: 1 num_axes: 2 } }
layer { name: "lstm" type: "Lstm" bottom: "lstm_input" top: "lstm" lstm_param { num_output: 6 } }
layer { name: "lstm-reverse1" type: "Reverse" bottom: "lstm_input" top: "rlstm_input" reverse_param { axis: 0 } }
layer { name: "rlstm" type: "Lstm" bottom: "rlstm_input" top: "rlstm-output" lstm_param { num_output: 6 } }
layer { name: "lstm-reverse2" type: "Reverse" bottom: "rlstm-output" top: "rlstm" reverse_param { axis: 0 } }
layer { name: "merge_lstm_rlstm" type: "Concat" bottom: "lstm" bottom: "rlstm" top: "merge" concat_param { axis: 2 } }
layer { name: "lstm_output_reshape" type: "Reshape" bottom: "merge" top: "lstm_output_reshape"
  reshape_param { shape { dim: -1 dim: 1 } axis: 1 num_axes: 1 } }
layer { name: "lstm_output" type: "Transpose" bottom: "lstm_output_reshape" top: "lstm_output"
  transpose_param { dim: 2 dim: 3 dim: 1 dim: 0 } }
layer { name: "rpn_cls_score" type: "Convolution" bottom: "lstm_output" top: "rpn_cls_score"
  convolution_param { num_output: 20 kernel_size: 1 } }
layer { name: "rpn_cls_score_reshape" type: "Reshape" bottom: "rpn_cls_score" top: "rpn_cls_score_reshape"
  reshape_param { shape { dim: 0 dim: 2 dim: -1 dim: 0 } } }
layer { name: "rpn_bbox_pred" type: "Convolution" bottom: "lstm_output" top: "rpn_bbox_pred"
  convolution_param { num_output: 20 kernel_size: 1 } }
layer { name: "rpn_cls_prob" type: "Softmax" bottom: "rpn_cls_score_reshape" top: "rpn_cls_prob" }
layer { name: "rpn_cls_prob_reshape" type: "Reshape" bottom: "rpn_cls_prob" top: "rpn_cls_prob_reshape"
  reshape_param { shape { dim: 0 dim: 20 dim: -1 dim: 0 } } }
layer { name: "proposal" type: "Python" bottom: "rpn_cls_prob_reshape" bottom: "rpn_bbox_pred" bottom: "im_info"
  top: "rois" top: "scores" python_param { module: "layers.text_proposal_layer" layer: "ProposalLayer"
  param_str: "'feat_stride': 16" } }
'''


def test_ctpn_head_runs_at_other_sizes_standalone_and_exported(tmp_path):
    from caffe2torch.export import export
    from caffe2torch.folder import save_net

    net = random_net(tmp_path, CTPN, 0.3)
    data, im_info = torch.randn(1, 8, 3, 5), torch.tensor([[48.0, 80.0, 1.0]])
    rois, scores = net(data, im_info)
    assert rois.shape == (150, 4) and scores.shape == (150, 1)
    assert net(torch.randn(1, 8, 4, 7), im_info)[0].shape == (280, 4)  # T = width and N = rows follow the input
    save_net(net, tmp_path / "folder")
    with torch.no_grad():
        again = load_standalone(tmp_path / "folder")(data, im_info)
    assert all(torch.equal(a, b) for a, b in zip(again, (rois, scores)))
    for fmt in ("onnx", "pt2"):  # torch.export cannot prove the proposals' guards for any batch: the example's
        check = export(net, fmt, tmp_path / f"net.{fmt}")
        assert check.max_rel <= 1e-5 and check.dynamic == "" and check.sizes == [[(1, 8, 3, 5), (1, 3)]], fmt
        assert check.note.startswith("torch.export could not prove the net's guards for any batch (Constraints "
                                     "violated"), check.note


def test_ctpn_proposal_checks_its_parameters():
    layer = layer_from_text('name: "p" type: "Python" python_param { module: "layers.text_proposal_layer" '
                            'layer: "ProposalLayer" param_str: "\'feat_stride\': 16.5" }')
    with pytest.raises(CaffeError, match="feat_stride' must be a positive integer"):
        convert_layer(layer, [(1, 20, 2, 2), (1, 20, 2, 2), (1, 3)], [])


def dense_block_reference(x: np.ndarray, blobs: list, count: int, growth: int, bottleneck: bool) -> np.ndarray:
    """DenseBlockLayer::Forward_cpu at TEST: BN_inf_Fwd, ReLU_Fwd, (1 x 1 convolution_Fwd, BN, ReLU,) 3 x 3
    convolution_Fwd (localX = h + 1 - fx: a flipped kernel), mergeChannelData."""
    factor = blobs[-1].reshape(-1)[0]
    scale = F(0) if factor == 0 else F(F(1) / factor)

    def norm(v, mean, var, gamma, beta):
        out = np.empty_like(v)
        for c in range(v.shape[1]):
            denom = F(1.0 / math.sqrt(float(F(var.reshape(-1)[c] * scale)) + 1e-5))
            centred = (v[:, c] - F(mean.reshape(-1)[c] * scale)).astype(F)
            out[:, c] = (gamma.reshape(-1)[c] * (denom * centred).astype(F)).astype(F) + beta.reshape(-1)[c]
        return np.where(out >= 0, out, F(0)).astype(F)

    def convolve(v, w):
        kernel = w.shape[2]
        padded = np.pad(v.astype(np.float64), ((0, 0), (0, 0), (kernel // 2,) * 2, (kernel // 2,) * 2))
        out = np.zeros((v.shape[0], w.shape[0]) + v.shape[2:])
        for fx in range(kernel):
            for fy in range(kernel):
                window = padded[:, :, 2 * (kernel // 2) - fx:, 2 * (kernel // 2) - fy:][:, :, :v.shape[2], :v.shape[3]]
                out += np.einsum("nchw,oc->nohw", window, w[:, :, fx, fy].astype(np.float64))
        return out.astype(F)

    for t in range(count):
        y = norm(x, blobs[3 * count + t], blobs[4 * count + t], blobs[count + t], blobs[2 * count + t])
        if bottleneck:
            y = convolve(y, blobs[5 * count + t])
            y = norm(y, blobs[8 * count + t], blobs[9 * count + t], blobs[6 * count + t], blobs[7 * count + t])
        x = np.concatenate([x, convolve(y, blobs[t])], axis=1)
    return x


@pytest.mark.parametrize("bottleneck", [False, True])
def test_dense_block_matches_the_fork_cpu_loops(bottleneck):
    from caffe2torch.layers.text import dense_block_blob_shapes

    layer = layer_from_text(f'name: "DenseBlock1" type: "DenseBlock" denseblock_param {{ numTransition: 3 '
                            f'growthRate: 2 use_BC: {str(bottleneck).lower()} }}')
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, (2, 3, 5, 6)).astype(F)
    blobs = [np.abs(rng.normal(0.5, 0.3, shape)).astype(F) for shape in dense_block_blob_shapes(layer, [x.shape])]
    blobs[-1] = np.array([0.75], F)  # the moving-average factor the stored statistics are divided by
    converted, out = run_layer(layer, [x.shape], blobs, x)
    assert converted.top_shapes == [(2, 3 + 3 * 2, 5, 6)]
    np.testing.assert_allclose(out, dense_block_reference(x, blobs, 3, 2, bottleneck), rtol=1e-5, atol=1e-5)
    # A kernel that is not symmetric: the fork convolves (flipped), where Caffe's Convolution correlates.
    assert not np.allclose(blobs[0], blobs[0][:, :, ::-1, ::-1])
