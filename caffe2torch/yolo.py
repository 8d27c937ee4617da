"""Torch modules for the YOLO Caffe ports (eric612/MobileNet-YOLO): Reorg, YoloDetectionOutput, Yolov3DetectionOutput.

The same contract as caffe2torch.modules (torch only, so a standalone `model.py` can embed them;
`extra_repr` is the constructor's keyword arguments). Each follows the fork's CPU forward.
"""

from __future__ import annotations

import torch
from torch import nn

from caffe2torch.modules import _kwargs, greedy_nms


class Reorg(nn.Module):
    """The fork's reorg_layer (darknet's reorg_cpu, called with forward = `reverse`).

    Not reversed (YOLOv2's passthrough): the input's memory read as [N, C/s^2, H*s, W*s] and gathered
    into [N, C, H, W] order, then stored as [N, C*s^2, H/s, W/s]. Reversed: the inverse scatter,
    [N, C/s^2, H*s, W*s].
    """

    def __init__(self, stride: int, reverse: bool = False) -> None:
        super().__init__()
        self.stride, self.reverse = int(stride), bool(reverse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        s = self.stride
        if self.reverse:
            y = x.reshape(n, s, s, c // (s * s), h, w).permute(0, 3, 4, 1, 5, 2)
            return y.reshape(n, c // (s * s), h * s, w * s)
        y = x.reshape(n, c // (s * s), h, s, w, s).permute(0, 3, 5, 1, 2, 4)
        return y.reshape(n, c * s * s, h // s, w // s)

    def extra_repr(self) -> str:
        return _kwargs(stride=self.stride, reverse=self.reverse)


def yolo_nms(boxes: torch.Tensor, threshold: float) -> list[int]:
    """The fork's ApplyNms over (x, y, w, h) boxes sorted by confidence, all classes together: a box
    suppresses every later one whose IoU (centre/size overlaps, each step in float32) is >= threshold.
    Taken greedily (`greedy_nms`), which keeps the same boxes as the fork's double loop."""
    x, y, w, h = boxes.unbind(1)
    left, right, top, bottom = x - w / 2, x + w / 2, y - h / 2, y + h / 2
    areas = w * h

    def suppresses(best: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
        across = torch.minimum(right[best], right[rest]) - torch.maximum(left[best], left[rest])
        down = torch.minimum(bottom[best], bottom[rest]) - torch.maximum(top[best], top[rest])
        inter = torch.where((across < 0) | (down < 0), torch.zeros_like(across), across * down)
        return inter / (areas[best] + areas[rest] - inter) >= threshold  # NaN suppresses nothing, as `>=` there

    return greedy_nms(boxes.shape[0], suppresses, device=boxes.device)


def yolo_rows(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, h: torch.Tensor, label: torch.Tensor,
              confidence: torch.Tensor, threshold: float, batch: int) -> torch.Tensor:
    """Sort the candidates by confidence (descending; equal ones keep their order, where the fork's
    std::sort is unstable), NMS, and write the fork's [1, 1, K, 7] rows (0, label + 1, confidence, left, top,
    right, bottom); with none kept, `batch` rows of -1 with the image index first."""
    order = torch.sort(confidence, descending=True, stable=True).indices
    x, y, w, h, label, confidence = (t[order] for t in (x, y, w, h, label, confidence))
    if confidence.numel() == 0:
        kept = []
    else:
        kept = yolo_nms(torch.stack([x, y, w, h], 1), threshold)
    if not kept:
        empty = torch.full((batch, 7), -1.0, device=x.device)
        empty[:, 0] = torch.arange(batch, device=x.device, dtype=torch.float32)
        return empty.reshape(1, 1, batch, 7)
    index = torch.tensor(kept, dtype=torch.long, device=x.device)
    x, y, w, h = x[index], y[index], w[index], h[index]
    rows = torch.stack([torch.zeros_like(x), label[index].float() + 1, confidence[index],
                        x - w / 2, y - h / 2, x + w / 2, y + h / 2], 1)
    return rows.reshape(1, 1, -1, 7)


class YoloV2Output(nn.Module):
    """The fork's YoloDetectionOutput (YOLOv2 region output), on one or two [N, A * (5 + classes), S, S] maps.

    Per anchor of each cell: x = (i + sigmoid(tx)) / S, y = (j + sigmoid(ty)) / S, w = exp(tw) * bias_w / S,
    h = exp(th) * bias_h / S; the softmax's best class (first maximum) times sigmoid(objectness) is kept when
    >= confidence_threshold. Then class-agnostic NMS (`yolo_nms`). Every image of the batch lands in one list
    with image index 0, as in the fork. The output size depends on the data: no fixed-shape export.
    """

    not_exportable = "its output size depends on the data"

    def __init__(self, num_classes: int, num_box: int, biases: tuple, confidence_threshold: float,
                 nms_threshold: float) -> None:
        super().__init__()
        self.num_classes, self.num_box, self.biases = int(num_classes), int(num_box), tuple(float(b) for b in biases)
        self.confidence_threshold, self.nms_threshold = float(confidence_threshold), float(nms_threshold)

    def forward(self, *maps: torch.Tensor) -> torch.Tensor:
        parts = []
        for features in maps:
            n, _, side, width = features.shape
            if side != width:  # the fork's CHECK (it reads a square map), for a net run at another size
                raise ValueError(f"YoloDetectionOutput reads square maps, got {side} x {width}")
            # [N, A, 5 + classes, S, S] -> [N, S(j), S(i), A, 5 + classes]: the fork's candidate order.
            v = features.float().reshape(n, self.num_box, -1, side, side).permute(0, 3, 4, 1, 2)
            grid = torch.arange(side, device=v.device, dtype=torch.float32)
            biases = torch.tensor(self.biases[:2 * self.num_box], device=v.device).reshape(-1, 2)  # extras unread
            x = (grid[None, None, :, None] + torch.sigmoid(v[..., 0])) / side
            y = (grid[None, :, None, None] + torch.sigmoid(v[..., 1])) / side
            w = torch.exp(v[..., 2]) * biases[:, 0] / side
            h = torch.exp(v[..., 3]) * biases[:, 1] / side
            logits = v[..., 5:5 + self.num_classes]
            e = torch.exp(logits - logits.max(-1, keepdim=True).values)
            probability, label = (e / e.sum(-1, keepdim=True)).max(-1)
            confidence = torch.sigmoid(v[..., 4]) * probability
            keep = confidence >= self.confidence_threshold
            parts.append([t[keep] for t in (x, y, w, h, label, confidence)])
        columns = [torch.cat(column) for column in zip(*parts)]
        return yolo_rows(*columns, threshold=self.nms_threshold, batch=maps[0].shape[0])

    def extra_repr(self) -> str:
        return _kwargs(num_classes=self.num_classes, num_box=self.num_box, biases=self.biases,
                       confidence_threshold=self.confidence_threshold, nms_threshold=self.nms_threshold)


class YoloV3Output(nn.Module):
    """The fork's Yolov3DetectionOutput, on one [N, A * (5 + classes), H, W] map per scale.

    For map t, anchor a of a cell (column i, row j): x = (i + sigmoid(tx)) / W, y = (j + sigmoid(ty)) / H,
    w = exp(tw) * bias_w[m] / (W * anchors_scale[t]), h likewise, with m = mask[a + t * (len(mask) / maps)];
    every class with sigmoid(class) * sigmoid(objectness) > confidence_threshold is a candidate. Then
    class-agnostic NMS (`yolo_nms`); all images in one list with image index 0, as in the fork. The output
    size depends on the data: no fixed-shape export.
    """

    not_exportable = "its output size depends on the data"

    def __init__(self, num_classes: int, num_box: int, biases: tuple, anchors_scale: tuple, mask: tuple,
                 confidence_threshold: float, nms_threshold: float) -> None:
        super().__init__()
        self.num_classes, self.num_box = int(num_classes), int(num_box)
        self.biases, self.anchors_scale = tuple(float(b) for b in biases), tuple(int(s) for s in anchors_scale)
        self.mask = tuple(int(m) for m in mask)
        self.confidence_threshold, self.nms_threshold = float(confidence_threshold), float(nms_threshold)

    def forward(self, *maps: torch.Tensor) -> torch.Tensor:
        parts = []
        groups = len(self.mask) // len(maps)
        pairs = len(self.biases) // 2  # an odd last value is never read: the fork takes biases[2m] and [2m + 1]
        biases_all = torch.tensor(self.biases[:2 * pairs], dtype=torch.float32).reshape(-1, 2)
        for t, features in enumerate(maps):
            n, _, height, width = features.shape
            # [N, A, 5 + classes, H, W] -> [N, H, W, A, 5 + classes]: the fork's candidate order (cell, anchor, class).
            v = features.float().reshape(n, self.num_box, -1, height, width).permute(0, 3, 4, 1, 2)
            chosen = torch.tensor(self.mask[t * groups:t * groups + self.num_box], dtype=torch.long)
            biases = biases_all[chosen].to(v.device)
            columns = torch.arange(width, device=v.device, dtype=torch.float32)
            rows = torch.arange(height, device=v.device, dtype=torch.float32)
            x = (columns[None, None, :, None] + torch.sigmoid(v[..., 0])) / width
            y = (rows[None, :, None, None] + torch.sigmoid(v[..., 1])) / height
            w = torch.exp(v[..., 2]) * biases[:, 0] / (width * self.anchors_scale[t])
            h = torch.exp(v[..., 3]) * biases[:, 1] / (height * self.anchors_scale[t])
            scores = torch.sigmoid(v[..., 5:5 + self.num_classes]) * torch.sigmoid(v[..., 4:5])
            keep = scores > self.confidence_threshold
            label = torch.arange(self.num_classes, device=v.device).expand_as(scores)
            spread = [value.unsqueeze(-1).expand_as(scores) for value in (x, y, w, h)]
            parts.append([value[keep] for value in (*spread, label, scores)])
        merged = [torch.cat(column) for column in zip(*parts)]
        return yolo_rows(*merged, threshold=self.nms_threshold, batch=maps[-1].shape[0])

    def extra_repr(self) -> str:
        return _kwargs(num_classes=self.num_classes, num_box=self.num_box, biases=self.biases,
                       anchors_scale=self.anchors_scale, mask=self.mask,
                       confidence_threshold=self.confidence_threshold, nms_threshold=self.nms_threshold)
