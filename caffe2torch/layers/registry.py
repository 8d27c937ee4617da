"""Registry of layer converters: one function per Caffe layer type, looked up by the type string."""

from __future__ import annotations

import ast
import math
import numbers
import re
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
    (one top) or a tuple (several tops, in Caffe's order); with `per_bottom` it is called once per
    bottom, each call making the top of the same index (Caffe's convolutions share their weights
    over several bottoms that way). `top_shapes` are Caffe's shapes for the tops, computed by
    Caffe's own rules. `warnings` are shown to the user at conversion time.
    """

    module: torch.nn.Module
    top_shapes: list[Shape]
    warnings: list[str] = field(default_factory=list)
    per_bottom: bool = False


def on_meta(factory: Callable[..., torch.nn.Module], *args, **kwargs) -> torch.nn.Module:
    """A torch module built without allocating or initialising its tensors (they are assigned next)."""
    with torch.device("meta"):
        return factory(*args, **kwargs)


def assign(module: torch.nn.Module, **tensors: torch.Tensor | None) -> torch.nn.Module:
    """Give a module built `on_meta` its Caffe tensors: parameters stay parameters, buffers buffers."""
    for name, value in tensors.items():
        if name in module._parameters:
            old = module._parameters[name]
            module._parameters[name] = None if value is None else torch.nn.Parameter(
                value, requires_grad=True if old is None else old.requires_grad)
        elif name in module._buffers:
            module._buffers[name] = value
        else:
            raise AttributeError(f"{type(module).__name__} has no parameter or buffer {name!r}")
    left = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{type(module).__name__}: no value given for {left}")
    return module


# A converter receives the TEST-phase LayerParameter, the shapes of its bottoms and its
# parameter blobs as float32 arrays (already shaped as Caffe stores them).
ConverterFn = Callable[["object", Sequence[Shape], Sequence[np.ndarray]], Converted]

CONVERTERS: dict[str, ConverterFn] = {}


# The converters of caffe2torch itself: an exception other than CaffeError from one of them is our bug
# and keeps its traceback; a plugin's is reported in one line (see convert_layer).
_BUILT_IN: set[Callable] = set()

CONTRACT = ("a converter must return caffe2torch.Converted(module, top_shapes): an nn.Module and one shape (a "
            "sequence of positive ints) per top (README 'Plugins')")


def converter(*type_names: str) -> Callable[[ConverterFn], ConverterFn]:
    """Register a built-in function as the converter of one or more Caffe layer types."""

    def register(fn: ConverterFn) -> ConverterFn:
        for name in type_names:
            register_converter(name)(fn)
        _BUILT_IN.add(fn)
        return fn

    return register


def register_converter(type_name: str, *, replace: bool = False) -> Callable[[ConverterFn], ConverterFn]:
    """The plugin API: register `fn(layer, inputs, blobs) -> Converted` for a Caffe type the built-ins lack.

    `type_name` is the layer's type string, or for Caffe's `Python` layers "Python:module.Layer" as
    its `python_param { module: ... layer: ... }` name it. The converter gets the TEST-phase
    LayerParameter, the bottom shapes and the layer's blobs (float32 arrays), as the built-ins do.
    `replace` allows taking over a type that already has a converter. A name that is not a non-empty
    string, or a converter that is not callable, is refused here (TypeError or ValueError, one line);
    what a converter returns is checked each time it is used (`convert_layer`).
    """
    if not isinstance(type_name, str):
        raise TypeError(f"register_converter takes the Caffe type name, got {type(type_name).__name__}: use "
                        f"@caffe2torch.register_converter(\"Type\") with the name in parentheses")
    if not type_name.strip():
        raise ValueError("register_converter: the Caffe type name is empty")

    def register(fn: ConverterFn) -> ConverterFn:
        if not callable(fn):
            raise TypeError(f"register_converter({type_name!r}): the converter must be a function "
                            f"fn(layer, inputs, blobs) -> caffe2torch.Converted, got {type(fn).__name__}")
        if type_name in CONVERTERS and not replace:
            raise ValueError(f"Caffe type {type_name!r} already has a converter; pass replace=True to take it over")
        CONVERTERS[type_name] = fn
        return fn

    return register


# BVLC types with a forward that have no converter, and why (the message for any other type: no converter).
_NOT_CONVERTED = {
    "Filter": "a layer whose output size depends on the data is not converted: type",
}


def supported_types() -> list[str]:
    return sorted(CONVERTERS)


def converter_key(layer) -> str:
    """The registry key of a layer: its type, or "Python:module.Layer" for Caffe's Python layers."""
    if layer.type == "Python":
        return f"Python:{layer.python_param.module}.{layer.python_param.layer}"
    return layer.type


def convert_layer(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """Convert one layer, with a clear error for an unknown type or a wrong number of blobs."""
    key = converter_key(layer)
    fn = CONVERTERS.get(key)
    if fn is None:
        why = _NOT_CONVERTED.get(key, "no converter for type")
        raise CaffeError(
            f"layer {layer.name!r}: {why} {key!r}; register one with "
            f"@caffe2torch.register_converter({key!r}) (README: 'Plugins'). Built in: "
            f"{', '.join(t for t in supported_types() if ':' not in t)}"
        )
    try:
        converted = fn(layer, list(inputs), list(blobs))
    except (CaffeError, MemoryError):
        raise
    except Exception as error:
        if fn in _BUILT_IN:
            raise
        # A plugin's failure is the plugin author's to fix: one line here; the cause stays chained for the API.
        reason = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
        raise CaffeError(f"layer {layer.name!r} ({layer.type}): its converter {_describe(fn)} failed: "
                         f"{type(error).__name__}{': ' + reason[:200] if reason else ''}") from error
    _check_converted(layer, converted, fn)
    converted.module.eval()  # Caffe's TEST phase
    return converted


def _describe(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', None) or '?'}.{getattr(fn, '__qualname__', None) or type(fn).__name__}"


def _check_converted(layer, converted, fn: Callable) -> None:
    """The contract every converter's result must meet; a plugin that breaks it fails here in one line."""
    def broken(what: str) -> CaffeError:
        return CaffeError(f"layer {layer.name!r} ({layer.type}): its converter {_describe(fn)} {what}; {CONTRACT}")

    if not isinstance(converted, Converted):
        raise broken(f"returned {type(converted).__name__}")
    if not isinstance(converted.module, torch.nn.Module):
        raise broken(f"returned a module that is a {type(converted.module).__name__}, not an nn.Module")
    shapes = converted.top_shapes
    # A built-in's size below 1 comes from the file (a crop past the blob ...): model.assemble names the top then.
    least = -math.inf if fn in _BUILT_IN else 1
    if not isinstance(shapes, (list, tuple)) or not all(
            isinstance(shape, (list, tuple)) and all(isinstance(d, numbers.Integral) and not isinstance(d, bool)
                                                     and d >= least for d in shape) for shape in shapes):
        raise broken(f"returned top_shapes {_short(shapes)}")
    if not isinstance(converted.warnings, (list, tuple)) or not all(isinstance(w, str) for w in converted.warnings):
        raise broken(f"returned warnings {_short(converted.warnings)} (a list of strings)")
    converted.top_shapes = [tuple(int(d) for d in shape) for shape in shapes]


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def expect_blobs(layer, blobs: Sequence[np.ndarray], *counts: int) -> None:
    """Fail with the layer's name when it carries a number of parameter blobs Caffe would not accept."""
    if len(blobs) not in counts:
        wanted = " or ".join(str(c) for c in counts)
        raise CaffeError(f"layer {layer.name!r} ({layer.type}): expected {wanted} parameter blobs, got {len(blobs)}")


def expect_bottoms(layer, inputs: Sequence[Shape], *counts: int) -> None:
    if len(inputs) not in counts:
        wanted = " or ".join(str(c) for c in counts)
        raise CaffeError(f"layer {layer.name!r} ({layer.type}): expected {wanted} bottoms, got {len(inputs)}")


INT_MAX = 2**31 - 1


def caffe_int(layer, name: str, values: Sequence[int]) -> list[int]:
    """Sizes Caffe keeps in a C int (kernel, stride, pad, dilation, local_size ...): a file's value past
    that range means something else to Caffe (it wraps) and overflows torch's kernels, so it is refused."""
    values = [int(v) for v in values]
    for value in values:
        if not -INT_MAX - 1 <= value <= INT_MAX:
            raise layer_error(layer, f"{name} {value} does not fit the 32-bit int Caffe keeps it in")
    return values


def layer_error(layer, message: str) -> CaffeError:
    """The one-line error of a layer: its name and type, then `message`."""
    return CaffeError(f"layer {layer.name!r} ({layer.type}): {message}")


def image_shape(layer, inputs: Sequence[Shape], index: int = 0) -> Shape:
    """Bottom `index`'s shape, which must have Caffe's 4 legacy axes (N, C, H, W)."""
    shape = tuple(inputs[index])
    if len(shape) != 4:
        which = "input" if len(inputs) == 1 else f"bottom {index}"
        raise layer_error(layer, f"{which} must have 4 axes (N, C, H, W), got {shape}")
    return shape


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


def parse_param_str(layer, text: str) -> dict:
    """A Python layer's param_str, the YAML mapping py-faster-rcnn writes ("'feat_stride': 16", maybe
    "scales: !!python/tuple [8, 16]"), without PyYAML: bare keys quoted, then a Python literal."""
    body = text.strip().replace("!!python/tuple", "")
    if not body:
        return {}
    if not body.startswith("{"):
        body = "{" + ", ".join(part for part in re.split(r"[\n;]+", body) if part.strip()) + "}"
    body = re.sub(r"([{,]\s*)([A-Za-z_]\w*)\s*:", r"\1'\2':", body)
    try:
        value = ast.literal_eval(body)
    except (ValueError, SyntaxError):
        raise CaffeError(f"layer {layer.name!r} ({layer.type}): cannot read param_str {text!r} "
                         f"(expected a mapping like \"'feat_stride': 16\")") from None
    if not isinstance(value, dict):
        raise CaffeError(f"layer {layer.name!r} ({layer.type}): param_str {text!r} is not a mapping")
    return value
