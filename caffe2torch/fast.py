"""Fast CPU inference for a converted net: folded norms, channels_last, lean kernels, in-place ops, dead blobs freed.

`optimize(net)` returns a FastNet; `enable_huge_pages()` (before the first large allocation)
adds the allocator lever. Exact mode stays float32; what changes against `CaffeNet` is rounding
(single layers within a few 1e-7 relative, whole ICNet within verify's 5e-4) and these give-ups:

* Records of folded layers: the convolution's pre-norm output (and a BatchNorm's output before
  its folded Scale) no longer exist; the last folded layer's output is the convolution's.
* Fused ReLUs (lever `fuse_relu`): a ReLU in place right after a convolution runs inside
  oneDNN's convolution, so that convolution's pre-activation output is not made either.
* Blobs: `run()` keeps only the net outputs (every other blob is freed after its last reader);
  `after_layer` still sees every remaining layer's tops as they are made, but a later in-place
  ReLU/SUM may overwrite them, so copy what you keep. Outputs are channels_last-strided when
  the input was 4-D (same values and shape; `.contiguous()` gives NCHW).
* Special values: ReLU(-inf) gives 0 (Caffe: NaN); MAX pooling uses PyTorch's window rule
  only where it gives Caffe's output size, so NaN/-FLT_MAX of empty windows keep the exact path;
  Eltwise SUM does not turn -0 into +0.
* Interp uses PyTorch's bilinear `align_corners=True` kernel; its source coordinates differ from
  the fork's float32 ones by rounding (relative error around 1e-7).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from caffe2torch.fold import (CONV_TYPES, NORM_TYPES, Affine, batch_norm_affine, bn_affine, find_chains,
                              fold_into_conv, scale_affine)
from caffe2torch.layers.activation import ReLU
from caffe2torch.layers.convolution import CaffeConvolution, CaffeDeconvolution
from caffe2torch.layers.elementwise import EltwiseSum
from caffe2torch.layers.interp import CaffeInterp
from caffe2torch.layers.normalization import CaffeBatchNorm, CaffeBN, CaffeScaleBias
from caffe2torch.layers.pooling import MAX, CaffePooling
from caffe2torch.model import CaffeNet, Step, module_key

# Step types whose fast module always returns a tensor no other blob shares, so a later op may
# overwrite it in place once nothing else reads it.
FRESH_TYPES = {"Convolution", "Deconvolution", "Pooling", "Interp", "Eltwise", "BN", "BatchNorm", "Scale", "ReLU"}


@dataclass
class FastOptions:
    """The levers of the fast path; each can be switched off to measure it."""

    fold: bool = True
    channels_last: bool = True
    fast_kernels: bool = True
    in_place: bool = True
    free_dead: bool = True
    # A ReLU that follows a convolution in place runs inside oneDNN's convolution (one pass less
    # over the tensor); the convolution's pre-activation record is then no longer made.
    fuse_relu: bool = True
    # torch.compile (inductor) of the whole forward: faster again, but about a minute of compiling
    # on 2 cores at the first call of each input shape; `run()` (and so verify) stays eager.
    compile: bool = False


# ---------------------------------------------------------------- lean layer kernels

class FastInterp(nn.Module):
    """Corner-aligned bilinear resize with PyTorch's kernel (exact subsampling when the step is an integer)."""

    def __init__(self, pad_beg: int, pad_end: int, out_size: tuple[int, int], channels_last: bool) -> None:
        super().__init__()
        self.pad_beg, self.pad_end, self.out_size = pad_beg, pad_end, tuple(out_size)
        self.memory = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2] + self.pad_beg + self.pad_end, x.shape[-1] + self.pad_beg + self.pad_end
        start = -self.pad_beg
        x = x[..., start:start + height, start:start + width]
        out_h, out_w = self.out_size
        if (height, width) == (out_h, out_w):
            return x.clone(memory_format=self.memory)
        if (height, width) == (1, 1):
            return x.expand(-1, -1, out_h, out_w).contiguous(memory_format=self.memory)
        steps = [(n - 1) // (m - 1) if m > 1 and (n - 1) % (m - 1) == 0 else 0 for n, m in ((height, out_h), (width, out_w))]
        if all(steps):
            # Source positions fall exactly on samples: bilinear is plain subsampling.
            return x[..., :: steps[0], :: steps[1]].contiguous(memory_format=self.memory)
        # PyTorch keeps the input's layout; a 1-pixel-wide map is ambiguous, so say which.
        x = x.contiguous(memory_format=self.memory)
        return F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=True)


class FastReLU(nn.Module):
    def __init__(self, negative_slope: float, in_place: bool) -> None:
        super().__init__()
        self.negative_slope, self.in_place = negative_slope, in_place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.negative_slope == 0.0:
            return torch.relu_(x) if self.in_place else torch.relu(x)
        return F.leaky_relu(x, self.negative_slope, inplace=self.in_place)


class FastSum(nn.Module):
    """Plain sum of the bottoms (unit coefficients), optionally accumulated into the first bottom."""

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.in_place = in_place

    def forward(self, *bottoms: torch.Tensor) -> torch.Tensor:
        total = bottoms[0].add_(bottoms[1]) if self.in_place else bottoms[0] + bottoms[1]
        for bottom in bottoms[2:]:
            total.add_(bottom)
        return total


class FastConv2d(nn.Module):
    """conv2d on the bottom as it is: CaffeConvolution's batch-flattening reshape gives an N=1
    channels_last tensor a batch stride oneDNN does not take as channels_last (8x slower)."""

    def __init__(self, conv: CaffeConvolution, channels_last: bool, relu: bool = False) -> None:
        super().__init__()
        self.relu = relu
        # Own copies in the wanted layout: the CaffeNet optimised from must stay as it was.
        memory = torch.channels_last if channels_last else torch.contiguous_format
        self.register_buffer("weight", conv.weight.detach().clone(memory_format=memory))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())
        self.stride, self.pad, self.dilation, self.group = tuple(conv.stride), tuple(conv.pad), tuple(conv.dilation), conv.group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.relu:
            return F.conv2d(x, self.weight, self.bias, self.stride, self.pad, self.dilation, self.group)
        if x.device.type == "cpu" and torch.backends.mkldnn.enabled and hasattr(torch.ops.mkldnn, "_convolution_pointwise"):
            return torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, list(self.pad), list(self.stride),
                                                           list(self.dilation), self.group, "relu", [], "")
        return torch.relu_(F.conv2d(x, self.weight, self.bias, self.stride, self.pad, self.dilation, self.group))


class FastMaxPool(nn.Module):
    def __init__(self, kernel, stride, pad) -> None:
        super().__init__()
        self.kernel, self.stride, self.pad = tuple(kernel), tuple(stride), tuple(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, self.kernel, self.stride, self.pad, ceil_mode=True)


def _torch_pool_size(size: int, kernel: int, stride: int, pad: int) -> int:
    """PyTorch's ceil_mode output size (its last window must start inside the input or left padding)."""
    out = -(-(size + 2 * pad - kernel) // stride) + 1
    if (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _fast_pool(module: CaffePooling) -> nn.Module:
    g = module.geometry
    if module.method != MAX or any(2 * p > k for p, k in zip(g.pad, g.kernel)):
        return module
    if tuple(_torch_pool_size(*args) for args in zip(g.size, g.kernel, g.stride, g.pad)) != tuple(g.out):
        return module  # Caffe keeps a window PyTorch drops (empty windows): stay exact
    return FastMaxPool(g.kernel, g.stride, g.pad)


# ---------------------------------------------------------------- folding on modules

def _module_affine(step: Step, module: nn.Module) -> Affine | None:
    if isinstance(module, CaffeBN):
        return bn_affine(module.slope.detach(), module.bias.detach(), module.mean, module.variance, module.eps)
    if isinstance(module, CaffeBatchNorm):
        return batch_norm_affine(module.mean, module.variance, module.scale_factor, module.eps)
    if isinstance(module, CaffeScaleBias) and module.operand_from_bottom is None and module.scale is not None:
        if module.scale_axis != 1 or module.scale.dim() != 1 or module.bias_axis not in (None, 1):
            return None
        return scale_affine(module.scale.detach(), module.bias.detach() if module.bias is not None else None)
    return None


def _foldable(step: Step, module: nn.Module) -> bool:
    if step.type in CONV_TYPES:
        return isinstance(module, CaffeConvolution) and module.axis == 1 and len(step.top_shapes) == 1
    if step.type in NORM_TYPES or step.type == "Scale":
        return len(step.top_shapes) == 1 and len(step.top_shapes[0]) >= 2 and _module_affine(step, module) is not None
    return False


def _folded_conv(conv: CaffeConvolution, layer_type: str, stages: list[Affine]) -> CaffeConvolution:
    weight, bias = fold_into_conv(layer_type, conv.group, conv.weight.detach().numpy(),
                                  None if conv.bias is None else conv.bias.detach().numpy(), stages)
    cls = CaffeDeconvolution if isinstance(conv, CaffeDeconvolution) else CaffeConvolution
    return cls(torch.from_numpy(weight), torch.from_numpy(bias), conv.axis, conv.stride, conv.pad, conv.dilation, conv.group)


# ---------------------------------------------------------------- the fast net

@dataclass
class _Plan:
    steps: list[Step]
    modules: dict[str, nn.Module]
    folded: dict[str, str] = field(default_factory=dict)       # removed layer -> its convolution
    stands_for: dict[str, str] = field(default_factory=dict)   # removed layer whose output a step makes -> step
    folded_away: list[str] = field(default_factory=list)       # Caffe layers whose records no longer exist


def _fold_steps(steps: list[Step], modules: dict[str, nn.Module]) -> _Plan:
    usable = [_foldable(step, modules[step.name]) for step in steps]
    chains = find_chains(steps, lambda i: usable[i])
    plan = _Plan([], dict(modules))
    by_conv = {chain.conv: chain for chain in chains}
    removed = {member for chain in chains for member in chain.members}
    for index, step in enumerate(steps):
        if index in removed:
            continue
        chain = by_conv.get(index)
        if chain is None:
            plan.steps.append(step)
            continue
        members = [steps[m] for m in chain.members]
        stages = [_module_affine(m, modules[m.name]) for m in members]
        plan.modules[step.name] = _folded_conv(modules[step.name], step.type, stages)
        plan.steps.append(Step(step.name, step.type, step.bottoms, (chain.top,), (members[-1].top_shapes[0],)))
        for member in members:
            plan.folded[member.name] = step.name
            del plan.modules[member.name]
        plan.stands_for[members[-1].name] = step.name
        plan.folded_away += [step.name] + [m.name for m in members[:-1]]
    return plan


def _last_reader_of_value(steps: Sequence[Step], index: int, blob: str) -> bool:
    """Whether step `index` is the last one to read the value `blob` holds when it runs."""
    for later in steps[index + 1:]:
        if blob in later.bottoms:
            return False
        if blob in later.tops:
            return True
    return True


def _producers(steps: Sequence[Step]) -> list[dict[str, str | None]]:
    """For each step, the type of the step that made each of its bottoms' current value (None: a net input)."""
    current: dict[str, str | None] = {}
    result = []
    for step in steps:
        result.append({b: current.get(b) for b in step.bottoms})
        for top in step.tops:
            current[top] = step.type
    return result


def _dead_after(steps: Sequence[Step], outputs: Sequence[str]) -> list[tuple[str, ...]]:
    """Blob names to drop after each step: read for the last time there and not an output."""
    dead = []
    for index, step in enumerate(steps):
        names = [b for b in dict.fromkeys(step.bottoms)
                 if b not in step.tops and b not in outputs and _last_reader_of_value(steps, index, b)]
        dead.append(tuple(names))
    return dead


class FastNet(nn.Module):
    """The optimised net: same inputs and outputs as the CaffeNet it came from, fewer and leaner steps."""

    def __init__(self, net: CaffeNet, options: FastOptions) -> None:
        super().__init__()
        self.name, self.input_shapes, self.outputs = net.name, dict(net.input_shapes), list(net.outputs)
        self.options = options
        modules = {step.name: net.layer(step.name) for step in net.steps}
        plan = _fold_steps(list(net.steps), modules) if options.fold else _Plan(list(net.steps), modules)
        self.steps, self.folded, self.stands_for, self.folded_away = plan.steps, plan.folded, plan.stands_for, plan.folded_away
        self.fused_relu = self._relu_fusions(plan.modules) if options.fuse_relu and options.fast_kernels else {}
        producers = _producers(self.steps)
        fast = {step.name: self._lean(index, step, plan.modules[step.name], producers[index])
                for index, step in enumerate(self.steps)}
        self.layers = nn.ModuleDict({module_key(step.name): fast[step.name] for step in self.steps})
        self.dead = _dead_after(self.steps, self.outputs) if options.free_dead else [()] * len(self.steps)
        self._compiled = torch.compile(self._outputs, dynamic=False) if options.compile else None
        self.eval()

    @property
    def input_names(self) -> list[str]:
        return list(self.input_shapes)

    def _may_overwrite(self, index: int, step: Step, bottom: str, producer: str | None) -> bool:
        """A bottom may be overwritten when a fresh tensor holds it and nothing reads that value later."""
        if not self.options.in_place or producer not in FRESH_TYPES:
            return False
        if step.bottoms.count(bottom) != 1 or not _last_reader_of_value(self.steps, index, bottom):
            return False
        # Overwriting a bottom under another name leaves that name stale: fine only once it is freed.
        return bottom in step.tops or self.options.free_dead and bottom not in self.outputs

    @staticmethod
    def _fusable_conv(step: Step, module: nn.Module) -> bool:
        return type(module) is CaffeConvolution and module.axis == 1 and len(module.stride) == 2 \
            and len(step.bottoms) == 1 and len(step.top_shapes[0]) == 4

    def _relu_fusions(self, modules: Mapping[str, nn.Module]) -> dict[str, str]:
        """Convolution step -> the plain ReLU right after it, in place on its top."""
        fusions = {}
        for conv, relu in zip(self.steps, self.steps[1:]):
            module = modules[relu.name]
            if self._fusable_conv(conv, modules[conv.name]) and isinstance(module, ReLU) \
                    and module.negative_slope == 0.0 and relu.bottoms == relu.tops == conv.tops:
                fusions[conv.name] = relu.name
        return fusions

    def _lean(self, index: int, step: Step, module: nn.Module, producers: Mapping[str, str | None]) -> nn.Module:
        if self._fusable_conv(step, module):
            # Same arithmetic; without it channels_last gains nothing.
            return FastConv2d(module, self.options.channels_last, relu=step.name in self.fused_relu)
        if step.name in self.fused_relu.values():
            return nn.Identity()  # its convolution applied it
        if not self.options.fast_kernels:
            return module
        if isinstance(module, CaffeInterp) and len(module.out_size) == 2:
            return FastInterp(module.pad_beg, module.pad_end, module.out_size, self.options.channels_last)
        if isinstance(module, ReLU):
            bottom = step.bottoms[0]
            return FastReLU(module.negative_slope, self._may_overwrite(index, step, bottom, producers[bottom]))
        if isinstance(module, EltwiseSum) and all(c == 1.0 for c in module.coeffs) and len(step.bottoms) >= 2:
            first = step.bottoms[0]
            return FastSum(self._may_overwrite(index, step, first, producers[first]) and first not in step.bottoms[1:])
        if isinstance(module, CaffePooling):
            return _fast_pool(module)
        return module

    def layer(self, name: str) -> nn.Module:
        return self.layers[module_key(name)]

    def run(self, *args: torch.Tensor, after_layer: Callable[[Step, tuple[torch.Tensor, ...]], None] | None = None,
            **kwargs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run every step; `after_layer(step, tops)` sees each step's outputs right after it runs."""
        blobs = dict(zip(self.input_names, args))
        blobs.update(kwargs)
        missing = [name for name in self.input_names if name not in blobs]
        if missing:
            raise TypeError(f"{self.name or 'net'} takes inputs {self.input_names}; missing {missing}")
        for name, shape in self.input_shapes.items():
            # Lean kernels fix Interp and pooling sizes at optimisation time; another size needs its own net.
            if tuple(blobs[name].shape[1:]) != tuple(shape[1:]):
                raise ValueError(f"input {name!r} has shape {tuple(blobs[name].shape)}; this optimised net was built "
                                 f"for {tuple(shape)}: convert and optimize() again for the new size")
        if self.options.channels_last:
            blobs = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for k, v in blobs.items()}
        layers = self.layers
        for step, dead in zip(self.steps, self.dead):
            result = layers[module_key(step.name)](*(blobs[b] for b in step.bottoms))
            tops = result if isinstance(result, tuple) else (result,)
            for name in dead:
                del blobs[name]
            for top, value in zip(step.tops, tops):
                blobs[top] = value
            if after_layer is not None:
                after_layer(step, tops)
        return blobs

    def _outputs(self, *args: torch.Tensor, **kwargs: torch.Tensor):
        blobs = self.run(*args, **kwargs)
        if len(self.outputs) == 1:
            return blobs[self.outputs[0]]
        return tuple(blobs[name] for name in self.outputs)

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor):
        with torch.inference_mode():
            return (self._compiled or self._outputs)(*args, **kwargs)


def enable_huge_pages() -> bool:
    """Let PyTorch's CPU allocator back large tensors with transparent huge pages (THP_MEM_ALLOC_ENABLE=1).

    Fresh 4 KiB pages cost a page fault each, which at 1025x2049 is a large share of the forward
    time. PyTorch reads the variable at its first large allocation, so call this before loading
    a net; it changes the whole process. Returns whether the setting is (now) on; a value the
    user set is left alone.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    return os.environ["THP_MEM_ALLOC_ENABLE"] == "1"


def optimize(net: CaffeNet, options: FastOptions | None = None, **levers: bool) -> FastNet:
    """The fast inference path of a converted net (float32); `levers` override FastOptions fields by name."""
    options = options or FastOptions()
    for name, value in levers.items():
        if not hasattr(options, name):
            raise TypeError(f"optimize() has no lever {name!r}; levers: {', '.join(FastOptions.__dataclass_fields__)}")
        setattr(options, name, value)
    return FastNet(net, options)
