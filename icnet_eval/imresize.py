"""MATLAB-exact `imresize` ('bilinear' with antialiasing, 'nearest') in NumPy and PyTorch, plus a fast approximation."""
from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from caffe2torch.errors import CaffeError
from caffe2torch.limits import available_cores

__all__ = ["contributions", "fast_resize", "matlab_imresize", "matlab_imresize_torch", "set_resize_threads"]

# Values per job and float64 buffer: a block of rows this size (256 KiB) stays in the L2 cache.
_BLOCK_VALUES = 32768


def _triangle(x: np.ndarray) -> np.ndarray:
    # MATLAB's own expression, kept term for term so the floating-point results match.
    return (1 + x) * ((-1 <= x) & (x < 0)) + (1 - x) * ((0 <= x) & (x <= 1))


def _box(x: np.ndarray) -> np.ndarray:
    return ((-0.5 <= x) & (x < 0.5)).astype(np.float64)


# method -> (kernel, kernel width, antialiasing default); MATLAB turns antialiasing off for 'nearest'.
_METHODS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], float, bool]] = {
    "bilinear": (_triangle, 2.0, True),
    "nearest": (_box, 1.0, False),
}


@functools.lru_cache(maxsize=64)
def contributions(in_length: int, out_length: int, method: str = "bilinear") -> tuple[np.ndarray, np.ndarray]:
    """MATLAB's `contributions`: per output pixel, weights (out, P) float64 and 0-based input indices (out, P)."""
    if method not in _METHODS:
        raise CaffeError(f"imresize: unknown method {method!r} (expected one of {sorted(_METHODS)})")
    if in_length < 1 or out_length < 1:
        raise CaffeError(f"imresize: cannot resize a length of {in_length} to {out_length}")
    kernel, kernel_width, antialiasing = _METHODS[method]
    scale = out_length / in_length
    if scale < 1 and antialiasing:
        # Stretch the kernel when shrinking so every input pixel contributes (MATLAB's antialiasing).
        def h(x: np.ndarray) -> np.ndarray:
            return scale * kernel(scale * x)

        kernel_width = kernel_width / scale
    else:
        h = kernel
    x = np.arange(1, out_length + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - kernel_width / 2)
    taps = int(np.ceil(kernel_width)) + 2
    indices = left[:, None] + np.arange(taps, dtype=np.float64)
    weights = h(u[:, None] - indices)
    weights = weights / weights.sum(axis=1, keepdims=True)
    # Mirror out-of-range taps as [1:n, n:-1:1] does (1-based there, 0-based here).
    mirror = np.concatenate([np.arange(in_length), np.arange(in_length)[::-1]])
    indices = mirror[np.mod(indices.astype(np.int64) - 1, 2 * in_length)]
    kept = np.any(weights != 0, axis=0)
    weights = np.ascontiguousarray(weights[:, kept])
    indices = np.ascontiguousarray(indices[:, kept])
    weights.flags.writeable = False
    indices.flags.writeable = False
    return weights, indices


def _pass_order(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> list[int]:
    """Spatial axes (0 = height, 1 = width) in MATLAB's order: smaller scale first, height on a tie."""
    scales = [out_hw[0] / in_hw[0], out_hw[1] / in_hw[1]]
    return [int(axis) for axis in np.argsort(scales, kind="stable")]


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """MATLAB's double -> uint8: saturate, then round halves away from zero (values are >= 0 after clipping)."""
    values = np.clip(values, 0.0, 255.0)
    floor = np.floor(values)
    return (floor + (values - floor >= 0.5)).astype(np.uint8)


@functools.lru_cache(maxsize=64)
def _tap_runs(in_length: int, out_length: int, method: str) -> tuple[tuple[tuple[int, int, int], ...], ...] | None:
    """Per tap, the runs (out_start, out_stop, in_start) over which the input index rises by one per output.

    Near-identity resizes (1025 -> 1024, 2049 -> 2048) have a few runs per tap; reading them as
    slices avoids gathering whole images. None when the taps are too fragmented for that to pay off.
    """
    _, indices = contributions(in_length, out_length, method)
    runs_per_tap = []
    for column in indices.T:
        bounds = np.concatenate([[0], np.flatnonzero(np.diff(column) != 1) + 1, [len(column)]])
        if len(bounds) - 1 > max(4, out_length // 64):
            return None
        runs_per_tap.append(tuple((int(a), int(b), int(column[a])) for a, b in zip(bounds[:-1], bounds[1:])))
    return tuple(runs_per_tap)


def _tap_pieces(runs, indices: np.ndarray, tap: int, lo: int, hi: int):
    """(out_start, out_stop, source) covering outputs lo..hi of one tap; source is a slice or an index array."""
    if runs is None:
        yield lo, hi, indices[lo:hi, tap]
        return
    for start, stop, in_start in runs[tap]:
        a, b = max(start, lo), min(stop, hi)
        if a < b:
            yield a, b, slice(in_start + a - start, in_start + b - start)


def _apply_taps(src: np.ndarray, axis: int, weights: np.ndarray, indices: np.ndarray, runs,
                lo: int, hi: int, out_dtype: np.dtype) -> np.ndarray:
    """Outputs lo..hi along `axis` of a 2-D `src`: sum over taps of weight * input in float64, in tap order."""
    if weights.shape[1] == 1:
        return np.take(src, indices[lo:hi, 0], axis=axis)
    shape = list(src.shape)
    shape[axis] = hi - lo
    acc = np.empty(shape, dtype=np.float64)
    term = np.empty_like(acc)
    for k in range(weights.shape[1]):
        target = acc if k == 0 else term
        for a, b, source in _tap_pieces(runs, indices, k, lo, hi):
            inputs = src[source] if axis == 0 else src[:, source]
            tap_weights = weights[a:b, k, None] if axis == 0 else weights[a:b, k]
            region = (slice(a - lo, b - lo),) if axis == 0 else (slice(None), slice(a - lo, b - lo))
            np.multiply(inputs, tap_weights, out=target[region])
        if k > 0:
            acc += term
    return _to_uint8(acc) if out_dtype == np.uint8 else acc.astype(out_dtype)


def _resize_block(src: np.ndarray, dst: np.ndarray, axis: int, method: str, block: slice) -> None:
    """One pass over one channel, for the output rows in `block` (rows of the output of this pass)."""
    weights, indices = contributions(src.shape[axis], dst.shape[axis], method)
    runs = _tap_runs(src.shape[axis], dst.shape[axis], method)
    if axis == 0:
        dst[block] = _apply_taps(src, 0, weights, indices, runs, block.start, block.stop, dst.dtype)
    else:
        dst[block] = _apply_taps(src[block], 1, weights, indices, runs, 0, dst.shape[1], dst.dtype)


_threads: int | None = None  # set_resize_threads; None: one per core, at most 8


def set_resize_threads(threads: int | None) -> None:
    """How many threads one NumPy resize uses (None: one per available core, at most 8). The evaluation's loader
    workers set 1, so that N workers use N cores instead of N pools competing for them. Results do not depend
    on it: the threads share out independent rows."""
    global _threads
    _threads = threads


def _workers() -> int:
    if _threads is not None:
        return max(1, _threads)
    return max(1, min(available_cores(), 8))


def _resize_chw_numpy(volume: np.ndarray, out_hw: tuple[int, int], method: str) -> np.ndarray:
    """Resize a C x H x W uint8/float32 array pass by pass, each pass stored in the input's type."""
    channels = volume.shape[0]
    current = volume
    for axis in _pass_order(volume.shape[1:], out_hw):
        shape = list(current.shape)
        shape[1 + axis] = out_hw[axis]
        result = np.empty(shape, dtype=volume.dtype)
        contributions(current.shape[1 + axis], out_hw[axis], method)  # fail early, outside the threads
        rows_per_job = max(1, _BLOCK_VALUES // shape[2])
        jobs = [
            (current[c], result[c], axis, method, slice(start, min(start + rows_per_job, shape[1])))
            for c in range(channels)
            for start in range(0, shape[1], rows_per_job)
        ]
        workers = min(_workers(), len(jobs))
        if workers > 1:
            # NumPy releases the GIL inside these array operations, so threads share the cores.
            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(lambda job: _resize_block(*job), jobs))
        else:
            for job in jobs:
                _resize_block(*job)
        current = result
    return current


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError):
        raise CaffeError(f"imresize: size must be (height, width), got {size!r}") from None
    if height < 1 or width < 1:
        raise CaffeError(f"imresize: output size must be positive, got {size!r}")
    return height, width


def matlab_imresize(array: np.ndarray, size: tuple[int, int], method: str = "bilinear") -> np.ndarray:
    """`imresize(array, [H W], method)` for an H x W or H x W x C uint8/float32 array, as MATLAB computes it."""
    out_hw = _check_size(size)
    array = np.asarray(array)
    if array.dtype not in (np.uint8, np.float32, np.float64):
        raise CaffeError(f"imresize: expected uint8, float32 or float64 data, got {array.dtype}")
    if array.ndim == 2:
        volume = array[None]
    elif array.ndim == 3:
        volume = array.transpose(2, 0, 1)
    else:
        raise CaffeError(f"imresize: expected an H x W or H x W x C array, got shape {array.shape}")
    resized = _resize_chw_numpy(np.ascontiguousarray(volume), out_hw, method)
    return resized[0] if array.ndim == 2 else np.ascontiguousarray(resized.transpose(1, 2, 0))


@functools.lru_cache(maxsize=64)
def _device_contributions(in_length: int, out_length: int, method: str,
                          device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`contributions` as float64 weights and indices on `device`, kept, and copied from pinned memory: a copy
    from pageable memory would wait for all the work queued on a GPU."""
    weights, indices = contributions(in_length, out_length, method)
    tables = (torch.from_numpy(np.array(weights, dtype=np.float64)), torch.from_numpy(np.array(indices)))  # writable copies
    if device.type == "cuda":
        tables = tuple(table.pin_memory() for table in tables)
    weights_on, indices_on = (table.to(device, non_blocking=True) for table in tables)
    return weights_on, indices_on


def _resize_chw_torch_ops(volume: torch.Tensor, out_hw: tuple[int, int], method: str) -> torch.Tensor:
    """Same passes as `_resize_chw_numpy` with whole-tensor torch operations (for GPUs).

    Each tap is a separate float64 multiply then add, in the same order as the NumPy path, so the
    results are bit-identical (no fused multiply-add, no reordered sums).
    """
    current = volume
    for axis in _pass_order(tuple(volume.shape[1:]), out_hw):
        dim = 1 + axis
        weights, indices = _device_contributions(current.shape[dim], out_hw[axis], method, current.device)
        if weights.shape[1] == 1:
            current = current.index_select(dim, indices[:, 0])
            continue
        view = [1, 1, 1]
        view[dim] = -1
        acc = current.index_select(dim, indices[:, 0]).to(torch.float64) * weights[:, 0].view(view)
        for k in range(1, weights.shape[1]):
            acc += current.index_select(dim, indices[:, k]).to(torch.float64) * weights[:, k].view(view)
        if volume.dtype == torch.uint8:
            acc = acc.clamp_(0.0, 255.0)
            floor = acc.floor()
            current = (floor + (acc - floor >= 0.5)).to(torch.uint8)
        else:
            current = acc.to(volume.dtype)
    return current


def matlab_imresize_torch(tensor: torch.Tensor, size: tuple[int, int], method: str = "bilinear") -> torch.Tensor:
    """`matlab_imresize` for a C x H x W or N x C x H x W uint8/float32 tensor, on any device.

    On the CPU it runs the blocked NumPy passes; elsewhere whole-tensor torch passes. Both give the
    same bits for the same input.
    """
    out_hw = _check_size(size)
    if tensor.dtype not in (torch.uint8, torch.float32, torch.float64):
        raise CaffeError(f"imresize: expected uint8, float32 or float64 data, got {tensor.dtype}")
    if tensor.dim() not in (3, 4):
        raise CaffeError(f"imresize: expected a C x H x W or N x C x H x W tensor, got shape {tuple(tensor.shape)}")
    lead = tensor.shape[:-2]
    volume = tensor.reshape(-1, *tensor.shape[-2:])
    if volume.device.type == "cpu":
        resized = torch.from_numpy(_resize_chw_numpy(np.ascontiguousarray(volume.detach().numpy()), out_hw, method))
    else:
        resized = _resize_chw_torch_ops(volume, out_hw, method)
    return resized.reshape(*lead, *out_hw)


def fast_resize(tensor: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Approximate `matlab_imresize_torch`: PyTorch bilinear, align_corners=False, antialias=True."""
    out_hw = _check_size(size)
    if tensor.dim() not in (3, 4):
        raise CaffeError(f"fast_resize: expected a C x H x W or N x C x H x W tensor, got shape {tuple(tensor.shape)}")
    batch = tensor if tensor.dim() == 4 else tensor[None]
    resized = F.interpolate(batch.float(), size=out_hw, mode="bilinear", align_corners=False, antialias=True)
    if tensor.dtype == torch.uint8:
        resized = resized.clamp_(0, 255)
        floor = resized.floor()
        resized = (floor + (resized - floor >= 0.5)).to(torch.uint8)
    elif resized.dtype != tensor.dtype:
        resized = resized.to(tensor.dtype)
    return resized if tensor.dim() == 4 else resized[0]
