"""Torch modules for layer types other Caffe forks added (SegNet, ShuffleNet, SENets, caffe-fast-rcnn, synopsys).

The same contract as caffe2torch.modules (torch only, and caffe2torch.errors, so a standalone `model.py`
can embed them; `extra_repr` is the constructor's keyword arguments). Each follows its fork's CPU forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from caffe2torch.errors import CaffeError
from caffe2torch.modules import TableCache, _concrete, _float32_if_half, _kwargs, _tracing, add_epsilon, dims


class MaxUnpool(nn.Module):
    """SegNet's Upsample with a mask: a zero map of the output size, each value written at its mask index.

    The output size is upsample_layer.cpp's Reshape of the input it gets: `size` (upsample_h, upsample_w) when
    given, else the input's size times `scale` less `pad_out`. The mask is MAX pooling's second top, a flat
    h * W + w index into the output plane (stored as floats, as Caffe stores it). The fork skips no index; a
    negative one (an empty pooling window's -1) would write before the plane there, and is dropped here. An
    index past the plane (a mask from a pooling of a larger map) stops the fork with a fatal error: a CaffeError
    here, and dropped in a traced or exported graph, which cannot check the data.
    """

    def __init__(self, size: tuple | None = None, scale: tuple = (2, 2), pad_out: tuple = (0, 0),
                 layer: str = "") -> None:
        super().__init__()
        self.size = None if size is None else tuple(int(n) for n in size)
        self.scale, self.pad_out = tuple(int(n) for n in scale), tuple(int(n) for n in pad_out)
        self.layer = str(layer)  # the Caffe layer's name, for errors about the data

    def output_size(self, size: tuple) -> tuple:
        if self.size is not None:
            return self.size
        return tuple(n * s - p for n, s, p in zip(size, self.scale, self.pad_out))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return max_unpool(x, mask, self.output_size(dims(x, -2, -1)), self.layer)

    def extra_repr(self) -> str:
        return _kwargs(size=self.size, scale=self.scale, pad_out=self.pad_out, layer=self.layer)


@torch.fx.wrap
def max_unpool(x: torch.Tensor, mask: torch.Tensor, size: tuple, layer: str = "", kind: str = "Upsample") -> torch.Tensor:
    n, c = x.shape[:2]
    plane = size[0] * size[1]
    index = mask.reshape(n, c, -1).long()
    values = x.reshape(n, c, -1)
    if not _tracing() and x.device.type != "meta" and bool((index >= plane).any()):
        where = f"layer {layer!r} ({kind})" if layer else kind
        raise CaffeError(f"{where}: mask index {int(index.max())} is outside the {size[0]} x {size[1]} output (the "
                         f"mask of a larger pooling input?)")
    keep = (index >= 0) & (index < plane)
    out = x.new_zeros(n, c, plane + 1)
    # Dropped entries go to a spare last slot, cut off below (scatter needs a valid index).
    slot = torch.where(keep, index, torch.full_like(index, plane))
    out = out.scatter(2, slot, values)
    return out[:, :, :-1].reshape(n, c, size[0], size[1])


class Unpooling(nn.Module):
    """HyeonwooNoh/caffe's Unpooling (DeconvNet; deep image matting ports), unpooling_layer.cpp onto a zero map of
    the fixed `size` (unpool_size or unpool_h / unpool_w, which the fork requires). MAX with a mask (bottom 1,
    MAX pooling's second top) writes each value at its mask index (as SegNet's Upsample); MAX without one writes
    value (ph, pw) at (ph stride, pw stride), clipped to the map, a later value winning. AVE adds value / window
    size and TILE the value over each kernel window (window sizes count only the part inside the map), summed in
    the fork's order of source positions. Padding is 0 (the fork's CHECK)."""

    def __init__(self, method: str, kernel: tuple, stride: tuple, size: tuple, layer: str = "") -> None:
        super().__init__()
        self.method, self.layer = str(method), str(layer)
        self.kernel, self.stride = tuple(int(k) for k in kernel), tuple(int(s) for s in stride)
        self.size = tuple(int(n) for n in size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None and self.method == "MAX":
            return max_unpool(x, mask, self.size, self.layer, "Unpooling")
        return caffe_unpool(x, self.method, self.kernel, self.stride, self.size)

    def extra_repr(self) -> str:
        return _kwargs(method=self.method, kernel=self.kernel, stride=self.stride, size=self.size, layer=self.layer)


@torch.fx.wrap
def caffe_unpool(x: torch.Tensor, method: str, kernel: tuple, stride: tuple, size: tuple) -> torch.Tensor:
    """Unpooling without a mask: the input's values placed at stride steps of the `size` map (see Unpooling)."""
    height, width = dims(x, -2, -1)
    (kh, kw), (sh, sw), (uh, uw) = kernel, stride, size
    if method == "MAX":  # top[min(ph * s, U - 1)] = bottom[ph]: a later value wins where the clipping repeats a target
        rows = torch.clamp(torch.arange(height, device=x.device) * sh, max=uh - 1)
        cols = torch.clamp(torch.arange(width, device=x.device) * sw, max=uw - 1)
        keep_rows = torch.cat([rows[1:] != rows[:-1], torch.ones_like(rows[:1], dtype=torch.bool)])
        keep_cols = torch.cat([cols[1:] != cols[:-1], torch.ones_like(cols[:1], dtype=torch.bool)])
        index = rows[:, None] * uw + cols[None, :]
        index = torch.where(keep_rows[:, None] & keep_cols[None, :], index, torch.full_like(index, -1))
        return max_unpool(x, index.expand(x.shape), size, "", "Unpooling")  # long: exact past float16's 2048
    if method == "AVE":  # pool_size = (min(start + k, U) - start) ...: the window's part inside the map
        rows = torch.clamp(uh - torch.arange(height, device=x.device) * sh, max=kh).clamp(min=1)
        cols = torch.clamp(uw - torch.arange(width, device=x.device) * sw, max=kw).clamp(min=1)
        x = x / (rows[:, None] * cols[None, :]).to(x.dtype)
    # Each source value at (ph s, pw s) of a zero canvas; then one shifted copy per kernel offset, added from the
    # last offset to the first so that every output sums its sources in the fork's (ph, pw) order.
    n, c = x.shape[:2]
    spread = x.new_zeros(n, c, height, sh, width, sw)
    spread[:, :, :, 0, :, 0] = x
    spread = spread.reshape(n, c, height * sh, width * sw)
    out = x.new_zeros(n, c, uh, uw)
    for dy in reversed(range(kh)):
        for dx in reversed(range(kw)):
            out = out + F.pad(spread, (dx, uw - dx - width * sw, dy, uh - dy - height * sh))
    return out


class LabelSpecificAdd(nn.Module):
    """happynear's LabelSpecificAdd (AM-Softmax, label_specific_add_layer.cpp): in training each sample's score of
    its ground-truth class (the label truncated to an integer) gains `bias` where it exceeds -bias; at test the scores
    pass unchanged (the fork's transform_test applies in its TRAIN phase only). Bottoms: scores [N, ...], labels
    (give them as integers or float32: float16 holds class numbers exactly only up to 2048, bfloat16 up to 256)."""

    def __init__(self, bias: float) -> None:
        super().__init__()
        self.bias = float(bias)

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        flat = x.reshape(x.shape[0], -1)
        index = label.reshape(-1, 1).long()  # static_cast<int>: toward zero
        if not _tracing() and x.device.type != "meta":
            # The fork reads past its label buffer or writes into a neighbour's scores: refused here.
            if index.shape[0] != flat.shape[0]:
                raise CaffeError(f"LabelSpecificAdd: {index.shape[0]} labels for {flat.shape[0]} samples")
            if bool(((index < 0) | (index >= flat.shape[1])).any()):
                raise CaffeError(f"LabelSpecificAdd: a label outside the {flat.shape[1]} classes (labels "
                                 f"{int(index.min())} to {int(index.max())})")
        score = flat.gather(1, index)
        bias = torch.full((), self.bias, dtype=x.dtype, device=x.device)  # Dtype bias_: float32 for a float net
        return flat.scatter(1, index, torch.where(score > -bias, score + bias, score)).reshape(x.shape)

    def extra_repr(self) -> str:
        return _kwargs(bias=self.bias)


class Flip(nn.Module):
    """happynear/caffe-windows' Flip: the image reversed along its width (flip_width, default) and/or height."""

    def __init__(self, width: bool = True, height: bool = False) -> None:
        super().__init__()
        self.width, self.height = bool(width), bool(height)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axes = [axis for axis, on in ((-1, self.width), (-2, self.height)) if on]
        return torch.flip(x, axes) if axes else x.clone()

    def extra_repr(self) -> str:
        return _kwargs(width=self.width, height=self.height)


class DropoutScaledAtTest(nn.Module):
    """caffe-fast-rcnn's Dropout with `scale_train: false`: training drops without rescaling, test multiplies
    by `factor` (the fork's float 1 / scale, i.e. 1 - ratio)."""

    def __init__(self, ratio: float, factor: float) -> None:
        super().__init__()
        self.ratio, self.factor = float(ratio), float(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return x * torch.bernoulli(torch.full_like(x, 1.0 - self.ratio))
        return x * self.factor

    def extra_repr(self) -> str:
        return _kwargs(ratio=self.ratio, factor=self.factor)


class BoundedReLU(nn.Module):
    """synopsys-caffe's ReLU with relu6 / maximum / minimum: max(x, 0) + negative_slope * min(x, 0), NaN made 0,
    then min(., upper) and then max(., lower) where given (`upper` folds relu6's 6 and maximum)."""

    def __init__(self, negative_slope: float = 0.0, upper: float | None = None, lower: float | None = None) -> None:
        super().__init__()
        self.negative_slope = float(negative_slope)
        self.upper = None if upper is None else float(upper)
        self.lower = None if lower is None else float(lower)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.leaky_relu(x, self.negative_slope) if self.negative_slope else torch.relu(x)
        y = torch.nan_to_num(y, nan=0.0, posinf=float("inf"), neginf=float("-inf"))
        if self.upper is not None:
            y = torch.clamp(y, max=self.upper)
        if self.lower is not None:
            y = torch.clamp(y, min=self.lower)
        return y

    def extra_repr(self) -> str:
        return _kwargs(negative_slope=self.negative_slope, upper=self.upper, lower=self.lower)


class BatchStatNorm(nn.Module):
    """SegNet's (and DeconvNet's) BN in LEARN mode: normalised with the batch's own statistics, in every phase.

    mean = E[x], var = E[x^2] - E[x]^2 over batch and positions (the fork's formula), then
    (x - mean) / sqrt(var + eps) * scale + shift. At batch size 1 this is instance norm. With `tops` 2 or 3 it also
    returns the batch mean and variance (before eps) as [1, C, 1, 1], DeconvNet's second and third tops.
    """

    def __init__(self, channels: int, eps: float = 1e-9, tops: int = 1) -> None:
        super().__init__()
        self.channels, self.eps, self.tops = int(channels), float(eps), int(tops)
        self.weight = nn.Parameter(torch.ones(self.channels))
        self.bias = nn.Parameter(torch.zeros(self.channels))

    def forward(self, x: torch.Tensor):
        work = _float32_if_half(x)
        per_channel = (1, -1) + (1,) * (x.dim() - 2)
        spatial = list(range(2, x.dim()))
        mean = (work.mean(spatial) if spatial else work).mean(0)
        square = (work.square().mean(spatial) if spatial else work.square()).mean(0)
        variance = square - mean.square()
        y = (work - mean.reshape(per_channel)) / torch.sqrt(add_epsilon(variance, self.eps)).reshape(per_channel)
        y = y * self.weight.to(work.dtype).reshape(per_channel) + self.bias.to(work.dtype).reshape(per_channel)
        if self.tops == 1:
            return y.to(x.dtype)
        stats = (mean.reshape(per_channel).to(x.dtype), variance.reshape(per_channel).to(x.dtype))
        return (y.to(x.dtype),) + stats[:self.tops - 1]

    def extra_repr(self) -> str:
        return _kwargs(channels=self.channels, eps=self.eps, tops=self.tops)


class ShuffleChannel(nn.Module):
    """ShuffleNet's channel shuffle: channel i * (C / group) + j moves to j * group + i."""

    def __init__(self, group: int) -> None:
        super().__init__()
        self.group = int(group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        rest = x.shape[2:]
        return x.reshape(n, self.group, c // self.group, *rest).transpose(1, 2).reshape(n, c, *rest)

    def extra_repr(self) -> str:
        return _kwargs(group=self.group)


class Axpy(nn.Module):
    """SENet ports' Axpy: a * x + y, with a per-channel scale a of shape [N, C] (or [N, C, 1, 1])."""

    def forward(self, scale: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        scale = scale.reshape(scale.shape[:2] + (1,) * (x.dim() - 2))
        return y + scale * x


def resize_table(size_in: int, size_out: int, mode: str, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """synopsys-caffe's compute_interpolation_weights along one axis: lower and upper source index, lerp.

    scale = (in - 1) / (out - 1) with align_corners (out > 1), else in / out, in float32; the source
    position is i * scale, or (i + 0.5) * scale - 0.5 for the half-pixel modes (pytorch_half_pixel: -0.5
    for a single output), each step rounded to float32 as the fork's float arithmetic.
    """
    n_in = torch.full((), size_in, dtype=torch.float32, device=device)
    n_out = torch.full((), size_out, dtype=torch.float32, device=device)
    if mode == "align_corners" and size_out > 1:
        scale = (n_in - 1) / (n_out - 1)
    else:
        scale = n_in / n_out
    i = torch.arange(size_out, dtype=torch.float32, device=device)
    if mode in ("half_pixel_centers", "pytorch_half_pixel"):
        position = (i + 0.5) * scale - 0.5
        if mode == "pytorch_half_pixel" and size_out == 1:
            position = torch.full_like(position, -0.5)
    else:
        position = i * scale
    floor = torch.floor(position)
    lower = torch.clamp(floor.long(), min=0)
    upper = torch.clamp(torch.ceil(position).long(), max=size_in - 1)
    return lower, upper, position - floor


def resized_size(size: tuple, output_size: tuple, scale: tuple) -> tuple:
    """The fork's top size: output_height / output_width where given, else floor(size * scale) in float32."""
    return tuple(given if given is not None else
                 int(torch.floor(torch.full((), n, dtype=torch.float32) * torch.tensor(f, dtype=torch.float32)))
                 for n, given, f in zip(size, output_size, scale))


class _TensorFlowResize(nn.Module):
    """What synopsys-caffe's two resize layers share: the output size `output_size` where given (None: floor(size *
    scale) in float32, of the input it gets), a coordinate `mode` of the layer's MODES, and `layout` "NHWC" to read
    and write N x H x W x C blobs (the fork's default data_format)."""

    MODES: tuple = ()

    def __init__(self, output_size: tuple = (None, None), scale: tuple = (1.0, 1.0), mode: str = "asymmetric",
                 layout: str = "NCHW") -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"unknown {type(self).__name__} mode {mode!r}: expected one of {self.MODES}")
        if layout not in ("NCHW", "NHWC"):
            raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
        self.output_size = tuple(None if n is None else int(n) for n in output_size)
        self.scale = tuple(float(f) for f in scale)
        self.mode, self.layout = mode, layout

    @property
    def fixed_export_sizes(self) -> str:
        """Why an export keeps the height and width of its example ("" where it need not): a scaled size is a
        float32 product rounded down, which an export cannot keep symbolic."""
        return "" if None not in self.output_size else "its output size is the input's times a float scale"

    def extra_repr(self) -> str:
        return _kwargs(output_size=self.output_size, scale=self.scale, mode=self.mode, layout=self.layout)


class ResizeBilinear(_TensorFlowResize):
    """synopsys-caffe's ResizeBilinear (TensorFlow's resize_bilinear) on N x C x H x W, at any input size.

    Each output is top + (bottom - top) * y_lerp, where top and bottom are left + (right - left) * x_lerp of the
    rows at the lower and upper source index: the fork's compute_lerp, op for op in float32. `mode`: "asymmetric"
    (TensorFlow's default), "align_corners", "half_pixel_centers" or "pytorch_half_pixel".
    """

    MODES = ("asymmetric", "align_corners", "half_pixel_centers", "pytorch_half_pixel")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resize_bilinear(x, self.output_size, self.scale, self.mode, self.layout)


def _resize_tables(size: tuple, out: tuple, mode: str, device, dtype) -> dict:
    tables = {}
    for axis, n_in, n_out in zip("yx", size, out):
        lower, upper, lerp = resize_table(n_in, n_out, mode, device)
        tables[axis] = (lower, upper, (lerp.reshape(-1, 1) if axis == "y" else lerp).to(dtype))
    return tables


@torch.fx.wrap
def resize_bilinear(x: torch.Tensor, output_size: tuple, scale: tuple, mode: str, layout: str) -> torch.Tensor:
    if layout == "NHWC":
        x = x.permute(0, 3, 1, 2)
    size = dims(x, 2, 3)
    out = resized_size(size, output_size, scale)
    if _concrete(*out) and min(out) <= 0:  # the converter's check, for a net run at another size
        raise ValueError(f"ResizeBilinear: a {size[0]} x {size[1]} input scaled by {scale} leaves no output")
    tables = TableCache.get(("resize_bilinear", size, out, mode, x.device, x.dtype),
                            lambda: _resize_tables(size, out, mode, x.device, x.dtype), x, *size, *out)
    (y_lower, y_upper, y_lerp), (x_lower, x_upper, x_lerp) = tables["y"], tables["x"]

    def across(rows: torch.Tensor) -> torch.Tensor:
        left, right = rows.index_select(3, x_lower), rows.index_select(3, x_upper)
        return left + (right - left) * x_lerp

    top = across(x.index_select(2, y_lower))
    bottom = across(x.index_select(2, y_upper))
    y = top + (bottom - top) * y_lerp
    return y.permute(0, 2, 3, 1).contiguous() if layout == "NHWC" else y


class ResizeNearest(_TensorFlowResize):
    """synopsys-caffe's ResizeNearestNeighbor (TensorFlow's resize_nearest_neighbor) on N x C x H x W (or NHWC).

    The output size follows ResizeBilinear's rule; each output row h reads input row in_h, computed in float32 from
    the scale in / out ((in - 1) / (out - 1) with align_corners): floorf(h * scale) (asymmetric), roundf(h * scale)
    (align_corners), floorf((h + 0.5f) * scale) (half_pixel_centers) or floorf((h + 0.5f) * scale - 0.5) with the
    0.5 subtracted in double (half_pixel_onnx), kept inside the input; columns alike."""

    MODES = ("asymmetric", "align_corners", "half_pixel_centers", "half_pixel_onnx")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resize_nearest(x, self.output_size, self.scale, self.mode, self.layout)


def nearest_sources(size: int, out: int, mode: str, device=None) -> torch.Tensor:
    """The input index each of `out` outputs reads along one axis (resize_nearest_neighbor_layer.cpp)."""
    f32 = torch.float32
    if mode == "align_corners" and out > 1:  # CalculateResizeScale, a float quotient
        scale = torch.tensor(size - 1, dtype=f32, device=device) / torch.tensor(out - 1, dtype=f32, device=device)
    else:
        scale = torch.tensor(size, dtype=f32, device=device) / torch.tensor(out, dtype=f32, device=device)
    steps = torch.arange(out, dtype=f32, device=device)
    if mode == "half_pixel_onnx":  # the literal 0.5 is a double; floorf takes the difference back as a float
        source = torch.floor(((steps + 0.5) * scale).double().sub(0.5).float())
    elif mode == "half_pixel_centers":
        source = torch.floor((steps + 0.5) * scale)
    elif mode == "align_corners":  # roundf: halves away from zero (the values are not negative)
        product = (steps * scale).double()
        source = torch.floor(product) + (product - torch.floor(product) >= 0.5).double()
    else:
        source = torch.floor(steps * scale)
    return source.long().clamp(0, size - 1)


@torch.fx.wrap
def resize_nearest(x: torch.Tensor, output_size: tuple, scale: tuple, mode: str, layout: str) -> torch.Tensor:
    if layout == "NHWC":
        x = x.permute(0, 3, 1, 2)
    size = dims(x, 2, 3)
    out = resized_size(size, output_size, scale)
    if _concrete(*out) and min(out) <= 0:  # the converter's check, for a net run at another size
        raise ValueError(f"ResizeNearestNeighbor: a {size[0]} x {size[1]} input scaled by {scale} leaves no output")
    rows, cols = TableCache.get(("resize_nearest", size, out, mode, x.device),
                                lambda: (nearest_sources(size[0], out[0], mode, x.device),
                                         nearest_sources(size[1], out[1], mode, x.device)), x, *size, *out)
    y = x.index_select(2, rows).index_select(3, cols)
    return y.permute(0, 2, 3, 1).contiguous() if layout == "NHWC" else y


class Squeeze(nn.Module):
    """synopsys-caffe's Squeeze (squeeze_layer.cpp): the blob without its axes of size 1, those of `axes` (each must
    be 1, as the fork CHECKs) or, with none given, all of them, recomputed for the input it gets."""

    def __init__(self, axes: tuple = ()) -> None:
        super().__init__()
        self.axes = tuple(int(axis) for axis in axes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.axes:
            return x.squeeze()
        if not _tracing() and any(x.shape[axis] != 1 for axis in self.axes):
            raise CaffeError(f"Squeeze: axes {self.axes} of a {tuple(x.shape)} blob are not all of size 1")
        return x.squeeze(self.axes)

    def extra_repr(self) -> str:
        return _kwargs(axes=self.axes)
