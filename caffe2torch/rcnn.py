"""Torch modules for the R-CNN family: ROIPooling (py-faster-rcnn), PSROIPooling (R-FCN), the RPN proposal layer.

The same contract as caffe2torch.modules (torch only, and caffe2torch.errors, which a standalone
`model.py` embeds too; `extra_repr` is the constructor's keyword arguments). Each reads region
coordinates from the data to slice the features (and the proposal layer's output size depends on
the data), so these have no fixed-shape export and no CUDA graph: their `not_exportable` says why.
Data the forks refuse or misread (a region's batch index outside the batch, corners past their C
ints, an im_info that is no image size) raises a CaffeError naming the layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from caffe2torch.errors import CaffeError
from caffe2torch.modules import _kwargs, greedy_nms

# The forks compute region corners and bin edges in C ints: coordinates (scaled) must stay below this in
# magnitude so that every int they derive (end - start + 1, start + a bin's offset) fits.
COORDINATE_LIMIT = 2 ** 30


def _where(layer: str, kind: str) -> str:
    return f"layer {layer!r} ({kind})" if layer else kind


def _batch_indices(batch: torch.Tensor, images: int, where: str) -> list[int]:
    """Each region's image, `int roi_batch_ind = bottom_rois[0]` (truncated), which caffe-fast-rcnn CHECKs to be
    >= 0 and < the feature batch: -1 is refused (indexing would wrap to the last image), NaN too."""
    truncated = torch.trunc(batch)
    bad = ~((truncated >= 0) & (truncated < images))
    if bool(bad.any()):
        region = int(torch.nonzero(bad)[0])
        raise CaffeError(f"{where}: region {region} has batch index {float(batch[region]):g}; it must be in "
                         f"[0, {images}) for a batch of {images} feature maps")
    return truncated.long().tolist()


def _check_coordinates(corners: torch.Tensor, where: str) -> None:
    """Scaled region corners within the forks' int range (NaN and infinities are not: C's (int) of them is
    undefined)."""
    bad = ~(corners.abs() < COORDINATE_LIMIT).all(1)
    if bool(bad.any()):
        region = int(torch.nonzero(bad)[0])
        values = ", ".join(f"{v:g}" for v in corners[region].tolist())
        raise CaffeError(f"{where}: region {region}'s corners scaled to ({values}) must be finite and within "
                         f"+-2^30 (the fork computes them in ints)")


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's round(): halves away from zero (torch.round goes to even)."""
    return torch.sign(x) * torch.floor(torch.abs(x) + 0.5)


def _bins(start: torch.Tensor, size: torch.Tensor, count: int, limit: int) -> tuple[list, list]:
    """ROIPooling's bin edges for every ROI: floor(p * bin) and ceil((p + 1) * bin), plus start, clipped."""
    bin_size = size / float(count)  # float32 division, as the fork's Dtype
    steps = torch.arange(count + 1, dtype=torch.float32)
    starts = torch.floor(steps[None, :-1] * bin_size[:, None]).long() + start[:, None]
    ends = torch.ceil(steps[None, 1:] * bin_size[:, None]).long() + start[:, None]
    return starts.clamp(0, limit).tolist(), ends.clamp(0, limit).tolist()


class ROIPool(nn.Module):
    """py-faster-rcnn's ROIPooling: MAX over floor/ceil bins of each ROI (x1, y1, x2, y2 rounded after
    scaling, both ends included), clipped to the map; an empty bin gives 0. Bottoms: features
    [N, C, H, W] and rois [R, 5] (batch index, x1, y1, x2, y2); top [R, C, pooled_h, pooled_w].
    As the fork: NaN never wins and a bin of nothing but -inf gives -FLT_MAX.
    """

    not_exportable = "it reads each region's coordinates from the data to slice the features"

    def __init__(self, pooled_size: tuple, spatial_scale: float, layer: str = "", pad_ratio: float = 0.0) -> None:
        super().__init__()
        self.pooled_size, self.spatial_scale = tuple(int(n) for n in pooled_size), float(spatial_scale)
        self.layer = str(layer)  # the Caffe layer's name, for errors about the data
        # mscnn / cascade-rcnn: each region grown by this share of its (pixel-inclusive) size on every side
        self.pad_ratio = float(pad_ratio)

    def forward(self, features: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        pooled_h, pooled_w = self.pooled_size
        height, width = features.shape[2:]
        where = _where(self.layer, "ROIPooling")
        boxes = rois.float().reshape(-1, 5).cpu()  # [R, 5] or R-FCN's [R, 5, 1, 1]
        batch = _batch_indices(boxes[:, 0], features.shape[0], where)
        corners = boxes[:, 1:5]
        if self.pad_ratio:  # pad = (x2 - x1 + 1) * pad_ratio in float; round((x1 - pad) * scale) ...
            ratio = torch.tensor(self.pad_ratio, dtype=torch.float32)
            pad = torch.stack([corners[:, 2] - corners[:, 0] + 1, corners[:, 3] - corners[:, 1] + 1], 1) * ratio
            corners = torch.cat([corners[:, :2] - pad, corners[:, 2:] + pad], dim=1)
        rounded = _round_half_away(corners * torch.tensor(self.spatial_scale, dtype=torch.float32))
        _check_coordinates(rounded, where)
        corners = rounded.long()
        start_w, start_h, end_w, end_h = corners.unbind(1)
        size_h = torch.clamp(end_h - start_h + 1, min=1).float()
        size_w = torch.clamp(end_w - start_w + 1, min=1).float()
        h_starts, h_ends = _bins(start_h, size_h, pooled_h, height)
        w_starts, w_ends = _bins(start_w, size_w, pooled_w, width)
        features = torch.nan_to_num(features, nan=-math.inf, posinf=math.inf, neginf=-math.inf)
        lowest = torch.finfo(features.dtype).min
        outputs = []
        for index, item in enumerate(batch):
            plane = features[item]
            columns = []
            for ws, we in zip(w_starts[index], w_ends[index]):
                columns.append(plane[:, :, ws:we].amax(2) if we > ws else torch.zeros_like(plane[:, :, 0]))
            columns = torch.stack(columns, dim=2)  # [C, H, pooled_w]
            rows = []
            for hs, he in zip(h_starts[index], h_ends[index]):
                rows.append(columns[:, hs:he].amax(1) if he > hs else torch.zeros_like(columns[:, 0]))
            pooled = torch.stack(rows, dim=1).clamp(min=lowest)  # Caffe starts each bin from -FLT_MAX
            empty_h = torch.tensor([he <= hs for hs, he in zip(h_starts[index], h_ends[index])], device=plane.device)
            empty_w = torch.tensor([we <= ws for ws, we in zip(w_starts[index], w_ends[index])], device=plane.device)
            empty = empty_h[:, None] | empty_w[None, :]
            outputs.append(torch.where(empty, torch.zeros_like(pooled), pooled))
        if not outputs:
            return features.new_zeros((0, features.shape[1], pooled_h, pooled_w))
        return torch.stack(outputs)

    def extra_repr(self) -> str:
        return _kwargs(pooled_size=self.pooled_size, spatial_scale=self.spatial_scale, layer=self.layer) + \
            (f", pad_ratio={self.pad_ratio!r}" if self.pad_ratio else "")


class PSROIPool(nn.Module):
    """R-FCN's position-sensitive ROI pooling (its GPU kernel; the fork has no CPU forward).

    Coordinates are rounded before scaling, the end gets + 1, bins stay fractional: start =
    floor(p * bin + roi_start), end = ceil((p + 1) * bin + roi_start), clipped. Output channel
    `ctop` at bin (ph, pw) averages input channel (ctop * group + ph) * group + pw; empty: 0.
    """

    not_exportable = "it reads each region's coordinates from the data to slice the features"

    def __init__(self, output_dim: int, group_size: int, spatial_scale: float, layer: str = "") -> None:
        super().__init__()
        self.output_dim, self.group_size = int(output_dim), int(group_size)
        self.spatial_scale = float(spatial_scale)
        self.layer = str(layer)  # the Caffe layer's name, for errors about the data

    def forward(self, features: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        group = self.group_size
        height, width = features.shape[2:]
        where = _where(self.layer, "PSROIPooling")
        boxes = rois.float().cpu().reshape(-1, 5)  # [R, 5] or R-FCN's [R, 5, 1, 1]
        # The fork does not check the batch index, and reads outside the features with a wrong one.
        batch = _batch_indices(boxes[:, 0], features.shape[0], where)
        scale = torch.tensor(self.spatial_scale, dtype=torch.float32)
        start_w, start_h = _round_half_away(boxes[:, 1]) * scale, _round_half_away(boxes[:, 2]) * scale
        end_w = (_round_half_away(boxes[:, 3]) + 1.0) * scale
        end_h = (_round_half_away(boxes[:, 4]) + 1.0) * scale
        _check_coordinates(torch.stack([start_w, start_h, end_w, end_h], 1), where)
        bin_w = torch.clamp(end_w - start_w, min=0.1) / float(group)
        bin_h = torch.clamp(end_h - start_h, min=0.1) / float(group)
        steps = torch.arange(group + 1, dtype=torch.float64)
        # nvcc contracts p * bin + start into one fused multiply-add: a product exact in double, one rounding.
        edges_w = (steps[None] * bin_w.double()[:, None] + start_w.double()[:, None]).float()
        edges_h = (steps[None] * bin_h.double()[:, None] + start_h.double()[:, None]).float()
        w_starts = torch.floor(edges_w[:, :-1]).long().clamp(0, width).tolist()
        w_ends = torch.ceil(edges_w[:, 1:]).long().clamp(0, width).tolist()
        h_starts = torch.floor(edges_h[:, :-1]).long().clamp(0, height).tolist()
        h_ends = torch.ceil(edges_h[:, 1:]).long().clamp(0, height).tolist()
        channels = torch.arange(self.output_dim, device=features.device) * group * group
        outputs = []
        for index, item in enumerate(batch):
            bins = []
            for ph in range(group):
                hs, he = h_starts[index][ph], h_ends[index][ph]
                for pw in range(group):
                    ws, we = w_starts[index][pw], w_ends[index][pw]
                    if he <= hs or we <= ws:
                        bins.append(features.new_zeros(self.output_dim))
                        continue
                    region = features[item].index_select(0, channels + ph * group + pw)[:, hs:he, ws:we]
                    bins.append(region.sum((1, 2)) / float((he - hs) * (we - ws)))
            outputs.append(torch.stack(bins, dim=1).reshape(self.output_dim, group, group))
        if not outputs:
            return features.new_zeros((0, self.output_dim, group, group))
        return torch.stack(outputs)

    def extra_repr(self) -> str:
        return _kwargs(output_dim=self.output_dim, group_size=self.group_size, spatial_scale=self.spatial_scale,
                       layer=self.layer)


def generate_anchors(scales: tuple, ratios: tuple = (0.5, 1.0, 2.0), base_size: int = 16) -> torch.Tensor:
    """py-faster-rcnn's generate_anchors (float64, np.round's half to even), ratio-major then scale."""
    def centre(box):
        w, h = box[2] - box[0] + 1, box[3] - box[1] + 1
        return w, h, box[0] + 0.5 * (w - 1), box[1] + 0.5 * (h - 1)

    def boxes(ws, hs, x, y):
        return torch.stack([x - 0.5 * (ws - 1), y - 0.5 * (hs - 1), x + 0.5 * (ws - 1), y + 0.5 * (hs - 1)], dim=1)

    w, h, x, y = centre(torch.tensor([0.0, 0.0, base_size - 1.0, base_size - 1.0], dtype=torch.float64))
    ratio = torch.tensor(ratios, dtype=torch.float64)
    ws = torch.round(torch.sqrt(w * h / ratio))
    ratio_anchors = boxes(ws, torch.round(ws * ratio), x, y)
    scale = torch.tensor(scales, dtype=torch.float64)
    out = []
    for anchor in ratio_anchors:
        w, h, x, y = centre(anchor)
        out.append(boxes(w * scale, h * scale, x, y))
    return torch.cat(out)


def rpn_nms(boxes: torch.Tensor, threshold: float, limit: int = -1) -> list[int]:
    """py-faster-rcnn's GPU NMS on boxes sorted by score: suppress IoU > threshold, areas with the +1;
    the first `limit` kept (-1: all)."""
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)

    def suppresses(best: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
        width = (torch.minimum(x2[best], x2[rest]) - torch.maximum(x1[best], x1[rest]) + 1).clamp(min=0)
        height = (torch.minimum(y2[best], y2[rest]) - torch.maximum(y1[best], y1[rest]) + 1).clamp(min=0)
        inter = width * height
        return inter / (areas[best] + areas[rest] - inter) > threshold

    return greedy_nms(boxes.shape[0], suppresses, limit, boxes.device)


class Proposal(nn.Module):
    """py-faster-rcnn's ProposalLayer (rpn/proposal_layer.py) at TEST: anchors shifted over the map,
    deltas applied, clipped, boxes under min_size * scale dropped, top pre_nms_top_n by score, NMS,
    top post_nms_top_n. Bottoms: rpn_cls_prob_reshape [1, 2A, H, W], rpn_bbox_pred [1, 4A, H, W],
    im_info [1, 3] (height, width, scale). Tops: rois [R, 5] (0, x1, y1, x2, y2) and optionally the
    scores [R, 1]. R depends on the data. Equal scores may rank differently from numpy's sort.
    `feat_stride`, scales and ratios are the numbers param_str gives, fractions kept: the shifts are
    arange(W) * feat_stride and the shifted anchors float64 sums, rounded to float32 once (as
    bbox_transform_inv's astype does).
    """

    not_exportable = "its output size depends on the data"

    def __init__(self, feat_stride: float, scales: tuple = (8, 16, 32), pre_nms_top_n: int = 6000,
                 post_nms_top_n: int = 300, nms_thresh: float = 0.7, min_size: int = 16,
                 with_scores: bool = False, ratios: tuple = (0.5, 1.0, 2.0), layer: str = "") -> None:
        super().__init__()
        self.feat_stride = float(feat_stride)
        self.scales, self.ratios = tuple(float(s) for s in scales), tuple(float(r) for r in ratios)
        self.pre_nms_top_n, self.post_nms_top_n = int(pre_nms_top_n), int(post_nms_top_n)
        self.nms_thresh, self.min_size, self.with_scores = float(nms_thresh), int(min_size), bool(with_scores)
        self.layer = str(layer)  # the Caffe layer's name, for errors about the data

    def forward(self, scores: torch.Tensor, deltas: torch.Tensor, im_info: torch.Tensor):
        where = _where(self.layer, "Python")
        if scores.shape[0] != 1:  # the Python layer asserts it
            raise CaffeError(f"{where}: the proposal layer takes single-image batches, got {scores.shape[0]} images")
        info = im_info.float().reshape(-1)[:3]
        if not bool(((info > 0) & (info < math.inf)).all()):
            values = ", ".join(f"{v:g}" for v in info.tolist())
            raise CaffeError(f"{where}: im_info (height, width, scale) must be positive finite numbers, got ({values})")
        # Computed here in float64, as numpy does (a float32 buffer would round the anchors before the shifts).
        anchors = generate_anchors(self.scales, self.ratios).to(scores.device)
        count = anchors.shape[0]
        height, width = scores.shape[-2:]
        scores = scores[:, count:].float().permute(0, 2, 3, 1).reshape(-1)
        deltas = deltas.float().permute(0, 2, 3, 1).reshape(-1, 4)
        shift_x = torch.arange(width, dtype=torch.float64, device=scores.device) * self.feat_stride
        shift_y = torch.arange(height, dtype=torch.float64, device=scores.device) * self.feat_stride
        grid_y, grid_x = torch.meshgrid(shift_y, shift_x, indexing="ij")
        shifts = torch.stack([grid_x, grid_y, grid_x, grid_y], dim=-1).reshape(-1, 1, 4)
        anchors = (anchors[None] + shifts).reshape(-1, 4).float()
        widths = anchors[:, 2] - anchors[:, 0] + 1.0
        heights = anchors[:, 3] - anchors[:, 1] + 1.0
        center_x, center_y = anchors[:, 0] + 0.5 * widths, anchors[:, 1] + 0.5 * heights
        box_x = deltas[:, 0] * widths + center_x
        box_y = deltas[:, 1] * heights + center_y
        box_w, box_h = torch.exp(deltas[:, 2]) * widths, torch.exp(deltas[:, 3]) * heights
        boxes = torch.stack([box_x - 0.5 * box_w, box_y - 0.5 * box_h, box_x + 0.5 * box_w, box_y + 0.5 * box_h], 1)
        limits = torch.stack([info[1] - 1, info[0] - 1, info[1] - 1, info[0] - 1])
        boxes = torch.maximum(torch.minimum(boxes, limits), torch.zeros_like(limits))
        smallest = self.min_size * info[2]
        keep = ((boxes[:, 2] - boxes[:, 0] + 1) >= smallest) & ((boxes[:, 3] - boxes[:, 1] + 1) >= smallest)
        boxes, scores = boxes[keep], scores[keep]
        order = torch.flip(torch.sort(scores, stable=True).indices, [0])  # numpy's argsort()[::-1]
        if self.pre_nms_top_n > 0:
            order = order[:self.pre_nms_top_n]
        boxes, scores = boxes[order], scores[order]
        kept = rpn_nms(boxes, self.nms_thresh, self.post_nms_top_n if self.post_nms_top_n > 0 else -1)
        index = torch.tensor(kept, dtype=torch.long, device=boxes.device)
        rois = torch.cat([boxes.new_zeros(len(kept), 1), boxes[index]], dim=1)
        if self.with_scores:
            return rois, scores[index][:, None]
        return rois

    def extra_repr(self) -> str:
        return _kwargs(feat_stride=self.feat_stride, scales=self.scales, pre_nms_top_n=self.pre_nms_top_n,
                       post_nms_top_n=self.post_nms_top_n, nms_thresh=self.nms_thresh, min_size=self.min_size,
                       with_scores=self.with_scores, ratios=self.ratios, layer=self.layer)
