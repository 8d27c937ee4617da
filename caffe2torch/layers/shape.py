"""Converters for Caffe's data-movement layers: Concat, Slice, Split, Flatten, Reshape, Crop (and AutoCrop), Tile,
ArgMax."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from torch import nn

from caffe2torch.bvlc import Tile
from caffe2torch.layers.registry import (Converted, Shape, canonical_axis, converter, expect_blobs, expect_bottoms,
                                         layer_error)
from caffe2torch.modules import ArgMax, Concat, Crop, Reshape, Slice, Split
from caffe2torch.vendor import FlattenConcat


def _single_bottom(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Shape:
    expect_bottoms(layer, inputs, 1)
    expect_blobs(layer, blobs, 0)
    return tuple(inputs[0])


@converter("Concat")
def convert_concat(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    expect_blobs(layer, blobs, 0)
    if not inputs:
        raise layer_error(layer, "needs at least 1 bottom")
    param = layer.concat_param
    first = tuple(inputs[0])
    if param.HasField("axis") and param.HasField("concat_dim"):
        raise layer_error(layer, "either axis or concat_dim should be specified, not both")
    if param.HasField("concat_dim"):
        # The legacy field is unsigned: no counting from the end.
        axis = param.concat_dim
        if axis >= len(first):
            raise layer_error(layer, f"concat_dim {axis} out of range for a {len(first)}-axis blob")
    else:
        axis = canonical_axis(layer, param.axis, len(first))
    engine = param.engine
    if param.per_fla_fuse and axis == 1 and engine not in (param.CAFFE, param.MKL2017):
        return _flatten_concat(layer, inputs)
    top = list(first)
    for index, shape in enumerate(inputs[1:], start=1):
        shape = tuple(shape)
        if len(shape) != len(first) or any(a != b for j, (a, b) in enumerate(zip(shape, first)) if j != axis):
            raise layer_error(layer, f"bottom {index} has shape {shape}, bottom 0 has {first}: all axes but {axis} must agree")
        top[axis] += shape[axis]
    return Converted(Concat(axis), [tuple(top)])


def _flatten_concat(layer, inputs: Sequence[Shape]) -> Converted:
    """Intel Caffe's `per_fla_fuse` along axis 1 (mkldnn_concat_layer.cpp, its default engine; its CAFFE and MKL2017
    engines ignore the field): each bottom contributes its count from axis 1, the axes after 1 become 1."""
    first = tuple(inputs[0])
    for index, shape in enumerate(inputs[1:], start=1):
        if len(shape) != len(first) or shape[0] != first[0]:
            raise layer_error(layer, f"per_fla_fuse: bottom {index} has shape {tuple(shape)}, bottom 0 has {first}: "
                                     f"they must agree in rank and on axis 0")
    total = sum(math.prod(shape[1:]) for shape in inputs)
    return Converted(FlattenConcat(len(first)), [(first[0], total) + (1,) * (len(first) - 2)])


@converter("Slice")
def convert_slice(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    shape = _single_bottom(layer, inputs, blobs)
    param = layer.slice_param
    num_tops = len(layer.top)
    if num_tops < 1:
        raise layer_error(layer, "needs at least 1 top")
    if param.HasField("axis") and param.HasField("slice_dim"):
        raise layer_error(layer, "either axis or slice_dim should be specified, not both")
    if param.HasField("slice_dim"):
        axis = param.slice_dim
        if axis >= len(shape):
            raise layer_error(layer, f"slice_dim {axis} out of range for a {len(shape)}-axis blob")
    else:
        axis = canonical_axis(layer, param.axis, len(shape))
    length = shape[axis]
    points = list(param.slice_point)
    if points:
        if len(points) != num_tops - 1:
            raise layer_error(layer, f"{len(points)} slice_point values for {num_tops} tops (need {num_tops - 1})")
        if num_tops > length:
            raise layer_error(layer, f"{num_tops} tops cannot slice axis {axis} of size {length}")
        sizes, previous = [], 0
        for point in points:
            if point <= previous:
                raise layer_error(layer, f"slice_point values must increase strictly and be positive, got {points}")
            sizes.append(point - previous)
            previous = point
        if previous > length:
            raise layer_error(layer, f"slice_point {previous} lies beyond axis {axis} of size {length}")
        sizes.append(length - previous)
    else:
        if length % num_tops:
            raise layer_error(layer, f"{num_tops} tops do not evenly divide axis {axis} of size {length}")
        sizes = [length // num_tops] * num_tops
    tops = [shape[:axis] + (size,) + shape[axis + 1 :] for size in sizes]
    return Converted(Slice(axis, tuple(points), num_tops), tops)


@converter("Split")
def convert_split(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    shape = _single_bottom(layer, inputs, blobs)
    num_tops = len(layer.top)
    if num_tops < 1:
        raise layer_error(layer, "needs at least 1 top")
    return Converted(Split(num_tops), [shape] * num_tops)


@converter("Flatten")
def convert_flatten(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    shape = _single_bottom(layer, inputs, blobs)
    start = canonical_axis(layer, layer.flatten_param.axis, len(shape))
    end = canonical_axis(layer, layer.flatten_param.end_axis, len(shape))
    if end + 1 < start:
        raise layer_error(layer, f"end_axis {layer.flatten_param.end_axis} lies before axis {layer.flatten_param.axis}")
    top = shape[:start] + (math.prod(shape[start : end + 1]),) + shape[end + 1 :]
    if end < start:  # Caffe inserts an axis of size 1 there; nn.Flatten cannot
        return Converted(Reshape((1,), start, 0), [top])
    return Converted(nn.Flatten(start, end), [top])


@converter("Reshape")
def convert_reshape(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    shape = _single_bottom(layer, inputs, blobs)
    param = layer.reshape_param
    rank = len(shape)
    dims = list(param.shape.dim)
    start = param.axis if param.axis >= 0 else rank + param.axis + 1
    if not 0 <= start <= rank:
        raise layer_error(layer, f"axis {param.axis} out of range for a {rank}-axis blob")
    if param.num_axes < -1:
        raise layer_error(layer, f"num_axes must be >= 0, or -1 for all, got {param.num_axes}")
    end = rank if param.num_axes == -1 else start + param.num_axes
    if end > rank:
        raise layer_error(layer, f"axis + num_axes = {end} is out of range for a {rank}-axis blob")
    if dims.count(-1) > 1:
        raise layer_error(layer, f"shape {dims} has more than one -1")
    if any(d < -1 for d in dims):
        raise layer_error(layer, f"shape {dims} has a negative dimension other than -1")
    resolved = []
    for i, d in enumerate(dims):
        if d == 0:
            if start + i >= rank:
                raise layer_error(layer, f"shape {dims} has a 0 at position {i} but the bottom has no axis {start + i} to copy")
            d = shape[start + i]
        resolved.append(d)
    count = math.prod(shape)
    if -1 in resolved:
        known = math.prod(d for d in resolved if d != -1) * math.prod(shape[:start]) * math.prod(shape[end:])
        if known == 0 or count % known:
            raise layer_error(layer, f"bottom count {count} is not divisible by the product of the given dimensions ({known})")
        resolved[resolved.index(-1)] = count // known
    top = shape[:start] + tuple(resolved) + shape[end:]
    if math.prod(top) != count:
        raise layer_error(layer, f"output shape {top} has {math.prod(top)} elements, bottom {shape} has {count}")
    # Caffe's rule again for the input the net gets (0 copies an axis, -1 takes what the count leaves)
    return Converted(Reshape(tuple(dims), param.axis, param.num_axes), [top])


@converter("Crop")
def convert_crop(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    expect_bottoms(layer, inputs, 2)
    expect_blobs(layer, blobs, 0)
    shape, reference = tuple(inputs[0]), tuple(inputs[1])
    rank = len(shape)
    param = layer.crop_param
    start = canonical_axis(layer, param.axis, rank)
    given = list(param.offset)
    cropped = rank - start
    if len(given) > 1 and len(given) != cropped:
        raise layer_error(layer, f"{len(given)} offsets for {cropped} cropped axes (axis {start} on): give one or one per axis")
    if len(reference) < rank:
        raise layer_error(layer, f"reference bottom shape {reference} has fewer axes than the data {shape}")
    offsets = given * cropped if len(given) == 1 else (given or [0] * cropped)
    top = list(shape)
    for axis, offset in zip(range(start, rank), offsets):
        if shape[axis] - offset < reference[axis]:
            raise layer_error(
                layer,
                f"crop of axis {axis} is out of bounds: size {reference[axis]} at offset {offset} "
                f"does not fit in {shape[axis]}",
            )
        top[axis] = reference[axis]
    return Converted(Crop(start, tuple(offsets)), [tuple(top)])


@converter("AutoCrop")
def convert_auto_crop(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """HED / RCF's AutoCrop: a Crop from axis 2 at the offsets the net's coordinate maps give (caffe2torch.coords,
    worked out when the net's graph is built)."""
    if len(layer.crop_param.offset) != 2:
        raise layer_error(layer, "its offsets come from the net's coordinate maps: convert the whole net")
    return convert_crop(layer, inputs, blobs)


@converter("Tile")
def convert_tile(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """The axes from `axis` on repeated `tiles` times along `axis` (tile_layer.cpp)."""
    shape = _single_bottom(layer, inputs, blobs)
    param = layer.tile_param
    axis = canonical_axis(layer, param.axis, len(shape))
    if not param.HasField("tiles") or param.tiles < 1:
        raise layer_error(layer, "tile_param needs tiles >= 1")
    top = shape[:axis] + (shape[axis] * param.tiles,) + shape[axis + 1:]
    return Converted(Tile(axis, param.tiles), [top])


@converter("ArgMax")
def convert_argmax(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    shape = _single_bottom(layer, inputs, blobs)
    param = layer.argmax_param
    top_k = param.top_k
    if top_k < 1:
        raise layer_error(layer, f"top_k must be at least 1, got {top_k}")
    if not shape:
        raise layer_error(layer, "bottom has no axes")
    if param.HasField("axis"):
        axis = canonical_axis(layer, param.axis, len(shape))
        if top_k > shape[axis]:
            raise layer_error(layer, f"top_k {top_k} exceeds the size {shape[axis]} of axis {axis}")
        top = shape[:axis] + (top_k,) + shape[axis + 1 :]
        return Converted(ArgMax(top_k, param.out_max_val, axis), [top])
    per_item = math.prod(shape[1:])
    if top_k > per_item:
        raise layer_error(layer, f"top_k {top_k} exceeds the {per_item} values per item")
    top_list = [1] * max(len(shape), 3)
    top_list[0], top_list[1], top_list[2] = shape[0], 2 if param.out_max_val else 1, top_k
    top = tuple(top_list)
    return Converted(ArgMax(top_k, param.out_max_val, None), [top])
