"""Torch modules for Cascade R-CNN (zhaoweicai/cascade-rcnn) and MS-CNN (zhaoweicai/mscnn): DecodeBBox,
BoxGroupOutput, BoxOutput, ROIAlign and ScaleRoute.

The same contract as caffe2torch.modules (torch, math, caffe2torch.errors and caffe2torch.modules only, so a
standalone `model.py` embeds them; `extra_repr` is the constructor's keyword arguments). Formulas and float
rounding follow the forks' CPU code: decode_bbox_layer.cpp, box_group_output_layer.cpp, box_output_layer.cpp,
roi_align_layer.cpp, scale_route_layer.cpp and util/bbox_util.cpp (cascade-rcnn) or util/math_functions.cpp
(mscnn). `exp` and `log` of a float there are libm's double functions, rounded once to float. DecodeBBox and
ROIAlign keep the shapes of their bottoms and export; the proposal layers and ScaleRoute have data-dependent
output sizes (`not_exportable`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from caffe2torch.errors import CaffeError
from caffe2torch.modules import FLT_MAX, _kwargs, _tracing, greedy_nms

# The placeholder region the proposal layers output when they keep no box.
EMPTY_PROPOSAL = (0.0, 1.0, 1.0, 10.0, 10.0)


def _std_max(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """std::max(a, b) = a < b ? b : a (NaN in b gives a)."""
    return torch.where(a < b, b, a)


def _std_min(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """std::min(a, b) = b < a ? b : a."""
    return torch.where(b < a, b, a)


class DecodeBBox(nn.Module):
    """decode_bbox_layer.cpp at TEST: each region [R, 5] (image, x1, y1, x2, y2) moved by the foreground deltas of
    bbox_pred [R, 8] (columns 4-7; class-agnostic regression), de-normalised by `mean` and `std`: width
    pw = x2 - x1 + 1, centre 0.5 (x1 + x2), x = dx pw + cx, w = pw exp(dw), corners x - (w - 1) / 2 and
    x + w - 1 after it. The top keeps the regions' shape and image indices."""

    def __init__(self, mean: tuple = (0.0, 0.0, 0.0, 0.0), std: tuple = (1.0, 1.0, 1.0, 1.0)) -> None:
        super().__init__()
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)

    def forward(self, bbox_pred: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        deltas = bbox_pred.reshape(bbox_pred.shape[0], -1)[:, 4:8].float()
        boxes = rois.reshape(rois.shape[0], -1).float()
        x1, y1, x2, y2 = boxes[:, 1], boxes[:, 2], boxes[:, 3], boxes[:, 4]
        pw, ph = x2 - x1 + 1, y2 - y1 + 1
        cx, cy = (x2 + x1) * 0.5, (y2 + y1) * 0.5
        # Python floats of float32 values: torch multiplies a float32 tensor by them in float32, as the fork.
        d = [deltas[:, k] * self.std[k] + self.mean[k] for k in range(4)]
        tx, ty = d[0] * pw + cx, d[1] * ph + cy
        tw = (pw.double() * torch.exp(d[2].double())).float()
        th = (ph.double() * torch.exp(d[3].double())).float()
        tx, ty = tx - (tw - 1) / 2, ty - (th - 1) / 2
        out = torch.stack([boxes[:, 0], tx, ty, tx + tw - 1, ty + th - 1], dim=1)
        return out.reshape(rois.shape).to(rois.dtype)

    def extra_repr(self) -> str:
        return _kwargs(mean=self.mean, std=self.std)


def _cascade_iou(box: torch.Tensor, others: torch.Tensor, mode: str) -> torch.Tensor:
    """cascade-rcnn's JaccardOverlap(BBox, BBox, mode) in float32: 0 for a reversed box, pixel-inclusive sizes
    (+1), no overlap where x_min > x_max or y_min >= y_max (the fork's test), union by mode."""
    def size(b):
        bad = (b[..., 2] < b[..., 0]) | (b[..., 3] < b[..., 1])
        return torch.where(bad, torch.zeros_like(b[..., 0]), (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1))

    ix1, iy1 = _std_max(box[0], others[:, 0]), _std_max(box[1], others[:, 1])
    ix2, iy2 = _std_min(box[2], others[:, 2]), _std_min(box[3], others[:, 3])
    inter = torch.where((ix1 > ix2) | (iy1 >= iy2), torch.zeros_like(ix1), (ix2 - ix1 + 1) * (iy2 - iy1 + 1))
    first, second = size(box[None])[0], size(others)
    if mode == "IOMU":
        union = torch.minimum(first.expand_as(second), second)
    elif mode == "IOFU":
        union = first.expand_as(second)
    else:
        union = first + second - inter
    reversed_ = (box[2] < box[0]) | (box[3] < box[1]) | (others[:, 2] < others[:, 0]) | (others[:, 3] < others[:, 1])
    overlap = torch.where(union <= 0, torch.zeros_like(inter), inter / union)
    return torch.where(reversed_, torch.zeros_like(overlap), overlap)


def _proposal_rows(kept: list, with_scores: bool, device) -> tuple:
    """The proposal layers' tops from each image's kept (boxes [K, 4], scores [K]): rows (image, x1, y1, x2, y2)
    and (..., score); the forks' placeholder rows when nothing is kept."""
    rows = [torch.cat([torch.full((len(s), 1), float(i), device=device), b, s[:, None]], dim=1)
            for i, (b, s) in enumerate(kept) if len(s)]
    if not rows:
        first = torch.tensor([EMPTY_PROPOSAL], device=device)
        return (first, torch.zeros(1, 6, device=device)) if with_scores else first
    table = torch.cat(rows)
    return (table[:, :5], table) if with_scores else table[:, :5]


class BoxGroupOutput(nn.Module):
    """box_group_output_layer.cpp: the RPN proposals of cascade-rcnn. Bottoms come in pairs per map: probabilities
    [N G, C, H, W] (the objectness is 1 - channel 0) and box deltas [N G, 4, H, W], G groups of anchor fields
    (`fields`: (w, h) per group, one list per map) at the map's `strides`. Each delta is de-normalised, bounded
    (x, y within +-1/field_xyr, log w, log h within +-log field_whr), placed on the anchor at ((w + 0.5) stride,
    (h + 0.5) stride), clipped to the map's image (width * stride, no -1), kept at objectness >= fg_thr and size
    >= min_size; the best max_nms_num by score (ties: lower index first; the fork's std::partial_sort is not
    stable), greedy NMS (`nms_type` IOU, IOMU or IOFU over pixel-inclusive boxes), the first max_post_nms_num
    kept. Tops: rois [K, 5] (image, x1, y1, x2, y2) and optionally [K, 6] with the score; [0, 1, 1, 10, 10] (and
    zeros) when no box is kept."""

    not_exportable = "its output size depends on the data"

    def __init__(self, fields: tuple, strides: tuple, fg_thr: float = 0.0, iou_thr: float = 0.5,
                 nms_type: str = "IOU", field_whr: float = 2.0, field_xyr: float = 2.0, max_nms_num: int = 0,
                 max_post_nms_num: int = 0, min_size: float = 15.0, mean: tuple = (0.0, 0.0, 0.0, 0.0),
                 std: tuple = (1.0, 1.0, 1.0, 1.0), with_scores: bool = False) -> None:
        super().__init__()
        self.fields = tuple(tuple((float(w), float(h)) for w, h in group) for group in fields)
        self.strides = tuple(float(s) for s in strides)
        self.fg_thr, self.iou_thr, self.nms_type = float(fg_thr), float(iou_thr), str(nms_type)
        self.field_whr, self.field_xyr = float(field_whr), float(field_xyr)
        self.max_nms_num, self.max_post_nms_num = int(max_nms_num), int(max_post_nms_num)
        self.min_size = float(min_size)
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.with_scores = bool(with_scores)

    def forward(self, *bottoms: torch.Tensor):
        device = bottoms[0].device
        groups = len(self.fields[0])
        num = bottoms[0].shape[0] // groups
        f32 = torch.float32
        xyr = torch.tensor(self.field_xyr, dtype=f32)
        whr = torch.tensor(self.field_whr, dtype=f32)
        bounds = [float(torch.tensor(-1.0, dtype=f32) / xyr), float(torch.tensor(1.0, dtype=f32) / xyr),
                  float(torch.tensor(math.log(float(torch.tensor(1.0, dtype=f32) / whr)), dtype=f32)),
                  float(torch.tensor(math.log(float(whr)), dtype=f32))]
        mean = torch.tensor(self.mean, dtype=f32, device=device)[:, None, None]
        std = torch.tensor(self.std, dtype=f32, device=device)[:, None, None]
        per_image: list = [([], []) for _ in range(num)]
        for level, (fields, stride) in enumerate(zip(self.fields, self.strides)):
            probs, deltas = bottoms[2 * level].float(), bottoms[2 * level + 1].float()
            height, width = probs.shape[2:]
            stride32 = torch.tensor(stride, dtype=f32)
            grid_x = (torch.arange(width, dtype=f32, device=device) + 0.5) * stride32
            grid_y = ((torch.arange(height, dtype=f32, device=device) + 0.5) * stride32)[:, None]
            d = deltas * std + mean  # [N G, 4, H, W]
            bx = _std_min(torch.full_like(d[:, 0], bounds[1]), _std_max(torch.full_like(d[:, 0], bounds[0]), d[:, 0]))
            by = _std_min(torch.full_like(d[:, 1], bounds[1]), _std_max(torch.full_like(d[:, 1], bounds[0]), d[:, 1]))
            bw = _std_min(torch.full_like(d[:, 2], bounds[3]), _std_max(torch.full_like(d[:, 2], bounds[2]), d[:, 2]))
            bh = _std_min(torch.full_like(d[:, 3], bounds[3]), _std_max(torch.full_like(d[:, 3], bounds[2]), d[:, 3]))
            fw = torch.tensor([w for w, _ in fields], dtype=f32, device=device).repeat(num)[:, None, None]
            fh = torch.tensor([h for _, h in fields], dtype=f32, device=device).repeat(num)[:, None, None]
            bx, by = bx * fw + grid_x, by * fh + grid_y
            bw = (fw.double() * torch.exp(bw.double())).float()
            bh = (fh.double() * torch.exp(bh.double())).float()
            bx, by = bx - bw / 2, by - bh / 2
            x1, y1, x2, y2 = bx, by, bx + bw - 1, by + bh - 1
            zero = torch.zeros_like(x1)
            x1, y1 = _std_max(zero, x1), _std_max(zero, y1)  # ClipBBox
            x2 = _std_min(torch.full_like(x2, float(width * int(stride))), x2)
            y2 = _std_min(torch.full_like(y2, float(height * int(stride))), y2)
            score = 1 - probs[:, 0]
            keep = (score >= self.fg_thr) & (x2 - x1 + 1 >= self.min_size) & (y2 - y1 + 1 >= self.min_size)
            boxes = torch.stack([x1, y1, x2, y2], dim=-1)
            count = len(fields)  # this map's groups
            for image in range(num):
                part = slice(image * count, (image + 1) * count)  # groups k, then positions, as the fork collects
                chosen = keep[part].reshape(-1)
                per_image[image][0].append(boxes[part].reshape(-1, 4)[chosen])
                per_image[image][1].append(score[part].reshape(-1)[chosen])
        kept = []
        for boxes, scores in per_image:
            boxes, scores = torch.cat(boxes), torch.cat(scores)
            order = torch.sort(scores, descending=True, stable=True).indices
            if 0 < self.max_nms_num < order.numel():
                order = order[:self.max_nms_num]
            boxes, scores = boxes[order], scores[order]
            chosen = greedy_nms(boxes.shape[0], lambda best, rest: _cascade_iou(boxes[best], boxes[rest],
                                                                                 self.nms_type) > self.iou_thr,
                                self.max_post_nms_num if self.max_post_nms_num > 0 else -1, device)
            index = torch.tensor(chosen, dtype=torch.long, device=device)
            kept.append((boxes[index], scores[index]))
        result = _proposal_rows(kept, self.with_scores, device)
        dtype = bottoms[0].dtype
        return tuple(r.to(dtype) for r in result) if self.with_scores else result.to(dtype)

    def extra_repr(self) -> str:
        return _kwargs(fields=self.fields, strides=self.strides, fg_thr=self.fg_thr, iou_thr=self.iou_thr,
                       nms_type=self.nms_type, field_whr=self.field_whr, field_xyr=self.field_xyr,
                       max_nms_num=self.max_nms_num, max_post_nms_num=self.max_post_nms_num, min_size=self.min_size,
                       mean=self.mean, std=self.std, with_scores=self.with_scores)


def _mscnn_iou(box: torch.Tensor, others: torch.Tensor, mode: str) -> torch.Tensor:
    """mscnn's BoxIOU of (x, y, w, h) boxes in float32: 0 for an empty box or no overlap (tl >= br)."""
    tlx, tly = _std_max(box[0], others[:, 0]), _std_max(box[1], others[:, 1])
    brx = _std_min(box[0] + box[2], others[:, 0] + others[:, 2])
    bry = _std_min(box[1] + box[3], others[:, 1] + others[:, 3])
    over = torch.where((tlx >= brx) | (tly >= bry), torch.zeros_like(tlx), (brx - tlx) * (bry - tly))
    first, second = box[2] * box[3], others[:, 2] * others[:, 3]
    if mode == "IOMU":
        union = torch.minimum(first.expand_as(second), second)
    elif mode == "IOFU":
        union = first.expand_as(second)
    else:
        union = first + second - over
    empty = (box[2] <= 0) | (box[3] <= 0) | (others[:, 2] <= 0) | (others[:, 3] <= 0)
    return torch.where(empty, torch.zeros_like(over), over / union)


class BoxOutput(nn.Module):
    """box_output_layer.cpp: MS-CNN's proposals from one bottom per map, [N, C + 4, H, W] (C class scores, then
    4 box values), with per-map field (w, h) and downsample rate. The objectness is the largest score of classes
    1..C-1 minus class 0's; each box is de-normalised (when `mean`/`std` are given), bounded, placed at
    ((w + 0.5) rate, (h + 0.5) rate), its top left clipped at 0 and its size at the image's edge; kept at
    objectness >= fg_thr and w, h >= min_size; sorted by score (ties: the later box first, std::greater on
    (score, index) pairs), the first max_nms_num, greedy NMS (BoxIOU over (x, y, w, h)), the first
    max_post_nms_num. Tops as BoxGroupOutput's: [K, 5] (image, x1, y1, x + w, y + h) and optionally the score."""

    not_exportable = "its output size depends on the data"

    def __init__(self, fields: tuple, rates: tuple, fg_thr: float = 0.0, iou_thr: float = 0.5, nms_type: str = "IOU",
                 field_whr: float = 2.0, field_xyr: float = 2.0, max_nms_num: int = 0, max_post_nms_num: int = 0,
                 min_size: float = 15.0, mean: tuple | None = None, std: tuple | None = None,
                 with_scores: bool = False) -> None:
        super().__init__()
        self.fields = tuple((float(w), float(h)) for w, h in fields)
        self.rates = tuple(float(r) for r in rates)
        self.fg_thr, self.iou_thr, self.nms_type = float(fg_thr), float(iou_thr), str(nms_type)
        self.field_whr, self.field_xyr = float(field_whr), float(field_xyr)
        self.max_nms_num, self.max_post_nms_num = int(max_nms_num), int(max_post_nms_num)
        self.min_size = float(min_size)
        self.mean = None if mean is None else tuple(float(v) for v in mean)
        self.std = None if std is None else tuple(float(v) for v in std)
        self.with_scores = bool(with_scores)

    def forward(self, *bottoms: torch.Tensor):
        device = bottoms[0].device
        num = bottoms[0].shape[0]
        f32 = torch.float32
        whr, xyr = torch.tensor(self.field_whr, dtype=f32), torch.tensor(self.field_xyr, dtype=f32)
        min_whr = float(torch.tensor(math.log(float(torch.tensor(1.0, dtype=f32) / whr)), dtype=f32))
        max_whr = float(torch.tensor(math.log(float(whr)), dtype=f32))
        min_xyr, max_xyr = float(torch.tensor(-1.0, dtype=f32) / xyr), float(torch.tensor(1.0, dtype=f32) / xyr)
        per_image: list = [([], []) for _ in range(num)]
        for level, x in enumerate(bottoms):
            x = x.float()
            classes = x.shape[1] - 4
            height, width = x.shape[2:]
            (fw, fh), rate = self.fields[level], torch.tensor(self.rates[level], dtype=f32)
            fw32, fh32 = torch.tensor(fw, dtype=f32), torch.tensor(fh, dtype=f32)
            score = torch.full_like(x[:, 0], -FLT_MAX)
            for k in range(1, classes):
                score = _std_max(score, x[:, k])
            score = score - x[:, 0]
            bx, by, bw, bh = x[:, classes], x[:, classes + 1], x[:, classes + 2], x[:, classes + 3]
            if self.mean is not None:
                bx, by, bw, bh = bx * self.std[0], by * self.std[1], bw * self.std[2], bh * self.std[3]
                bx, by, bw, bh = bx + self.mean[0], by + self.mean[1], bw + self.mean[2], bh + self.mean[3]
            bx = _std_min(torch.full_like(bx, max_xyr), _std_max(torch.full_like(bx, min_xyr), bx))
            by = _std_min(torch.full_like(by, max_xyr), _std_max(torch.full_like(by, min_xyr), by))
            bx = bx * fw32 + (torch.arange(width, dtype=f32, device=device) + 0.5) * rate
            by = by * fh32 + ((torch.arange(height, dtype=f32, device=device) + 0.5) * rate)[:, None]
            bw = _std_min(torch.full_like(bw, max_whr), _std_max(torch.full_like(bw, min_whr), bw))
            bh = _std_min(torch.full_like(bh, max_whr), _std_max(torch.full_like(bh, min_whr), bh))
            bw = (torch.exp(bw.double()) * fw).float()
            bh = (torch.exp(bh.double()) * fh).float()
            bx, by = bx - bw / 2, by - bh / 2
            zero = torch.zeros_like(bx)
            bx, by = torch.where(bx < zero, zero, bx), torch.where(by < zero, zero, by)
            image_w, image_h = float(width * int(self.rates[level])), float(height * int(self.rates[level]))
            bw, bh = _std_min(bw, image_w - bx), _std_min(bh, image_h - by)
            keep = (score >= self.fg_thr) & (bw >= self.min_size) & (bh >= self.min_size)
            boxes = torch.stack([bx, by, bw, bh], dim=-1)
            for image in range(num):
                per_image[image][0].append(boxes[image][keep[image]])
                per_image[image][1].append(score[image][keep[image]])
        kept = []
        for boxes, scores in per_image:
            boxes, scores = torch.cat(boxes), torch.cat(scores)
            # std::sort with std::greater on (score, index): equal scores put the later box first.
            order = torch.sort(scores.flip(0), descending=True, stable=True).indices
            order = scores.numel() - 1 - order
            if 0 < self.max_nms_num < order.numel():
                order = order[:self.max_nms_num]
            boxes, scores = boxes[order], scores[order]
            chosen = greedy_nms(boxes.shape[0], lambda best, rest: _mscnn_iou(boxes[best], boxes[rest],
                                                                               self.nms_type) > self.iou_thr,
                                self.max_post_nms_num if self.max_post_nms_num > 0 else -1, device)
            index = torch.tensor(chosen, dtype=torch.long, device=device)
            b = boxes[index]
            kept.append((torch.stack([b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]], dim=1), scores[index]))
        result = _proposal_rows(kept, self.with_scores, device)
        dtype = bottoms[0].dtype
        return tuple(r.to(dtype) for r in result) if self.with_scores else result.to(dtype)

    def extra_repr(self) -> str:
        return _kwargs(fields=self.fields, rates=self.rates, fg_thr=self.fg_thr, iou_thr=self.iou_thr,
                       nms_type=self.nms_type, field_whr=self.field_whr, field_xyr=self.field_xyr,
                       max_nms_num=self.max_nms_num, max_post_nms_num=self.max_post_nms_num, min_size=self.min_size,
                       mean=self.mean, std=self.std, with_scores=self.with_scores)


class ROIAlign(nn.Module):
    """roi_align_layer.cpp (cascade-rcnn and mscnn): for each region [R, 5] (grown by pad_ratio of its size), a
    (pooled_h + 1) x (pooled_w + 1) grid of bilinear samples over [x1, x2] x [y1, y2] scaled and shifted by -0.5;
    0 for an empty region or a point outside [-0.5, size - 0.5]. Float32 as the fork: coordinates, weights
    (1 - l) and l, then w00 v00 + w10 v10 + w01 v01 + w11 v11 in that order. Tensor ops only: it exports."""

    def __init__(self, pooled_size: tuple, spatial_scale: float, pad_ratio: float = 0.0, layer: str = "") -> None:
        super().__init__()
        self.pooled_size, self.spatial_scale = tuple(int(n) for n in pooled_size), float(spatial_scale)
        self.pad_ratio, self.layer = float(pad_ratio), str(layer)

    def forward(self, features: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        return roi_align(features, rois, self.pooled_size, self.spatial_scale, self.pad_ratio, self.layer)

    def extra_repr(self) -> str:
        return _kwargs(pooled_size=self.pooled_size, spatial_scale=self.spatial_scale, pad_ratio=self.pad_ratio,
                       layer=self.layer)


@torch.fx.wrap
def roi_align(features: torch.Tensor, rois: torch.Tensor, pooled_size: tuple, spatial_scale: float,
              pad_ratio: float, layer: str = "") -> torch.Tensor:
    num, channels, height, width = features.shape
    grid_h, grid_w = pooled_size[0] + 1, pooled_size[1] + 1
    boxes = rois.reshape(rois.shape[0], -1).float()
    # `int roi_batch_ind = bottom_rois[0]` truncates: in range iff -1 < value < N (NaN is not)
    outside_batch = ~((boxes[:, 0] > -1) & (boxes[:, 0] < num))
    if not _tracing() and bool(outside_batch.any()):
        region = int(torch.nonzero(outside_batch)[0])
        where = f"layer {layer!r} (ROIAlign)" if layer else "ROIAlign"
        raise CaffeError(f"{where}: region {region} has batch index {float(boxes[region, 0]):g}; "
                         f"it must be in [0, {num})")
    scale, ratio = spatial_scale, pad_ratio  # float32 values: a float32 tensor times them rounds as the fork
    pad_w = (boxes[:, 3] - boxes[:, 1] + 1) * ratio
    pad_h = (boxes[:, 4] - boxes[:, 2] + 1) * ratio
    start_w, start_h = (boxes[:, 1] - pad_w) * scale - 0.5, (boxes[:, 2] - pad_h) * scale - 0.5
    end_w, end_h = (boxes[:, 3] + pad_w) * scale - 0.5, (boxes[:, 4] + pad_h) * scale - 0.5
    roi_h, roi_w = end_h - start_h, end_w - start_w
    bin_h, bin_w = roi_h / float(pooled_size[0]), roi_w / float(pooled_size[1])
    h = start_h[:, None] + torch.arange(grid_h, dtype=torch.float32, device=boxes.device) * bin_h[:, None]  # [R, gh]
    w = start_w[:, None] + torch.arange(grid_w, dtype=torch.float32, device=boxes.device) * bin_w[:, None]  # [R, gw]
    outside = ((h < -0.5) | (h > height - 0.5))[:, :, None] | ((w < -0.5) | (w > width - 0.5))[:, None, :]
    empty = ((roi_h <= 0) | (roi_w <= 0))[:, None, None]
    h_floor, w_floor = torch.floor(h), torch.floor(w)
    h = h.clamp(0, height - 1)
    w = w.clamp(0, width - 1)
    h0, w0 = h_floor.clamp(0, height - 1), w_floor.clamp(0, width - 1)
    h1, w1 = (h_floor + 1).clamp(0, height - 1), (w_floor + 1).clamp(0, width - 1)
    lh, lw = h - h0, w - w0
    hh, hw = 1 - lh, 1 - lw
    flat = features.float().permute(0, 2, 3, 1).reshape(-1, channels)  # rows (image, y, x)
    base = (boxes[:, 0].long().clamp(0, num - 1) * (height * width))[:, None, None]

    def sample(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        index = base + (rows.long() * width)[:, :, None] + cols.long()[:, None, :]  # [R, gh, gw]
        return flat.index_select(0, index.reshape(-1)).reshape(index.shape + (channels,))

    lh, hh = lh[:, :, None, None], hh[:, :, None, None]
    lw, hw = lw[:, None, :, None], hw[:, None, :, None]
    value = (hw * hh) * sample(h0, w0) + (lw * hh) * sample(h0, w1) + (hw * lh) * sample(h1, w0) + \
        (lw * lh) * sample(h1, w1)
    value = torch.where((outside | empty)[..., None], torch.zeros_like(value), value)
    return value.permute(0, 3, 1, 2).to(features.dtype)


class ScaleRoute(nn.Module):
    """scale_route_layer.cpp (cascade-rcnn's FPN): the regions whose scale sqrt((x2 - x1 + 1)(y2 - y1 + 1)) lies in
    [low, high), or, when none does, the one closest to the middle scale in log2; every bottom's rows at those
    indices (bottom 0 is the regions [R, 5])."""

    not_exportable = "its output size depends on the data"

    def __init__(self, low: float | None = None, high: float | None = None) -> None:
        super().__init__()
        self.low, self.high = (None if v is None else float(v) for v in (low, high))

    def forward(self, *bottoms: torch.Tensor):
        f32 = torch.float32
        low = torch.tensor(0.0 if self.low is None else self.low, dtype=f32)
        high = torch.tensor(FLT_MAX if self.high is None else self.high, dtype=f32)
        if self.low is not None and self.high is not None:
            middle = torch.tensor(math.sqrt(float(low * high)), dtype=f32)
        else:
            middle = low if self.low is not None else high if self.high is not None else torch.tensor(256.0)
        rois = bottoms[0].reshape(bottoms[0].shape[0], -1).float()
        x1, y1, x2, y2 = rois[:, 1], rois[:, 2], rois[:, 3], rois[:, 4]
        reversed_ = (x2 < x1) | (y2 < y1)
        size = torch.where(reversed_, torch.zeros_like(x1), (x2 - x1 + 1) * (y2 - y1 + 1))
        scale = torch.sqrt(size.double()).float()
        chosen = torch.nonzero((scale >= low) & (scale < high)).flatten()
        if chosen.numel() == 0 and rois.shape[0]:
            distance = torch.log2((scale / middle).double()).abs().float()
            best, index = torch.tensor(FLT_MAX, dtype=f32), 0
            for i, value in enumerate(distance.tolist()):  # the first strictly smaller, from FLT_MAX
                if value < best:
                    best, index = value, i
            chosen = torch.tensor([index], device=rois.device)
        tops = tuple(bottom.index_select(0, chosen.to(bottom.device)) for bottom in bottoms)
        return tops if len(tops) > 1 else tops[0]

    def extra_repr(self) -> str:
        return _kwargs(low=self.low, high=self.high)
