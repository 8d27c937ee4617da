"""The converted network: a plain nn.Module that runs Caffe's layers in order and names every blob as Caffe does."""

from __future__ import annotations

import warnings as warnings_module
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from caffe2torch.errors import CaffeError
from caffe2torch.fill import placeholder_blobs
from caffe2torch.graph import Layer, NetGraph, build_graph, output_blobs
from caffe2torch.layers import convert_layer
from proto import caffe_pb2

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Step:
    """One layer call: which module, which blobs it reads, which it writes."""

    name: str
    type: str
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]
    top_shapes: tuple[Shape, ...] = ()


def module_key(layer_name: str) -> str:
    """Caffe layer names may hold '.', which nn.Module names cannot."""
    return layer_name.replace(".", "\u2024") if layer_name else "_"


class CaffeNet(nn.Module):
    """Caffe's forward pass in PyTorch.

    `net(x)` returns the net's output blob (or a tuple of them, in Caffe's order); `net.blobs(x)`
    returns every blob by its Caffe name, holding for in-place layers the value after the last
    layer that writes it.
    """

    def __init__(self, name: str, inputs: Mapping[str, Shape], steps: Sequence[Step],
                 modules: Mapping[str, nn.Module], shapes: Mapping[str, Shape], outputs: Sequence[str]):
        super().__init__()
        self.name = name
        self.input_shapes = dict(inputs)
        self.steps = list(steps)
        self.layers = nn.ModuleDict({module_key(step.name): modules[step.name] for step in steps})
        self.blob_shapes = dict(shapes)
        self.outputs = list(outputs)

    @property
    def input_names(self) -> list[str]:
        return list(self.input_shapes)

    def layer(self, name: str) -> nn.Module:
        return self.layers[module_key(name)]

    def _bind_inputs(self, args: Sequence[torch.Tensor], kwargs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        blobs = dict(zip(self.input_names, args))
        blobs.update(kwargs)
        missing = [name for name in self.input_names if name not in blobs]
        if missing or len(args) > len(self.input_names):
            raise TypeError(f"{self.name or 'net'} takes inputs {self.input_names}; missing {missing}")
        return blobs

    def run(self, *args: torch.Tensor, after_layer: Callable[[Step, tuple[torch.Tensor, ...]], None] | None = None,
            **kwargs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run every layer; `after_layer(step, tops)` sees each layer's outputs right after it runs."""
        blobs = self._bind_inputs(args, kwargs)
        for step in self.steps:
            result = self.layers[module_key(step.name)](*(blobs[b] for b in step.bottoms))
            tops = result if isinstance(result, tuple) else (result,)
            for top, value in zip(step.tops, tops):
                blobs[top] = value
            if after_layer is not None:
                after_layer(step, tops)
        return blobs

    def blobs(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.run(*args, **kwargs)

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor):
        blobs = self.run(*args, **kwargs)
        if len(self.outputs) == 1:
            return blobs[self.outputs[0]]
        return tuple(blobs[name] for name in self.outputs)


def _check_shapes(layer: Layer, converted_shapes: Sequence[Shape]) -> None:
    if len(converted_shapes) != len(layer.tops):
        raise CaffeError(f"layer {layer.name!r} ({layer.type}): makes {len(converted_shapes)} tops, the net names {len(layer.tops)}")


def assemble(graph: NetGraph, weights: Mapping[str, Sequence[np.ndarray]],
             on_warning: Callable[[str], None] | None = None, fill_missing: bool = False) -> CaffeNet:
    """Convert each TEST-phase layer with the trained blobs of the layer of the same name.

    `fill_missing` gives layers without trained blobs zero-filled ones of Caffe's shapes (for
    looking at a structure, not for use).
    """
    shapes: dict[str, Shape] = dict(graph.inputs)
    modules: dict[str, nn.Module] = {}
    steps: list[Step] = []
    for layer in graph.layers:
        bottoms = [shapes[b] for b in layer.bottoms]
        blobs = list(weights.get(layer.name, []))
        if not blobs and fill_missing:
            blobs = placeholder_blobs(layer.param, bottoms)
        try:
            converted = convert_layer(layer.param, bottoms, blobs)
        except CaffeError as error:
            if weights and layer.name not in weights and "parameter blobs" in str(error):
                raise CaffeError(f"{error} (the weights hold no layer named {layer.name!r})") from None
            raise
        _check_shapes(layer, converted.top_shapes)
        for message in converted.warnings:
            text = f"layer {layer.name!r} ({layer.type}): {message}"
            if on_warning is not None:
                on_warning(text)
            else:
                warnings_module.warn(text, stacklevel=2)
        for top, shape in zip(layer.tops, converted.top_shapes):
            if any(d <= 0 for d in shape):
                raise CaffeError(f"layer {layer.name!r} ({layer.type}): top {top!r} would have shape {tuple(shape)}")
            shapes[top] = tuple(int(d) for d in shape)
        modules[layer.name] = converted.module
        steps.append(Step(layer.name, layer.type, tuple(layer.bottoms), tuple(layer.tops),
                          tuple(shapes[top] for top in layer.tops)))
    net = CaffeNet(graph.name, graph.inputs, steps, modules, shapes, output_blobs(graph))
    return net.eval()


def unmatched_weights(definition: caffe_pb2.NetParameter, weights: Mapping[str, Sequence[np.ndarray]],
                      weights_source: str, definition_source: str) -> list[str]:
    """Weighted layers of the weights file that the definition does not have (Caffe ignores them).

    None matching at all means the wrong file: that is an error, raised before any conversion.
    """
    unmatched = sorted(set(weights) - {layer.name for layer in definition.layer})
    if weights and len(unmatched) == len(weights):
        raise CaffeError(f"{weights_source}: none of its {len(weights)} weighted layers match a layer name of "
                         f"{definition_source}")
    return unmatched


def from_net_parameter(net: caffe_pb2.NetParameter, weights: Mapping[str, Sequence[np.ndarray]],
                       source: str = "<net>", input_shapes=None,
                       on_warning: Callable[[str], None] | None = None, fill_missing: bool = False) -> CaffeNet:
    graph = build_graph(net, source, input_shapes)
    return assemble(graph, weights, on_warning, fill_missing)
