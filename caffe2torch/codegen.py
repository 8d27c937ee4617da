"""Standalone PyTorch source for a converted net: modules built with their hyper-parameters, one line per layer.

The generated `model.py` needs only torch. It holds the source of every Caffe-specific module it
uses (from the files in `_RUNTIME`), a `Net` class whose attribute names are the state_dict keys of
the converted GraphModule, and `load()`. Caffe's own names reach the file only as escaped string
literals (`ascii()`), so no layer or file name can inject code.
"""

from __future__ import annotations

import inspect
import operator
import re

from torch import fx, nn

from caffe2torch import bvlc as bvlc_modules
from caffe2torch import cascade as cascade_modules
from caffe2torch import detection as detection_modules
from caffe2torch import detectnet as detectnet_modules
from caffe2torch import errors as error_types
from caffe2torch import forks as fork_modules
from caffe2torch import rcnn as rcnn_modules
from caffe2torch import recurrent as recurrent_modules
from caffe2torch import text as text_modules
from caffe2torch import yolo as yolo_modules
from caffe2torch import modules as caffe_modules
from caffe2torch import vendor as vendor_modules
from caffe2torch.errors import CaffeError
from caffe2torch.model import META_KEY, LayerCall, NetInfo, net_info, python_names

WEIGHTS_FILE = "weights.pt"
# What a converted net's graph calls besides its modules: multi-top unpacking.
_ALLOWED_FUNCTIONS = {operator.getitem}

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_DECONV = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Our files of modules whose source a generated model.py embeds (they import only torch, math, each other and
# errors: the CaffeError a module raises on data the fork refuses, e.g. an ROI's batch index).
_RUNTIME = (error_types, caffe_modules, bvlc_modules, detection_modules, fork_modules, rcnn_modules, yolo_modules,
            vendor_modules, detectnet_modules, recurrent_modules, text_modules, cascade_modules)
_RUNTIME_NAMES = {module.__name__ for module in _RUNTIME}


def _norm_constructor(module: nn.modules.batchnorm._BatchNorm) -> str:
    name = type(module).__name__
    prefix = "" if type(module).__module__ == caffe_modules.__name__ else "nn."
    text = (f"{prefix}{name}({module.num_features}, eps={module.eps!r}, momentum={module.momentum!r}, "
            f"affine={module.affine}, track_running_stats={module.track_running_stats})")
    frozen_affine = module.affine and not any(p.requires_grad for p in module.parameters())
    return text + ".requires_grad_(False)" if frozen_affine else text


def constructor(module: nn.Module) -> str:
    """A Python expression that builds a module equal to `module` up to its parameter and buffer values."""
    kind = type(module)
    if isinstance(module, caffe_modules.CaffeOrderNorm):
        raise CaffeError("this graph evaluates BatchNorm in Caffe's order (passes.caffe_order_norms), for "
                         "inference only; save the converted net itself")
    if kind.__module__ in _RUNTIME_NAMES and not isinstance(module, _NORM):
        if isinstance(module, (caffe_modules.BatchAxes, vendor_modules.ConvSum)):  # a module around another
            return f"{kind.__name__}({constructor(module.inner)}, {module.extra_repr()})"
        return f"{kind.__name__}({module.extra_repr()})"
    if isinstance(module, _NORM):
        return _norm_constructor(module)
    if kind is nn.Sequential:  # e.g. a convolution padded differently on each side
        return f"nn.Sequential({', '.join(constructor(child) for child in module)})"
    if kind in _CONV or kind in _DECONV:
        extra = f", output_padding={module.output_padding}" if kind in _DECONV and any(module.output_padding) else ""
        return (f"nn.{kind.__name__}({module.in_channels}, {module.out_channels}, kernel_size={module.kernel_size}, "
                f"stride={module.stride}, padding={module.padding}, dilation={module.dilation}, groups={module.groups}, "
                f"bias={module.bias is not None}{extra})")
    simple = {
        nn.Linear: lambda m: f"{m.in_features}, {m.out_features}, bias={m.bias is not None}",
        nn.ReLU: lambda m: "inplace=True" if m.inplace else "",
        nn.LeakyReLU: lambda m: f"negative_slope={m.negative_slope!r}",
        nn.PReLU: lambda m: f"num_parameters={m.num_parameters}",
        nn.ELU: lambda m: f"alpha={m.alpha!r}",
        nn.Sigmoid: lambda m: "",
        nn.Tanh: lambda m: "",
        nn.Softmax: lambda m: f"dim={m.dim}",
        nn.Softplus: lambda m: f"beta={m.beta!r}, threshold={m.threshold!r}",
        nn.Dropout: lambda m: f"p={m.p!r}",
        nn.Dropout2d: lambda m: f"p={m.p!r}",
        nn.Mish: lambda m: "",
        nn.SiLU: lambda m: "",
        nn.ReLU6: lambda m: "",
        nn.Hardtanh: lambda m: f"min_val={caffe_modules._literal(m.min_val)}, max_val={caffe_modules._literal(m.max_val)}",
        nn.ZeroPad2d: lambda m: f"{m.padding!r}",
        nn.Flatten: lambda m: f"start_dim={m.start_dim}, end_dim={m.end_dim}",
        nn.Unflatten: lambda m: f"{m.dim}, {tuple(m.unflattened_size)!r}",
        nn.Unfold: lambda m: (f"{m.kernel_size!r}, dilation={m.dilation!r}, padding={m.padding!r}, "
                              f"stride={m.stride!r}"),
        nn.Identity: lambda m: "",
        nn.Upsample: lambda m: f"scale_factor={m.scale_factor!r}, mode={m.mode!r}",
        nn.LocalResponseNorm: lambda m: f"{m.size}, alpha={m.alpha!r}, beta={m.beta!r}, k={m.k!r}",
    }
    if kind in simple:
        return f"nn.{kind.__name__}({simple[kind](module)})"
    if _is_plugin(kind):
        return f"{kind.__name__}({module.extra_repr()})"
    raise CaffeError(f"cannot write standalone source for a {kind.__module__}.{kind.__name__} module; "
                     f"save the state_dict and rebuild the net with caffe2torch instead")


def _is_plugin(kind: type) -> bool:
    """A module class of a registered plugin converter: importable, outside torch and caffe2torch.

    Its `extra_repr()` must be its constructor's keyword arguments, as caffe2torch's own modules'
    are; model.py then imports it from its module.
    """
    module = kind.__module__
    return not module.startswith(("torch.", "caffe2torch.")) and module not in ("__main__", "builtins")


def _runtime_source(used: set[type]) -> tuple[str, list[str]]:
    """The source of our module classes used, with every helper and constant they name, in file order;
    and the files it comes from."""
    defined = {name: value for runtime in _RUNTIME for name, value in vars(runtime).items()
               if (inspect.isclass(value) or inspect.isfunction(value)) and value.__module__ == runtime.__name__}
    constants = {name: value for runtime in _RUNTIME for name, value in vars(runtime).items()
                 if name.isupper() and isinstance(value, (int, float, str, tuple))}
    wanted = {cls.__name__ for cls in used if cls.__name__ in defined}
    named: set[str] = set()
    pending = list(wanted)
    while pending:
        source = inspect.getsource(defined[pending.pop()])
        for word in set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", source)):
            if word in defined and word not in wanted:
                wanted.add(word)
                pending.append(word)
            elif word in constants:
                named.add(word)
    files = [runtime.__name__ for runtime in _RUNTIME]
    ordered = sorted(wanted, key=lambda name: (files.index(defined[name].__module__),
                                               inspect.getsourcelines(defined[name])[1]))
    header = "".join(f"{name} = {constants[name]!r}\n" for name in sorted(named))
    source = (header + "\n\n" if header else "") + "\n\n".join(
        inspect.getsource(defined[name]).rstrip() + "\n" for name in ordered)
    return source, [file for file in files if any(defined[name].__module__ == file for name in ordered)]


def _classes(module: nn.Module) -> set[type]:
    return {type(m) for m in module.modules()}


def generate_source(net: fx.GraphModule, origin: str = "") -> str:
    """`model.py` for a converted net (not for a graph a pass optimised: those keep no Caffe layout)."""
    info: NetInfo = net_info(net)
    used = set().union(*(_classes(m) for m in net.children())) if list(net.children()) else set()
    variables: dict[fx.Node, str] = {}
    taken: set[str] = set()  # locals of forward(); python_names keeps clear of self, torch and the like
    blob_names = python_names([info.input_names[i] for i in range(len(info.input_names))], taken, prefix="input")
    forward: list[str] = []
    local_names: dict[str, str] = {}

    def variable(blob: str) -> str:
        if blob not in local_names:
            local_names[blob] = python_names([blob], taken | set(local_names.values()), prefix="blob")[0]
        return local_names[blob]

    placeholders = [node for node in net.graph.nodes if node.op == "placeholder"]
    for node, blob, arg in zip(placeholders, info.input_names, blob_names):
        local_names[blob] = arg
        variables[node] = arg
    for node in net.graph.nodes:
        call = node.meta.get(META_KEY)
        if node.op == "call_module" and isinstance(call, LayerCall):
            args = ", ".join(variables[a] for a in node.args)
            outputs = [variable(top) for top in call.tops]
            forward.append(f"        {', '.join(outputs)} = self.{node.target}({args})  # {ascii(call.layer)} ({call.type})")
            if len(outputs) == 1:
                variables[node] = outputs[0]
        elif node.op == "call_function" and node.meta.get("caffe_blob") is not None and node.args \
                and isinstance(node.args[0], fx.Node) and node.args[0].op == "call_module":
            variables[node] = variable(node.meta["caffe_blob"])
        elif node.op == "output":
            result = node.args[0]
            if result is None:
                forward.append("        return None")
            elif isinstance(result, (tuple, list)):
                forward.append("        return " + ", ".join(variables[r] for r in result))
            else:
                forward.append(f"        return {variables[result]}")
    constructors = [f"        self.{name} = {constructor(child)}" for name, child in net.named_children()]
    layers = {node.target: (call.layer, call.type) for node, call in _calls(net)}
    runtime, runtime_files = _runtime_source(used)
    plugins = sorted({(kind.__module__, kind.__name__) for kind in used if _is_plugin(kind)})
    header = [
        '"""A Caffe net converted by caffe2torch into standalone PyTorch (needs only torch).',
        "",
        "`load()` returns the net with the weights stored beside this file (a state_dict, loadable with",
        "`torch.load(..., weights_only=True)`); `python model.py` runs one forward on zeros of the shape",
        "the net was converted for (INPUT_SHAPES, an example: sizes come from the inputs, as Caffe's",
        "Reshape() computes them) and prints each output's name and shape. Variables in `forward` are",
        "named after Caffe's blobs, modules after Caffe's layers (names sanitised for Python).",
        '"""',
        f"# Caffe net name: {ascii(info.name)}",
        f"# converted from: {ascii(origin)}",
        "",
        "from __future__ import annotations",
        "",
        "import math",
        "import threading",
        "from pathlib import Path",
        "",
        "import torch",
        "import torch.nn.functional as F",
        "from torch import nn",
        *[f"from {module} import {name}  # a plugin converter's module" for module, name in plugins],
        "",
        f"INPUT_SHAPES = {ascii({name: tuple(shape) for name, shape in info.inputs.items()})}",
        f"OUTPUTS = {ascii(list(info.outputs))}",
        "# module name -> (Caffe layer name, Caffe type)",
        "CAFFE_LAYERS = {",
        *[f"    {ascii(module)}: {ascii(value)}," for module, value in layers.items()],
        "}",
        "",
    ]
    if runtime:
        header += ["", f"# ---- Caffe-specific modules (from {', '.join(runtime_files)}) ----", "", runtime.rstrip(), ""]
    body = [
        "",
        "class Net(nn.Module):",
        f"    \"\"\"The converted net: forward() takes the INPUT_SHAPES blobs and returns {_returns(info)}.\"\"\"",
        "",
        "    def __init__(self) -> None:",
        "        super().__init__()",
        *constructors,
        "",
        f"    def forward(self, {', '.join(blob_names)}):",
        *forward,
        "",
        "",
        "def load(folder=None, map_location=\"cpu\") -> Net:",
        "    \"\"\"The net with the weights of `folder` (default: the folder of this file), in eval mode.\"\"\"",
        "    folder = Path(__file__).resolve().parent if folder is None else Path(folder)",
        "    net = Net()",
        f"    state = torch.load(folder / {WEIGHTS_FILE!r}, map_location=map_location, weights_only=True)",
        "    net.load_state_dict(state)",
        "    return net.to(map_location).eval()",
        "",
        "",
        'if __name__ == "__main__":',
        "    net = load()",
        "    inputs = [torch.zeros(shape) for shape in INPUT_SHAPES.values()]",
        "    with torch.no_grad():",
        "        outputs = net(*inputs)",
        "    outputs = outputs if isinstance(outputs, tuple) else (outputs,)",
        "    for name, value in zip(OUTPUTS, outputs):",
        "        print(f\"{name}: {tuple(value.shape)}\")",
    ]
    return "\n".join(header + body) + "\n"


def _returns(info: NetInfo) -> str:
    """Words only: Caffe's names stay out of docstrings, where quotes in a name would end the string."""
    if not info.outputs:
        return "None"
    return "the OUTPUTS blob" if len(info.outputs) == 1 else f"the {len(info.outputs)} OUTPUTS blobs, in that order"


def _calls(net: fx.GraphModule):
    for node in net.graph.nodes:
        call = node.meta.get(META_KEY)
        if node.op == "call_module" and isinstance(call, LayerCall):
            yield node, call


def check_standalone(net: fx.GraphModule) -> None:
    """Refuse graphs `model.py` cannot describe: optimised ones (merged layers) or foreign nodes."""
    for node in net.graph.nodes:
        call = node.meta.get(META_KEY)
        if node.op == "call_module" and (not isinstance(call, LayerCall) or call.absorbed):
            raise CaffeError("this graph was changed by a pass (e.g. caffe2torch.fast.optimize); "
                             "save the converted net itself")
        foreign = (node.op == "call_function" and node.target not in _ALLOWED_FUNCTIONS
                   or node.op == "call_method" or node.op == "get_attr")
        if foreign:
            raise CaffeError(f"the graph calls {node.target}, which a converted net does not; "
                             f"save the converted net itself")

