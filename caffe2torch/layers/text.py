"""Converters for text recognition and detection forks: CTCGreedyDecoder (BVLC's ctc branch, senlinuc/caffe_ocr),
senlinuc/caffe_ocr's DenseBlock and CTPN's Python text proposal layer."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from caffe2torch.layers.registry import (Converted, Shape, converter, expect_blobs, expect_bottoms, image_shape,
                                         layer_error, on_meta, parse_param_str)
import torch

from caffe2torch.layers.convolution import fit_blob
from caffe2torch.text import CTPN_ANCHOR_HEIGHTS, CTCGreedyDecoder, DenseBlock, TextProposal


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


def dense_block_blob_shapes(layer, inputs: Sequence[Shape]) -> list[Shape]:
    """DenseBlockLayer::LayerSetUp's blobs for a bottom of `inputs[0]` (its channels are the block's initChannel in
    senlinuc/caffe_ocr): 3 x 3 filters, BN scales, biases, means, variances per transition ([10 T + 1] with the
    bottleneck's 1 x 1 filters and BN), then the BN factor."""
    param = layer.denseblock_param
    count, growth = int(param.numTransition), int(param.growthRate)
    channels = int(inputs[0][1]) if inputs and len(inputs[0]) > 1 else 0
    widths = [channels + t * growth for t in range(count)]
    shapes = [(growth, 4 * growth if param.use_BC else c, 3, 3) for c in widths]
    shapes += [(1, c, 1, 1) for _ in range(4) for c in widths]
    if param.use_BC:
        shapes += [(4 * growth, c, 1, 1) for c in widths] + [(1, 4 * growth, 1, 1)] * (4 * count)
    return shapes + [(1,)]


@converter("DenseBlock")
def convert_dense_block(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """senlinuc/caffe_ocr's DenseBlock: numTransition BN-ReLU-(1x1 conv-BN-ReLU)-3x3 conv steps, concatenated."""
    expect_bottoms(layer, inputs, 1)
    shape = image_shape(layer, inputs)
    param = layer.denseblock_param
    count, growth = int(param.numTransition), int(param.growthRate)
    if count <= 0 or growth <= 0:
        raise layer_error(layer, f"numTransition {count} and growthRate {growth} must be positive")
    if (param.filter_H, param.filter_W, param.pad_h, param.pad_w, param.conv_verticalStride,
            param.conv_horizentalStride) != (3, 3, 1, 1, 1, 1):
        raise layer_error(layer, "the fork hard-codes 3 x 3 convolutions with padding 1 and stride 1; this layer "
                          "asks for other ones")
    shapes = dense_block_blob_shapes(layer, inputs)
    expect_blobs(layer, blobs, len(shapes))
    tensors = [fit_blob(layer, f"blob {i}", blob, wanted) for i, (blob, wanted) in enumerate(zip(blobs, shapes))]
    module = on_meta(DenseBlock, shape[1], count, growth, param.use_BC)
    # Parameters and buffers are real tensors here (ParameterLists are built on the meta device too).
    values = {f"filters.{t}": tensors[t] for t in range(count)}
    for t in range(count):
        values[f"scales.{t}"] = tensors[count + t].reshape(-1)
        values[f"biases.{t}"] = tensors[2 * count + t].reshape(-1)
        values[f"mean_{t}"] = tensors[3 * count + t].reshape(-1)
        values[f"var_{t}"] = tensors[4 * count + t].reshape(-1)
        if param.use_BC:
            values[f"bottleneck_filters.{t}"] = tensors[5 * count + t]
            values[f"bottleneck_scales.{t}"] = tensors[6 * count + t].reshape(-1)
            values[f"bottleneck_biases.{t}"] = tensors[7 * count + t].reshape(-1)
            values[f"bottleneck_mean_{t}"] = tensors[8 * count + t].reshape(-1)
            values[f"bottleneck_var_{t}"] = tensors[9 * count + t].reshape(-1)
    values["factor"] = tensors[-1].reshape(1)
    module = module.to_empty(device="cpu")
    with torch.no_grad():
        for name, value in values.items():
            target = module.get_parameter(name) if "." in name else module.get_buffer(name)
            target.copy_(value)
    return Converted(module, [(shape[0], shape[1] + count * growth) + shape[2:]])
