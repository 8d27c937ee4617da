"""Fast inference for a converted net: passes over its graph, on any device and float dtype, plus CUDA graphs.

`optimize(net)` returns a new GraphModule (the net it came from stays as it was):

* BN / BatchNorm (+ Scale) folded into the convolution before them (`passes.fold_norms`);
* on the CPU, a ReLU that alone reads a convolution runs inside oneDNN's convolution;
* channels_last weights and inputs;
* lean kernels: Interp by torch's bilinear `align_corners=True` (plain subsampling when the
  step is an integer), MAX pooling by `nn.MaxPool2d(ceil_mode=True)` where torch's window
  layout equals Caffe's, ReLU and unit-coefficient Eltwise SUM in place on a value nothing else
  reads. Intermediate values are freed after their last use (the graph's own code does that).

What changes against the converted net is rounding (single layers within a few 1e-7 relative,
whole ICNet within verify's 5e-4) and these records, listed apart by `verify`: a folded
convolution's pre-norm output (and a BatchNorm's output before its folded Scale), a fused
convolution's pre-ReLU output. ReLU(-inf) stays 0, Eltwise SUM keeps -0; outputs are
channels_last-strided for 4-D inputs (same values; `.contiguous()` gives NCHW). Parameters
no longer require gradients: this is an inference graph.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, fields
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from caffe2torch.errors import CaffeError
from caffe2torch.model import net_info, unexportable_layers
from caffe2torch.modules import Eltwise, Interp, Pool2d, TableCache, _concrete, caffe_pool2d, dims, interp_size, pool_geometry
from caffe2torch.passes import call_of, fold_norms, merge_into, module_of, only_user, replace_calls

FRESH = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear,
         nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.LeakyReLU, nn.MaxPool2d, Pool2d, Interp, Eltwise)


@dataclass
class FastOptions:
    """The levers of the fast path; each can be switched off to measure it."""

    fold: bool = True
    channels_last: bool = True
    fast_kernels: bool = True
    in_place: bool = True
    fuse_relu: bool = True  # CPU (oneDNN) only; elsewhere the ReLU runs in place after the convolution


class ConvReLU(nn.Module):
    """A 2-D convolution with its ReLU: one oneDNN call on the CPU, conv then in-place ReLU elsewhere."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        fused = x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.enabled
        if fused and not torch.jit.is_tracing():  # the tracer cannot record the op's empty scalar list
            return torch.ops.mkldnn._convolution_pointwise(x, c.weight, c.bias, list(c.padding), list(c.stride),
                                                           list(c.dilation), c.groups, "relu", [], "")
        return torch.relu_(c(x))


class FastInterp(nn.Module):
    """Corner-aligned bilinear resize by torch's kernel (exact subsampling when the step is an integer), at the
    size the fork's rules give for the input it gets."""

    def __init__(self, interp: Interp, channels_last: bool) -> None:
        super().__init__()
        self.shrink, self.zoom, self.height, self.width = interp.shrink, interp.zoom, interp.height, interp.width
        self.pad_beg, self.pad_end, self.channels_last = interp.pad_beg, interp.pad_end, bool(channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_interp(x, self.shrink, self.zoom, self.height, self.width, self.pad_beg, self.pad_end,
                           self.channels_last)


@torch.fx.wrap
def fast_interp(x: torch.Tensor, shrink, zoom, height, width, pad_beg: int, pad_end: int,
                channels_last: bool) -> torch.Tensor:
    memory = torch.channels_last if channels_last else torch.contiguous_format
    height_in, width_in = (n + pad_beg + pad_end for n in dims(x, -2, -1))
    out_h, out_w = interp_size((height_in, width_in), shrink, zoom, height, width)
    start = -pad_beg
    x = x[:, :, start:start + height_in, start:start + width_in]
    if not _concrete(height_in, width_in, out_h, out_w):  # symbolic sizes: torch's resize for every case
        return F.interpolate(x.contiguous(memory_format=memory), size=(out_h, out_w), mode="bilinear",
                             align_corners=True)
    if (height_in, width_in) == (out_h, out_w):
        return x.clone(memory_format=memory)
    if (height_in, width_in) == (1, 1):
        return x.expand(-1, -1, out_h, out_w).contiguous(memory_format=memory)
    steps = [(n - 1) // (m - 1) if m > 1 and (n - 1) % (m - 1) == 0 else 0
             for n, m in ((height_in, out_h), (width_in, out_w))]
    if all(steps):  # source positions fall exactly on samples
        return x[:, :, :: steps[0], :: steps[1]].contiguous(memory_format=memory)
    # torch keeps the input's layout; a 1-pixel-wide map is ambiguous, so say which.
    return F.interpolate(x.contiguous(memory_format=memory), size=(out_h, out_w), mode="bilinear", align_corners=True)


class FastMaxPool(nn.Module):
    """torch's ceil-mode MAX pooling where its window layout is Caffe's for the input it gets (else Caffe's own), with
    Caffe's special values kept: NaN never wins and a window of nothing but -inf gives the dtype's lowest value
    (-FLT_MAX in float32)."""

    def __init__(self, kernel: tuple, stride: tuple, pad: tuple) -> None:
        super().__init__()
        self.kernel, self.stride, self.pad = tuple(kernel), tuple(stride), tuple(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_max_pool(x, self.kernel, self.stride, self.pad)


@torch.fx.wrap
def fast_max_pool(x: torch.Tensor, kernel: tuple, stride: tuple, pad: tuple) -> torch.Tensor:
    size = dims(x, -2, -1)
    if _concrete(*size):
        same = tuple(_torch_pool_size(*a) for a in zip(size, kernel, stride, pad)) == \
            pool_geometry(size, kernel, stride, pad, pad, True)[0]
    else:  # symbolic sizes: torch's ceil mode branches on the size inside (an export would fix it); Caffe's form
        same = False
    if not same:
        return caffe_pool2d(x, "MAX", kernel, stride, pad, pad)  # Caffe keeps a window torch drops: stay exact
    x = torch.nan_to_num(x, nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    y = F.max_pool2d(x, kernel, stride, pad, ceil_mode=True)
    return torch.nan_to_num(y, nan=0.0, posinf=math.inf, neginf=None)


class FastSum(nn.Module):
    """Eltwise SUM with unit coefficients, accumulated into the first bottom when nothing else reads it."""

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.in_place = in_place

    def forward(self, *bottoms: torch.Tensor) -> torch.Tensor:
        total = bottoms[0].add_(bottoms[1]) if self.in_place else bottoms[0] + bottoms[1]
        for bottom in bottoms[2:]:
            total = total.add_(bottom)
        return total


def _torch_pool_size(size: int, kernel: int, stride: int, pad: int) -> int:
    """torch's ceil_mode output size (its last window must start inside the input or left padding)."""
    out = -(-(size + 2 * pad - kernel) // stride) + 1
    if (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _lean_pool(pool: Pool2d) -> nn.Module | None:
    if pool.method != "MAX" or pool.mask or not pool.ceil or pool.same or pool.kernel is None or \
            pool.pad_end != pool.pad or any(2 * p > k for p, k in zip(pool.pad, pool.kernel)):
        return None
    return FastMaxPool(pool.kernel, pool.stride, pool.pad)


def _owned(net: fx.GraphModule, value: fx.Node, reader: fx.Node) -> bool:
    """Whether `reader` may overwrite `value`: a fresh tensor of a module call that nothing else reads."""
    fresh = FRESH + (FastSum, ConvReLU, FastInterp, FastMaxPool)
    return (value.op == "call_module" and isinstance(module_of(net, value), fresh)
            and only_user(value) is reader and reader.args.count(value) == 1)


def _fuse_relus(net: fx.GraphModule) -> None:
    erased: set[fx.Node] = set()
    for node in list(net.graph.nodes):
        conv = module_of(net, node) if call_of(node) and node not in erased else None
        user = only_user(node) if isinstance(conv, nn.Conv2d) else None
        relu = module_of(net, user) if user is not None and call_of(user) else None
        if type(relu) is nn.ReLU and user.args == (node,):
            calls = sum(1 for n in net.graph.nodes if n.op == "call_module" and n.target == node.target)
            if calls != 1:
                continue
            net.add_submodule(node.target, ConvReLU(conv))
            relu_target = user.target
            erased.add(user)
            merge_into(node, [user], net.graph)
            net.delete_submodule(relu_target)
    net.recompile()


def _lean_kernels(net: fx.GraphModule, options: FastOptions) -> None:
    def rewrite(node: fx.Node, module: nn.Module) -> nn.Module | None:
        if isinstance(module, Interp):
            return FastInterp(module, options.channels_last)
        if isinstance(module, Pool2d):
            return _lean_pool(module)
        in_place = options.in_place and _owned(net, node.args[0], node) if node.args else False
        if type(module) is nn.ReLU and in_place:
            return nn.ReLU(inplace=True)
        if type(module) is nn.LeakyReLU and in_place:
            return nn.LeakyReLU(module.negative_slope, inplace=True)
        if isinstance(module, Eltwise) and module.operation == "SUM" and all(c == 1.0 for c in module.coeffs) \
                and len(node.args) >= 2:
            return FastSum(in_place)
        return None

    # One node at a time in graph order, so an in-place decision sees the modules already chosen before it.
    replace_calls(net, rewrite)


def _channels_last(net: fx.GraphModule) -> None:
    net.to(memory_format=torch.channels_last)
    info = net_info(net)
    for node, blob in zip([n for n in net.graph.nodes if n.op == "placeholder"], info.input_names):
        if len(info.inputs[blob]) != 4:
            continue
        with net.graph.inserting_after(node):
            converted = net.graph.call_method("contiguous", (node,), {"memory_format": torch.channels_last})
        node.replace_all_uses_with(converted, delete_user_cb=lambda user: user is not converted)
    net.recompile()


def optimize(net: fx.GraphModule, options: FastOptions | None = None, **levers: bool) -> fx.GraphModule:
    """The fast inference graph of a converted net, on its device and dtype; `levers` override FastOptions fields."""
    options = copy.copy(options or FastOptions())
    names = {f.name for f in fields(FastOptions)}
    for name, value in levers.items():
        if name not in names:
            raise TypeError(f"optimize() has no lever {name!r}; levers: {', '.join(sorted(names))}")
        setattr(options, name, value)
    net_info(net)  # a clear error for anything but a converted net
    fast = copy.deepcopy(net).eval().requires_grad_(False)
    if options.fold:
        fold_norms(fast)
    device = next((t.device for t in fast.parameters()), torch.device("cpu"))
    if options.fuse_relu and options.fast_kernels and device.type == "cpu" \
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise"):
        _fuse_relus(fast)
    if options.fast_kernels:
        _lean_kernels(fast, options)
    if options.channels_last:
        _channels_last(fast)
    return fast


class _Capture:
    """One CUDA graph of the net for one set of input shapes and dtypes, with the size tables it reads."""

    def __init__(self, net: nn.Module, example_inputs: Sequence[torch.Tensor], warmup: int) -> None:
        self.device = example_inputs[0].device
        tables = TableCache.keep()
        try:
            with torch.cuda.device(self.device), torch.inference_mode():
                self.inputs = [x.clone() for x in example_inputs]
                stream = torch.cuda.Stream(self.device)
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):
                    for _ in range(warmup):  # lazy initialisation and cuDNN's choices happen outside the capture
                        net(*self.inputs)
                torch.cuda.current_stream(self.device).wait_stream(stream)
                self.graph = torch.cuda.CUDAGraph()
                # thread_local: CUDA calls of other threads (a DataLoader's pin-memory thread, writers freeing
                # pinned buffers) do not invalidate this capture
                capture = torch.cuda.Stream(self.device)
                with torch.cuda.graph(self.graph, stream=capture, capture_error_mode="thread_local"):
                    self.outputs = net(*self.inputs)
        finally:
            TableCache.stop_keeping()
        self.tables = tables  # the graph reads them by address: kept alive as long as it is

    def replay(self, inputs: Sequence[torch.Tensor]):
        # the static inputs are inference tensors: they can only be written in inference mode
        with torch.cuda.device(self.device), torch.inference_mode():
            for static, value in zip(self.inputs, inputs):
                static.copy_(value, non_blocking=True)
            self.graph.replay()
        return self.outputs


class CUDAGraphed:
    """A net captured in CUDA graphs, one per set of input shapes (and dtypes) it is called with: each call copies the
    inputs into the graph of their shapes and replays it; a new shape is captured on its first call (the LIMIT most
    recently used graphs are kept).

    The outputs are the graph's own static tensors, overwritten by the next call at that shape: clone what you
    keep. Build it with `cuda_graph(net, example_inputs)` (the example's graph is captured at once).
    """

    LIMIT = 4

    def __init__(self, net: nn.Module, example_inputs: Sequence[torch.Tensor], warmup: int = 3) -> None:
        blocking = unexportable_layers(net)
        if blocking:
            layer, reason = blocking[0]
            raise CaffeError(f"layer {layer}: {reason}, so the net cannot be captured in a CUDA graph")
        if not torch.cuda.is_available():
            raise CaffeError("CUDA graphs need a CUDA device; none is available")
        if not all(isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs):
            raise CaffeError("cuda_graph() needs the example inputs on the CUDA device the net is on")
        self.net, self.warmup, self.count = net, warmup, len(example_inputs)
        self.device = example_inputs[0].device
        self.captures: dict[tuple, _Capture] = {}
        self._use(example_inputs)

    @staticmethod
    def _key(inputs: Sequence[torch.Tensor]) -> tuple:
        return tuple((tuple(x.shape), x.dtype) for x in inputs)

    def _use(self, inputs: Sequence[torch.Tensor]) -> _Capture:
        key = self._key(inputs)
        capture = self.captures.pop(key, None)
        if capture is None:
            if any(x.device != self.device for x in inputs):
                raise ValueError(f"the captured net runs on {self.device}; got inputs on "
                                 f"{', '.join(str(x.device) for x in inputs)}")
            capture = _Capture(self.net, inputs, self.warmup)
            while len(self.captures) >= self.LIMIT:
                self.captures.pop(next(iter(self.captures)))
        self.captures[key] = capture  # last: the most recently used
        # the most recent capture's tensors, as the one graph of earlier versions exposed them
        self.inputs, self.outputs, self.graph = capture.inputs, capture.outputs, capture.graph
        return capture

    def __call__(self, *inputs: torch.Tensor):
        if len(inputs) != self.count:
            raise TypeError(f"the captured net takes {self.count} inputs, got {len(inputs)}")
        return self._use(inputs).replay(inputs)


def cuda_graph(net: nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor, warmup: int = 3) -> CUDAGraphed:
    """Capture `net` (converted or optimised, on a CUDA device) for the shapes of `example_inputs`; other shapes are
    captured as they come."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = [example_inputs]
    return CUDAGraphed(net, list(example_inputs), warmup)


def enable_huge_pages() -> bool:
    """Let torch's CPU allocator back large tensors with transparent huge pages (THP_MEM_ALLOC_ENABLE=1).

    Fresh 4 KiB pages cost a page fault each, which at 1025x2049 is a large share of the forward
    time. torch reads the variable at its first large allocation, so call this before loading a
    net; it changes the whole process. Returns whether the setting is (now) on; a value the user
    set is left alone.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    return os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
