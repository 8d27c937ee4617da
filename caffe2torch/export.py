"""Export a converted net (ONNX, torch.export pt2, TorchScript, safetensors) and prove the file computes the same.

After writing (caffe2torch.writers), the file is loaded back and run (onnxruntime for ONNX, the
loaded program for pt2 and TorchScript; safetensors in the net) on reference-style inputs against
the PyTorch net: at the converted size, and where the file's sizes are symbolic at a second size
Caffe's rules accept too. The batch is symbolic by default (ONNX, pt2); `dynamic` makes height
and width symbolic too, over the range the net takes (caffe2torch.dynamic). `fast` exports the
fast graph (caffe2torch.fast: norms folded, torch's kernels for Interp and pooling). A relative
error above `tolerance` deletes the file; the error then names the first layer type whose own
export, run alone on the values it sees in the net, differs.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import fx, nn

from caffe2torch.errors import CaffeError, term
from caffe2torch.model import layer_calls, unexportable_layers, net_info
from caffe2torch.protect import ReadFiles
from caffe2torch.refinput import reference_inputs
from caffe2torch.write import current_umask
from caffe2torch.writers import FORMATS, SUFFIXES, _as_tuple, dynamo_onnx, require, write

TOLERANCE = 1e-4


class ExportMismatch(CaffeError):
    """The exported file computes something else than the net (the file is deleted)."""


@dataclass
class ExportCheck:
    """How the written file compares with the PyTorch net on the check inputs (the worst of every size checked)."""

    path: Path
    max_abs: float
    max_rel: float
    outputs: int
    sizes: list = None  # the input shapes checked, the converted ones first
    dynamic: str = ""  # which sizes the file leaves symbolic, in words ("" when none)
    note: str = ""  # why sizes the net takes were kept fixed after all ("" when none)


def _errors(expected: Sequence[torch.Tensor], actual: Sequence) -> tuple[float, float]:
    """Max absolute error and that error relative to the largest expected magnitude, over all outputs.

    NaN and infinities must sit at the same places with the same sign; a mismatch there is an
    infinite error.
    """
    if len(expected) != len(actual):
        return math.inf, math.inf
    worst_abs = worst_rel = 0.0
    for want, got in zip(expected, actual):
        want = want.detach().double().cpu().numpy()
        got = np.asarray(got.detach().double().cpu().numpy() if isinstance(got, torch.Tensor) else got, dtype=np.float64)
        if want.shape != got.shape:
            return math.inf, math.inf
        special = ~np.isfinite(want)
        if not np.array_equal(np.isnan(want), np.isnan(got)) or not np.array_equal(want[special & ~np.isnan(want)],
                                                                                      got[special & ~np.isnan(want)]):
            return math.inf, math.inf
        if not np.isfinite(got[~special]).all():
            return math.inf, math.inf
        if not (~special).any():
            continue
        difference = float(np.abs(got[~special] - want[~special]).max())
        scale = float(np.abs(want[~special]).max())
        worst_abs = max(worst_abs, difference)
        worst_rel = max(worst_rel, difference / scale if scale > 0 else difference)
    return worst_abs, worst_rel


def _expected(module: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    with torch.inference_mode():
        return list(_as_tuple(module(*inputs)))


def check_inputs(net: fx.GraphModule, seed: int = 0, shapes: dict | None = None) -> tuple[torch.Tensor, ...]:
    """Reference-style inputs (as the Caffe reference generator makes them) of the converted shapes (or `shapes`)."""
    info = net_info(net)
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), torch.float32)
    return tuple(torch.from_numpy(x).to(device, dtype) for x in reference_inputs(shapes or info.inputs, seed).values())


class _Layer(nn.Module):
    """One layer call alone, for blaming an export mismatch on a layer type."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.layer = module

    def forward(self, *bottoms: torch.Tensor):
        return self.layer(*bottoms)


def blame(net: fx.GraphModule, fmt: str, inputs: tuple, tolerance: float, folder: Path) -> str | None:
    """The first layer (in graph order) whose own export differs from it on the values it gets in the net."""
    captured: list[tuple[fx.Node, tuple]] = []

    class Capture(fx.Interpreter):
        def run_node(self, node):
            if node.op == "call_module":
                captured.append((node, tuple(self.env[a] if isinstance(a, fx.Node) else a for a in node.args)))
            return super().run_node(node)

    with torch.inference_mode():
        Capture(net, garbage_collect_values=False).run(*inputs)
    calls = dict(layer_calls(net))
    tried: set[str] = set()
    for index, (node, args) in enumerate(captured):
        module = net.get_submodule(node.target)
        key = f"{type(module).__name__}({module.extra_repr()}) {[tuple(a.shape) for a in args]}"
        if key in tried or not all(isinstance(a, torch.Tensor) for a in args):
            continue
        tried.add(key)
        single = _Layer(module).eval()
        path = folder / f"layer{index}{SUFFIXES[fmt]}"
        names = [f"bottom{i}" for i in range(len(args))]
        try:
            run = write(fmt, single, args, path, names, [])
            _, rel = _errors(_expected(single, args), run(args))
        except Exception:  # noqa: BLE001 - a layer that cannot even be exported alone is the culprit too
            rel = math.inf
        finally:
            path.unlink(missing_ok=True)
        if rel > tolerance:
            call = calls.get(node)
            return f"{call.type} layer {call.layer!r}" if call is not None else f"module {node.target!r}"
    return None


def _export_plan(net: fx.GraphModule, fmt: str, dynamic: bool, seed: int):
    """The dynamic_shapes, the example inputs the exporter traces, the inputs the file is checked on, and the
    sizes left symbolic in words."""
    from caffe2torch.dynamic import describe, dynamic_shapes_from, example_shapes, probe_sizes, size_ranges

    info = net_info(net)
    converted = check_inputs(net, seed)
    if fmt in ("safetensors", "torchscript") or fmt == "onnx" and not dynamo_onnx():
        if dynamic:
            why = ("a TorchScript trace keeps its example's sizes" if fmt == "torchscript" else
                   "torch's older ONNX exporter traces, keeping its example's sizes; install onnxscript")
            if fmt != "safetensors":
                raise CaffeError(f"{term('--dynamic', 'dynamic=True')}: {why}; export pt2 or onnx for symbolic sizes")
        return None, converted, [converted], ""
    try:
        ranges = size_ranges(net, batch=True, spatial=dynamic)
    except CaffeError:
        if dynamic:
            raise
        ranges = {}  # shapes alone cannot tell (a layer reads the data to size itself): the example's sizes
    if not any(ranges.values()):
        return None, converted, [converted], ""
    example = check_inputs(net, seed, example_shapes(net, ranges))
    second = check_inputs(net, seed + 1, probe_sizes(net, ranges))
    return dynamic_shapes_from(ranges), example, [converted, second], describe(ranges, info.inputs)


def export(net: fx.GraphModule, fmt: str, path: str | os.PathLike, tolerance: float = TOLERANCE,
           seed: int = 0, force: bool = False, protect: Sequence[str | os.PathLike] = (),
           read: ReadFiles | None = None, dynamic: bool = False, fast: bool = False) -> ExportCheck:
    """Write `net` as `fmt` to `path` and check it; a mismatch deletes the file and raises ExportMismatch.

    ONNX and pt2 files take any batch size (unless torch.export cannot prove the net's guards for any: then the
    converted sizes, said in the check's `note`); `dynamic` also any height and width the net takes. `fast`
    writes the fast graph (caffe2torch.fast.optimize, without the CPU-only fused convolutions).
    An existing file is replaced only with `force`, and never a file the run read (`read`, e.g.
    `Conversion.read_files()`: the model, its definition wherever it was found; `protect`: more
    paths), nor anything inside a folder among them.
    """
    if fmt not in FORMATS:
        raise CaffeError(f"{term('--format', 'format')} {fmt}: expected one of {', '.join(FORMATS)}")
    require(fmt)
    info = net_info(net)
    blocking = unexportable_layers(net) if fmt != "safetensors" else []
    if blocking:
        layer, reason = blocking[0]
        raise CaffeError(f"layer {layer}: {reason}, so it has no {fmt} export; export a definition without it "
                         f"(its bottoms become the outputs) and run it in PyTorch after the exported part")
    if fast and fmt == "safetensors":
        raise CaffeError(f"{term('--fast', 'fast=True')}: safetensors holds the converted net's tensors; export the fast "
                         f"graph as onnx or pt2")
    path = Path(path)
    if path.is_dir():
        raise CaffeError(f"{path}: is a folder; give the file to write")
    read = read or ReadFiles()
    for source in protect:
        read.add(source, "the model being exported")
    read.check_file(path, term("-o", "path"))
    if path.exists() and not force:
        raise CaffeError(f"{path}: exists; pass {term('--force', 'force=True')} to replace it")
    net = net.eval()
    shapes, example, checks, symbolic = _export_plan(net, fmt, dynamic, seed)
    note = ""
    module = _fast_graph(net) if fast else net
    parent = path.absolute().parent
    blocking = next((p for p in [parent, *parent.parents] if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise CaffeError(f"{blocking}: is not a folder, so {path} cannot be written")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=SUFFIXES[fmt], dir=parent)
        os.close(handle)
    except OSError as error:
        raise CaffeError(f"{path}: cannot write ({error.strerror or error})") from None
    temporary = Path(temporary)
    try:
        worst_abs = worst_rel = 0.0
        try:
            try:
                run = write(fmt, module, example, temporary, info.input_names, list(info.outputs), shapes)
            except Exception as error:  # noqa: BLE001 - torch.export's guard failures have no public type
                if dynamic or shapes is None or "Constraints violated" not in str(error):
                    raise
                # The batch the net takes on shapes alone, but torch.export cannot prove every guard for any batch
                # (e.g. a proposal layer's min(top_n, ...) of it): the file keeps the converted sizes.
                example = checks[0]
                shapes, checks, symbolic = None, checks[:1], ""
                note = (f"torch.export could not prove the net's guards for any batch ({str(error).splitlines()[0]}): "
                        f"the file keeps the converted sizes")
                run = write(fmt, module, example, temporary, info.input_names, list(info.outputs), shapes)
            results = [(inputs, run(inputs)) for inputs in checks]
        except CaffeError:
            raise
        except OSError as error:
            raise CaffeError(f"{path}: cannot write ({error.strerror or error})") from None
        except Exception as error:  # noqa: BLE001 - the exporters raise many types
            raise ExportMismatch(f"{path}: the {fmt} export failed ({type(error).__name__}: "
                                 f"{str(error).splitlines()[0] if str(error) else ''})") from None
        for inputs, actual in results:
            max_abs, max_rel = _errors(_expected(net, inputs), actual)
            worst_abs, worst_rel = max(worst_abs, max_abs), max(worst_rel, max_rel)
            if max_rel > tolerance:
                with tempfile.TemporaryDirectory() as scratch:
                    culprit = blame(module, fmt, inputs, tolerance, Path(scratch)) if not fast else None
                where = f"; the first layer that differs alone: {culprit}" if culprit else \
                    "; no single layer differs alone (the mismatch comes from their combination)"
                size = ", ".join("x".join(map(str, x.shape)) for x in inputs)
                raise ExportMismatch(f"{path}: the {fmt} file differs from the PyTorch net by {max_rel:.3g} relative "
                                     f"at input {size} (max abs {max_abs:.3g}, tolerance {tolerance:g}), file "
                                     f"deleted{where}")
        os.chmod(temporary, 0o666 & ~current_umask())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return ExportCheck(path, worst_abs, worst_rel, len(info.outputs), [[tuple(x.shape) for x in inputs]
                                                                       for inputs in checks], symbolic, note)


def _fast_graph(net: fx.GraphModule) -> fx.GraphModule:
    """The fast graph for an export: the folds and torch's kernels; not the CPU's oneDNN-fused convolutions (no
    exporter knows them; onnxruntime fuses a convolution and its ReLU itself) nor channels_last copies."""
    from caffe2torch.fast import optimize

    return optimize(net, fuse_relu=False, channels_last=False, in_place=False)
