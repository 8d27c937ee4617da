"""DIGITS' DetectNet output: NVCaffe's Python layer caffe.layers.detectnet.clustering.ClusterDetections.

The same contract as caffe2torch.modules (torch, math and caffe2torch.errors, so a standalone `model.py` can embed
it; `extra_repr` is the constructor's keyword arguments). It follows NVIDIA/caffe caffe-0.17's
python/caffe/layers/detectnet/clustering.py, with OpenCV's groupRectangles (objdetect's cascadedetect.cpp, its
`partition` and SimilarRects) and its Python binding's conversion of the float boxes to integer rectangles
(saturate_cast<int>: round half to even) written out.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from caffe2torch.errors import CaffeError
from caffe2torch.modules import _kwargs

MAX_BOXES = 50  # clustering.py's rows per image


def _round(x: torch.Tensor) -> torch.Tensor:
    """OpenCV's saturate_cast<int> of a float or double: to nearest, ties to even (cvRound)."""
    return torch.round(x).to(torch.int64)


def _float16(x: torch.Tensor) -> torch.Tensor:
    """float64 values rounded once to float16 (NumPy's astype; torch's cast goes through float32, rounding twice),
    as float32."""
    exponent = torch.floor(torch.log2(x.abs().clamp(min=2.0 ** -14)))
    step = torch.pow(2.0, exponent - 10)  # the spacing of float16 numbers there (normal or, below, subnormal)
    rounded = torch.round(x / step) * step  # exact in float64; ties to even
    return torch.where(rounded.abs() > 65504, torch.copysign(torch.tensor(math.inf, dtype=x.dtype), x),
                       rounded).to(torch.float32)


def _components(similar: torch.Tensor) -> torch.Tensor:
    """OpenCV's partition: the connected components of `similar`, numbered in the order of their first member."""
    count = similar.shape[0]
    label = torch.arange(count)
    while True:  # each box takes the smallest index among its neighbours until nothing changes
        spread = torch.where(similar, label[None, :], count).min(dim=1).values
        spread = torch.minimum(spread, label)
        spread = spread[spread]  # and the smallest of that box: path halving
        if torch.equal(spread, label):
            break
        label = spread
    return torch.unique(label, return_inverse=True)[1]  # ascending smallest index = order of first member


def group_rectangles(rects: torch.Tensor, threshold: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cv2.groupRectangles(rects, threshold, eps) on int64 [x, y, w, h] rows: the kept rectangles and weights."""
    if threshold <= 0 or rects.shape[0] == 0:
        return rects, torch.ones(rects.shape[0], dtype=torch.int64)
    x, y, w, h = rects.double().unbind(1)
    # SimilarRects: delta = eps * (min width + min height) * 0.5, every edge within delta.
    delta = eps * (torch.minimum(w[:, None], w[None, :]) + torch.minimum(h[:, None], h[None, :])) * 0.5
    right, bottom = x + w, y + h
    similar = ((x[:, None] - x[None, :]).abs() <= delta) & ((y[:, None] - y[None, :]).abs() <= delta) & \
        ((right[:, None] - right[None, :]).abs() <= delta) & ((bottom[:, None] - bottom[None, :]).abs() <= delta)
    labels = _components(similar)
    classes = int(labels.max()) + 1
    sums = torch.zeros(classes, 4, dtype=torch.int64).index_add_(0, labels, rects)
    weights = torch.bincount(labels, minlength=classes)
    # Rect(saturate_cast<int>(r.x * s), ...) with the float s = 1.f / n: a float32 product, rounded.
    scale = (1.0 / weights.to(torch.float32)).to(torch.float32)
    average = _round(sums.to(torch.float32) * scale[:, None])
    kept_rects, kept_weights = [], []
    for i in range(classes):
        n1 = int(weights[i])
        if n1 <= threshold:  # too few similar rectangles
            continue
        r1 = average[i].tolist()
        inside = False
        for j in range(classes):  # a small rectangle inside a large one with more support is dropped
            n2 = int(weights[j])
            if j == i or n2 <= threshold:
                continue
            r2 = average[j].tolist()
            dx, dy = int(_round(torch.tensor(r2[2] * eps, dtype=torch.float64))), \
                int(_round(torch.tensor(r2[3] * eps, dtype=torch.float64)))
            if (r1[0] >= r2[0] - dx and r1[1] >= r2[1] - dy and r1[0] + r1[2] <= r2[0] + r2[2] + dx
                    and r1[1] + r1[3] <= r2[1] + r2[3] + dy and (n2 > max(3, n1) or n1 < 3)):
                inside = True
                break
        if not inside:
            kept_rects.append(r1)
            kept_weights.append(n1)
    return (torch.tensor(kept_rects, dtype=torch.int64).reshape(-1, 4),
            torch.tensor(kept_weights, dtype=torch.int64))


class ClusterDetections(nn.Module):
    """DetectNet's clustering of its coverage and box maps into at most 50 boxes per image and class.

    For class c, the cells of coverage[:, c] (its first image_size / stride rows and columns) at or above
    `threshold` (compared in float32) propose the box (bbox[0:4] at the cell) + the cell's corner (column and row
    times image_size / cells); those are grouped as cv2.groupRectangles(rects, rect_threshold, eps) does, on the
    rectangles rounded to integers; groups at least `min_height` high become rows [x1, y1, x2, y2, log(group
    size)], rounded to float16 as the layer stores them, then zeros. One [N, 50, 5] output per class. A class with
    more than 50 groups stops the fork (NumPy cannot fit them): a CaffeError here.
    """

    not_exportable = "its rows come from a clustering of the data"

    def __init__(self, image_size: tuple = (1248, 352), stride: int = 16, threshold: float = 0.05,
                 rect_threshold: int = 1, eps: float = 0.025, min_height: int = 22, num_classes: int = 1,
                 layer: str = "") -> None:
        super().__init__()
        self.image_size, self.stride = tuple(int(n) for n in image_size), int(stride)
        self.threshold, self.rect_threshold, self.eps = float(threshold), int(rect_threshold), float(eps)
        self.min_height, self.num_classes, self.layer = int(min_height), int(num_classes), str(layer)

    def _image(self, coverage: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """One image and class: coverage [H, W], boxes [>= 4, H, W] -> [50, 5]."""
        cells = (int(self.image_size[0] / self.stride), int(self.image_size[1] / self.stride))
        cell_width, cell_height = self.image_size[0] / cells[0], self.image_size[1] / cells[1]
        grid = coverage[:cells[1], :cells[0]].float()
        ys, xs = torch.nonzero(grid >= torch.tensor(self.threshold, dtype=torch.float32), as_tuple=True)
        picked = boxes[:4, ys, xs].double()
        corners = torch.stack([xs * cell_width, ys * cell_height, xs * cell_width, ys * cell_height]).double()
        proposals = (picked + corners).t()  # [x1, y1, x2, y2] in float64, as NumPy adds them
        rows = torch.zeros(MAX_BOXES, 5, dtype=torch.float32)
        if not bool(proposals.ne(0).any()):  # clustering.py: `if not propose_boxes.any(): return []`
            return rows
        sizes = torch.stack([proposals[:, 0], proposals[:, 1], proposals[:, 2] - proposals[:, 0],
                             proposals[:, 3] - proposals[:, 1]], dim=1)
        rects, weights = group_rectangles(_round(sizes), self.rect_threshold, self.eps)
        keep = rects[:, 3] >= self.min_height
        rects, weights = rects[keep], weights[keep]
        if rects.shape[0] > MAX_BOXES:
            where = f"layer {self.layer!r} (ClusterDetections)" if self.layer else "ClusterDetections"
            raise CaffeError(f"{where}: {rects.shape[0]} boxes in one image, more than the layer's {MAX_BOXES} "
                             f"rows (the fork fails here too)")
        found = torch.cat([rects[:, :2], rects[:, :2] + rects[:, 2:],
                           torch.tensor([[math.log(int(w))] for w in weights], dtype=torch.float64).reshape(-1, 1)],
                          dim=1)
        rows[:found.shape[0]] = _float16(found)
        return rows

    def forward(self, coverage: torch.Tensor, boxes: torch.Tensor):
        device = coverage.device
        with torch.no_grad():
            coverage, boxes = coverage.detach().cpu(), boxes.detach().cpu()
            outputs = [torch.stack([self._image(coverage[n, c], boxes[n]) for n in range(coverage.shape[0])])
                       for c in range(self.num_classes)]
        outputs = [out.to(device=device) for out in outputs]
        return outputs[0] if self.num_classes == 1 else tuple(outputs)

    def extra_repr(self) -> str:
        return _kwargs(image_size=self.image_size, stride=self.stride, threshold=self.threshold,
                       rect_threshold=self.rect_threshold, eps=self.eps, min_height=self.min_height,
                       num_classes=self.num_classes, layer=self.layer)
