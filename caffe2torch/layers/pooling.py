"""Converter for Pooling (MAX, AVE) with Caffe's ceil output size, clipping rule, AVE divisor and empty windows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from caffe2torch.errors import CaffeError
from caffe2torch.layers.registry import Converted, Shape, converter, expect_blobs, expect_bottoms
from proto import caffe_pb2

FLT_MAX = float(np.finfo(np.float32).max)
MAX, AVE = "MAX", "AVE"


def pooled_size(size: int, kernel: int, stride: int, pad: int, clip: bool, floor: bool = False) -> int:
    """Caffe's output size: ceil((size + 2 pad - kernel) / stride) + 1, then the padding clip.

    The clip (drop the last window if it starts at or beyond `size + pad`) runs on both axes
    whenever either axis is padded, exactly as PoolingLayer::Reshape does it; without padding a
    window may lie wholly outside the image (MAX gives -FLT_MAX there, AVE gives NaN).
    """
    span = size + 2 * pad - kernel
    out = (span // stride if floor else -(-span // stride)) + 1
    if clip and (out - 1) * stride >= size + pad:
        out -= 1
    return out


@dataclass(frozen=True)
class PoolGeometry:
    """Window layout of one pooling layer on one input size (all ints, cheap to recompute)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad: tuple[int, int]
    out: tuple[int, int]
    size: tuple[int, int]

    def edge_pads(self) -> tuple[int, int, int, int]:
        """F.pad amounts (left, right, top, bottom) giving exactly the rows/cols the windows span.

        The windows start at -pad and end at (out-1)*stride + kernel - pad; a negative amount
        at the far edge crops rows that no window reaches.
        """
        (ph, pw), (kh, kw), (sh, sw), (oh, ow), (h, w) = self.pad, self.kernel, self.stride, self.out, self.size
        return pw, (ow - 1) * sw + kw - pw - w, ph, (oh - 1) * sh + kh - ph - h

    def divisor(self) -> torch.Tensor:
        """Caffe's AVE divisor per output position, from the unclipped window start.

        Padded positions count, the part of a window beyond size + pad does not; an empty
        window gives 0 or a negative count (so Caffe's 0/0 = NaN, 0/negative = -0 follow).
        """
        per_axis = []
        for k, s, p, o, n in zip(self.kernel, self.stride, self.pad, self.out, self.size):
            start = np.arange(o, dtype=np.int64) * s - p
            per_axis.append(np.minimum(start + k, n + p) - start)
        counts = per_axis[0][:, None] * per_axis[1][None, :]
        return torch.from_numpy(counts.astype(np.float32))


def _pad_or_crop(x: torch.Tensor, pads: tuple[int, int, int, int], value: float) -> torch.Tensor:
    return x if not any(pads) else F.pad(x, pads, value=value)


def caffe_pool2d(x: torch.Tensor, method: str, geometry: PoolGeometry,
                 divisor: torch.Tensor | None = None) -> torch.Tensor:
    """Pool an NCHW tensor exactly as Caffe's CPU PoolingLayer (MAX or AVE)."""
    pads = geometry.edge_pads()
    if method == MAX:
        # Caffe starts each window at -FLT_MAX and only takes values strictly greater, so NaN
        # never wins and a window of -inf or of nothing at all yields -FLT_MAX.
        x = torch.nan_to_num(x, nan=-float("inf"), posinf=float("inf"), neginf=-float("inf"))
        pooled = F.max_pool2d(_pad_or_crop(x, pads, -float("inf")), geometry.kernel, geometry.stride)
        return pooled.clamp_min(-FLT_MAX)
    if divisor is None:
        divisor = geometry.divisor().to(x.device)
    # Zero padding does not change a float sum, so this is Caffe's sum over the clipped window.
    sums = F.avg_pool2d(_pad_or_crop(x, pads, 0.0), geometry.kernel, geometry.stride, divisor_override=1)
    return sums.div_(divisor)


class CaffePooling(nn.Module):
    """Caffe Pooling layer; the window layout is recomputed if the input size differs from conversion time."""

    def __init__(self, method: str, kernel: tuple[int, int] | None, stride: tuple[int, int],
                 pad: tuple[int, int], floor: bool, input_size: tuple[int, int], name: str = "") -> None:
        super().__init__()
        self.method, self.kernel, self.stride, self.pad = method, kernel, stride, pad
        self.floor, self.name = floor, name
        self.geometry = self.geometry_for(input_size)
        if method == AVE:
            self.register_buffer("divisor", self.geometry.divisor(), persistent=False)
        else:
            self.register_buffer("divisor", None, persistent=False)

    def geometry_for(self, size: tuple[int, int]) -> PoolGeometry:
        kernel = self.kernel if self.kernel is not None else tuple(size)  # global pooling
        clip = any(self.pad)
        out = tuple(pooled_size(n, k, s, p, clip, self.floor)
                    for n, k, s, p in zip(size, kernel, self.stride, self.pad))
        if min(out) <= 0 or any(clip and (o - 1) * s >= n + p for o, s, n, p in zip(out, self.stride, size, self.pad)):
            raise CaffeError(
                f"layer {self.name!r} (Pooling): kernel {kernel}, stride {self.stride}, pad {self.pad} "
                f"give no valid output on a {tuple(size)} input"
            )
        return PoolGeometry(tuple(kernel), tuple(self.stride), tuple(self.pad), out, tuple(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = (int(x.shape[-2]), int(x.shape[-1]))
        if size == self.geometry.size:
            return caffe_pool2d(x, self.method, self.geometry, self.divisor)
        return caffe_pool2d(x, self.method, self.geometry_for(size))


def _pair(layer, param, name: str, default: int | None) -> tuple[int, int] | None:
    """`name` for both axes, or `name_h` and `name_w` (Caffe accepts one form, not a mix)."""
    single = "kernel_size" if name == "kernel" else name
    has_h, has_w = param.HasField(f"{name}_h"), param.HasField(f"{name}_w")
    if has_h or has_w:
        if param.HasField(single) or not (has_h and has_w):
            raise CaffeError(
                f"layer {layer.name!r} (Pooling): give either {single} or both {name}_h and {name}_w"
            )
        return int(getattr(param, f"{name}_h")), int(getattr(param, f"{name}_w"))
    if param.HasField(single) or default is not None:
        value = int(getattr(param, single))
        return value, value
    return None


@converter("Pooling")
def convert_pooling(layer, inputs: list[Shape], blobs: list) -> Converted:
    expect_bottoms(layer, inputs, 1)
    expect_blobs(layer, blobs, 0)
    param = layer.pooling_param
    methods = {caffe_pb2.PoolingParameter.MAX: MAX, caffe_pb2.PoolingParameter.AVE: AVE}
    if param.pool not in methods:
        raise CaffeError(
            f"layer {layer.name!r} (Pooling): STOCHASTIC pooling has no CPU forward in Caffe; not supported"
        )
    if len(layer.top) > 1:
        raise CaffeError(f"layer {layer.name!r} (Pooling): the second (argmax mask) top is not supported")
    shape = tuple(inputs[0])
    if len(shape) != 4:
        raise CaffeError(f"layer {layer.name!r} (Pooling): input must have 4 axes (N, C, H, W), got {shape}")
    pad = _pair(layer, param, "pad", 0)
    stride = _pair(layer, param, "stride", 1)
    if param.global_pooling:
        if param.HasField("kernel_size") or param.HasField("kernel_h") or param.HasField("kernel_w"):
            raise CaffeError(f"layer {layer.name!r} (Pooling): global_pooling takes no kernel size")
        if pad != (0, 0) or stride != (1, 1):
            raise CaffeError(f"layer {layer.name!r} (Pooling): global_pooling needs pad 0 and stride 1")
        kernel = None
    else:
        kernel = _pair(layer, param, "kernel", None)
        if kernel is None:
            raise CaffeError(f"layer {layer.name!r} (Pooling): kernel_size (or kernel_h and kernel_w) is required")
        if min(kernel) <= 0:
            raise CaffeError(f"layer {layer.name!r} (Pooling): kernel size must be positive, got {kernel}")
        if any(pad) and (pad[0] >= kernel[0] or pad[1] >= kernel[1]):
            raise CaffeError(f"layer {layer.name!r} (Pooling): pad {pad} must be smaller than kernel {kernel}")
    if min(stride) <= 0:
        raise CaffeError(f"layer {layer.name!r} (Pooling): stride must be positive, got {stride}")
    floor = param.HasField("round_mode") and param.round_mode == caffe_pb2.PoolingParameter.FLOOR
    module = CaffePooling(methods[param.pool], kernel, stride, pad, floor, shape[2:], layer.name)
    return Converted(module, [shape[:2] + module.geometry.out])
