"""Writing a net as ONNX, a torch.export program (pt2), TorchScript or safetensors, with Caffe's blob names, and
running the written file back (the export check compares that with the PyTorch net).

`dynamic_shapes` (torch.export's, see caffe2torch.dynamic) make sizes symbolic in ONNX (dynamo exporter) and
pt2; a TorchScript trace keeps its example's sizes, so it takes none.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import logging
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from caffe2torch.errors import CaffeError, term

FORMATS = ("onnx", "pt2", "torchscript", "safetensors")
SUFFIXES = {"onnx": ".onnx", "pt2": ".pt2", "torchscript": ".pt", "safetensors": ".safetensors"}
_NEEDS = {"onnx": ("onnx", "onnxruntime"), "safetensors": ("safetensors",)}
# Runs a written file on a tuple of inputs.
Runner = Callable[[tuple], list]


def require(fmt: str) -> None:
    missing = [name for name in _NEEDS.get(fmt, ()) if importlib.util.find_spec(name) is None]
    if missing:
        raise CaffeError(f"{term('--format', 'format')} {fmt} needs the package(s) {', '.join(missing)}: "
                         f"pip install 'caffe2torch[export]'")


def dynamo_onnx() -> bool:
    """torch's dynamo ONNX exporter (it needs onnxscript); without it the older TorchScript-based one."""
    return importlib.util.find_spec("onnxscript") is not None


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


def _write_onnx(module: nn.Module, inputs: tuple, path: Path, input_names: list[str], output_names: list[str],
                dynamic_shapes: dict | None) -> None:
    if not dynamo_onnx():  # the older exporter traces: its sizes are its example's
        if dynamic_shapes:
            raise CaffeError("torch's older ONNX exporter keeps its example's sizes; install onnxscript for symbolic "
                             "ones")
        with _quiet():
            torch.onnx.export(module, inputs, str(path), dynamo=False)
    else:
        # torch.export first, here: given a module, torch.onnx.export falls back to a draft export that silently
        # fixes sizes it cannot keep symbolic; a program whose sizes are what was asked, or an error, instead
        with _quiet():
            program = torch.export.export(module, inputs, dynamic_shapes=dynamic_shapes or None)
            torch.onnx.export(program, (), str(path), dynamo=True, external_data=False)
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


def _name_program_outputs(program, names: Sequence[str]) -> None:
    """A torch.export program's outputs named after the Caffe blobs (torch names them after their last op, e.g.
    `add_41`); an output that is an input or another output's value keeps its name."""
    from caffe2torch.model import python_names

    output = next(node for node in program.graph.nodes if node.op == "output")
    values = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    taken = {node.name for node in program.graph.nodes}
    seen = set()
    for node, spec, name in zip(values, program.graph_signature.output_specs, python_names(list(names),
                                                                                         prefix="blob")):
        if not isinstance(node, torch.fx.Node) or node.op != "call_function" or node in seen:
            continue
        seen.add(node)
        if name in taken:
            continue
        taken.discard(node.name)
        node._rename(name)
        taken.add(node.name)
        if hasattr(spec.arg, "name"):
            spec.arg.name = node.name
    program.graph_module.recompile()


def write(fmt: str, module: nn.Module, inputs: tuple, path: Path, input_names: list[str], output_names: list[str],
          dynamic_shapes: dict | None = None) -> Runner:
    """Write `module` as `fmt` to `path` (exported on the example `inputs`); returns what runs the written file on
    inputs of any size it takes."""
    if fmt == "onnx":
        _write_onnx(module, inputs, path, input_names, output_names, dynamic_shapes)
        return lambda given: _run_onnx(path, given, input_names)
    if fmt == "pt2":
        with _quiet():
            program = torch.export.export(module, inputs, dynamic_shapes=dynamic_shapes or None)
        _name_program_outputs(program, output_names)
        torch.export.save(program, str(path))
        return lambda given: list(_as_tuple(torch.export.load(str(path)).module()(*given)))
    if fmt == "torchscript":
        with _quiet():
            traced = torch.jit.trace(module, inputs, check_trace=False)
        traced.save(str(path))
        return lambda given: list(_as_tuple(torch.jit.load(str(path), map_location=given[0].device)(*given)))
    if fmt == "safetensors":
        from safetensors.torch import load_file, save_file

        state = {name: value.detach().cpu().contiguous() for name, value in module.state_dict().items()}
        save_file(state, str(path), metadata={"format": "pt", "producer": "caffe2torch"})

        def reloaded(given: tuple) -> list:  # the net with the file's tensors in place of its own
            clone = copy.deepcopy(module)
            clone.load_state_dict(load_file(str(path)))
            with torch.inference_mode():
                return list(_as_tuple(clone(*given)))
        return reloaded
    raise CaffeError(f"{term('--format', 'format')} {fmt}: expected one of {', '.join(FORMATS)}")
