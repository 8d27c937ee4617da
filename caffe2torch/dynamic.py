"""Which input sizes a converted net takes, found by running it on shapes alone, and the torch.export Dims that say so.

A converted net computes every size from its inputs, as Caffe's Reshape() does, so the sizes it
takes are the sizes at which every layer's rules hold: any size for a fully convolutional net, a
range for nets whose definition fixes an inner size (ICNet's pyramid pooling), only the converted
size where weights fix it (an InnerProduct after spatial layers). The net is run on the meta
device (shapes, no data, milliseconds a run) at probe sizes around the converted one: each input
axis that can vary alone becomes a `torch.export.Dim` with the range found, the batch one Dim
shared by the inputs that carry it.
"""

from __future__ import annotations

import copy
import warnings
from typing import Callable, Sequence

import torch
from torch import fx

from caffe2torch.errors import CaffeError
from caffe2torch.model import net_info, unexportable_layers

Shape = tuple[int, ...]
# Largest size probed: a net still taking it takes any size above its minimum (torch's Dim without a max).
_LARGEST = 1 << 16
# torch.export specialises sizes 0 and 1 and guards that a symbolic size is not 1, inner sizes included (a
# pooling's windows before its empty ones are one fewer than its top): every size that follows an input's stays
# at 3 or more over a Dim's range.
_SMALLEST_INNER = 3


def _meta_copy(net: fx.GraphModule) -> fx.GraphModule:
    copy_ = copy.deepcopy(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return copy_.to("meta").eval()


class _Prober:
    """Runs the net on meta tensors of given input shapes and says whether every layer takes them."""

    def __init__(self, net: fx.GraphModule) -> None:
        from caffe2torch.model import run_layers

        self.net, self.run_layers = _meta_copy(net), run_layers
        self.info = net_info(net)
        self.names = self.info.input_names
        self.base = {name: tuple(shape) for name, shape in self.info.inputs.items()}
        self.error = ""
        self.base_blobs = self._blob_shapes(self.base)
        if self.base_blobs is None:
            raise CaffeError(f"the net does not run on shapes alone (the meta device) at the size it was converted "
                             f"for, so its size ranges cannot be worked out: {self.error[:200]}")
        self.cache: dict[tuple, bool] = {}

    def _blob_shapes(self, shapes: dict[str, Shape]) -> dict[str, Shape] | None:
        seen: dict[str, Shape] = {}

        def keep(call, tops) -> None:
            for top, value in zip(call.tops, tops):
                if isinstance(value, torch.Tensor):
                    seen[top] = tuple(value.shape)

        inputs = [torch.empty(shapes[name], device="meta") for name in self.names]
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.run_layers(self.net, *inputs, after_layer=keep)
        except Exception as error:  # noqa: BLE001 - any failure means this size is not taken
            self.error = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
            return None
        return seen

    def takes(self, shapes: dict[str, Shape]) -> bool:
        """The net runs at `shapes` and no size that moved with them fell below 2."""
        key = tuple(shapes[name] for name in self.names)
        if key not in self.cache:
            blobs = self._blob_shapes(shapes)
            ok = blobs is not None
            if ok:
                for blob, shape in blobs.items():
                    base = self.base_blobs.get(blob)
                    if base is None or len(base) != len(shape):
                        continue
                    if any(d != b and d < _SMALLEST_INNER for d, b in zip(shape, base)):
                        ok = False
                        break
            self.cache[key] = ok
        return self.cache[key]

    def with_size(self, names: Sequence[str], axis: int, size: int) -> dict[str, Shape]:
        shapes = dict(self.base)
        for name in names:
            shape = list(shapes[name])
            shape[axis] = size
            shapes[name] = tuple(shape)
        return shapes


def _range(prober: _Prober, names: Sequence[str], axis: int) -> tuple[int, int | None] | None:
    """(min, max) of the sizes axis `axis` of the inputs `names` take together (max None: unbounded), or None if
    only their converted size. Sizes in between two taken ones are taken (Caffe's rules are monotonic in
    practice); the ends are found by doubling and bisection."""
    def takes(size: int) -> bool:
        return prober.takes(prober.with_size(names, axis, size))

    base = prober.base[names[0]][axis]
    if not (takes(base + 1) or base > _SMALLEST_INNER and takes(base - 1)):
        return None
    smallest = _SMALLEST_INNER if takes(_SMALLEST_INNER) else _edge(takes, base, _SMALLEST_INNER)
    step = max(base, 1)
    upper = base
    while upper < _LARGEST and takes(min(upper + step, _LARGEST)):
        upper = min(upper + step, _LARGEST)
        step *= 2
    if upper >= _LARGEST:
        return smallest, None
    return smallest, _edge(takes, upper, min(upper + step, _LARGEST))


def _edge(takes: Callable[[int], bool], good: int, bad: int) -> int:
    """The taken size next to the untaken ones, by bisection between a taken size `good` and an untaken `bad`
    (either side of it)."""
    while abs(good - bad) > 1:
        middle = (good + bad) // 2
        if takes(middle):
            good = middle
        else:
            bad = middle
    return good


def size_ranges(net: fx.GraphModule, batch: bool = True, spatial: bool = True) -> dict[str, dict[int, tuple]]:
    """For each input, the axes that can vary: {axis: (min, max or None)}. The batch (axis 0 of the inputs whose
    converted batch is the first input's) is tried for all of them at once; the other axes of 4-axis inputs one at
    a time, the rest of the net at its converted size."""
    blocking = unexportable_layers(net)
    if blocking:
        layer, reason = blocking[0]
        raise CaffeError(f"layer {layer}: {reason}, so its sizes cannot be worked out from shapes alone")
    if spatial:
        fixed = fixed_export_sizes(net)
        if fixed:
            layer, reason = fixed[0]
            raise CaffeError(f"layer {layer}: {reason}, so an export keeps the height and width of its example "
                             f"(leave out --dynamic; the batch stays symbolic)")
    prober = _Prober(net)
    ranges: dict[str, dict[int, tuple]] = {name: {} for name in prober.names}
    batched = [name for name in prober.names if len(prober.base[name]) >= 2 and
               prober.base[name][0] == prober.base[prober.names[0]][0]]
    if batch and batched:
        grown = {name: (3,) + shape[1:] if name in batched else shape for name, shape in prober.base.items()}
        if prober.takes(grown):
            for name in batched:
                ranges[name][0] = (1, None)
    if spatial:
        for axis in (2, 3):
            for name in prober.names:
                if len(prober.base[name]) != 4:
                    continue
                found = _range(prober, [name], axis)
                if found is not None:
                    ranges[name][axis] = found
            # inputs of one size that vary only together (an Eltwise of two inputs): one size for all of them
            groups: dict[int, list[str]] = {}
            for name in prober.names:
                if len(prober.base[name]) == 4 and axis not in ranges[name]:
                    groups.setdefault(prober.base[name][axis], []).append(name)
            for names in groups.values():
                found = _range(prober, names, axis) if len(names) > 1 else None
                for name in names if found is not None else ():
                    ranges[name][axis] = found + (tuple(names),)
    return ranges


def fixed_export_sizes(net: fx.GraphModule) -> list[tuple[str, str]]:
    """(layer, why) for each layer whose sizes an export cannot keep symbolic (its `fixed_export_sizes`)."""
    from caffe2torch.model import layer_calls

    calls = {node.target: call for node, call in layer_calls(net)}
    found = []
    for name, module in net.named_modules():
        reason = getattr(module, "fixed_export_sizes", "")
        if reason:
            call = calls.get(name)
            found.append((f"{call.layer!r} ({call.type})" if call is not None else repr(name), reason))
    return found


def dynamic_shapes(net: fx.GraphModule, batch: bool = True, spatial: bool = True) -> dict[str, dict[int, object]]:
    """`dynamic_shapes` for `torch.export.export(net, inputs, dynamic_shapes=...)` and `torch.onnx.export`: one
    `torch.export.Dim` per input axis the net takes at other sizes (the batch shared by the inputs that carry
    it), with the range Caffe's rules accept; axes it does not list stay at their example's size. Give example
    inputs of batch 2 or more (torch.export makes a size of 1 a constant): `example_shapes` gives their shapes."""
    return dynamic_shapes_from(size_ranges(net, batch, spatial))


def dynamic_shapes_from(ranges: dict[str, dict[int, tuple]]) -> dict[str, dict[int, object]]:
    """`dynamic_shapes` for the ranges `size_ranges` found."""
    from torch.export import Dim

    result: dict[str, dict[int, object]] = {}
    made: dict[tuple, object] = {}  # one Dim per axis shared by a group of inputs
    for index, (name, axes) in enumerate(ranges.items()):
        dims: dict[int, object] = {}
        for axis, found in sorted(axes.items()):
            low, high = found[:2]
            if axis == 0:
                key = ("batch",)
                label = "batch"
            else:
                key = (axis,) + (found[2] if len(found) > 2 else (name,))
                label = f"{'height' if axis == 2 else 'width'}{index if index else ''}"
            if key not in made:
                made[key] = Dim(label, min=low, max=high) if high is not None else Dim(label, min=low)
            dims[axis] = made[key]
        result[name] = dims
    return result


def probe_sizes(net: fx.GraphModule, ranges: dict[str, dict[int, tuple]]) -> dict[str, Shape]:
    """An input size other than the converted one inside the ranges (to check an export at a second size): every
    varying axis moved by about a fifth, kept in range; the batch 2."""
    info = net_info(net)
    shapes = {}
    for name, shape in info.inputs.items():
        shape = list(shape)
        for axis, found in ranges.get(name, {}).items():
            low, high = found[:2]
            if axis == 0:
                shape[0] = 2
                continue
            moved = shape[axis] + max(1, shape[axis] // 5)
            if high is not None and moved > high:
                moved = max(low, shape[axis] - max(1, shape[axis] // 5))
                moved = moved if moved != shape[axis] else high
            shape[axis] = moved
        shapes[name] = tuple(shape)
    return shapes


def example_shapes(net: fx.GraphModule, ranges: dict[str, dict[int, tuple]]) -> dict[str, Shape]:
    """The converted shapes with a batch of 2 where the batch varies (torch.export makes an example size of 1 a
    constant)."""
    return {name: ((2,) + tuple(shape[1:]) if 0 in ranges.get(name, {}) else tuple(shape))
            for name, shape in net_info(net).inputs.items()}


def describe(ranges: dict[str, dict[int, tuple]], inputs: dict[str, Sequence[int]]) -> str:
    """e.g. "data: N x 3 x H (>= 13) x W (17 to 40)" for messages."""
    parts = []
    for name, shape in inputs.items():
        axes = ranges.get(name, {})
        words = []
        for axis, size in enumerate(shape):
            if axis not in axes:
                words.append(str(size))
                continue
            low, high = axes[axis][:2]
            letter = "N" if axis == 0 else "HW"[axis - 2]
            words.append(letter if axis == 0 else f"{letter} ({low} to {high})" if high else f"{letter} (>= {low})")
        parts.append(f"{name}: {' x '.join(words)}")
    return "; ".join(parts)
