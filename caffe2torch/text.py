"""Torch modules for text recognition and detection forks: the CTC greedy decoder (BVLC's ctc branch, ChWick, also
in MhLiao/TextBoxes_plusplus; senlinuc/caffe_ocr's one-bottom variant), senlinuc/caffe_ocr's DenseBlock and CTPN's
text proposal layer (tianzhi0549/CTPN, src/layers/text_proposal_layer.py with src/anchor.py and src/other.py).

The same contract as caffe2torch.modules (torch, math and caffe2torch.modules only, so a standalone `model.py`
embeds them; `extra_repr` is the constructor's keyword arguments). Both have outputs of a fixed shape, computed
with exportable tensor ops (no Python loop over the data); DenseBlock is convolutions and BN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from caffe2torch.modules import _kwargs, dims


@torch.fx.wrap
def ctc_greedy_decode(probs: torch.Tensor, indicators: torch.Tensor | None, blank: int, merge_repeated: bool,
                      with_scores: bool):
    """CTCGreedyDecoderLayer::Decode of probs [T, N, C] (see CTCGreedyDecoder)."""
    steps, batch, classes = dims(probs, 0, 1, 2)
    values = probs.reshape(steps, batch, classes)
    blank = classes - 1 if blank < 0 else blank  # CTCDecoderLayer::Reshape
    # The fork's scan keeps the first strict maximum from probs[0] on: NaN never wins, and a NaN probs[0] keeps
    # class 0 (nothing compares greater than it).
    best = torch.where(torch.isnan(values), torch.full_like(values, -math.inf), values).argmax(dim=2)
    best = torch.where(torch.isnan(values[:, :, 0]), torch.zeros_like(best), best)
    best_value = values.gather(2, best.unsqueeze(2)).squeeze(2)
    if indicators is None:  # senlinuc/caffe_ocr: every time step
        valid = torch.ones_like(best, dtype=torch.bool)
    else:  # a sequence ends before the first t >= 1 whose indicator is 0
        going = indicators.reshape(steps, batch) != 0
        going = torch.cat([torch.ones_like(going[:1]), going[1:]])
        valid = torch.cummin(going.to(torch.uint8), dim=0).values.bool()
    previous = torch.cat([torch.full_like(best[:1], -1), best[:-1]])
    keep = valid & (best != blank)
    if merge_repeated:
        keep = keep & (best != previous)
    position = torch.cumsum(keep.long(), dim=0) - 1
    slot = torch.where(keep, position, torch.full_like(position, steps))  # dropped labels go to a spare column
    out = torch.full((batch, steps + 1), -1.0, dtype=probs.dtype, device=probs.device)
    out = out.scatter(1, slot.t(), best.t().to(probs.dtype))[:, :steps].reshape(batch, steps, 1, 1)
    if not with_scores:
        return out
    score = torch.zeros(batch, dtype=probs.dtype, device=probs.device)
    for t in range(steps):  # score_data[n] += -max_prob, in time order
        score = torch.where(valid[t], score - best_value[t], score)
    return out, score.reshape(batch, 1, 1, 1)


class CTCGreedyDecoder(nn.Module):
    """The CTC greedy decoder (ctc_decoder_layer.cpp): at each time step the class of the largest probability; a
    label is kept unless it is the blank or (merge_repeated) the same class as the step before; the kept labels are
    written from the left into a [N, T, 1, 1] top filled with -1. With `indicators` (BVLC's ctc branch: bottom 1,
    [T, N]) a stream's sequence ends before the first step t >= 1 whose indicator is 0; without (senlinuc/
    caffe_ocr's one-bottom layer) every step counts. `with_scores` adds the second top, [N, 1, 1, 1]: minus the
    sum of the chosen probabilities. A negative `blank` is the last class.
    """

    def __init__(self, blank: int = -1, merge_repeated: bool = True, indicators: bool = False,
                 with_scores: bool = False) -> None:
        super().__init__()
        self.blank, self.merge_repeated = int(blank), bool(merge_repeated)
        self.indicators, self.with_scores = bool(indicators), bool(with_scores)

    def forward(self, probs: torch.Tensor, indicators: torch.Tensor | None = None):
        return ctc_greedy_decode(probs, indicators if self.indicators else None, self.blank, self.merge_repeated,
                                 self.with_scores)

    def extra_repr(self) -> str:
        return _kwargs(blank=self.blank, merge_repeated=self.merge_repeated, indicators=self.indicators,
                       with_scores=self.with_scores)


# CTPN's AnchorText: ten anchors 16 pixels wide, of these heights.
CTPN_ANCHOR_HEIGHTS = (11, 16, 23, 33, 48, 68, 97, 139, 198, 283)


def ctpn_basic_anchors() -> list:
    """AnchorText.basic_anchors under Python 2, which CTPN runs on: the centre 7.5 of the 16-pixel base box minus
    and plus h / 2 and w / 2 in integer division, stored into an int32 array (truncated toward zero)."""
    anchors = []
    for height in CTPN_ANCHOR_HEIGHTS:
        x1, x2 = math.trunc(7.5 - 16 // 2), math.trunc(7.5 + 16 // 2)
        y1, y2 = math.trunc(7.5 - height // 2), math.trunc(7.5 + height // 2)
        anchors.append((x1, y1, x2, y2))
    return anchors


@torch.fx.wrap
def ctpn_proposals(scores: torch.Tensor, deltas: torch.Tensor, im_info: torch.Tensor, feat_stride: int):
    """text_proposal_layer.py's forward (see TextProposal): (proposals [H W 10, 4], scores [H W 10, 1])."""
    height, width = dims(scores, 2, 3)
    count = len(CTPN_ANCHOR_HEIGHTS)
    base = torch.tensor(ctpn_basic_anchors(), dtype=torch.int32, device=scores.device)
    ys = torch.arange(height, dtype=torch.int32, device=scores.device) * feat_stride
    xs = torch.arange(width, dtype=torch.int32, device=scores.device) * feat_stride
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack([grid_x, grid_y, grid_x, grid_y], dim=-1).reshape(-1, 1, 4)
    anchors = (base[None] + shifts).reshape(-1, 4)  # locate_anchors: rows y, then x, then the ten anchors
    foreground = scores[:, count:].float().permute(0, 2, 3, 1).reshape(-1, 1)
    delta = deltas.float().permute(0, 2, 3, 1).reshape(-1, 2)
    # apply_deltas_to_anchors: the anchor's centre and height in float64, each result stored as float32.
    centre = (anchors[:, 1] + anchors[:, 3]).double() / 2.0
    anchor_h = (anchors[:, 3] - anchors[:, 1]).double() + 1.0
    box_h = (torch.exp(delta[:, 1]).double() * anchor_h).float()
    box_y = (delta[:, 0].double() * anchor_h + centre - box_h.double() / 2.0).float()
    boxes = torch.stack([anchors[:, 0].float(), box_y, anchors[:, 2].float(), box_y + box_h], dim=1)
    info = im_info.float().reshape(-1)
    limits = torch.stack([info[1] - 1, info[0] - 1, info[1] - 1, info[0] - 1])  # clip_boxes
    boxes = torch.maximum(torch.minimum(boxes, limits), torch.zeros_like(limits))
    return boxes.to(scores.dtype), foreground.to(scores.dtype)


class TextProposal(nn.Module):
    """CTPN's Python ProposalLayer: bottoms rpn_cls_prob_reshape [1, 20, H, W], rpn_bbox_pred [1, 20, H, W] and
    im_info [1, 2 or 3] (height, width); tops rois [H W 10, 4] (x1, y1, x2, y2) and scores [H W 10, 1], one row
    per anchor, rows in (y, x, anchor) order. Each anchor keeps its x extent; its vertical centre and height come
    from the two deltas; the boxes are clipped to the image. No NMS: CTPN's detector does that in Python after the
    net. The shapes follow the map's size, so it exports.
    """

    def __init__(self, feat_stride: int = 16) -> None:
        super().__init__()
        self.feat_stride = int(feat_stride)

    def forward(self, scores: torch.Tensor, deltas: torch.Tensor, im_info: torch.Tensor):
        return ctpn_proposals(scores, deltas, im_info, self.feat_stride)

    def extra_repr(self) -> str:
        return _kwargs(feat_stride=self.feat_stride)


class DenseBlock(nn.Module):
    """senlinuc/caffe_ocr's DenseBlock (DenseBlock_layer.cpp / .cu, Tongcheng Li's memory-efficient DenseNet block):
    `transitions` times BN (stored statistics) - ReLU - [with `bottleneck`: 1 x 1 convolution to 4 growth
    channels - BN - ReLU -] 3 x 3 convolution to `growth` channels, each output appended to the block's channels.
    The fork hard-codes the 3 x 3 kernel, padding 1 and stride 1, and convolves (CUDNN_CONVOLUTION on the GPU, the
    same flipped kernel in its CPU loop), where Caffe's Convolution correlates. Its BN: mean and variance are the
    stored blobs times 1 / factor (0 when the factor is 0), y = scale (1 / sqrt(var + 1e-5) (x - mean)) + bias,
    the inverse root in double. The statistics stay fixed in training too (the fork's TRAIN phase would use the
    batch's)."""

    def __init__(self, in_channels: int, transitions: int, growth: int, bottleneck: bool = False) -> None:
        super().__init__()
        self.in_channels, self.transitions, self.growth = int(in_channels), int(transitions), int(growth)
        self.bottleneck = bool(bottleneck)
        widths = [self.in_channels + t * self.growth for t in range(self.transitions)]
        inner = 4 * self.growth if self.bottleneck else None
        self.filters = nn.ParameterList([nn.Parameter(torch.empty(self.growth, inner or c, 3, 3)) for c in widths])
        self.scales = nn.ParameterList([nn.Parameter(torch.empty(c)) for c in widths])
        self.biases = nn.ParameterList([nn.Parameter(torch.empty(c)) for c in widths])
        for t, c in enumerate(widths):
            self.register_buffer(f"mean_{t}", torch.empty(c))
            self.register_buffer(f"var_{t}", torch.empty(c))
        if self.bottleneck:
            self.bottleneck_filters = nn.ParameterList([nn.Parameter(torch.empty(inner, c, 1, 1)) for c in widths])
            self.bottleneck_scales = nn.ParameterList([nn.Parameter(torch.empty(inner)) for _ in widths])
            self.bottleneck_biases = nn.ParameterList([nn.Parameter(torch.empty(inner)) for _ in widths])
            for t in range(self.transitions):
                self.register_buffer(f"bottleneck_mean_{t}", torch.empty(inner))
                self.register_buffer(f"bottleneck_var_{t}", torch.empty(inner))
        self.register_buffer("factor", torch.empty(1))

    def _norm(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, scale: torch.Tensor,
              bias: torch.Tensor) -> torch.Tensor:
        factor = torch.where(self.factor == 0, torch.zeros_like(self.factor), 1 / self.factor)
        mean, var = mean * factor, var * factor
        denom = (1.0 / torch.sqrt(var.double() + 1e-5)).to(x.dtype)
        view = (1, -1, 1, 1)
        y = scale.reshape(view) * (denom.reshape(view) * (x - mean.to(x.dtype).reshape(view))) + bias.reshape(view)
        return torch.where(y >= 0, y, torch.zeros_like(y))  # the fork's ReLU: y >= 0 ? y : 0 (NaN gives 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for t in range(self.transitions):
            y = self._norm(x, getattr(self, f"mean_{t}"), getattr(self, f"var_{t}"), self.scales[t], self.biases[t])
            if self.bottleneck:
                y = F.conv2d(y, self.bottleneck_filters[t])
                y = self._norm(y, getattr(self, f"bottleneck_mean_{t}"), getattr(self, f"bottleneck_var_{t}"),
                               self.bottleneck_scales[t], self.bottleneck_biases[t])
            x = torch.cat([x, F.conv2d(y, self.filters[t].flip(2, 3), padding=1)], dim=1)
        return x

    def extra_repr(self) -> str:
        return _kwargs(in_channels=self.in_channels, transitions=self.transitions, growth=self.growth,
                       bottleneck=self.bottleneck)
