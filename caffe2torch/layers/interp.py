"""Converter for the PSPNet fork's Interp layer: corner-aligned bilinear resize, bit-close to caffe_cpu_interp2."""

from __future__ import annotations

from dataclasses import dataclass

from caffe2torch.errors import CaffeError
from caffe2torch.layers.registry import Converted, Shape, converter, expect_blobs, expect_bottoms, image_shape
from caffe2torch.limits import check_top
from caffe2torch.modules import Interp


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


@converter("Interp")
def convert_interp(layer, inputs: list[Shape], blobs: list) -> Converted:
    """Crop by the (non-positive) pads, then corner-aligned bilinear resize to the size the rules give."""
    expect_bottoms(layer, inputs, 1)
    expect_blobs(layer, blobs, 0)
    shape = image_shape(layer, inputs)
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
    rule = InterpSizeRule.from_layer(layer)
    out_size = rule(*eff)  # checks the factors and the size, with the layer's name
    check_top(layer, shape[:2] + tuple(out_size), inputs)
    module = Interp(rule.shrink, rule.zoom, rule.height, rule.width, pad_beg, pad_end)
    return Converted(module, [shape[:2] + tuple(module.output_size(shape[2:]))])
