"""Registry of layer converters: one function per Caffe layer type, looked up by the type string."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from caffe2torch.errors import CaffeError

Shape = tuple[int, ...]


@dataclass
class Converted:
    """What a converter makes of one Caffe layer.

    `module.forward(*bottoms)` takes the bottom tensors in Caffe's order and returns one tensor
    (one top) or a tuple (several tops, in Caffe's order). `top_shapes` are Caffe's shapes for
    the tops, computed by Caffe's own rules (they are checked against what the module returns).
    `warnings` are shown to the user at conversion time.
    """

    module: torch.nn.Module
    top_shapes: list[Shape]
    warnings: list[str] = field(default_factory=list)


# A converter receives the TEST-phase LayerParameter, the shapes of its bottoms and its
# parameter blobs as float32 arrays (already shaped as Caffe stores them).
ConverterFn = Callable[["object", Sequence[Shape], Sequence[np.ndarray]], Converted]

CONVERTERS: dict[str, ConverterFn] = {}


def converter(*type_names: str) -> Callable[[ConverterFn], ConverterFn]:
    """Register a function as the converter of one or more Caffe layer types."""

    def register(fn: ConverterFn) -> ConverterFn:
        for name in type_names:
            if name in CONVERTERS:
                raise RuntimeError(f"two converters registered for Caffe type {name!r}")
            CONVERTERS[name] = fn
        return fn

    return register


def supported_types() -> list[str]:
    return sorted(CONVERTERS)


def convert_layer(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """Convert one layer, with a clear error for an unknown type or a wrong number of blobs."""
    fn = CONVERTERS.get(layer.type)
    if fn is None:
        raise CaffeError(
            f"layer {layer.name!r}: unsupported type {layer.type!r} "
            f"(supported: {', '.join(supported_types())})"
        )
    return fn(layer, list(inputs), list(blobs))


def expect_blobs(layer, blobs: Sequence[np.ndarray], *counts: int) -> None:
    """Fail with the layer's name when it carries a number of parameter blobs Caffe would not accept."""
    if len(blobs) not in counts:
        wanted = " or ".join(str(c) for c in counts)
        raise CaffeError(f"layer {layer.name!r} ({layer.type}): expected {wanted} parameter blobs, got {len(blobs)}")


def expect_bottoms(layer, inputs: Sequence[Shape], *counts: int) -> None:
    if len(inputs) not in counts:
        wanted = " or ".join(str(c) for c in counts)
        raise CaffeError(f"layer {layer.name!r} ({layer.type}): expected {wanted} bottoms, got {len(inputs)}")


def expect_shape(layer, what: str, actual: Sequence[int], expected: Sequence[int]) -> None:
    """A parameter blob whose shape differs from what the layer needs: name the layer and both shapes."""
    if tuple(actual) != tuple(expected):
        raise CaffeError(
            f"layer {layer.name!r} ({layer.type}): {what} has shape {tuple(actual)}, expected {tuple(expected)}"
        )


def canonical_axis(layer, axis: int, rank: int) -> int:
    """Caffe's CanonicalAxisIndex: negative axes count from the end; out of range is an error."""
    if not -rank <= axis < rank:
        raise CaffeError(f"layer {layer.name!r} ({layer.type}): axis {axis} out of range for a {rank}-axis blob")
    return axis % rank
