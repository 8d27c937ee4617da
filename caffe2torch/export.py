"""Export a converted net (ONNX, torch.export pt2, TorchScript, safetensors) and prove the file computes the same.

After writing, the file is loaded back and run (onnxruntime for ONNX, the loaded program for
pt2 and TorchScript; safetensors is compared tensor by tensor) on reference-style inputs against
the PyTorch net. A relative error above `tolerance` deletes the file; the error then names the
first layer type whose own export, run alone on the values it sees in the net, differs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import fx, nn

from caffe2torch.errors import CaffeError, term
from caffe2torch.model import layer_calls, unexportable_layers, net_info
from caffe2torch.protect import ReadFiles
from caffe2torch.refinput import reference_inputs
from caffe2torch.write import current_umask

FORMATS = ("onnx", "pt2", "torchscript", "safetensors")
SUFFIXES = {"onnx": ".onnx", "pt2": ".pt2", "torchscript": ".pt", "safetensors": ".safetensors"}
TOLERANCE = 1e-4
_NEEDS = {"onnx": ("onnx", "onnxruntime"), "safetensors": ("safetensors",)}


class ExportMismatch(CaffeError):
    """The exported file computes something else than the net (the file is deleted)."""


@dataclass
class ExportCheck:
    """How the written file compares with the PyTorch net on the check inputs."""

    path: Path
    max_abs: float
    max_rel: float
    outputs: int


def _require(fmt: str) -> None:
    missing = [name for name in _NEEDS.get(fmt, ()) if importlib.util.find_spec(name) is None]
    if missing:
        raise CaffeError(f"{term('--format', 'format')} {fmt} needs the package(s) {', '.join(missing)}: "
                         f"pip install 'caffe2torch[export]'")


@contextlib.contextmanager
def _quiet():
    """The exporters print progress, log and warn about tracing; one line of ours says what matters."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._dynamo")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def _as_tuple(value) -> tuple:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


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


def _write_onnx(module: nn.Module, inputs: tuple, path: Path, input_names: list[str], output_names: list[str]) -> None:
    # The dynamo exporter needs onnxscript; torch's TorchScript-based exporter works without it.
    dynamo = importlib.util.find_spec("onnxscript") is not None
    with _quiet():
        torch.onnx.export(module, inputs, str(path), dynamo=dynamo, **({"external_data": False} if dynamo else {}))
    _rename_onnx(path, input_names, output_names)


OUTPUT_SUFFIX = "_output"


def onnx_output_names(input_names: Sequence[str], output_names: Sequence[str]) -> list[str]:
    """The ONNX names of the outputs: each blob's own, except where an input has that name (a Caffe layer
    working in place on an input, e.g. `ReLU bottom: data top: data`): then `<blob>_output` (`_output2`,
    ... if that is taken too). ONNX needs every name defined once, and an input is defined by the caller."""
    inputs = set(input_names)
    taken = inputs | set(output_names)  # a blob's own name is never given to another
    names = []
    for name in output_names:
        candidate, count = name, 1
        while name in inputs and candidate in taken:
            count += 1
            candidate = f"{name}{OUTPUT_SUFFIX}" if count == 2 else f"{name}{OUTPUT_SUFFIX}{count - 1}"
        taken.add(candidate)
        names.append(candidate)
    return names


def _separate_outputs(graph, existing: set[str]) -> None:
    """Give every graph output a value of its own: the exporter lets an output be an input itself (an
    identity layer such as Dropout on an input) or another output's value; an Identity node copies it."""
    import onnx

    inputs, seen = {value.name for value in graph.input}, set()
    for value in graph.output:
        if value.name in inputs or value.name in seen:
            fresh, count = f"{value.name}_copy", 1
            while fresh in existing:
                count += 1
                fresh = f"{value.name}_copy{count}"
            existing.add(fresh)
            graph.node.append(onnx.helper.make_node("Identity", [value.name], [fresh]))
            value.name = fresh
        seen.add(value.name)


def _rename_onnx(path: Path, input_names: list[str], output_names: list[str]) -> None:
    """Name the graph's inputs and outputs after the Caffe blobs (outputs: see `onnx_output_names`).

    Done after export: the exporter's own naming can give an internal value the name of a
    Caffe blob (e.g. `log`), which it then defines twice; here such a value is renamed first.
    """
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    output_names = onnx_output_names(input_names, output_names)
    _separate_outputs(graph, {name for node in graph.node for name in [*node.input, *node.output]}
                      | {v.name for v in [*graph.input, *graph.output, *graph.value_info, *graph.initializer]})
    mapping = {value.name: new for value, new in zip(graph.input, input_names)}
    mapping.update({value.name: new for value, new in zip(graph.output, output_names)})
    existing = {name for node in graph.node for name in [*node.input, *node.output]}
    existing |= {v.name for v in [*graph.input, *graph.output, *graph.value_info]} | {t.name for t in graph.initializer}
    wanted = set(mapping.values())
    for name in sorted(existing & wanted - set(mapping)):
        alias, suffix = f"{name}_internal", 1
        while alias in existing or alias in wanted:
            suffix += 1
            alias = f"{name}_internal{suffix}"
        mapping[name] = alias

    def rename(graph) -> None:
        for node in graph.node:
            node.input[:] = [mapping.get(name, name) for name in node.input]
            node.output[:] = [mapping.get(name, name) for name in node.output]
            for attribute in node.attribute:
                for subgraph in [attribute.g, *attribute.graphs] if attribute.type in (5, 10) else []:
                    rename(subgraph)
        for value in [*graph.input, *graph.output, *graph.value_info, *graph.initializer]:
            value.name = mapping.get(value.name, value.name)

    rename(graph)
    onnx.save(model, str(path))


def _run_onnx(path: Path, inputs: tuple, input_names: list[str]) -> list[np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {arg.name: x.detach().cpu().numpy() for arg, x in zip(session.get_inputs(), inputs)}
    return session.run(None, feeds)


def _write(fmt: str, module: nn.Module, inputs: tuple, path: Path, input_names: list[str],
           output_names: list[str]) -> Callable[[], list]:
    """Write `module` as `fmt` to `path`; returns a function that runs the written file on `inputs`."""
    if fmt == "onnx":
        _write_onnx(module, inputs, path, input_names, output_names)
        return lambda: _run_onnx(path, inputs, input_names)
    if fmt == "pt2":
        with _quiet():
            program = torch.export.export(module, inputs)
        torch.export.save(program, str(path))
        return lambda: list(_as_tuple(torch.export.load(str(path)).module()(*inputs)))
    if fmt == "torchscript":
        with _quiet():
            traced = torch.jit.trace(module, inputs, check_trace=False)
        traced.save(str(path))
        return lambda: list(_as_tuple(torch.jit.load(str(path), map_location=inputs[0].device)(*inputs)))
    if fmt == "safetensors":
        from safetensors.torch import load_file, save_file

        state = {name: value.detach().cpu().contiguous() for name, value in module.state_dict().items()}
        save_file(state, str(path), metadata={"format": "pt", "producer": "caffe2torch"})

        def reloaded() -> list:  # the net with the file's tensors in place of its own
            copy = _clone(module)
            copy.load_state_dict(load_file(str(path)))
            with torch.inference_mode():
                return list(_as_tuple(copy(*inputs)))
        return reloaded
    raise CaffeError(f"{term('--format', 'format')} {fmt}: expected one of {', '.join(FORMATS)}")


def _clone(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


def _expected(module: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    with torch.inference_mode():
        return list(_as_tuple(module(*inputs)))


def check_inputs(net: fx.GraphModule, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Reference-style inputs (as the Caffe reference generator makes them) of the converted shapes."""
    info = net_info(net)
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), torch.float32)
    return tuple(torch.from_numpy(x).to(device, dtype) for x in reference_inputs(info.inputs, seed).values())


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
            run = _write(fmt, single, args, path, names, [])
            _, rel = _errors(_expected(single, args), run())
        except Exception:  # noqa: BLE001 - a layer that cannot even be exported alone is the culprit too
            rel = math.inf
        finally:
            path.unlink(missing_ok=True)
        if rel > tolerance:
            call = calls.get(node)
            return f"{call.type} layer {call.layer!r}" if call is not None else f"module {node.target!r}"
    return None


def export(net: fx.GraphModule, fmt: str, path: str | os.PathLike, tolerance: float = TOLERANCE,
           seed: int = 0, force: bool = False, protect: Sequence[str | os.PathLike] = (),
           read: ReadFiles | None = None) -> ExportCheck:
    """Write `net` as `fmt` to `path` and check it; a mismatch deletes the file and raises ExportMismatch.

    An existing file is replaced only with `force`, and never a file the run read (`read`, e.g.
    `Conversion.read_files()`: the model, its definition wherever it was found; `protect`: more
    paths), nor anything inside a folder among them.
    """
    if fmt not in FORMATS:
        raise CaffeError(f"{term('--format', 'format')} {fmt}: expected one of {', '.join(FORMATS)}")
    _require(fmt)
    info = net_info(net)
    blocking = unexportable_layers(net) if fmt != "safetensors" else []
    if blocking:
        layer, reason = blocking[0]
        raise CaffeError(f"layer {layer}: {reason}, so it has no {fmt} export; export a definition without it "
                         f"(its bottoms become the outputs) and run it in PyTorch after the exported part")
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
    inputs = check_inputs(net, seed)
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
        try:
            run = _write(fmt, net, inputs, temporary, info.input_names, list(info.outputs))
            actual = run()
        except CaffeError:
            raise
        except OSError as error:
            raise CaffeError(f"{path}: cannot write ({error.strerror or error})") from None
        except Exception as error:  # noqa: BLE001 - the exporters raise many types
            raise ExportMismatch(f"{path}: the {fmt} export failed ({type(error).__name__}: "
                                 f"{str(error).splitlines()[0] if str(error) else ''})") from None
        max_abs, max_rel = _errors(_expected(net, inputs), actual)
        if max_rel > tolerance:
            with tempfile.TemporaryDirectory() as scratch:
                culprit = blame(net, fmt, inputs, tolerance, Path(scratch))
            where = f"; the first layer that differs alone: {culprit}" if culprit else \
                "; no single layer differs alone (the mismatch comes from their combination)"
            raise ExportMismatch(f"{path}: the {fmt} file differs from the PyTorch net by {max_rel:.3g} relative "
                                 f"(max abs {max_abs:.3g}, tolerance {tolerance:g}), file deleted{where}")
        os.chmod(temporary, 0o666 & ~current_umask())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return ExportCheck(path, max_abs, max_rel, len(info.outputs))
