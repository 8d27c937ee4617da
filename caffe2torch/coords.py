"""AutoCrop's offsets (HED / RCF forks): the net's coordinate maps walked back to a common blob, as the fork does.

Each layer maps its top's coordinates to its bottom's by y = a * x + b per spatial axis
(include/caffe/util/coords.hpp): a convolution or pooling by FilterMap(extent, stride, pad).inv(),
a deconvolution by FilterMap itself, an AutoCrop by (1, -crop), the neuron layers, Concat, Eltwise,
LRN, MVN, Slice, Softmax and Split by the identity; any other layer has none (the fork aborts). A BVLC
Crop maps by (1, -offsets[0]), (1, -offsets[1]) as the fork's crop_layer.hpp has it: the offsets of
axes 0 and 1 (N and C), so an axis-2 crop maps as the identity there, and here. auto_crop_layer.cpp
composes the maps from each bottom back to where their paths meet (through first bottoms, and each
blob's first producer, so in-place layers are never crossed); the crop is minus the offset of first
bottom -> second bottom. Exact fractions here, where the fork uses float and checks the result is
(1, -integer).
"""

from __future__ import annotations

from fractions import Fraction

from caffe2torch.errors import CaffeError
from proto import caffe_pb2

Map = tuple[tuple[Fraction, Fraction], tuple[Fraction, Fraction]]  # (scale, offset) for H and W
IDENTITY: Map = ((Fraction(1), Fraction(0)), (Fraction(1), Fraction(0)))
# Layers whose coord_map is the identity in the fork: its own list and every NeuronLayer (the forks' ReLU6 too).
POINTWISE = {"Concat", "Eltwise", "LRN", "MVN", "Slice", "Softmax", "Split", "ReLU", "PReLU", "Sigmoid", "TanH",
             "AbsVal", "BNLL", "Dropout", "Exp", "Log", "Power", "Threshold", "ELU", "ReLU6", "Clip", "Swish"}


def _compose(left: Map, right: Map) -> Map:
    return tuple((la * ra, la * rb + lb) for (la, lb), (ra, rb) in zip(left, right))


def _inverse(m: Map) -> Map:
    return tuple((1 / a, -b / a) for a, b in m)


def _pair(values, single: int | None, h: int, w: int, default: int) -> tuple[int, int]:
    if h or w:
        return int(h), int(w)
    if single is not None:
        return single, single
    values = list(values)
    if not values:
        return default, default
    return (int(values[0]), int(values[-1])) if len(values) <= 2 else (int(values[-2]), int(values[-1]))


def _filter_map(kernel: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int]) -> Map:
    return tuple((Fraction(s), Fraction(k - 1, 2) - p) for k, s, p in zip(kernel, stride, pad))


def coord_map(param: caffe_pb2.LayerParameter, crops: dict[str, tuple[int, int]]) -> Map | None:
    """The fork's coord_map() of one layer; None where the fork has none (NOT_IMPLEMENTED)."""
    kind = param.type
    if kind in POINTWISE:
        return IDENTITY
    if kind in ("Convolution", "Deconvolution"):
        conv = param.convolution_param
        kernel = _pair(conv.kernel_size, None, conv.kernel_h, conv.kernel_w, 1)
        stride = _pair(conv.stride, None, conv.stride_h, conv.stride_w, 1)
        pad = _pair(conv.pad, None, conv.pad_h, conv.pad_w, 0)
        dilation = _pair(conv.dilation, None, 0, 0, 1)
        extent = tuple(d * (k - 1) + 1 for d, k in zip(dilation, kernel))
        forward = _filter_map(extent, stride, pad)
        return _inverse(forward) if kind == "Convolution" else forward
    if kind == "Pooling":
        pool = param.pooling_param
        if pool.global_pooling:
            return None
        kernel = _pair((), pool.kernel_size if pool.HasField("kernel_size") else None, pool.kernel_h, pool.kernel_w, 1)
        stride = _pair((), pool.stride if not (pool.stride_h or pool.stride_w) else None,
                       pool.stride_h, pool.stride_w, 1)
        pad = _pair((), pool.pad if not (pool.pad_h or pool.pad_w) else None, pool.pad_h, pool.pad_w, 0)
        return _inverse(_filter_map(kernel, stride, pad))
    if kind == "Crop":
        crop = param.crop_param
        given = list(crop.offset) or [0]
        axis = crop.axis if crop.axis >= 0 else 4 + crop.axis
        # crop_layer.cpp's offsets, one per axis of a 4-axis blob; coord_map reads those of axes 0 and 1.
        offsets = [0 if d < axis else (given[0] if len(given) == 1 else given[d - axis]) for d in (0, 1)]
        return tuple((Fraction(1), Fraction(-s)) for s in offsets)
    if kind == "AutoCrop" and param.name in crops:
        return tuple((Fraction(1), Fraction(-s)) for s in crops[param.name])
    return None


def auto_crop_offsets(layers: list, index: int, crops: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """(crop_h, crop_w) of the AutoCrop layer `layers[index]` (graph.Layer objects, in net order)."""
    layer = layers[index]
    where = f"layer {layer.name!r} (AutoCrop)"
    if len(layer.bottoms) != 2:
        raise CaffeError(f"{where}: takes 2 bottoms (the blob to crop and the reference), got {len(layer.bottoms)}")
    producer: dict[str, int] = {}  # each blob's first producer, as the fork's down_map (in-place layers skipped)
    for position, earlier in enumerate(layers[:index]):
        for top in earlier.tops:
            producer.setdefault(top, position)

    def back(blob: str) -> str | None:
        position = producer.get(blob)
        if position is None or not layers[position].bottoms:
            return None
        return layers[position].bottoms[0]

    path, blob = {layer.bottoms[0]}, layer.bottoms[0]
    while (blob := back(blob)) is not None:
        path.add(blob)
    meet = layer.bottoms[1]
    while meet not in path:
        meet = back(meet)
        if meet is None:
            raise CaffeError(f"{where}: cannot align apparently disconnected blobs {layer.bottoms[0]!r} and "
                             f"{layer.bottoms[1]!r}")
    maps = []
    for start in layer.bottoms:
        composed, blob = IDENTITY, start
        while blob != meet:
            through = layers[producer[blob]]
            step = coord_map(through.param, crops)
            if step is None:
                why = ("global pooling, whose kernel is its input's size, is not mapped here"
                       if through.type == "Pooling" else "which has no coordinate map in the fork")
                raise CaffeError(f"{where}: the path to {meet!r} passes layer {through.name!r} ({through.type}), "
                                 f"{why}")
            composed = _compose(composed, step)
            blob = through.bottoms[0]
        maps.append(composed)
    crop = _compose(maps[1], _inverse(maps[0]))
    offsets = []
    for axis, (scale, offset) in zip("HW", crop):
        if scale != 1:
            raise CaffeError(f"{where}: the two bottoms differ in scale along {axis} ({scale}), nothing to crop")
        if offset > 0 or offset.denominator != 1:
            raise CaffeError(f"{where}: the crop along {axis} would be {-offset}, not a whole number >= 0")
        offsets.append(int(-offset))
    return offsets[0], offsets[1]
