"""Caffe-specific torch modules: only where Caffe's meaning differs from every torch.nn module.

This file imports nothing but torch and math: a converted folder's standalone `model.py` embeds
the source of the classes it uses. Every forward uses only differentiable, exportable, dtype-safe
torch ops on shapes fixed at conversion time (the batch size stays free), so a converted net
trains, traces (fx, torch.export, jit.trace, ONNX) and runs in half precision. Each `extra_repr`
is exactly the constructor's keyword arguments, so `print(net)` shows the hyper-parameters and the
code generator writes `ClassName(<extra_repr>)`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def caffe_pooled_size(size: int, kernel: int, stride: int, pad: int, clip: bool, ceil: bool = True,
                      pad_end: int | None = None) -> int:
    """Caffe's PoolingLayer::Reshape: ceil((size + 2 pad - kernel) / stride) + 1, then the padding clip.

    The clip drops a last window that would start at or beyond `size + pad`; Caffe applies it to
    both axes whenever either axis is padded. Without padding a window may lie wholly outside.
    `pad_end` pads the far side differently (synopsys-caffe's pad_b / pad_r; `pad` is then the near side).
    """
    span = size + pad + (pad if pad_end is None else pad_end) - kernel
    out = (-(-span // stride) if ceil else span // stride) + 1
    if clip and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def greedy_nms(count: int, suppresses, limit: int = -1, device=None) -> list[int]:
    """Greedy non-maximum suppression over `count` candidates sorted best first: keep the best one left,
    drop every later one `suppresses(best, rest)` marks (a bool tensor over the index tensor `rest`), repeat.
    Stops after `limit` kept (-1: none); costs kept x candidates, where a full overlap matrix costs candidates^2."""
    kept: list[int] = []
    remaining = torch.arange(count, device=device)
    while remaining.numel() and len(kept) != limit:
        best, rest = remaining[0], remaining[1:]
        kept.append(int(best))
        remaining = rest[~suppresses(best, rest)]
    return kept


def _tracing() -> bool:
    """Whether forward runs under a tracer or compiler (fx, TorchScript, dynamo, torch.export), where a check of
    the data's values cannot run (its graph records the computation alone)."""
    tracer = torch.fx._symbolic_trace
    fx_tracing = getattr(tracer, "is_fx_symbolic_tracing", tracer.is_fx_tracing)  # the latter warns in newer torch
    return bool(torch.jit.is_tracing() or torch.compiler.is_compiling() or fx_tracing())


def _literal(value) -> str:
    """Python source for a value: repr, except infinities and NaN, whose repr is no Python expression."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"float({str(value)!r})"
    if isinstance(value, tuple):
        items = [_literal(item) for item in value]
        return f"({items[0]},)" if len(items) == 1 else "(" + ", ".join(items) + ")"
    return repr(value)


def _kwargs(**values) -> str:
    return ", ".join(f"{name}={_literal(value)}" for name, value in values.items())


def _float32_if_half(x: torch.Tensor) -> torch.Tensor:
    """float16 / bfloat16 as float32, for sums over many values; other dtypes as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class Pool2d(nn.Module):
    """Caffe MAX / AVE pooling on a fixed H x W, window layout and divisors as Caffe's CPU layer.

    The input is padded (or cropped) to exactly the rows and columns the windows span, so the
    pooling itself has no padding and no ceil mode. MAX: NaN never wins and an empty window gives
    the dtype's lowest value (Caffe's -FLT_MAX in float32). AVE: the sum over the window clipped
    to the image, divided by Caffe's count (padding counts, the ceil overhang does not; 0 for an
    empty window, so 0/0 = NaN as in Caffe). The divisor is kernel area times a precomputed
    per-position factor, which is exactly 1 wherever Caffe divides by the full kernel area.
    With `mask` (MAX only) it also returns Caffe's second top: each maximum's flat h * W + w
    index in the input plane, -1 where Caffe's window found nothing above -FLT_MAX; float32
    as Caffe stores it (exact up to 2^24 positions), whatever the input's dtype.
    """

    def __init__(self, method: str, kernel: tuple, stride: tuple, pad: tuple, input_size: tuple,
                 ceil: bool = True, mask: bool = False, pad_end: tuple | None = None) -> None:
        super().__init__()
        if method not in ("MAX", "AVE", "AVE_EXC_PAD") or mask and method != "MAX":
            raise ValueError(f"pooling method must be 'MAX', 'AVE' or 'AVE_EXC_PAD' (a mask needs MAX), got {method!r}")
        self.method, self.ceil, self.mask = method, bool(ceil), bool(mask)
        self.kernel, self.stride = tuple(int(k) for k in kernel), tuple(int(s) for s in stride)
        self.pad, self.input_size = tuple(int(p) for p in pad), tuple(int(n) for n in input_size)
        # The bottom and right padding where it differs from the top and left (synopsys-caffe's pad_b, pad_r).
        self.pad_end = self.pad if pad_end is None else tuple(int(p) for p in pad_end)
        clip = any(self.pad) or any(self.pad_end)
        self.output_size = tuple(caffe_pooled_size(n, k, s, p, clip, self.ceil, e) for n, k, s, p, e in
                                 zip(self.input_size, self.kernel, self.stride, self.pad, self.pad_end))
        # Windows that start at or past size + pad hold nothing (possible without padding when the
        # stride exceeds the kernel): they come last and are appended as constants, so the input is
        # never padded out to them (a stride of 99999 would otherwise pad to 99999 rows).
        vh, vw = (min(out, -(-(n + p + e) // s)) for out, n, p, e, s in zip(self.output_size, self.input_size,
                                                                            self.pad, self.pad_end, self.stride))
        self.empty = (self.output_size[0] - vh, self.output_size[1] - vw)
        # A window reaching past the padded input (a kernel longer than it, which Caffe takes with a longer
        # stride still) is cut there: the same values (MAX), the same sum and count (AVE), and no padding out to
        # the kernel. A stride with one window along its axis is never taken (and may exceed torch's int).
        self.window = tuple(min(k, n + p + e) for k, n, p, e in zip(self.kernel, self.input_size, self.pad,
                                                                    self.pad_end))
        self.step = tuple(s if valid > 1 else 1 for s, valid in zip(self.stride, (vh, vw)))
        (ph, pw), (kh, kw), (sh, sw) = self.pad, self.window, self.step
        (h, w) = self.input_size
        # F.pad amounts (left, right, top, bottom) for the other windows; negative ones crop rows no window reaches.
        self.edges = (pw, (vw - 1) * sw + kw - pw - w, ph, (vh - 1) * sh + kh - ph - h)
        self.rescale = False
        if method != "MAX":
            counts = []
            for k, s, p, e, n, out in zip(self.window, self.stride, self.pad, self.pad_end, self.input_size,
                                          self.output_size):
                start = torch.arange(out, dtype=torch.float64) * s - p
                if method == "AVE":
                    counts.append(torch.clamp(start + k, max=n + e) - start)
                else:  # padding never counts
                    counts.append(torch.clamp(torch.clamp(start + k, max=n) - torch.clamp(start, min=0), min=0))
            factor = (kh * kw) / (counts[0][:, None] * counts[1][None, :])  # kk / 0 = inf: Caffe's 0 / 0 = NaN
            self.rescale = bool((factor != 1).any())
            self.register_buffer("factor", factor.float(), persistent=False)

    def forward(self, x: torch.Tensor):
        if self.method == "MAX":
            x = torch.nan_to_num(x, nan=-math.inf, posinf=math.inf, neginf=-math.inf)
            if any(self.edges):
                x = F.pad(x, self.edges, value=-math.inf)
            if self.mask:
                return self._with_mask(x)
            y = F.max_pool2d(x, self.window, self.step)
            if any(self.empty):
                y = F.pad(y, (0, self.empty[1], 0, self.empty[0]), value=-math.inf)
            return torch.nan_to_num(y, nan=0.0, posinf=math.inf, neginf=None)  # -inf: the dtype's lowest
        if any(self.edges):
            x = F.pad(x, self.edges)
        y = F.avg_pool2d(x, self.window, self.step)
        if any(self.empty):
            y = F.pad(y, (0, self.empty[1], 0, self.empty[0]))  # a sum of nothing, then 0/0 or 0/-n as in Caffe
        return y * self.factor.to(y.dtype) if self.rescale else y

    def _with_mask(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # torch's first maximum is Caffe's (a strict > scan from the window's top left).
        y, index = F.max_pool2d(x, self.window, self.step, return_indices=True)
        width = x.shape[-1]
        mask = ((index // width - self.pad[0]) * self.input_size[1] + index % width - self.pad[1]).float()
        if any(self.empty):
            y = F.pad(y, (0, self.empty[1], 0, self.empty[0]), value=-math.inf)
            mask = F.pad(mask, (0, self.empty[1], 0, self.empty[0]), value=-1.0)
        lowest = torch.finfo(y.dtype).min
        mask = torch.where(y <= lowest, torch.full_like(mask, -1.0), mask)  # nothing beat Caffe's -FLT_MAX start
        return torch.nan_to_num(y, nan=0.0, posinf=math.inf, neginf=None), mask

    def extra_repr(self) -> str:
        extra = ", mask=True" if self.mask else ""
        extra += f", pad_end={self.pad_end!r}" if self.pad_end != self.pad else ""
        return _kwargs(method=self.method, kernel=self.kernel, stride=self.stride, pad=self.pad,
                       input_size=self.input_size, ceil=self.ceil) + extra


def interp_table(size_in: int, size_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and weights along one axis, in float32 exactly as the fork's caffe_cpu_interp2.

    ratio = float(size_in - 1) / (size_out - 1) (0 for one output), position = ratio * i in
    float32, index = truncation, weight of the next sample = position - index; the next sample
    is the same one at the last row/column.
    """
    if size_out > 1:
        ratio = torch.tensor(size_in - 1, dtype=torch.float32) / torch.tensor(size_out - 1, dtype=torch.float32)
    else:
        ratio = torch.tensor(0.0)
    position = ratio * torch.arange(size_out, dtype=torch.float32)
    index = position.to(torch.int64)
    next_index = index + (index < size_in - 1).to(torch.int64)
    far = position - index.to(torch.float32)
    return index, next_index, 1.0 - far, far


class Interp(nn.Module):
    """The PSPNet fork's Interp: crop by -pad_beg (both axes), then corner-aligned bilinear resize.

    Evaluates Caffe's h0 * (w0*p00 + w1*p01) + h1 * (w0*p10 + w1*p11) with separate float32
    multiplies and adds in that order, so float32 results equal the fork's bit for bit.
    """

    def __init__(self, input_size: tuple, output_size: tuple, pad_beg: int = 0, pad_end: int = 0) -> None:
        super().__init__()
        self.input_size, self.output_size = tuple(int(n) for n in input_size), tuple(int(n) for n in output_size)
        self.pad_beg, self.pad_end = int(pad_beg), int(pad_end)
        self.cropped = tuple(n + self.pad_beg + self.pad_end for n in self.input_size)
        self.copy = self.cropped == self.output_size
        # Shrinking rows: interpolate only the source rows that are used.
        self.rows_first = 2 * self.output_size[0] < self.cropped[0]
        for axis, n_in, n_out in zip("hw", self.cropped, self.output_size):
            index, next_index, near, far = interp_table(n_in, n_out)
            shape = (-1, 1) if axis == "h" else (-1,)
            self.register_buffer(f"{axis}_index", index, persistent=False)
            self.register_buffer(f"{axis}_next", next_index, persistent=False)
            self.register_buffer(f"{axis}_near", near.reshape(shape), persistent=False)
            self.register_buffer(f"{axis}_far", far.reshape(shape), persistent=False)

    def _horizontal(self, rows: torch.Tensor) -> torch.Tensor:
        near, far = self.w_near.to(rows.dtype), self.w_far.to(rows.dtype)  # tables follow the input's dtype
        return rows.index_select(3, self.w_index) * near + rows.index_select(3, self.w_next) * far

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = -self.pad_beg
        if start or self.pad_end:
            x = x[:, :, start:start + self.cropped[0], start:start + self.cropped[1]]
        if self.copy:
            return x.clone()
        if self.rows_first:
            near, far = self._horizontal(x.index_select(2, self.h_index)), self._horizontal(x.index_select(2, self.h_next))
        else:
            per_row = self._horizontal(x)
            near, far = per_row.index_select(2, self.h_index), per_row.index_select(2, self.h_next)
        return near * self.h_near.to(near.dtype) + far * self.h_far.to(far.dtype)

    def extra_repr(self) -> str:
        return _kwargs(input_size=self.input_size, output_size=self.output_size, pad_beg=self.pad_beg,
                       pad_end=self.pad_end)


class Eltwise(nn.Module):
    """Caffe Eltwise over two or more bottoms.

    SUM: coeff_0 * x_0 + coeff_1 * x_1 + ... accumulated in bottom order (Caffe's axpy loop).
    PROD: multiplied in bottom order. MAX: a > b ? a : b, then a later bottom only if strictly
    greater, which decides where NaNs end up as Caffe does (torch.maximum would spread every NaN).
    """

    def __init__(self, operation: str, coeffs: tuple = ()) -> None:
        super().__init__()
        if operation not in ("SUM", "PROD", "MAX"):
            raise ValueError(f"Eltwise operation must be SUM, PROD or MAX, got {operation!r}")
        self.operation, self.coeffs = operation, tuple(float(c) for c in coeffs)

    def forward(self, *bottoms: torch.Tensor) -> torch.Tensor:
        if self.operation == "SUM":
            coeffs = self.coeffs or (1.0,) * len(bottoms)
            total = bottoms[0] if coeffs[0] == 1.0 else bottoms[0] * coeffs[0]
            for coeff, bottom in zip(coeffs[1:], bottoms[1:]):
                total = total + bottom if coeff == 1.0 else torch.add(total, bottom, alpha=coeff)
            return total
        if self.operation == "PROD":
            total = bottoms[0] * bottoms[1]
            for bottom in bottoms[2:]:
                total = total * bottom
            return total
        running = torch.where(bottoms[0] > bottoms[1], bottoms[0], bottoms[1])
        for bottom in bottoms[2:]:
            running = torch.where(bottom > running, bottom, running)
        return running

    def extra_repr(self) -> str:
        return _kwargs(operation=self.operation, coeffs=self.coeffs)


class Scale(nn.Module):
    """Caffe Scale (y = x * s [+ b]) and Bias (y = x + b) along axes axis .. axis + k of the bottom.

    `shape` is the learned blob's shape (None when the scale comes from a second bottom, or for a
    Bias layer); `trailing` is how many bottom axes follow the operand (it broadcasts over them).
    """

    def __init__(self, shape: tuple | None, bias_shape: tuple | None = None, trailing: int = 0,
                 bias_trailing: int = 0) -> None:
        super().__init__()
        self.shape = None if shape is None else tuple(int(d) for d in shape)
        self.bias_shape = None if bias_shape is None else tuple(int(d) for d in bias_shape)
        self.trailing, self.bias_trailing = int(trailing), int(bias_trailing)
        self.register_parameter("weight", None if shape is None else nn.Parameter(torch.ones(self.shape)))
        self.register_parameter("bias", None if bias_shape is None else nn.Parameter(torch.zeros(self.bias_shape)))

    def forward(self, x: torch.Tensor, operand: torch.Tensor | None = None) -> torch.Tensor:
        scale = self.weight if operand is None else operand
        if scale is not None:
            x = x * scale[(...,) + (None,) * self.trailing]
        if self.bias is not None:
            x = x + self.bias[(...,) + (None,) * self.bias_trailing]
        return x

    def extra_repr(self) -> str:
        return _kwargs(shape=self.shape, bias_shape=self.bias_shape, trailing=self.trailing,
                       bias_trailing=self.bias_trailing)


class AddOperand(nn.Module):
    """Caffe Bias with a second bottom: y = x + b, b covering the bottom axes before the last `trailing`."""

    def __init__(self, trailing: int = 0) -> None:
        super().__init__()
        self.trailing = int(trailing)

    def forward(self, x: torch.Tensor, operand: torch.Tensor) -> torch.Tensor:
        return x + operand[(...,) + (None,) * self.trailing]

    def extra_repr(self) -> str:
        return _kwargs(trailing=self.trailing)


def _wide(function, x: torch.Tensor) -> torch.Tensor:
    """Evaluate in float64 and round once: the correctly rounded result Caffe's libm gives in float32."""
    return function(x.double()).to(x.dtype)


class Power(nn.Module):
    """Caffe Power: (shift + scale * x) ^ power; a constant when power * scale == 0, as Caffe fills it."""

    def __init__(self, power: float = 1.0, scale: float = 1.0, shift: float = 0.0, constant: float | None = None) -> None:
        super().__init__()
        self.power, self.scale, self.shift, self.constant = float(power), float(scale), float(shift), constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.constant is not None:
            return torch.full_like(x, self.constant)
        if self.scale != 1.0:
            x = x * self.scale
        if self.shift != 0.0:
            x = x + self.shift
        if self.power != 1.0:
            x = _wide(lambda wide: torch.pow(wide, self.power), x)
        return x

    def extra_repr(self) -> str:
        return _kwargs(power=self.power, scale=self.scale, shift=self.shift, constant=self.constant)


class Exp(nn.Module):
    """Caffe Exp: outer_scale * exp(inner_scale * x) (base and shift already folded into the two scales).

    `zero_output` reproduces the fork's NaN outer factor for base e with a fractional shift, which
    OpenBLAS's sscal writes as zeros.
    """

    def __init__(self, inner_scale: float = 1.0, outer_scale: float = 1.0, zero_output: bool = False) -> None:
        super().__init__()
        self.inner_scale, self.outer_scale, self.zero_output = float(inner_scale), float(outer_scale), bool(zero_output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.zero_output:
            return torch.zeros_like(x)
        y = _wide(torch.exp, x if self.inner_scale == 1.0 else x * self.inner_scale)
        return y if self.outer_scale == 1.0 else y * self.outer_scale

    def extra_repr(self) -> str:
        return _kwargs(inner_scale=self.inner_scale, outer_scale=self.outer_scale, zero_output=self.zero_output)


class Log(nn.Module):
    """Caffe Log: log(shift + scale * x) * base_scale (base_scale = 1 / log(base)), step by step."""

    def __init__(self, scale: float = 1.0, shift: float = 0.0, base_scale: float = 1.0) -> None:
        super().__init__()
        self.scale, self.shift, self.base_scale = float(scale), float(shift), float(base_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            x = x * self.scale
        if self.shift != 0.0:
            x = x + self.shift
        x = _wide(torch.log, x)
        return x if self.base_scale == 1.0 else x * self.base_scale

    def extra_repr(self) -> str:
        return _kwargs(scale=self.scale, shift=self.shift, base_scale=self.base_scale)


class AbsVal(nn.Module):
    """Caffe AbsVal: |x|."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.abs(x)


class Threshold(nn.Module):
    """Caffe Threshold: 1 where x > threshold, else 0 (NaN gives 0); not torch.nn.Threshold, which keeps x."""

    def __init__(self, threshold: float = 0.0) -> None:
        super().__init__()
        self.threshold = float(threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x > self.threshold).to(x.dtype)

    def extra_repr(self) -> str:
        return _kwargs(threshold=self.threshold)


class Concat(nn.Module):
    """Caffe Concat along one axis."""

    def __init__(self, axis: int = 1) -> None:
        super().__init__()
        self.axis = int(axis)

    def forward(self, *bottoms: torch.Tensor) -> torch.Tensor:
        return torch.cat(bottoms, dim=self.axis) if len(bottoms) > 1 else bottoms[0]

    def extra_repr(self) -> str:
        return _kwargs(axis=self.axis)


class Slice(nn.Module):
    """Caffe Slice: consecutive pieces of one axis, one per top."""

    def __init__(self, axis: int, sizes: tuple) -> None:
        super().__init__()
        self.axis, self.sizes = int(axis), tuple(int(s) for s in sizes)

    def forward(self, x: torch.Tensor):
        return tuple(torch.split(x, list(self.sizes), dim=self.axis)) if len(self.sizes) > 1 else x

    def extra_repr(self) -> str:
        return _kwargs(axis=self.axis, sizes=self.sizes)


class Split(nn.Module):
    """Caffe Split: every top is the bottom itself."""

    def __init__(self, tops: int = 2) -> None:
        super().__init__()
        self.tops = int(tops)

    def forward(self, x: torch.Tensor):
        return (x,) * self.tops if self.tops > 1 else x

    def extra_repr(self) -> str:
        return _kwargs(tops=self.tops)


class Crop(nn.Module):
    """Upstream Caffe Crop: axes from `axis` on take the reference bottom's sizes, starting at `offsets`."""

    def __init__(self, axis: int, offsets: tuple, sizes: tuple) -> None:
        super().__init__()
        self.axis, self.offsets, self.sizes = int(axis), tuple(int(o) for o in offsets), tuple(int(s) for s in sizes)
        self.index = (slice(None),) * self.axis + tuple(slice(o, o + s) for o, s in zip(self.offsets, self.sizes))

    def forward(self, x: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        return x[self.index]  # the reference bottom only gives the sizes, fixed at conversion

    def extra_repr(self) -> str:
        return _kwargs(axis=self.axis, offsets=self.offsets, sizes=self.sizes)


class Reshape(nn.Module):
    """Caffe Reshape / Flatten to a shape fixed at conversion; None keeps the batch axis free."""

    def __init__(self, shape: tuple) -> None:
        super().__init__()
        self.shape = tuple(None if d is None else int(d) for d in shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape([x.shape[0] if d is None else d for d in self.shape])

    def extra_repr(self) -> str:
        return _kwargs(shape=self.shape)


def caffe_topk(x: torch.Tensor, k: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest k along `dim` in Caffe's order: by value descending, ties to the larger index first.

    Caffe partial-sorts (value, index) pairs with std::greater. On the reversed axis the first
    maximum is the one of largest original index; k > 1 takes k such maxima in turn among the
    entries not yet taken (an unrolled loop of exportable ops: torch's stable sort has no ONNX form).
    """
    size = x.shape[dim]
    flipped = x.flip(dim)
    if k == 1:
        position = torch.argmax(flipped, dim=dim, keepdim=True)
        return torch.gather(flipped, dim, position), (size - 1) - position
    taken = torch.zeros_like(flipped, dtype=torch.bool)
    values, positions = [], []
    for _ in range(k):
        best = torch.where(taken, -math.inf, flipped).amax(dim=dim, keepdim=True)
        eligible = (flipped == best) & ~taken
        position = torch.argmax(eligible.to(torch.uint8), dim=dim, keepdim=True)
        values.append(torch.gather(flipped, dim, position))
        positions.append(position)
        taken = taken.scatter(dim, position, torch.ones_like(position, dtype=torch.bool))
    return torch.cat(values, dim=dim), (size - 1) - torch.cat(positions, dim=dim)


class ArgMax(nn.Module):
    """Caffe ArgMax: float indices (and/or values) of the top_k largest entries, ties to the larger index.

    Without an axis the search runs over all axes but the first; the top is (N, 1 or 2, top_k, 1, ...).
    """

    def __init__(self, top_k: int = 1, out_max_val: bool = False, axis: int | None = None,
                 top_shape: tuple = ()) -> None:
        super().__init__()
        self.top_k, self.out_max_val, self.axis = int(top_k), bool(out_max_val), axis
        self.top_shape = tuple(int(d) for d in top_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.axis is not None:
            values, indices = caffe_topk(x, self.top_k, self.axis)
            return values if self.out_max_val else indices.to(x.dtype)
        values, indices = caffe_topk(x.flatten(1), self.top_k, 1)
        parts = [indices.to(x.dtype), values] if self.out_max_val else [indices.to(x.dtype)]
        return torch.stack(parts, dim=1).reshape([x.shape[0]] + list(self.top_shape[1:]))

    def extra_repr(self) -> str:
        return _kwargs(top_k=self.top_k, out_max_val=self.out_max_val, axis=self.axis, top_shape=self.top_shape)


class LRNWithinChannel(nn.Module):
    """Caffe LRN WITHIN_CHANNEL: y = x * (1 + alpha * A)^-beta, A = Caffe AVE pooling of x^2.

    The pooling has kernel `size`, stride 1 and pad (size-1)/2 with Caffe's divisor rule (padded
    zeros count); Caffe ignores `k` in this mode. ACROSS_CHANNELS is torch.nn.LocalResponseNorm.
    """

    def __init__(self, size: int, alpha: float, beta: float, input_size: tuple) -> None:
        super().__init__()
        self.size, self.alpha, self.beta = int(size), float(alpha), float(beta)
        self.input_size = tuple(int(n) for n in input_size)
        half = (self.size - 1) // 2
        self.average = Pool2d("AVE", (self.size, self.size), (1, 1), (half, half), self.input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.pow(self.average(x * x) * self.alpha + 1, -self.beta)

    def extra_repr(self) -> str:
        return _kwargs(size=self.size, alpha=self.alpha, beta=self.beta, input_size=self.input_size)


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that keeps its stored statistics in train mode too.

    For the fork's `BN { frozen: true }` (statistics and affine fixed in training) and Caffe's
    `use_global_stats: true`: `.train()` leaves this module in eval mode. The input rank was
    checked at conversion, so there is no check on the input here (it would stop fx tracing).
    """

    def train(self, mode: bool = True) -> "FrozenBatchNorm2d":
        return super().train(False)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        pass


class FrozenBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d that keeps its stored statistics in train mode too (see FrozenBatchNorm2d)."""

    def train(self, mode: bool = True) -> "FrozenBatchNorm1d":
        return super().train(False)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        pass


class FrozenBatchNorm3d(nn.BatchNorm3d):
    """BatchNorm3d that keeps its stored statistics in train mode too (see FrozenBatchNorm2d)."""

    def train(self, mode: bool = True) -> "FrozenBatchNorm3d":
        return super().train(False)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        pass


class CaffeOrderNorm(nn.Module):
    """A BatchNorm evaluated in Caffe's order of float32 operations (inference only).

    torch's BatchNorm computes x * a + b with a, b folded from the statistics; Caffe subtracts the
    mean first: `((x - mean) * (var + eps)^-0.5) * slope + bias` for the fork's BN, `(x - mean) /
    sqrt(var + eps)` for BatchNorm, the power or root correctly rounded. This gives Caffe's bits
    where torch's differ by an ulp or two (`passes.caffe_order_norms` puts it in place of each norm).
    """

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        view = [1, -1] + [1] * (x.dim() - 2)
        centred = x - norm.running_mean.reshape(view)
        spread = (norm.running_var + norm.eps).double()  # var + eps rounded to float32 first, as Caffe adds
        if norm.affine:
            inv_std = torch.pow(spread, -0.5).to(x.dtype).reshape(view)
            return (centred * inv_std) * norm.weight.reshape(view) + norm.bias.reshape(view)
        return centred / torch.sqrt(spread).to(x.dtype).reshape(view)


class InnerProduct(nn.Linear):
    """Caffe InnerProduct on a blob of more axes than `axis` + 1: nn.Linear after flattening from `axis`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, axis: int = 1) -> None:
        super().__init__(in_features, out_features, bias)
        self.axis = int(axis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.flatten(self.axis))

    def extra_repr(self) -> str:
        return _kwargs(in_features=self.in_features, out_features=self.out_features, bias=self.bias is not None,
                       axis=self.axis)


class BatchAxes(nn.Module):
    """Run `inner` (a convolution) over the axes after `axis`; the axes before it act as one batch axis."""

    def __init__(self, inner: nn.Module, axis: int, lead: tuple) -> None:
        super().__init__()
        self.inner, self.axis, self.lead = inner, int(axis), tuple(int(d) for d in lead)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x.flatten(0, self.axis - 1))
        return y.unflatten(0, self.lead)

    def extra_repr(self) -> str:
        return _kwargs(axis=self.axis, lead=self.lead)
