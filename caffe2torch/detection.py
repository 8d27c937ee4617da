"""Torch modules for SSD's layers (weiliu89/caffe, branch ssd): Normalize, Permute, PriorBox, DetectionOutput.

The same contract as caffe2torch.modules (torch and math only, so a standalone `model.py` can
embed them; `extra_repr` is the constructor's keyword arguments). Formulas and float rounding
follow the fork's CPU code: normalize_layer.cpp, permute_layer.cpp, prior_box_layer.cpp,
detection_output_layer.cpp and util/bbox_util.cpp.
"""

from __future__ import annotations

import torch
from torch import nn

from caffe2torch.modules import FLT_MAX, TableCache, _concrete, _float32_if_half, _kwargs, add_epsilon, dims

# Caffe's -FLT_MAX: DetectionOutput's confidence threshold when none is given.
LOWEST_FLOAT = -FLT_MAX
CODE_TYPES = ("CORNER", "CENTER_SIZE", "CORNER_SIZE")


class Normalize(nn.Module):
    """SSD's Normalize: x / sqrt(sum of squares + eps), then times a learned scale.

    The sum runs over the channels at each position (`across_spatial=False`, what SSD uses) or
    over a whole item (`True`, Caffe's default; then x is multiplied by the reciprocal, as Caffe
    does). The scale is one value (`channel_shared`) or one per channel. Half-precision inputs are
    normalised in float32: their sums of squares would overflow.
    """

    def __init__(self, channels: int, across_spatial: bool = True, channel_shared: bool = True,
                 eps: float = 1e-10) -> None:
        super().__init__()
        self.channels, self.across_spatial, self.channel_shared = int(channels), bool(across_spatial), bool(channel_shared)
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(1 if self.channel_shared else self.channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        work = _float32_if_half(x)
        if self.across_spatial:
            norm = torch.sqrt(add_epsilon(work.square().flatten(1).sum(1), self.eps))
            # Caffe scales by Dtype(1.0 / norm): double division rounded once, the same as a float32 one.
            y = work * torch.reciprocal(norm).reshape((-1,) + (1,) * (x.dim() - 1))
        else:
            y = work / torch.sqrt(add_epsilon(work.square().sum(1, keepdim=True), self.eps))
        scale = self.weight.to(work.dtype)
        if not self.channel_shared:
            scale = scale.reshape((-1,) + (1,) * (x.dim() - 2))
        return (y * scale).to(x.dtype)

    def extra_repr(self) -> str:
        return _kwargs(channels=self.channels, across_spatial=self.across_spatial,
                       channel_shared=self.channel_shared, eps=self.eps)


class ChannelNormalize(nn.Module):
    """happynear/caffe-windows' Normalize: x / sqrt(sum over channels of x^2 + 1e-6) ("L2") or x / (sum |x| + 1e-6)
    ("L1") at each position, summed in float32 (1e-6 added as the fork's double, rounded once)."""

    def __init__(self, kind: str = "L2") -> None:
        super().__init__()
        if kind not in ("L2", "L1"):
            raise ValueError(f"normalize kind must be 'L2' or 'L1', got {kind!r}")
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        work = _float32_if_half(x)
        total = (work.square() if self.kind == "L2" else work.abs()).sum(1, keepdim=True)
        total = (total.double() + 1e-6).to(work.dtype)  # norm_data += 1e-6: a double sum stored as a float
        norm = torch.sqrt(total) if self.kind == "L2" else total
        return (work / norm).to(x.dtype)

    def extra_repr(self) -> str:
        return _kwargs(kind=self.kind)


class Permute(nn.Module):
    """SSD's Permute: the axes in `order` (Caffe's order with the unlisted axes appended)."""

    def __init__(self, order: tuple) -> None:
        super().__init__()
        self.order = tuple(int(axis) for axis in order)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(self.order)

    def extra_repr(self) -> str:
        return _kwargs(order=self.order)


def prior_box_table(layer_size: tuple, image_size: tuple, step: tuple | None, offset: float, box_sizes: tuple,
                    clip: bool, variance: tuple, device=None, denser: bool = False,
                    shifts: tuple = ()) -> torch.Tensor:
    """PriorBoxLayer::Forward_cpu's top, [1, 2, H*W*len(box_sizes)*4], rounded as the fork rounds.

    Centres are float32 ((w + offset) * step); each coordinate is (centre -/+ size / 2.) / image
    in double, stored as float32. The step, when the layer gives none, is the float32 quotient
    image / layer of each axis, as the fork's Forward computes it. `box_sizes` are the (width,
    height) float32 values in the fork's order per cell. TextBoxes++'s `denser` follows each box by
    a copy centred on the cell's lower edge ((h + 1.0) * step, in double, stored as float32). `shifts`
    (dx, dy per prior, FaceBoxes' densified anchors) move each centre in float32 (centre + j * 8) before
    the double arithmetic. Built a block of rows at a time into the table, so the work space stays
    small beside a table that may be large (the converter checks the table's size first).
    """
    height, width = layer_size
    if step is None:
        step_h, step_w = (torch.full((), i, dtype=torch.float32, device=device) /
                          torch.full((), n, dtype=torch.float32, device=device) for i, n in zip(image_size, layer_size))
    else:
        step_h, step_w = (torch.tensor(s, dtype=torch.float32, device=device) for s in step)
    offset32 = torch.tensor(offset, dtype=torch.float32, device=device)
    sizes = torch.tensor(box_sizes, dtype=torch.float32, device=device).double().reshape(-1, 2)
    # Each prior's vertical offset in its cell: `offset`, and 1.0 for TextBoxes++'s denser copies.
    offsets_y = torch.full((sizes.shape[0],), float(offset32), dtype=torch.float32, device=device)
    if denser:
        sizes = sizes.repeat_interleave(2, dim=0)
        offsets_y = torch.stack([offsets_y, torch.ones_like(offsets_y)], dim=1).reshape(-1)
    half_w, half_h = sizes[:, 0] / 2.0, sizes[:, 1] / 2.0
    moves = torch.tensor(shifts or (0.0, 0.0) * sizes.shape[0], dtype=torch.float32, device=device).reshape(-1, 2)
    center_x = (((torch.arange(width, dtype=torch.float32, device=device) + offset32) * step_w)[:, None]
                + moves[:, 0]).double()
    x_min, x_max = (center_x - half_w) / image_size[1], (center_x + half_w) / image_size[1]  # [W, priors]
    per_row = width * sizes.shape[0] * 4

    def block(start, stop) -> torch.Tensor:
        rows = torch.arange(start, stop, dtype=torch.float32, device=device)
        center_y = ((rows[:, None] + offsets_y) * step_h + moves[:, 1]).double()
        y_min, y_max = (center_y - half_h) / image_size[0], (center_y + half_h) / image_size[0]  # [rows, priors]
        corners = torch.broadcast_tensors(x_min[None], y_min[:, None], x_max[None], y_max[:, None])
        return torch.stack(corners, dim=-1).reshape(-1).float()  # rounded to float32 as it is stored

    if _concrete(height, width):
        boxes = torch.empty(height * per_row, device=device)
        rows = max(1, (1 << 18) // per_row)
        for start in range(0, height, rows):
            stop = min(start + rows, height)
            boxes[start * per_row:stop * per_row] = block(start, stop)
    else:  # symbolic sizes (torch.export): one block
        boxes = block(0, height)
    if clip:
        boxes = boxes.clamp(0.0, 1.0)
    variances = torch.tensor(variance, dtype=torch.float32, device=device).expand(boxes.shape[0] // 4, 4)
    return torch.stack([boxes, variances.reshape(-1)]).unsqueeze(0)


class PriorBox(nn.Module):
    """SSD's PriorBox: the default boxes of the feature map it gets, fixed by the shapes (never by the data).

    The grid is bottom 0's size, the image size `image_size` (img_size / img_h, img_w) or bottom 1's,
    the step `step` or image / grid, as the fork's Forward computes them for the blobs it is given.
    The table is built once per size (`TableCache`); forward returns it in the bottom's dtype.
    Caffe gives one set for the whole batch: shape [1, 2, H*W*priors*4].
    """

    def __init__(self, image_size: tuple | None, step: tuple | None, offset: float, box_sizes: tuple, clip: bool,
                 variance: tuple, denser: bool = False, shifts: tuple = ()) -> None:
        super().__init__()
        self.image_size = None if image_size is None else tuple(map(int, image_size))
        self.step = None if step is None else tuple(map(float, step))
        self.offset, self.box_sizes, self.clip = float(offset), tuple(map(float, box_sizes)), bool(clip)
        self.variance, self.denser = tuple(map(float, variance)), bool(denser)
        self.shifts = tuple(map(float, shifts))  # FaceBoxes' densified anchors: (dx, dy) per prior

    def forward(self, x: torch.Tensor, *image: torch.Tensor) -> torch.Tensor:
        return prior_boxes(x, image[0] if image else None, self.image_size, self.step, self.offset, self.box_sizes,
                           self.clip, self.variance, self.denser, self.shifts)

    def extra_repr(self) -> str:
        return _kwargs(image_size=self.image_size, step=self.step, offset=self.offset, box_sizes=self.box_sizes,
                       clip=self.clip, variance=self.variance) + (", denser=True" if self.denser else "") + \
            (f", shifts={self.shifts!r}" if self.shifts else "")


@torch.fx.wrap
def prior_boxes(x: torch.Tensor, image: torch.Tensor | None, image_size: tuple | None, step: tuple | None,
                offset: float, box_sizes: tuple, clip: bool, variance: tuple, denser: bool = False,
                shifts: tuple = ()) -> torch.Tensor:
    layer_size = dims(x, 2, 3)
    if image_size is None:
        image_size = dims(image, 2, 3)
    key = ("priorbox", layer_size, image_size, step, offset, box_sizes, clip, variance, denser, shifts, x.device)
    table = TableCache.get(key, lambda: prior_box_table(layer_size, image_size, step, offset, box_sizes, clip,
                                                        variance, x.device, denser, shifts),
                           x, *layer_size, *image_size)
    return table.to(dtype=x.dtype, copy=True)


def decode_boxes(loc: torch.Tensor, priors: torch.Tensor, variances: torch.Tensor, code_type: str,
                 variance_encoded_in_target: bool) -> torch.Tensor:
    """bbox_util's DecodeBBox on [..., 4] float32 tensors, operation by operation.

    Where the fork mixes in double (a `/ 2.` literal, libm's double exp) the value is computed in
    float64 and rounded to float32 once, as its assignment to a float field does.
    """
    if variance_encoded_in_target:
        variances = torch.ones_like(variances)
    p = priors.unbind(-1)
    v = variances.unbind(-1)
    lo = loc.unbind(-1)
    if code_type == "CORNER":
        return torch.stack([p[i] + v[i] * lo[i] for i in range(4)], dim=-1)
    width, height = p[2] - p[0], p[3] - p[1]
    if code_type == "CORNER_SIZE":
        return torch.stack([p[0] + v[0] * lo[0] * width, p[1] + v[1] * lo[1] * height,
                            p[2] + v[2] * lo[2] * width, p[3] + v[3] * lo[3] * height], dim=-1)
    center_x, center_y = (p[0] + p[2]) / 2, (p[1] + p[3]) / 2  # float sum, exact halving
    box_x = (v[0] * lo[0] * width + center_x).double()
    box_y = (v[1] * lo[1] * height + center_y).double()
    box_w = (torch.exp((v[2] * lo[2]).double()) * width.double()).float().double()
    box_h = (torch.exp((v[3] * lo[3]).double()) * height.double()).float().double()
    return torch.stack([box_x - box_w / 2.0, box_y - box_h / 2.0, box_x + box_w / 2.0, box_y + box_h / 2.0],
                       dim=-1).float()


def text_values(kind: str) -> int:
    """TextBoxes++'s location values a prior beyond the box's four."""
    return {"polygon": 8, "rbox": 5}.get(kind, 0)


def decode_text(loc: torch.Tensor, priors: torch.Tensor, variances: torch.Tensor, kind: str) -> torch.Tensor:
    """TextBoxes++'s DecodeBBoxPolygon / DecodeBBoxRBox (CENTER_SIZE, variance in the prior) for [..., 8 or 5]
    values, float32 operation by operation: a polygon's corner k is variance * offset * prior size + the prior's
    corner k (x1 y1 top left, then clockwise); a rotated box's points are offsets from the prior's centre, its
    height exp(variance * h) * prior height (libm's double exp, rounded once)."""
    xmin, ymin, xmax, ymax = priors.unbind(-1)
    v = variances.unbind(-1)
    width, height = xmax - xmin, ymax - ymin
    if kind == "polygon":
        xs, ys = (xmin, xmax, xmax, xmin), (ymin, ymin, ymax, ymax)
        out = []
        for k in range(4):
            out += [v[0] * loc[..., 2 * k] * width + xs[k], v[1] * loc[..., 2 * k + 1] * height + ys[k]]
        return torch.stack(out, dim=-1)
    center_x, center_y = (xmin + xmax) / 2, (ymin + ymax) / 2
    h = (torch.exp((v[3] * loc[..., 4]).double()) * height.double()).float()
    return torch.stack([v[0] * loc[..., 0] * width + center_x, v[1] * loc[..., 1] * height + center_y,
                        v[0] * loc[..., 2] * width + center_x, v[1] * loc[..., 3] * height + center_y, h], dim=-1)


def box_sizes(boxes: torch.Tensor) -> torch.Tensor:
    """BBoxSize: width * height in float32, 0 for a box with xmax < xmin or ymax < ymin."""
    width, height = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    invalid = (boxes[..., 2] < boxes[..., 0]) | (boxes[..., 3] < boxes[..., 1])
    return torch.where(invalid, torch.zeros_like(width), width * height)


def _cpp_max(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """std::max(a, b): `a` unless `b` is larger (so a NaN `b` gives `a`, where torch.maximum gives NaN)."""
    return torch.where(a < b, b, a)


def _cpp_min(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """std::min(a, b): `a` unless `b` is smaller."""
    return torch.where(b < a, b, a)


def _overlaps(first: torch.Tensor, first_size: torch.Tensor, second: torch.Tensor, second_size: torch.Tensor,
              plain: bool) -> torch.Tensor:
    """JaccardOverlap of boxes given as coordinate rows ([4, A] and [4, B]): [A, B], computed in place where it
    can. `plain` boxes (coordinates within +-1e38, every size > 0) take a shorter exact form: sides clamped at 0
    give an overlap of 0 / (size + size) = 0 wherever the fork returns 0, and the fork's own formula elsewhere."""
    a, b = first[:, :, None], second[:, None, :]
    if plain:
        inter_w = torch.minimum(a[2], b[2]).sub_(torch.maximum(a[0], b[0])).clamp_(min=0)
        inter_h = torch.minimum(a[3], b[3]).sub_(torch.maximum(a[1], b[1])).clamp_(min=0)
        inter = inter_w.mul_(inter_h)
        return inter.div_((first_size[:, None] + second_size[None, :]).sub_(inter))
    inter_w = _cpp_min(a[2], b[2]).sub_(_cpp_max(a[0], b[0]))
    inter_h = _cpp_min(a[3], b[3]).sub_(_cpp_max(a[1], b[1]))
    intersecting = (inter_w > 0).logical_and_(inter_h > 0)
    inter = inter_w.mul_(inter_h)
    overlap = inter.div_((first_size[:, None] + second_size[None, :]).sub_(inter))
    return overlap.masked_fill_(intersecting.logical_not_(), 0.0)


def jaccard(first: torch.Tensor, first_size: torch.Tensor, second: torch.Tensor,
            second_size: torch.Tensor) -> torch.Tensor:
    """JaccardOverlap(first, second) of every `first` box [A, 4] with every `second` box [B, 4], in float32 as the
    fork: IntersectBBox's std::max / std::min in its argument order, 0 unless both sides are > 0 (NaN too).

    IntersectBBox's early "no intersection" test needs no pass of its own: where it holds, a side is
    negative (the std::min / std::max of its operands are bounded by the two coordinates it compares).
    """
    return _overlaps(first.T.contiguous(), first_size, second.T.contiguous(), second_size, plain=False)


def _float32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float32))


# Candidates NMS resolves one block at a time (their overlaps with each other as a small Python table).
NMS_BLOCK = 128


def nms_fast(boxes: torch.Tensor, sizes: torch.Tensor, scores: torch.Tensor, score_threshold: float,
             nms_threshold: float, eta: float, top_k: int) -> list[int]:
    """ApplyNMSFast: scores above the threshold, stable-sorted (ties keep the lower index), top_k, then keep a
    box unless its JaccardOverlap with a kept one is not <= the threshold (eta lowers the threshold after
    each keep while it is above 0.5); the threshold and eta are floats there.

    The fork's rows, in time proportional to kept x candidates: the candidates left are taken a block at
    a time, in order; within a block the fork's loop runs on the block's own overlaps and each candidate's
    largest overlap with the boxes kept before the block; then every later candidate's largest overlap
    takes in the block's kept boxes, and those above the (current) threshold are dropped at once, since
    the threshold only falls and the fork would drop them when it came to them.
    """
    candidates = torch.nonzero(scores > score_threshold).flatten()
    order = torch.sort(scores[candidates], descending=True, stable=True).indices
    candidates = candidates[order]
    if 0 <= top_k < candidates.numel():
        candidates = candidates[:top_k]
    chosen, chosen_sizes = boxes[candidates], sizes[candidates]
    plain = bool((chosen.abs() <= 1e38).all() and (chosen_sizes > 0).all())
    # The candidates left, in order: rows x1, y1, x2, y2, size and the largest overlap with a kept box so far
    # (NaN: never within a threshold); `positions` says which candidate each column is.
    left = torch.cat([chosen.T, chosen_sizes[None], torch.zeros_like(chosen_sizes)[None]])
    positions = torch.arange(candidates.numel(), device=chosen.device)
    threshold, eta = _float32(nms_threshold), _float32(eta)
    kept: list[int] = []
    while positions.numel():
        block, rest = left[:, :NMS_BLOCK], left[:, NMS_BLOCK:]
        among = _overlaps(block[:4], block[4], block[:4], block[4], plain).tolist()
        before = block[5].tolist()
        winners: list[int] = []
        for j in range(len(before)):
            if before[j] <= threshold and all(among[j][k] <= threshold for k in winners):
                winners.append(j)
                if eta < 1 and threshold > 0.5:
                    threshold = _float32(threshold * eta)  # float times float: exact in double, rounded once
        kept += positions[:NMS_BLOCK][winners].tolist()
        positions = positions[NMS_BLOCK:]
        if winners and positions.numel():
            won = block[:, winners]
            torch.maximum(rest[5], _overlaps(rest[:4], rest[4], won[:4], won[4], plain).amax(1), out=rest[5])
            within = rest[5] <= threshold
            rest, positions = rest[:, within], positions[within]
        left = rest
    return candidates[kept].tolist()


class DetectionOutput(nn.Module):
    """SSD's DetectionOutput: decode the boxes, per-class NMS, keep_top_k; rows of
    (image, label, score, xmin, ymin, xmax, ymax) in a [1, 1, K, 7] top, as the fork's CPU layer.

    K depends on the data, so this layer has no fixed-shape export (ONNX, torch.export,
    TorchScript) and cannot be captured in a CUDA graph. The confidences must already be
    probabilities (the layer applies no softmax). Boxes are not clipped. Ties: NMS ranks equal
    scores by prior index (the fork's stable sort); keep_top_k's ranking is an unstable std::sort
    in the fork, here equal scores keep the lower label first.

    TextBoxes++ (MhLiao/TextBoxes_plusplus) predicts more per prior: `extra` "polygon" (12 values: the box, then a
    quadrilateral's four corners as offsets from the prior's corners) or "rbox" (9: the box, then a rotated box's
    two points as offsets from the prior's centre and its log height). NMS still runs on the boxes; each row gains
    the decoded corners (x1, y1 .. x4, y4: 15 columns) or (x1, y1, x2, y2, h: 12 columns).
    """

    not_exportable = "its output size depends on the data"

    def __init__(self, num_classes: int, share_location: bool = True, background_label_id: int = 0,
                 nms_threshold: float = 0.3, top_k: int = -1, eta: float = 1.0, keep_top_k: int = -1,
                 code_type: str = "CORNER", variance_encoded_in_target: bool = False,
                 confidence_threshold: float = LOWEST_FLOAT, extra: str = "") -> None:
        super().__init__()
        self.extra = str(extra)  # "", "polygon" or "rbox" (TextBoxes++)
        self.num_classes, self.share_location = int(num_classes), bool(share_location)
        self.background_label_id = int(background_label_id)
        self.nms_threshold, self.top_k, self.eta = float(nms_threshold), int(top_k), float(eta)
        self.keep_top_k, self.code_type = int(keep_top_k), str(code_type)
        self.variance_encoded_in_target = bool(variance_encoded_in_target)
        self.confidence_threshold = float(confidence_threshold)

    def forward(self, loc: torch.Tensor, conf: torch.Tensor, prior: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        num = loc.shape[0]
        loc_classes = 1 if self.share_location else self.num_classes
        priors = prior.float().reshape(2, -1, 4)
        values = 4 + text_values(self.extra)
        loc = loc.float().reshape(num, priors.shape[1], loc_classes, values)
        conf = conf.float().reshape(num, priors.shape[1], self.num_classes)
        rows: list[list[float]] = []
        for image in range(num):
            decoded = decode_boxes(loc[image, ..., :4], priors[0, :, None, :], priors[1, :, None, :], self.code_type,
                                   self.variance_encoded_in_target)
            if self.extra:  # TextBoxes++: the decoded quadrilateral or rotated box rides along with each box
                decoded = torch.cat([decoded, decode_text(loc[image, ..., 4:], priors[0, :, None, :],
                                                          priors[1, :, None, :], self.extra)], dim=-1)
            sizes = box_sizes(decoded[..., :4])
            scores = conf[image]
            chosen: list[tuple[int, list[int]]] = []
            for label in range(self.num_classes):
                if label == self.background_label_id:
                    continue
                column = 0 if self.share_location else label
                chosen.append((label, nms_fast(decoded[:, column, :4], sizes[:, column], scores[:, label],
                                               self.confidence_threshold, self.nms_threshold, self.eta, self.top_k)))
            total = sum(len(indices) for _, indices in chosen)
            if -1 < self.keep_top_k < total:
                ranked = [(label, index) for label, indices in chosen for index in indices]
                labels = torch.tensor([label for label, _ in ranked], device=scores.device)
                values = scores[torch.tensor([index for _, index in ranked], device=scores.device), labels]
                order = torch.sort(values, descending=True, stable=True).indices[:self.keep_top_k].tolist()
                by_label: dict[int, list[int]] = {}
                for position in order:
                    label, index = ranked[position]
                    by_label.setdefault(label, []).append(index)
                chosen = sorted(by_label.items())
            for label, indices in chosen:
                if not indices:
                    continue
                index = torch.tensor(indices, device=decoded.device)
                column = 0 if self.share_location else label
                boxes = decoded[index, column]
                values = scores[index, label]
                rows.append(torch.cat([torch.full((len(indices), 1), float(image), device=decoded.device),
                                       torch.full((len(indices), 1), float(label), device=decoded.device),
                                       values[:, None], boxes], dim=1))
        width = 7 + text_values(self.extra)
        if not rows:
            # The fork's "no detections" top: one row of -1 per image, with the image's index.
            empty = torch.full((num, width), -1.0, device=loc.device)
            empty[:, 0] = torch.arange(num, dtype=torch.float32, device=loc.device)
            return empty.reshape(1, 1, num, width).to(prior.dtype)
        return torch.cat(rows).reshape(1, 1, -1, width).to(prior.dtype)

    def extra_repr(self) -> str:
        return _kwargs(num_classes=self.num_classes, share_location=self.share_location,
                       background_label_id=self.background_label_id, nms_threshold=self.nms_threshold,
                       top_k=self.top_k, eta=self.eta, keep_top_k=self.keep_top_k, code_type=self.code_type,
                       variance_encoded_in_target=self.variance_encoded_in_target,
                       confidence_threshold=self.confidence_threshold) + (f", extra={self.extra!r}" if self.extra else "")
