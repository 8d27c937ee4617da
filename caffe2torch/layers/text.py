"""Converters for text recognition and detection forks: CTCGreedyDecoder (BVLC's ctc branch, senlinuc/caffe_ocr)
and CTPN's Python text proposal layer."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from caffe2torch.layers.registry import (Converted, Shape, converter, expect_blobs, expect_bottoms, layer_error,
                                         parse_param_str)
from caffe2torch.text import CTPN_ANCHOR_HEIGHTS, CTCGreedyDecoder, TextProposal


@converter("CTCGreedyDecoder")
def convert_ctc_greedy_decoder(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """Best-path decoding of probabilities [T, N, C] into labels [N, T, 1, 1] (-1 after the last label).

    Two forks publish the type. BVLC's ctc branch (ctc_decoder_layer.cpp) takes the sequence indicators [T, N] as
    bottom 1 and may add a scores top; its blank_index defaults to -1 (the last class). senlinuc/caffe_ocr's takes
    the probabilities alone (its two-bottom form scores accuracy against labels) and its schema's blank_index
    defaults to 0: an unset blank_index follows the fork the bottoms identify.
    """
    expect_bottoms(layer, inputs, 1, 2)
    expect_blobs(layer, blobs, 0)
    probs = tuple(inputs[0])
    if len(probs) < 3 or math.prod(probs[3:]) != 1:
        raise layer_error(layer, f"bottom 0 must hold probabilities [T, N, C], has shape {probs}")
    steps, batch, classes = probs[:3]
    param = layer.ctc_decoder_param
    indicators = len(inputs) == 2
    if indicators and tuple(inputs[1])[:2] != (steps, batch) or indicators and math.prod(inputs[1]) != steps * batch:
        raise layer_error(layer, f"bottom 1 has shape {tuple(inputs[1])}: BVLC's ctc branch reads sequence indicators "
                          f"[{steps}, {batch}] (T, N) there; senlinuc/caffe_ocr's two-bottom form scores accuracy "
                          f"against labels, a training layer")
    tops = len(layer.top)
    if tops not in (1, 2) or tops == 2 and not indicators:
        raise layer_error(layer, f"has {tops} tops: it makes the label sequences, and with the sequence indicators "
                          f"as bottom 1 optionally the scores")
    blank = param.blank_index if param.HasField("blank_index") else (-1 if indicators else 0)
    module = CTCGreedyDecoder(blank, param.ctc_merge_repeated, indicators, tops == 2)
    return Converted(module, [(batch, steps, 1, 1), (batch, 1, 1, 1)][:tops])


@converter("Python:layers.text_proposal_layer.ProposalLayer")
def convert_ctpn_proposal(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """CTPN's text proposals (tianzhi0549/CTPN src/layers/text_proposal_layer.py): ten 16-pixel-wide anchors per
    map position, vertical centre and height from the deltas, clipped; param_str gives feat_stride."""
    expect_bottoms(layer, inputs, 3)
    expect_blobs(layer, blobs, 0)
    params = parse_param_str(layer, layer.python_param.param_str)
    stride = params.get("feat_stride")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride <= 0:
        raise layer_error(layer, f"param_str's 'feat_stride' must be a positive integer (the anchors are int32), "
                          f"got {stride!r}")
    scores, deltas, info = (tuple(shape) for shape in inputs)
    count = len(CTPN_ANCHOR_HEIGHTS)
    if len(scores) != 4 or scores[0] != 1 or scores[1] != 2 * count:
        raise layer_error(layer, f"bottom 0 (the scores) has shape {scores}: expected [1, {2 * count}, H, W] "
                          f"(the layer takes single-image batches)")
    if deltas != (1, 2 * count) + scores[2:]:
        raise layer_error(layer, f"bottom 1 (the deltas) has shape {deltas}: expected {(1, 2 * count) + scores[2:]}")
    if len(info) < 2 or info[1] < 2:
        raise layer_error(layer, f"bottom 2 (im_info) has shape {info}: expected [1, 2 or 3] (height, width)")
    if len(layer.top) != 2:
        raise layer_error(layer, f"has {len(layer.top)} tops; it makes 2 (rois and scores)")
    rows = scores[2] * scores[3] * count
    return Converted(TextProposal(stride), [(rows, 4), (rows, 1)])
