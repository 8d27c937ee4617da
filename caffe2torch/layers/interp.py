"""Converter for the PSPNet fork's Interp layer: corner-aligned bilinear resize, bit-close to caffe_cpu_interp2."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from caffe2torch.errors import CaffeError
from caffe2torch.layers.registry import Converted, Shape, converter, expect_blobs, expect_bottoms


def interp_axis(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights along one axis, in float32 exactly as caffe_cpu_interp2 computes them.

    ratio = float(size_in - 1) / (size_out - 1) (0 for one output), position = ratio * i in
    float32, index = truncation, weight of the next sample = position - index, and the next
    sample is the same one at the last row/column.
    """
    ratio = np.float32(size_in - 1) / np.float32(size_out - 1) if size_out > 1 else np.float32(0)
    position = ratio * np.arange(size_out, dtype=np.float32)
    index = position.astype(np.int64)
    next_index = index + (index < size_in - 1)
    far_weight = position - index.astype(np.float32)
    near_weight = np.float32(1) - far_weight
    return index, next_index, near_weight, far_weight


@dataclass(frozen=True)
class InterpSizeRule:
    """The fork's InterpLayer::Reshape output size rules, in its order of precedence."""

    layer_name: str
    shrink: int | None
    zoom: int | None
    height: int | None
    width: int | None

    @classmethod
    def from_layer(cls, layer) -> "InterpSizeRule":
        param = layer.interp_param

        def given(field: str) -> int | None:
            return int(getattr(param, field)) if param.HasField(field) else None

        rule = cls(layer.name, given("shrink_factor"), given("zoom_factor"), given("height"), given("width"))
        if rule.shrink is None and rule.zoom is None and (rule.height is None or rule.width is None):
            raise CaffeError(
                f"layer {layer.name!r} (Interp): needs zoom_factor, shrink_factor, or both height and width"
            )
        return rule

    def _factor(self, name: str, value: int) -> int:
        if value < 1:
            raise CaffeError(f"layer {self.layer_name!r} (Interp): {name} must be >= 1, got {value}")
        return value

    def __call__(self, height_eff: int, width_eff: int) -> tuple[int, int]:
        sizes = (height_eff, width_eff)
        if self.shrink is not None and self.zoom is None:
            shrink = self._factor("shrink_factor", self.shrink)
            sizes = tuple((n - 1) // shrink + 1 for n in sizes)
        elif self.zoom is not None and self.shrink is None:
            zoom = self._factor("zoom_factor", self.zoom)
            sizes = tuple(n + (n - 1) * (zoom - 1) for n in sizes)
        elif self.height is not None and self.width is not None:
            sizes = (self.height, self.width)
        else:  # both factors: shrink first, then zoom
            shrink, zoom = self._factor("shrink_factor", self.shrink), self._factor("zoom_factor", self.zoom)
            sizes = tuple((n - 1) // shrink + 1 for n in sizes)
            sizes = tuple(n + (n - 1) * (zoom - 1) for n in sizes)
        if min(sizes) <= 0:
            raise CaffeError(f"layer {self.layer_name!r} (Interp): output size {sizes} must be positive")
        return sizes


class CaffeInterp(nn.Module):
    """Crop by -pad_beg (both axes) to the effective size, then bilinear resize with corner alignment.

    The horizontal pass is done per source row and the vertical pass combines rows, which
    evaluates Caffe's h0*(w0*p00 + w1*p01) + h1*(w0*p10 + w1*p11) in the same order (separate
    float32 multiplies and adds, no fused ops), so results match Caffe bit for bit.
    """

    def __init__(self, pad_beg: int, pad_end: int, out_size: tuple[int, int], input_size: tuple[int, int],
                 size_rule: InterpSizeRule | None = None) -> None:
        super().__init__()
        self.pad_beg, self.pad_end = pad_beg, pad_end
        self.size_rule = size_rule  # maps (H_eff, W_eff) to the output size for other input sizes
        self.input_size, self.out_size = tuple(input_size), tuple(out_size)
        for name, value in zip(("h", "w"), self._tables(self.input_size, self.out_size)):
            for part, tensor in zip(("index", "next", "near", "far"), value):
                self.register_buffer(f"{name}_{part}", tensor, persistent=False)

    def effective_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return size[0] + self.pad_beg + self.pad_end, size[1] + self.pad_beg + self.pad_end

    def _tables(self, input_size: tuple[int, int], out_size: tuple[int, int]) -> list[tuple[torch.Tensor, ...]]:
        return [tuple(torch.from_numpy(a) for a in interp_axis(n_in, n_out))
                for n_in, n_out in zip(self.effective_size(input_size), out_size)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = (int(x.shape[-2]), int(x.shape[-1]))
        if size == self.input_size:
            out_size = self.out_size
            h_tab = (self.h_index, self.h_next, self.h_near, self.h_far)
            w_tab = (self.w_index, self.w_next, self.w_near, self.w_far)
        else:
            if self.size_rule is None:
                raise ValueError(f"Interp converted for input {self.input_size}, got {size}")
            out_size = self.size_rule(*self.effective_size(size))
            h_tab, w_tab = (tuple(t.to(x.device) for t in tab) for tab in self._tables(size, out_size))
        eff_h, eff_w = self.effective_size(size)
        start = -self.pad_beg
        x = x[..., start:start + eff_h, start:start + eff_w]
        if (eff_h, eff_w) == tuple(out_size):
            return x.clone()
        h_index, h_next, h_near, h_far = h_tab
        w_index, w_next, w_near, w_far = w_tab

        def horizontal(rows: torch.Tensor) -> torch.Tensor:
            # Advanced indexing copies, so the in-place ops below touch only fresh tensors
            # (and avoid extra full-size temporaries, which dominate the time at 1025x2049).
            return rows[..., w_index].mul_(w_near).add_(rows[..., w_next].mul_(w_far))

        if 2 * out_size[0] < eff_h:
            # Downsampling: interpolate only the source rows that are used.
            near_rows, far_rows = horizontal(x[..., h_index, :]), horizontal(x[..., h_next, :])
        else:
            per_source_row = horizontal(x)
            near_rows, far_rows = per_source_row[..., h_index, :], per_source_row[..., h_next, :]
        return near_rows.mul_(h_near[:, None]).add_(far_rows.mul_(h_far[:, None]))


@converter("Interp")
def convert_interp(layer, inputs: list[Shape], blobs: list) -> Converted:
    expect_bottoms(layer, inputs, 1)
    expect_blobs(layer, blobs, 0)
    shape = tuple(inputs[0])
    if len(shape) != 4:
        raise CaffeError(f"layer {layer.name!r} (Interp): input must have 4 axes (N, C, H, W), got {shape}")
    param = layer.interp_param
    pad_beg, pad_end = int(param.pad_beg), int(param.pad_end)
    if pad_beg > 0 or pad_end > 0:
        raise CaffeError(
            f"layer {layer.name!r} (Interp): pad_beg and pad_end must be <= 0 (cropping only), "
            f"got {pad_beg} and {pad_end}"
        )
    eff = (shape[2] + pad_beg + pad_end, shape[3] + pad_beg + pad_end)
    if min(eff) <= 0:
        raise CaffeError(f"layer {layer.name!r} (Interp): cropping leaves an empty {eff} input")
    size_rule = InterpSizeRule.from_layer(layer)
    out_size = size_rule(*eff)
    module = CaffeInterp(pad_beg, pad_end, out_size, shape[2:], size_rule)
    return Converted(module, [shape[:2] + tuple(out_size)])
