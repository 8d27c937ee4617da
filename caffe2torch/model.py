"""The converted net: a torch.fx GraphModule of torch modules, one call per Caffe layer, named after it.

Each layer's call node carries `node.meta["caffe"]` (a `LayerCall`: Caffe's layer name, type,
bottom and top blob names), and `net.meta["caffe"]` holds what the net as a whole needs
(`NetInfo`: input and output blobs, every blob's shape, the TEST-phase definition). `run_layers`
replays the graph and hands every layer's tops to a callback (what `verify` compares).
"""

from __future__ import annotations

import keyword
import math
import operator
import re
import warnings as warnings_module
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import fx, nn

from caffe2torch.errors import CaffeError, InputSizeError
from caffe2torch.fill import placeholder_blobs, placeholder_bytes
from caffe2torch.graph import NetGraph, build_graph, output_blobs
from caffe2torch.layers import convert_layer
from caffe2torch.layers.registry import CONTRACT
from caffe2torch.limits import MemoryBudget
from proto import caffe_pb2

Shape = tuple[int, ...]
META_KEY = "caffe"


@dataclass(frozen=True)
class LayerCall:
    """What one call node computes in Caffe's terms.

    `layer` is the Caffe layer whose output the node makes; `absorbed` lists layers a pass
    merged into this call (e.g. the convolution and BN a folded BN chain started from), whose
    own outputs no longer exist.
    """

    layer: str
    type: str
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]
    absorbed: tuple[str, ...] = ()


@dataclass
class NetInfo:
    """The Caffe facts of a converted net: blob names and shapes and the definition it came from."""

    name: str
    inputs: dict[str, Shape]
    outputs: list[str]
    blob_shapes: dict[str, Shape]
    definition: caffe_pb2.NetParameter
    modules: dict[str, str] = field(default_factory=dict)  # Caffe layer name -> module name
    source: str = ""

    @property
    def input_names(self) -> list[str]:
        return list(self.inputs)


# Names a module may not take: attributes of every GraphModule instance, and words generated code uses.
_RESERVED = set(dir(fx.GraphModule(nn.Module(), fx.Graph()))) | {"self", "torch", "nn", "F", "math", "Path", "load"}


def _is_safe_name(name: str, taken: set[str]) -> bool:
    """Usable as it is: ASCII letters, digits and '_', no leading digit, no leading double underscore
    (Python would mangle it inside a class), no keyword, nothing taken."""
    return (name.isascii() and name.isidentifier() and not name.startswith("__") and not keyword.iskeyword(name)
            and not keyword.issoftkeyword(name) and name not in taken)


def _sanitised(name: str, prefix: str) -> str:
    base = re.sub(r"[^0-9A-Za-z_]+", "_", name).strip("_") or prefix
    if base[0].isdigit() or keyword.iskeyword(base) or keyword.issoftkeyword(base):
        base = f"{prefix}_{base}"
    return base


def python_names(names: Sequence[str], reserved: set[str] = frozenset(), prefix: str = "layer") -> list[str]:
    """A distinct, safe Python identifier for each name, in order (Caffe's names stay as data).

    A name that already is a safe identifier keeps it exactly, whatever the other names are: the
    module (and state_dict key) `a_b` is always the layer named "a_b", never a layer "a.b" that
    happened to come first. Only names that must change are changed: to their sanitised form, with
    _2, _3, ... where that is taken, handed out in the order of the original names (not of the
    layers), so reordering a definition does not swap two layers' keys.
    """
    taken = set(reserved) | _RESERVED
    result: list[str | None] = [None] * len(names)
    for index, name in enumerate(names):
        if _is_safe_name(name, taken):
            taken.add(name)
            result[index] = name
    # Python's sort is stable: a name used twice keeps the layer order among its copies.
    for index in sorted((i for i, value in enumerate(result) if value is None), key=lambda i: names[i]):
        base = _sanitised(names[index], prefix)
        candidate, suffix = base, 1
        while candidate in taken:
            suffix += 1
            candidate = f"{base}_{suffix}"
        taken.add(candidate)
        result[index] = candidate
    return result  # type: ignore[return-value]


def legacy_python_names(names: Sequence[str], prefix: str = "layer") -> list[str]:
    """The module names caffe2torch gave before folder format 3 (first come, first served), to read
    the weights.pt of such a folder."""
    taken = set(_RESERVED)
    result = []
    for name in names:
        base = _sanitised(name, prefix)
        candidate, suffix = base, 1
        while candidate in taken:
            suffix += 1
            candidate = f"{base}_{suffix}"
        taken.add(candidate)
        result.append(candidate)
    return result


def _check_shapes(layer, converted_shapes: Sequence[Shape]) -> None:
    if len(converted_shapes) != len(layer.tops):
        raise CaffeError(f"layer {layer.name!r} ({layer.type}): its converter made {len(converted_shapes)} top "
                         f"shapes, the net names {len(layer.tops)} tops; {CONTRACT}")


def _warn(on_warning: Callable[[str], None] | None, text: str) -> None:
    if on_warning is not None:
        on_warning(text)
    else:
        warnings_module.warn(text, stacklevel=3)


def _shape_text(shape: Shape) -> str:
    return "x".join(str(d) for d in shape)


class CaffeNet(fx.GraphModule):
    """A converted net: a GraphModule whose every size comes from its inputs, as Caffe's Reshape() does.

    A call at another size than the converted one that fails (a layer whose weights fix a size, an
    Eltwise of two sizes, a crop that does not fit) raises InputSizeError naming the first layer that
    cannot take its bottoms, with the shapes the net was converted for and the shapes it got, instead of
    torch's message from deep inside a kernel (the original error chained). Out-of-memory errors and
    failures at the converted size stand as they are; tracers and compilers see the plain call.
    """

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except (RuntimeError, ValueError, IndexError) as error:
            if isinstance(error, CaffeError) or _out_of_memory(error) or _tracing(args, kwargs):
                raise
            message = _diagnose(self, args, kwargs)
            if message is None:
                raise
            raise InputSizeError(message) from error


def _tracing(args, kwargs) -> bool:
    compiling = getattr(torch.compiler, "is_compiling", None)
    fake = any(type(x) not in (torch.Tensor, nn.Parameter) for x in [*args, *kwargs.values()])
    symbolic = getattr(fx._symbolic_trace, "is_fx_symbolic_tracing", fx._symbolic_trace.is_fx_tracing)
    return fake or torch.jit.is_tracing() or symbolic() or bool(compiling and compiling())


def _out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, getattr(torch, "OutOfMemoryError", ())) or "out of memory" in text or \
        "can't allocate memory" in text or "not enough memory" in text


def _brief(error: BaseException) -> str:
    line = next((text.strip() for text in str(error).splitlines() if text.strip()), type(error).__name__)
    return line if len(line) <= 160 else line[:157] + "..."


def _diagnose(net: "CaffeNet", args, kwargs) -> str | None:
    """Replay the graph layer by layer; the first layer call that fails, its bottoms' shapes and the converted ones."""
    info = net_info(net)
    try:
        inputs = bind_inputs(net, args, kwargs)
    except TypeError:
        return None
    moved = [name for name, value in zip(info.input_names, inputs) if isinstance(value, torch.Tensor) and
             tuple(value.shape[1:]) != tuple(info.inputs[name][1:])]
    if not moved:  # at the converted size (any batch) the failure is not about sizes: the original error stands
        return None

    class Replay(fx.Interpreter):
        def run_node(self, node: fx.Node):
            try:
                return super().run_node(node)
            except (RuntimeError, ValueError, IndexError) as error:
                call = node.meta.get(META_KEY)
                if node.op != "call_module" or not isinstance(call, LayerCall) or _out_of_memory(error):
                    raise
                values = [self.env[a] for a in node.args if isinstance(a, fx.Node)]
                sizes = [tuple(value.shape)[1:] for value in values if isinstance(value, torch.Tensor)]
                if sizes == [tuple(info.blob_shapes.get(blob, ()))[1:] for blob in call.bottoms]:
                    raise  # the sizes it was converted for (any batch): no size error, a dtype or device without a kernel
                got = ", ".join(f"{blob!r} {_shape_text(tuple(value.shape))}" for blob, value in
                                zip(call.bottoms, values) if isinstance(value, torch.Tensor))
                wanted = ", ".join(f"{_shape_text(info.blob_shapes[blob])}" for blob in call.bottoms
                                   if blob in info.blob_shapes)
                found.append(f"layer {call.layer!r} ({call.type}) cannot take bottoms {got} (the net was converted "
                             f"for {wanted}; Caffe's Reshape() refuses this size too): {_brief(error)}")
                raise

    found: list[str] = []
    with torch.no_grad():
        try:
            Replay(net).run(*inputs)
        except Exception:  # noqa: BLE001 - the layer that failed is in `found`; otherwise the original error stands
            pass
    return found[0] if found else None


def assemble(graph: NetGraph, weights: Mapping[str, Sequence[np.ndarray]],
             on_warning: Callable[[str], None] | None = None, fill_missing: bool = False,
             definition: caffe_pb2.NetParameter | None = None, source: str = "",
             memory_limit: int | str | None = None) -> fx.GraphModule:
    """Convert each TEST-phase layer with the trained blobs of the layer of the same name.

    `fill_missing` gives layers without trained blobs zero-filled ones of Caffe's shapes (for
    looking at a structure, or to be overwritten by a state_dict). A net whose parameters or
    one layer's activations would not fit `memory_limit` (default: the available memory) is
    refused before anything of that size is allocated.
    """
    budget = MemoryBudget(memory_limit)
    for blob, shape in graph.inputs.items():
        budget.check_layer(f"{source}: input {blob!r} of shape {_shape_text(shape)}" if source else
                           f"input {blob!r} of shape {_shape_text(shape)}", math.prod(shape))
    shapes: dict[str, Shape] = dict(graph.inputs)
    names = python_names([layer.name for layer in graph.layers])
    fx_graph = fx.Graph()
    current: dict[str, fx.Node] = {}
    for blob, input_name in zip(graph.inputs, python_names(list(graph.inputs), set(names), prefix="input")):
        current[blob] = fx_graph.placeholder(input_name)
        current[blob].meta["caffe_blob"] = blob

    modules: dict[str, nn.Module] = {}
    last_of_name = {layer.name: index for index, layer in enumerate(graph.layers)}
    for index, (layer, module_name) in enumerate(zip(graph.layers, names)):
        where = f"layer {layer.name!r} ({layer.type})"
        bottoms = [shapes[b] for b in layer.bottoms]
        blobs = list(weights.get(layer.name, []))
        if blobs and last_of_name[layer.name] != index:
            raise CaffeError(f"{where}: another layer has this name too, and Caffe gives the weights of a name to "
                             f"the last layer of that name only (this one keeps random initial values); "
                             f"rename the layers")
        if not blobs and fill_missing:
            budget.add_parameters(where, placeholder_bytes(layer.param, bottoms) // 4)
            try:
                blobs = placeholder_blobs(layer.param, bottoms)
            except MemoryError:  # a limit set above what the machine has
                raise CaffeError(f"{where}: out of memory while building it") from None
        else:
            budget.add_parameters(where, sum(blob.size for blob in blobs))
        try:
            with budget.applied():  # the converters' own table checks count against this net's budget
                converted = convert_layer(layer.param, bottoms, blobs)
        except CaffeError as error:
            if weights and layer.name not in weights and "parameter blobs" in str(error):
                raise CaffeError(f"{error} (the weights hold no layer named {layer.name!r})") from None
            raise
        except MemoryError:
            raise CaffeError(f"{where}: out of memory while building it") from None
        except RuntimeError as error:  # torch's allocator failing; anything else is a bug to see whole
            if "allocate" not in str(error):
                raise
            raise CaffeError(f"{where}: out of memory while building it ({str(error).splitlines()[0][:120]})") from None
        _check_shapes(layer, converted.top_shapes)
        for message in converted.warnings:
            if fill_missing and not weights and message.startswith("has no weights"):
                continue  # a definition alone: every layer has placeholder parameters, which is no news
            _warn(on_warning, f"layer {layer.name!r} ({layer.type}): {message}")
        for top, shape in zip(layer.tops, converted.top_shapes):
            if any(d <= 0 for d in shape):
                raise CaffeError(f"layer {layer.name!r} ({layer.type}): top {top!r} would have shape {tuple(shape)}")
        budget.check_layer(f"{where} (tops {', '.join(_shape_text(s) for s in converted.top_shapes)})",
                           sum(math.prod(s) for s in bottoms) + sum(math.prod(s) for s in converted.top_shapes))
        modules[module_name] = converted.module
        if converted.per_bottom:
            calls = [((bottom,), (top,)) for bottom, top in zip(layer.bottoms, layer.tops)]
        else:
            calls = [(tuple(layer.bottoms), tuple(layer.tops))]
        results = []
        for call_bottoms, call_tops in calls:
            node = fx_graph.call_module(module_name, tuple(current[b] for b in call_bottoms))
            node.meta[META_KEY] = LayerCall(layer.name, layer.type, call_bottoms, call_tops)
            if len(call_tops) == 1:
                results.append((call_tops[0], node))
                continue
            for index, top in enumerate(call_tops):
                item = fx_graph.create_node("call_function", operator.getitem, (node, index),
                                            name=python_names([top], prefix="blob")[0])
                results.append((top, item))
        for (top, node), shape in zip(results, converted.top_shapes):
            node.meta["caffe_blob"] = top
            current[top] = node
            shapes[top] = tuple(int(d) for d in shape)

    outputs = output_blobs(graph)
    if len(outputs) == 1:
        fx_graph.output(current[outputs[0]])
    else:
        fx_graph.output(tuple(current[name] for name in outputs) if outputs else None)
    net = CaffeNet(modules, fx_graph, class_name="CaffeNet")
    if definition is None:
        definition = caffe_pb2.NetParameter(name=graph.name)
    net.meta[META_KEY] = NetInfo(graph.name, dict(graph.inputs), outputs, shapes, definition,
                                 dict(zip((layer.name for layer in graph.layers), names)), source)
    return net.eval()


def net_info(net: nn.Module) -> NetInfo:
    """The Caffe facts of a converted net; a clear error for any other module."""
    meta = getattr(net, "meta", None)
    info = meta.get(META_KEY) if isinstance(meta, dict) else None
    if not isinstance(info, NetInfo):
        raise CaffeError(f"{type(net).__name__} is not a net converted by caffe2torch (no Caffe information)")
    return info


def layer_calls(net: fx.GraphModule) -> Iterator[tuple[fx.Node, LayerCall]]:
    """Every call node of a Caffe layer, in graph order."""
    for node in net.graph.nodes:
        call = node.meta.get(META_KEY)
        if node.op == "call_module" and isinstance(call, LayerCall):
            yield node, call


def layer_modules(net: fx.GraphModule) -> list[tuple[str, str]]:
    """(Caffe layer name, module name) of every layer, in the net's order (a layer called once per
    bottom counts once); what a saved folder records of which state_dict keys belong to which layer."""
    seen: dict[str, str] = {}
    for node, call in layer_calls(net):
        seen.setdefault(node.target, call.layer)
    return [(layer, module) for module, layer in seen.items()]


def unexportable_layers(net: nn.Module) -> list[tuple[str, str]]:
    """(layer, why) for each layer with no fixed-shape export or CUDA graph: SSD's DetectionOutput, the
    R-CNN layers. Their modules say why in a `not_exportable` class attribute (plugins may too)."""
    calls = {node.target: call for node, call in layer_calls(net)} if isinstance(net, fx.GraphModule) else {}
    found = []
    for name, module in net.named_modules():
        reason = getattr(module, "not_exportable", None)
        if reason:
            call = calls.get(name)
            found.append((f"{call.layer!r} ({call.type})" if call is not None else
                          f"{name!r} ({type(module).__name__})", reason))
    return found


def layer_module(net: fx.GraphModule, layer: str) -> nn.Module:
    """The module that computes Caffe layer `layer`."""
    for node, call in layer_calls(net):
        if call.layer == layer:
            return net.get_submodule(node.target)
    raise CaffeError(f"the net has no layer named {layer!r}")


def bind_inputs(net: fx.GraphModule, args: Sequence[torch.Tensor], kwargs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """Positional inputs in the net's order from positional and Caffe-named arguments."""
    names = net_info(net).input_names
    values = dict(zip(names, args))
    values.update(kwargs)
    missing = [name for name in names if name not in values]
    unknown = [name for name in values if name not in names]
    if missing or unknown or len(args) > len(names):
        raise TypeError(f"the net takes inputs {names}; missing {missing}, unknown {unknown}")
    return [values[name] for name in names]


class _LayerRunner(fx.Interpreter):
    """Runs the graph node by node and shows every layer call's tops to a callback."""

    def __init__(self, net: fx.GraphModule, after_layer: Callable[[LayerCall, tuple[torch.Tensor, ...]], None]):
        super().__init__(net)
        self.after_layer = after_layer

    def run_node(self, node: fx.Node):
        result = super().run_node(node)
        call = node.meta.get(META_KEY)
        if node.op == "call_module" and isinstance(call, LayerCall):
            self.after_layer(call, result if isinstance(result, tuple) else (result,))
        return result


def run_layers(net: fx.GraphModule, *args: torch.Tensor,
               after_layer: Callable[[LayerCall, tuple[torch.Tensor, ...]], None], **kwargs: torch.Tensor):
    """Run the net; `after_layer(call, tops)` sees each layer call's outputs as it is made.

    Returns what the net returns. The tops are the layer's own outputs at that point: for Caffe's
    in-place chains (conv -> BN -> ReLU on one blob) each layer's values, as Caffe records them.
    """
    return _LayerRunner(net, after_layer).run(*bind_inputs(net, args, kwargs))


def blobs(net: fx.GraphModule, *args: torch.Tensor, **kwargs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every blob by its Caffe name, holding for in-place layers the value after the last layer that writes it.

    The values are detached (computed without autograd), as Caffe's blobs are plain data: `.numpy()` works.
    """
    values = dict(zip(net_info(net).input_names, (x.detach() for x in bind_inputs(net, args, kwargs))))

    def keep(call: LayerCall, tops: tuple[torch.Tensor, ...]) -> None:
        values.update(zip(call.tops, tops))

    with torch.no_grad():
        run_layers(net, *values.values(), after_layer=keep)
    return values


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
                       on_warning: Callable[[str], None] | None = None, fill_missing: bool = False,
                       memory_limit: int | str | None = None,
                       on_note: Callable[[str], None] | None = None,
                       assumed_size: tuple[int, int] | None = None) -> fx.GraphModule:
    """Build the net of a definition; `on_note` hears what was left out or changed to make it deployable."""
    graph = build_graph(net, source, input_shapes, assumed_size=assumed_size)
    for note in graph.notes:
        if on_note is not None:
            on_note(note)
    return assemble(graph, weights, on_warning, fill_missing, definition=net, source=source, memory_limit=memory_limit)
