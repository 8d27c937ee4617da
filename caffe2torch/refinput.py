"""The synthetic inputs of the Caffe reference files, made anew for any shape (checks without a reference file).

Element (n, c, y, x) of an N x C x H x W blob is a smooth image with a disk, a rectangle and a
texture, rounded, plus integer noise from C++ std::mt19937(seed XOR 0x9E3779B9), one draw per
element in C order, clamped to [-128, 127]; `unit` mode divides by 64. This reproduces the
stored `/input` datasets of ../shared/reference bit for bit (rank 3: C = 1; rank <= 2: H = 1).
"""

from __future__ import annotations

import math

import numpy as np


def _nchw(shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """The 4-D layout the generator draws in. The references have 1 to 4 axes; other ranks (a 3-D
    convolution's N x C x D x H x W, a scalar) are drawn with the middle axes as channels, reshaped."""
    if len(shape) == 4:
        return shape  # type: ignore[return-value]
    if len(shape) == 3:
        return shape[0], 1, shape[1], shape[2]
    if len(shape) == 2:
        return shape[0], 1, 1, shape[1]
    if len(shape) == 1:
        return 1, 1, 1, shape[0]
    if not shape:
        return 1, 1, 1, 1
    return shape[0], math.prod(shape[1:-2]), shape[-2], shape[-1]


def reference_input(shape: tuple[int, ...], seed: int, mode: str = "unit") -> np.ndarray:
    """The float32 input the reference generator makes for `shape` ('image': integers, 'unit': /64)."""
    if mode not in ("image", "unit"):
        raise ValueError(f"mode must be 'image' or 'unit', got {mode!r}")
    shape = tuple(int(d) for d in shape)
    batch, channels, height, width = _nchw(shape)
    n = np.arange(batch, dtype=np.float64)[:, None, None, None]
    c = np.arange(channels, dtype=np.float64)[None, :, None, None]
    u = np.arange(width, dtype=np.float64)[None, None, None, :] / max(width - 1, 1)
    t = np.arange(height, dtype=np.float64)[None, None, :, None] / max(height - 1, 1)
    channel = np.arange(channels)[None, :, None, None]
    v = 100 * (u - 0.5) * np.cos(1.3 * c + n) + 80 * (t - 0.5) * np.sin(0.7 * c + 1 + n)
    v = v + np.where((u - 0.3) ** 2 + (t - 0.4) ** 2 < 0.04, np.where(channel % 2 == 1, 60.0, -60.0), 0.0)
    v = v + np.where((0.55 <= u) & (u <= 0.85) & (0.5 <= t) & (t <= 0.9), -50.0 + 25.0 * (channel % 5), 0.0)
    v = v + 20 * np.sin(2 * math.pi * (6 * u + 3 * t) + c)
    # RandomState seeded with an int is std::mt19937's init_genrand; a full-range uint32 draw is one raw output.
    draws = np.random.RandomState((seed ^ 0x9E3779B9) & 0xFFFFFFFF).randint(
        0, 2**32, size=batch * channels * height * width, dtype=np.uint64).reshape(batch, channels, height, width)
    q = np.clip(np.floor(v + 0.5) + (draws % 17).astype(np.float64) - 8, -128, 127)
    return (q if mode == "image" else q / 64).reshape(shape).astype(np.float32)


def reference_inputs(shapes: dict[str, tuple[int, ...]], seed: int = 0, mode: str = "unit") -> dict[str, np.ndarray]:
    """Inputs for a net as the reference generator makes them; input i uses seed + i."""
    return {name: reference_input(shape, seed + index, mode) for index, (name, shape) in enumerate(shapes.items())}
