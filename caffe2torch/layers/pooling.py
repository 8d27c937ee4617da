"""Converters for Pooling (MAX, AVE) with Caffe's ceil output size, clipping rule, AVE divisor and empty windows,
and for SPP (spatial pyramid pooling)."""

from __future__ import annotations

import math

from caffe2torch.errors import CaffeError
from caffe2torch.layers.convolution import SIDES
from caffe2torch.layers.registry import (Converted, Shape, caffe_int, converter, expect_blobs, expect_bottoms,
                                         image_shape)
from caffe2torch.limits import check_top
from caffe2torch.bvlc import SPP, spp_level
from caffe2torch.modules import Pool2d, caffe_pooled_size, same_padding
from proto import caffe_pb2

MAX, AVE = "MAX", "AVE"


def _pair(layer, param, name: str, default: int | None) -> tuple[int, int] | None:
    """`name` for both axes, or `name_h` and `name_w` (Caffe accepts one form, not a mix)."""
    single = "kernel_size" if name == "kernel" else name
    has_h, has_w = param.HasField(f"{name}_h"), param.HasField(f"{name}_w")
    if has_h or has_w:
        if param.HasField(single) or not (has_h and has_w):
            raise CaffeError(
                f"layer {layer.name!r} (Pooling): give either {single} or both {name}_h and {name}_w"
            )
        return tuple(caffe_int(layer, f"{name}_h/{name}_w", [getattr(param, f"{name}_h"), getattr(param, f"{name}_w")]))
    if param.HasField(single) or default is not None:
        value, = caffe_int(layer, single, [getattr(param, single)])
        return value, value
    return None


def _side_pads(layer, param, size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int]
               ) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """synopsys-caffe's padding per side ((top, left), (bottom, right)), or None where the net uses pad / pad_h / pad_w.

    pad_type 1 is TensorFlow's "SAME" as the fork computes it: ceil(size / stride) windows, the padding the
    kernel needs beyond the input split with the smaller half first.
    """
    sided = any(getattr(param, name) for name in SIDES)
    if not sided and param.pad_type == 0:
        return None
    if param.HasField("pad") or param.HasField("pad_h") or param.HasField("pad_w") or sided and param.pad_type:
        raise CaffeError(f"layer {layer.name!r} (Pooling): give one of pad (or pad_h/pad_w), pad_l/r/t/b and "
                         f"pad_type")
    if sided:
        t, l, b, r = caffe_int(layer, "pad_t/l/b/r", [getattr(param, name) for name in SIDES])
        if max(t, b) >= kernel[0] or max(l, r) >= kernel[1]:
            # The fork does not check, and then pools windows lying wholly in the padding (dividing by their
            # unclipped, negative extents); Caffe itself refuses pad >= kernel.
            raise CaffeError(f"layer {layer.name!r} (Pooling): pad_t/b {t}/{b} and pad_l/r {l}/{r} must be smaller "
                             f"than the kernel {kernel}")
        return (t, l), (b, r)
    if param.pad_type != 1:
        raise CaffeError(f"layer {layer.name!r} (Pooling): unknown pad_type {param.pad_type} (0: Caffe's, 1: SAME)")
    along = [same_padding(n, k, s) for n, k, s in zip(size, kernel, stride)]
    return (along[0] // 2, along[1] // 2), (along[0] - along[0] // 2, along[1] - along[1] // 2)


@converter("Pooling")
def convert_pooling(layer, inputs: list[Shape], blobs: list) -> Converted:
    """Caffe rounds the output size up, then drops a last window that would start inside the padding.

    Intel Caffe's `avg_include_pad: false` (mkldnn_pooling_layer.cpp) leaves the padding out of AVE's count, as
    synopsys-caffe's AVE_EXC_PAD does.
    """
    expect_bottoms(layer, inputs, 1)
    expect_blobs(layer, blobs, 0)
    param = layer.pooling_param
    methods = {caffe_pb2.PoolingParameter.MAX: MAX, caffe_pb2.PoolingParameter.AVE: AVE,
               caffe_pb2.PoolingParameter.AVE_EXC_PAD: "AVE_EXC_PAD"}
    if param.pool not in methods:
        raise CaffeError(
            f"layer {layer.name!r} (Pooling): STOCHASTIC pooling has no CPU forward in Caffe; not supported"
        )
    if len(layer.top) > 2 or len(layer.top) == 2 and param.pool != caffe_pb2.PoolingParameter.MAX:
        raise CaffeError(f"layer {layer.name!r} (Pooling): only MAX pooling has a second (mask) top, and no third")
    shape = image_shape(layer, inputs)
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
    if param.HasField("ceil_mode"):  # the ceil_mode forks' field (BVLC PR #3057)
        if param.HasField("round_mode") and floor == param.ceil_mode:
            raise CaffeError(f"layer {layer.name!r} (Pooling): round_mode and ceil_mode disagree")
        floor = not param.ceil_mode
    size = tuple(shape[2:])
    kernel = size if kernel is None else kernel
    pad_end = pad
    sides = _side_pads(layer, param, size, kernel, stride)
    if sides is not None:
        if param.global_pooling:
            raise CaffeError(f"layer {layer.name!r} (Pooling): global_pooling takes no padding")
        pad, pad_end = sides
        floor = floor or param.pad_type == 1  # SAME: ceil(size / stride) windows, whatever the rounding
    clip = any(pad) or any(pad_end)
    out = tuple(caffe_pooled_size(n, k, s, p, clip, not floor, e)
                for n, k, s, p, e in zip(size, kernel, stride, pad, pad_end))
    if min(out) <= 0 or any(clip and (o - 1) * s >= n + p for o, s, n, p in zip(out, stride, size, pad)):
        padding = f"pad {pad}" if pad == pad_end else f"pad {pad} before and {pad_end} after"
        raise CaffeError(f"layer {layer.name!r} (Pooling): kernel {kernel}, stride {stride}, {padding} "
                         f"give no valid output on a {size} input")
    check_top(layer, shape[:2] + out, inputs)  # before the divisor table of that size is built
    same = sides is not None and param.pad_type == 1  # worked out again for each input size, as the fork does
    method = methods[param.pool]
    if method == AVE and not param.avg_include_pad:
        method = "AVE_EXC_PAD"
    module = Pool2d(method, None if param.global_pooling else kernel, stride, (0, 0) if same else pad,
                    ceil=not floor,
                    mask=len(layer.top) == 2, pad_end=None if pad_end == pad or same else pad_end, same=same)
    return Converted(module, [shape[:2] + module.output_size(size)] * (2 if module.mask else 1))


@converter("SPP")
def convert_spp(layer, inputs: list[Shape], blobs: list) -> Converted:
    """Caffe pooling at 2^level bins per axis for each pyramid level (kernel = stride = ceil(size / bins), pad
    (kernel * bins - size + 1) / 2), flattened and concatenated; height 1 keeps the [N, C, 1, 1] pooling."""
    expect_bottoms(layer, inputs, 1)
    expect_blobs(layer, blobs, 0)
    param = layer.spp_param
    shape = image_shape(layer, inputs)
    if param.pyramid_height < 1:
        raise CaffeError(f"layer {layer.name!r} (SPP): pyramid_height must be at least 1")
    if param.pool == caffe_pb2.SPPParameter.STOCHASTIC:
        raise CaffeError(f"layer {layer.name!r} (SPP): STOCHASTIC pooling has no CPU forward in Caffe; not supported")
    size = shape[2:]
    for level in range(param.pyramid_height):
        for n in size:
            kernel, pad = spp_level(n, level)
            if pad >= kernel and pad:  # PoolingLayer's CHECK_LT(pad, kernel)
                raise CaffeError(f"layer {layer.name!r} (SPP): level {level} of a {size[0]} x {size[1]} input needs "
                                 f"pad {pad} with kernel {kernel}; Caffe refuses it")
    method = MAX if param.pool == caffe_pb2.SPPParameter.MAX else AVE
    module = SPP(method, param.pyramid_height)
    levels = [Pool2d(method, (kh, kw), (kh, kw), (ph, pw)).output_size(size)
              for (kh, ph), (kw, pw) in ((spp_level(size[0], level), spp_level(size[1], level))
                                         for level in range(param.pyramid_height))]
    if param.pyramid_height == 1:
        return Converted(module, [shape[:2] + levels[0]])
    return Converted(module, [(shape[0], sum(shape[1] * math.prod(level) for level in levels))])
