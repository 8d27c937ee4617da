"""Caffe-specific torch modules: only where Caffe's meaning differs from every torch.nn module.

This file imports nothing but torch, math and threading: a converted folder's standalone `model.py` embeds
the source of the classes it uses. Every forward uses only differentiable, exportable, dtype-safe
torch ops, and takes its sizes from the tensors it gets, as Caffe's Reshape() does, so one
converted net runs at any size Caffe's rules accept, trains, traces (fx, torch.export, jit.trace,
ONNX) and runs in half precision. Tables that depend on a size are built once per size
(`TableCache`); the functions that read sizes are fx leaves (`torch.fx.wrap`). Each `extra_repr`
is exactly the constructor's keyword arguments, so `print(net)` shows the hyper-parameters and the
code generator writes `ClassName(<extra_repr>)`.
"""

from __future__ import annotations

import math
import threading

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


def _concrete(*sizes) -> bool:
    return all(type(n) is int for n in sizes)


def dims(x: torch.Tensor, *axes: int) -> tuple:
    """x's sizes along `axes`: ints, or SymInts under torch.export; ints under torch.jit.trace too (its sizes are
    traced tensors, which its ONNX export mishandles: a trace keeps the size of its example, as it always did)."""
    if torch.jit.is_tracing():
        return tuple(int(x.shape[a]) for a in axes)
    return tuple(x.shape[a] for a in axes)


class TableCache:
    """Tables that depend on an input size (pooling divisors, interpolation indices and weights, priors), kept for
    each size, device and dtype a net has met: the first call at a size builds them, later calls reuse them.

    At most LIMIT tables and LIMIT_BYTES of them are kept, the least recently used going first. Nothing is kept
    while a tracer or compiler runs (its sizes may be symbolic, its tensors fake), or while a CUDA graph is being
    captured (a table built there is part of the graph): they record the computation instead. Tables are made
    outside inference mode, so a net that met a size under `torch.inference_mode` still trains at it. `keep()`
    collects, for the calling thread, what a CUDA graph capture reads: an eviction must not free it.
    """

    LIMIT = 512
    LIMIT_BYTES = 256 << 20
    tables: dict = {}
    sizes: dict = {}
    lock = threading.Lock()
    keeping = threading.local()

    @staticmethod
    def usable(x: torch.Tensor, *sizes) -> bool:
        if not _concrete(*sizes) or type(x) not in (torch.Tensor, nn.Parameter) or torch.jit.is_tracing() or \
                x.device.type == "meta":  # shapes alone (caffe2torch.dynamic): nothing to keep
            return False
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return False
        compiling = getattr(torch.compiler, "is_compiling", None)
        return not (compiling is not None and compiling())

    @staticmethod
    def _bytes(value) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, (tuple, list)):
            return sum(TableCache._bytes(item) for item in value)
        return 0

    @classmethod
    def get(cls, key: tuple, make, x: torch.Tensor, *sizes):
        """`make()`'s result for `key`, built once per key (when x and sizes are concrete)."""
        if not cls.usable(x, *sizes):
            return make()
        with cls.lock:
            value = cls.tables.pop(key, None)
            if value is not None:
                cls.tables[key] = value  # last: the most recently used
        if value is None:
            with torch.inference_mode(False), torch.no_grad():
                value = make()
            size = cls._bytes(value)
            with cls.lock:
                cls.tables.pop(key, None)
                while cls.tables and (len(cls.tables) >= cls.LIMIT or sum(cls.sizes.values()) + size > cls.LIMIT_BYTES):
                    oldest = next(iter(cls.tables))
                    cls.tables.pop(oldest)
                    cls.sizes.pop(oldest, None)
                cls.tables[key], cls.sizes[key] = value, size
        kept = getattr(cls.keeping, "tables", None)
        if kept is not None:
            kept.append(value)
        return value

    @classmethod
    def clear(cls) -> None:
        with cls.lock:
            cls.tables.clear()
            cls.sizes.clear()

    @classmethod
    def keep(cls) -> list:
        """Start collecting, in this thread, every table handed out (a CUDA graph capture holds them: an eviction
        must not free what it reads); `stop_keeping()` ends it."""
        cls.keeping.tables = []
        return cls.keeping.tables

    @classmethod
    def stop_keeping(cls) -> None:
        cls.keeping.tables = None


def pool_geometry(size: tuple, kernel: tuple, stride: tuple, pad: tuple, pad_end: tuple, ceil: bool):
    """Caffe's pooled size (out), the padding or cropping that makes the input span exactly the windows that hold
    something (edges: F.pad's left, right, top, bottom), how many trailing windows lie wholly past the input and
    padding (empty: rows, columns; possible when the stride exceeds the kernel: appended as constants, so a stride
    of 99999 never pads 99999 rows), and the window and step torch pools with: a window reaching past the padded
    input (a kernel longer than it, which Caffe takes with a longer stride still) is cut there (the same values for
    MAX, the same sum and count for AVE, no padding out to the kernel), and a stride with one window along its axis
    is never taken (it may exceed torch's int)."""
    clip = any(pad) or any(pad_end)
    if _concrete(*size):
        out = tuple(caffe_pooled_size(n, k, s, p, clip, ceil, e)
                    for n, k, s, p, e in zip(size, kernel, stride, pad, pad_end))
        valid = tuple(min(o, -(-(n + p + e) // s)) for o, n, p, e, s in zip(out, size, pad, pad_end, stride))
        window = tuple(min(k, n + p + e) for k, n, p, e in zip(kernel, size, pad, pad_end))
        step = tuple(s if v > 1 else 1 for s, v in zip(stride, valid))
    else:
        out, valid, window, step = _symbolic_pool_geometry(size, kernel, stride, pad, pad_end, ceil, clip)
    (ph, pw), (kh, kw), (sh, sw), (h, w), (vh, vw) = pad, window, step, size, valid
    edges = (pw, (vw - 1) * sw + kw - pw - w, ph, (vh - 1) * sh + kh - ph - h)
    return out, edges, (out[0] - vh, out[1] - vw), window, step


def _symbolic_pool_geometry(size: tuple, kernel: tuple, stride: tuple, pad: tuple, pad_end: tuple, ceil: bool,
                            clip: bool):
    """pool_geometry's rules for symbolic sizes (torch.export with dynamic height and width), written without a
    branch on a size wherever the layer's own numbers settle it, so an export stays dynamic: Caffe's clip can only
    drop a window when stride > kernel - pad, a window can only lie wholly past the input when stride > kernel,
    and the windows are the kernel (an input smaller than the kernel is refused when the exported net runs).
    (The last window starts at q * stride - pad with q = ceil((n + pad + pad_end - kernel) / stride), before
    n + pad + pad_end - kernel + stride: past the input only if stride > kernel - pad_end.)"""
    out, valid = [], []
    # Divisions of non-negative sizes only ((a + s - 1) // s for a ceiling): exporters may lower a symbolic floor
    # division to a truncating one (ONNX's Div), which differs for a negative numerator.
    for n, k, s, p, e in zip(size, kernel, stride, pad, pad_end):
        torch._check(n + p + e >= k, lambda: "the pooling kernel is larger than the padded input")
        span = n + p + e - k
        o = ((span + s - 1) // s if ceil else span // s) + 1
        if clip and s > k - e:  # the clip as a minimum: the windows that start before the input ends
            o = torch.sym_min(o, (n + p + s - 1) // s)
        out.append(o)
        valid.append(o if s <= k else torch.sym_min(o, (n + p + e + s - 1) // s))
    return tuple(out), tuple(valid), tuple(kernel), tuple(stride)


def _pool_divisor(method: str, size: tuple, kernel: tuple, stride: tuple, pad: tuple, pad_end: tuple, out: tuple,
                  device, dtype, look: bool) -> tuple[torch.Tensor, bool]:
    """AVE pooling's per-window factor kernel area / Caffe's count (padding counts for AVE, the ceil overhang never;
    never padding for AVE_EXC_PAD), and whether any factor differs from 1 (with `look`; else assumed: a tracer
    cannot look at values, and multiplying by 1 changes no bit)."""
    counts = []
    for k, s, p, e, n, o in zip(kernel, stride, pad, pad_end, size, out):
        start = torch.arange(o, dtype=torch.float64, device=device) * s - p
        if method == "AVE":
            counts.append(torch.clamp(start + k, max=n + e) - start)
        else:  # padding never counts
            counts.append(torch.clamp(torch.clamp(start + k, max=n) - torch.clamp(start, min=0), min=0))
    factor = (kernel[0] * kernel[1]) / (counts[0][:, None] * counts[1][None, :])  # kk / 0 = inf: Caffe's 0 / 0 = NaN
    if look and not bool((factor != 1).any()):
        return None, False  # every window divides by the kernel's area: nothing to keep
    return factor.float().to(dtype), True


def same_padding(size: int, kernel: int, stride: int) -> int:
    """synopsys-caffe's TensorFlow "SAME" (pad_type 1, its im2col and pooling alike): the padding the undilated
    kernel needs beyond the input for ceil(size / stride) windows; the near side gets half of it, rounded down.
    (size - 1) % stride + 1 is `stride` where size % stride is 0, else size % stride: no branch on the size, so an
    export keeps it symbolic."""
    need = kernel - ((size - 1) % stride + 1)
    return max(need, 0) if _concrete(need) else torch.sym_max(need, 0)


@torch.fx.wrap
def caffe_pool2d(x: torch.Tensor, method: str, kernel: tuple, stride: tuple, pad: tuple, pad_end: tuple,
                 ceil: bool = True, mask: bool = False, same: bool = False):
    """Caffe MAX / AVE pooling of x's last two axes at whatever size x has (see Pool2d)."""
    size = dims(x, -2, -1)
    if kernel is None:  # global pooling: one window over whatever size x has
        if not _concrete(*size) and not mask:  # symbolic sizes (torch.export): a reduction, no symbolic kernel
            return _global_pool(x, method)
        kernel = size
    if same:  # synopsys-caffe's SAME: ceil(size / stride) windows, the padding worked out for this size
        along = [same_padding(n, k, s) for n, k, s in zip(size, kernel, stride)]
        pad, pad_end, ceil = tuple(a // 2 for a in along), tuple(a - a // 2 for a in along), False
    out, edges, empty, window, step = pool_geometry(size, kernel, stride, pad, pad_end, ceil)
    pads = not _concrete(*edges) or any(edges)
    tail = not _concrete(*empty) or any(empty)
    if method == "MAX":
        x = torch.nan_to_num(x, nan=-math.inf, posinf=math.inf, neginf=-math.inf)
        if pads:
            x = F.pad(x, edges, value=-math.inf)
        if mask:
            return _max_with_mask(x, window, step, pad, size[1], empty, tail)
        y = F.max_pool2d(x, window, step)
        if tail:
            y = F.pad(y, (0, empty[1], 0, empty[0]), value=-math.inf)
        return torch.nan_to_num(y, nan=0.0, posinf=math.inf, neginf=None)  # -inf: the dtype's lowest
    if pads:
        x = F.pad(x, edges)
    y = F.avg_pool2d(x, window, step)
    if tail:
        y = F.pad(y, (0, empty[1], 0, empty[0]))  # a sum of nothing, then 0/0 or 0/-n as in Caffe
    look = TableCache.usable(y, *size)
    factor, rescale = TableCache.get(("pool", method, window, stride, pad, pad_end, size, out, y.device, y.dtype),
                                     lambda: _pool_divisor(method, size, window, stride, pad, pad_end, out,
                                                           y.device, y.dtype, look), y, *size)
    return y * factor if rescale else y


def _global_pool(x: torch.Tensor, method: str) -> torch.Tensor:
    """One window over the whole plane, as Caffe's global pooling (NaN never wins MAX), for exports whose height
    and width are symbolic (torch's pooling takes no symbolic kernel); equal to the windowed form up to the order
    of the sum's additions."""
    if method == "MAX":
        y = torch.nan_to_num(x, nan=-math.inf, posinf=math.inf, neginf=-math.inf).amax(dim=(-2, -1), keepdim=True)
        return torch.nan_to_num(y, nan=0.0, posinf=math.inf, neginf=None)
    return x.mean(dim=(-2, -1), keepdim=True)


def _max_with_mask(x: torch.Tensor, kernel: tuple, stride: tuple, pad: tuple, width_in, empty: tuple, tail: bool):
    # torch's first maximum is Caffe's (a strict > scan from the window's top left).
    y, index = F.max_pool2d(x, kernel, stride, return_indices=True)
    (width,) = dims(x, -1)
    mask = ((index // width - pad[0]) * width_in + index % width - pad[1]).float()
    if tail:
        y = F.pad(y, (0, empty[1], 0, empty[0]), value=-math.inf)
        mask = F.pad(mask, (0, empty[1], 0, empty[0]), value=-1.0)
    lowest = torch.finfo(y.dtype).min
    mask = torch.where(y <= lowest, torch.full_like(mask, -1.0), mask)  # nothing beat Caffe's -FLT_MAX start
    return torch.nan_to_num(y, nan=0.0, posinf=math.inf, neginf=None), mask


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


def add_epsilon(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x + eps (rounded to x's dtype, as a scalar would be). The epsilon goes in as a one-element vector: ONNX
    optimisers drop the addition of a scalar within 1e-8 of 0 as a no-op (onnxscript's add_0 rule, which torch's
    exporter runs), and an all-zero norm then divides 0 by 0."""
    return x + torch.full((1,), eps, dtype=x.dtype, device=x.device)


def _float32_if_half(x: torch.Tensor) -> torch.Tensor:
    """float16 / bfloat16 as float32, for sums over many values; other dtypes as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# torch.export's solver cannot prove the shape equalities that SAME's remainders give (it would fix the parity)
SAME_FIXED = "TensorFlow's SAME padding depends on the size's remainder"
# C's FLT_MAX, the largest float32: the forks' "no limit" and "lowest score" values.
FLT_MAX = 3.4028234663852886e38


class Pool2d(nn.Module):
    """Caffe MAX / AVE pooling, its window layout and divisors as Caffe's CPU layer, at any input size.

    The output size is Caffe's Reshape() of the input it gets. The input is padded (or cropped)
    to exactly the rows and columns the windows span, so the pooling itself has no padding and no
    ceil mode. MAX: NaN never wins and an empty window gives the dtype's lowest value (Caffe's
    -FLT_MAX in float32). AVE: the sum over the window clipped to the image, divided by Caffe's
    count (padding counts, the ceil overhang does not; 0 for an empty window, so 0/0 = NaN as in
    Caffe). A `kernel` of None is global pooling (the kernel is the input's size, as Caffe's Reshape
    sets it). The divisor is kernel area times a per-position factor (built once per input size),
    exactly 1 wherever Caffe divides by the full kernel area. With `mask` (MAX only) it also
    returns Caffe's second top: each maximum's flat h * W + w index in the input plane, -1 where
    Caffe's window found nothing above -FLT_MAX; float32 as Caffe stores it (exact up to 2^24
    positions), whatever the input's dtype.
    """

    def __init__(self, method: str, kernel: tuple | None, stride: tuple, pad: tuple, ceil: bool = True,
                 mask: bool = False, pad_end: tuple | None = None, same: bool = False) -> None:
        super().__init__()
        if method not in ("MAX", "AVE", "AVE_EXC_PAD") or mask and method != "MAX":
            raise ValueError(f"pooling method must be 'MAX', 'AVE' or 'AVE_EXC_PAD' (a mask needs MAX), got {method!r}")
        self.method, self.ceil, self.mask, self.same = method, bool(ceil), bool(mask), bool(same)
        # None: global pooling, one window over whatever size the input has
        self.kernel = None if kernel is None else tuple(int(k) for k in kernel)
        self.stride = tuple(int(s) for s in stride)
        self.pad = tuple(int(p) for p in pad)
        # The bottom and right padding where it differs from the top and left (synopsys-caffe's pad_b, pad_r).
        self.pad_end = self.pad if pad_end is None else tuple(int(p) for p in pad_end)

    @property
    def fixed_export_sizes(self) -> str:
        """Why an export keeps the height and width of its example ("" where it need not)."""
        return SAME_FIXED if self.same else ""

    def output_size(self, size: tuple) -> tuple:
        """Caffe's top size for an input of `size` (H, W)."""
        if self.same:
            return tuple(-(-n // s) for n, s in zip(size, self.stride))
        kernel = tuple(size) if self.kernel is None else self.kernel
        return pool_geometry(tuple(size), kernel, self.stride, self.pad, self.pad_end, self.ceil)[0]

    def forward(self, x: torch.Tensor):
        return caffe_pool2d(x, self.method, self.kernel, self.stride, self.pad, self.pad_end, self.ceil, self.mask,
                            self.same)

    def extra_repr(self) -> str:
        extra = ", mask=True" if self.mask else ""
        extra += f", pad_end={self.pad_end!r}" if self.pad_end != self.pad else ""
        extra += ", same=True" if self.same else ""
        return _kwargs(method=self.method, kernel=self.kernel, stride=self.stride, pad=self.pad, ceil=self.ceil) + extra


class SamePad2d(nn.Module):
    """synopsys-caffe's SAME padding before a convolution (pad_type 1), worked out for the input it gets: ceil(size /
    stride) outputs, the near side padded by half of what the undilated kernel needs (rounded down), the far side
    by what the outputs then reach with the dilated `extent`."""

    fixed_export_sizes = SAME_FIXED

    def __init__(self, kernel: tuple, stride: tuple, extent: tuple) -> None:
        super().__init__()
        self.kernel, self.stride, self.extent = (tuple(int(v) for v in t) for t in (kernel, stride, extent))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return same_pad2d(x, self.kernel, self.stride, self.extent)

    def extra_repr(self) -> str:
        return _kwargs(kernel=self.kernel, stride=self.stride, extent=self.extent)


@torch.fx.wrap
def same_pad2d(x: torch.Tensor, kernel: tuple, stride: tuple, extent: tuple) -> torch.Tensor:
    pads = []
    for n, k, s, e in zip(dims(x, -2, -1), kernel, stride, extent):
        near = same_padding(n, k, s) // 2
        pads.append((near, ((n + s - 1) // s - 1) * s + e - n - near))  # a ceiling of non-negative sizes
    (top, bottom), (left, right) = pads
    return F.pad(x, (left, right, top, bottom))


def interp_table(size_in: int, size_out: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and weights along one axis, in float32 exactly as the fork's caffe_cpu_interp2.

    ratio = float(size_in - 1) / (size_out - 1) (0 for one output), position = ratio * i in
    float32, index = truncation, weight of the next sample = position - index; the next sample
    is the same one at the last row/column.
    """
    if size_out > 1:
        ratio = (torch.full((), size_in - 1, dtype=torch.float32, device=device)
                 / torch.full((), size_out - 1, dtype=torch.float32, device=device))
    else:
        ratio = torch.zeros((), dtype=torch.float32, device=device)
    position = ratio * torch.arange(size_out, dtype=torch.float32, device=device)
    index = position.to(torch.int64)
    next_index = index + (index < size_in - 1).to(torch.int64)
    far = position - index.to(torch.float32)
    return index, next_index, 1.0 - far, far


def interp_size(size: tuple, shrink: int | None, zoom: int | None, height: int | None, width: int | None) -> tuple:
    """The fork's InterpLayer::Reshape output size of an (effective, already cropped) input size, in its order of
    precedence: shrink alone, zoom alone, height and width, both factors (shrink first)."""
    if shrink is not None and zoom is None:
        return tuple((n - 1) // shrink + 1 for n in size)
    if zoom is not None and shrink is None:
        return tuple(n + (n - 1) * (zoom - 1) for n in size)
    if height is not None and width is not None:
        return (height, width)
    if shrink is None or zoom is None:
        raise ValueError("Interp needs zoom_factor, shrink_factor, or both height and width")
    return tuple(m + (m - 1) * (zoom - 1) for m in ((n - 1) // shrink + 1 for n in size))


def _interp_tables(size_in: tuple, size_out: tuple, device, dtype) -> dict:
    tables = {}
    for axis, n_in, n_out in zip("hw", size_in, size_out):
        index, next_index, near, far = interp_table(n_in, n_out, device)
        shape = (-1, 1) if axis == "h" else (-1,)
        tables[axis] = (index, next_index, near.reshape(shape).to(dtype), far.reshape(shape).to(dtype))
    return tables


@torch.fx.wrap
def caffe_interp(x: torch.Tensor, shrink: int | None = None, zoom: int | None = None, height: int | None = None,
                 width: int | None = None, pad_beg: int = 0, pad_end: int = 0) -> torch.Tensor:
    """The fork's Interp of x's last two axes at whatever size x has (see Interp)."""
    cropped = tuple(n + pad_beg + pad_end for n in dims(x, -2, -1))
    out = interp_size(cropped, shrink, zoom, height, width)
    start = -pad_beg
    if start or pad_end:
        x = x[:, :, start:start + cropped[0], start:start + cropped[1]]
    if _concrete(*cropped, *out) and cropped == out:
        return x.clone()
    tables = TableCache.get(("interp", cropped, out, x.device, x.dtype),
                            lambda: _interp_tables(cropped, out, x.device, x.dtype), x, *cropped, *out)
    (h_index, h_next, h_near, h_far), (w_index, w_next, w_near, w_far) = tables["h"], tables["w"]

    def horizontal(rows: torch.Tensor) -> torch.Tensor:
        return rows.index_select(3, w_index) * w_near + rows.index_select(3, w_next) * w_far

    # shrinking rows: interpolate only the source rows that are used (the same values either way; with symbolic
    # sizes the rule decides, as a branch on a size would fix it in an export)
    rows_first = 2 * out[0] < cropped[0] if _concrete(*out, *cropped) else (zoom is None and (shrink or 1) > 2)
    if rows_first:
        near, far = horizontal(x.index_select(2, h_index)), horizontal(x.index_select(2, h_next))
    else:
        per_row = horizontal(x)
        near, far = per_row.index_select(2, h_index), per_row.index_select(2, h_next)
    return near * h_near + far * h_far


class Interp(nn.Module):
    """The PSPNet fork's Interp: crop by -pad_beg (both axes), then corner-aligned bilinear resize, at any input size.

    The output size follows the fork's rules from the input it gets (`shrink` / `zoom` factors, or a fixed
    `height` and `width`). Evaluates Caffe's h0 * (w0*p00 + w1*p01) + h1 * (w0*p10 + w1*p11) with separate
    float32 multiplies and adds in that order, so float32 results equal the fork's bit for bit; an output of
    the cropped input's own size is a copy, as the fork's.
    """

    def __init__(self, shrink: int | None = None, zoom: int | None = None, height: int | None = None,
                 width: int | None = None, pad_beg: int = 0, pad_end: int = 0) -> None:
        super().__init__()
        self.shrink, self.zoom = (None if v is None else int(v) for v in (shrink, zoom))
        self.height, self.width = (None if v is None else int(v) for v in (height, width))
        self.pad_beg, self.pad_end = int(pad_beg), int(pad_end)

    def output_size(self, size: tuple) -> tuple:
        """The fork's top size for an input of `size` (H, W)."""
        cropped = tuple(n + self.pad_beg + self.pad_end for n in size)
        return interp_size(cropped, self.shrink, self.zoom, self.height, self.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return caffe_interp(x, self.shrink, self.zoom, self.height, self.width, self.pad_beg, self.pad_end)

    def extra_repr(self) -> str:
        given = {name: value for name, value in (("shrink", self.shrink), ("zoom", self.zoom),
                                                 ("height", self.height), ("width", self.width)) if value is not None}
        return _kwargs(**given, pad_beg=self.pad_beg, pad_end=self.pad_end)


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
    """Caffe Slice: consecutive pieces of one axis, one per top: cut at `points` (Caffe's slice_point), or `tops`
    equal pieces of whatever size the axis has."""

    def __init__(self, axis: int, points: tuple = (), tops: int = 1) -> None:
        super().__init__()
        self.axis, self.points, self.tops = int(axis), tuple(int(p) for p in points), int(tops)

    def forward(self, x: torch.Tensor):
        return caffe_slice(x, self.axis, self.points, self.tops)

    def extra_repr(self) -> str:
        return _kwargs(axis=self.axis, points=self.points, tops=self.tops)


def slice_sizes(length: int, points: tuple, tops: int) -> list:
    """The pieces' sizes along an axis of `length`, as SliceLayer::Reshape cuts it."""
    if not points:
        if _concrete(length) and length % tops:
            raise ValueError(f"Slice: {tops} tops do not evenly divide an axis of size {length}")
        return [length // tops] * tops
    if _concrete(length) and points[-1] >= length:
        raise ValueError(f"Slice: slice_point {points[-1]} leaves nothing of an axis of size {length}")
    edges = (0,) + tuple(points)
    return [b - a for a, b in zip(edges, edges[1:])] + [length - edges[-1]]


@torch.fx.wrap
def caffe_slice(x: torch.Tensor, axis: int, points: tuple, tops: int):
    sizes = slice_sizes(dims(x, axis)[0], points, tops)
    return tuple(torch.split(x, sizes, dim=axis)) if len(sizes) > 1 else x


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
    """Upstream Caffe Crop: axes from `axis` on take the reference bottom's sizes (at run time), starting at
    `offsets`. Without a reference (CropCenter), each cropped axis loses offsets[i] elements at both ends."""

    def __init__(self, axis: int, offsets: tuple) -> None:
        super().__init__()
        self.axis, self.offsets = int(axis), tuple(int(o) for o in offsets)

    def forward(self, x: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        return caffe_crop(x, reference, self.axis, self.offsets)

    def extra_repr(self) -> str:
        return _kwargs(axis=self.axis, offsets=self.offsets)


@torch.fx.wrap
def caffe_crop(x: torch.Tensor, reference: torch.Tensor | None, axis: int, offsets: tuple) -> torch.Tensor:
    axes = range(axis, axis + len(offsets))
    have = dims(x, *axes)
    sizes = dims(reference, *axes) if reference is not None else tuple(n - 2 * o for n, o in zip(have, offsets))
    for a, o, n, m in zip(axes, offsets, sizes, have):
        if _concrete(n, m) and (n <= 0 or o + n > m):  # CropLayer's CHECK
            raise ValueError(f"Crop: a size {n} at offset {o} does not fit axis {a} of size {m}")
    return x[(slice(None),) * axis + tuple(slice(o, o + n) for o, n in zip(offsets, sizes))]


def caffe_reshape(shape: tuple, dims: tuple, axis: int = 0, num_axes: int = -1) -> list:
    """ReshapeLayer::Reshape: the axes [axis, axis + num_axes) of `shape` replaced by `dims`, where 0 copies the
    bottom's axis at that position and one -1 takes what the element count leaves."""
    rank = len(shape)
    start = axis if axis >= 0 else rank + axis + 1
    end = rank if num_axes == -1 else start + num_axes
    middle = [shape[start + i] if d == 0 else d for i, d in enumerate(dims)]
    if -1 in middle:
        known = math.prod(d for d in middle if d != -1) * math.prod(shape[:start]) * math.prod(shape[end:])
        if _concrete(known) and (known == 0 or math.prod(shape) % known):
            raise ValueError(f"Reshape: {math.prod(shape)} values cannot take the shape {list(dims)}")
        middle[middle.index(-1)] = math.prod(shape) // known
    return list(shape[:start]) + middle + list(shape[end:])


@torch.fx.wrap
def caffe_reshaped(x: torch.Tensor, dims: tuple, axis: int, num_axes: int) -> torch.Tensor:
    return x.reshape(caffe_reshape(tuple(x.shape), dims, axis, num_axes))


class Reshape(nn.Module):
    """Caffe Reshape (and Flatten with end_axis before axis) by Caffe's rules, applied to the input it gets: the
    axes [axis, axis + num_axes) become `dims`, 0 copying an axis, -1 taking what the element count leaves."""

    def __init__(self, dims: tuple, axis: int = 0, num_axes: int = -1) -> None:
        super().__init__()
        self.dims, self.axis, self.num_axes = tuple(int(d) for d in dims), int(axis), int(num_axes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return caffe_reshaped(x, self.dims, self.axis, self.num_axes)

    def extra_repr(self) -> str:
        return _kwargs(dims=self.dims, axis=self.axis, num_axes=self.num_axes)


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

    Without an axis the search runs over all axes but the first; the top is (N, 1 or 2, top_k, 1, ...) with at
    least 3 axes, as many as the bottom has.
    """

    def __init__(self, top_k: int = 1, out_max_val: bool = False, axis: int | None = None) -> None:
        super().__init__()
        self.top_k, self.out_max_val, self.axis = int(top_k), bool(out_max_val), axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return caffe_argmax(x, self.top_k, self.out_max_val, self.axis)

    def extra_repr(self) -> str:
        return _kwargs(top_k=self.top_k, out_max_val=self.out_max_val, axis=self.axis)


@torch.fx.wrap
def caffe_argmax(x: torch.Tensor, top_k: int, out_max_val: bool, axis: int | None) -> torch.Tensor:
    if axis is not None:
        values, indices = caffe_topk(x, top_k, axis)
        return values if out_max_val else indices.to(x.dtype)
    values, indices = caffe_topk(x.flatten(1), top_k, 1)
    parts = [indices.to(x.dtype), values] if out_max_val else [indices.to(x.dtype)]
    trailing = [1] * (max(x.dim(), 3) - 3)
    return torch.stack(parts, dim=1).reshape([x.shape[0], len(parts), top_k] + trailing)


class LRNAcrossChannels(nn.Module):
    """Caffe LRN ACROSS_CHANNELS: y = x * (k + alpha / size * window sum of x^2 over channels)^-beta, torch's
    local_response_norm. In half precision it computes in float32: the squares would overflow float16 from
    |x| = 256, and its average pooling has no half-precision kernel on the CPU."""

    def __init__(self, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0) -> None:
        super().__init__()
        self.size, self.alpha, self.beta, self.k = int(size), float(alpha), float(beta), float(k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.local_response_norm(_float32_if_half(x), self.size, self.alpha, self.beta, self.k).to(x.dtype)

    def extra_repr(self) -> str:
        return _kwargs(size=self.size, alpha=self.alpha, beta=self.beta, k=self.k)


class LRNWithinChannel(nn.Module):
    """Caffe LRN WITHIN_CHANNEL: y = x * (1 + alpha * A)^-beta, A = Caffe AVE pooling of x^2.

    The pooling has kernel `size`, stride 1 and pad (size-1)/2 with Caffe's divisor rule (padded
    zeros count); Caffe ignores `k` in this mode. In half precision it computes in float32 (the squares
    would overflow float16).
    """

    def __init__(self, size: int, alpha: float, beta: float) -> None:
        super().__init__()
        self.size, self.alpha, self.beta = int(size), float(alpha), float(beta)
        half = (self.size - 1) // 2
        self.average = Pool2d("AVE", (self.size, self.size), (1, 1), (half, half))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        work = _float32_if_half(x)
        return (work * torch.pow(self.average(work * work) * self.alpha + 1, -self.beta)).to(x.dtype)

    def extra_repr(self) -> str:
        return _kwargs(size=self.size, alpha=self.alpha, beta=self.beta)


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

    def __init__(self, inner: nn.Module, axis: int) -> None:
        super().__init__()
        self.inner, self.axis = inner, int(axis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.axis == 0:  # Caffe's axis 0: the whole blob is one sample (no axis to fold into a batch)
            return self.inner(x.unsqueeze(0)).squeeze(0)
        y = self.inner(x.flatten(0, self.axis - 1))
        return y.unflatten(0, x.shape[:self.axis])

    def extra_repr(self) -> str:
        return _kwargs(axis=self.axis)
