"""The `caffe2torch` command line: convert, verify, inspect and fold-bn."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from caffe2torch.errors import CaffeError, command_line_terms
from caffe2torch.write import weights_stem

EXIT_MISMATCH = 1
EXIT_USAGE = 2


def _fail(message: str, code: int = EXIT_USAGE) -> None:
    click.echo(f"caffe2torch: error: {message}", err=True)
    sys.exit(code)


def _parse_shape(text: str | None):
    """'1,3,512,1024' for a single input, or 'data=1,3,512,1024;im_info=1,3'."""
    if not text:
        return None
    try:
        if "=" in text:
            shapes = {}
            for part in text.split(";"):
                name, dims = part.split("=", 1)
                shapes[name.strip()] = tuple(int(d) for d in dims.replace("x", ",").split(","))
            return shapes
        return tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise CaffeError(f"--input-shape {text!r}: expected comma-separated integers like 1,3,1025,2049") from None


_shown: set[str] = set()  # warnings printed by this command, so an error repeats only the others


def _warn(message: str) -> None:
    _shown.add(message)
    click.echo(f"caffe2torch: warning: {message}", err=True)


class _Group(click.Group):
    """Turns our own errors into one line on stderr instead of a traceback, after the warnings gathered before
    them (skipped fields may be why a net does not build)."""

    def invoke(self, ctx):
        _shown.clear()  # a new command (tests and scripts run several in one process)
        try:
            with command_line_terms():
                return super().invoke(ctx)
        except CaffeError as error:
            for message in error.warnings:
                if message not in _shown:
                    _warn(message)
            _fail(str(error))
        except OSError as error:  # the file system refused: a path the user gave
            where = f"{error.filename}: " if error.filename else ""
            _fail(f"{where}{error.strerror or error}")
        except KeyboardInterrupt:
            _fail("interrupted", 130)


@click.group(cls=_Group)
@click.version_option(package_name="caffe2torch")
def main() -> None:
    """Convert Caffe models to PyTorch and prove them equal to Caffe."""


model_argument = click.argument("model", type=click.Path(path_type=Path))
prototxt_option = click.option("--prototxt", type=click.Path(dir_okay=False, path_type=Path),
                               help="Deploy net definition (default: the one the manifest names, or the net stored in the caffemodel).")
shape_option = click.option("--input-shape", metavar="SHAPE",
                            help="Override the input shape, e.g. 1,3,1025,2049 (or name=shape;name=shape).")


def _set_memory_limit(ctx, param, value: str | None) -> None:
    if value is not None:
        from caffe2torch.limits import ENVIRONMENT, parse_size

        try:
            parse_size(value)
        except CaffeError as error:
            raise click.BadParameter(str(error)) from None
        previous = os.environ.get(ENVIRONMENT)
        os.environ[ENVIRONMENT] = value  # read where nets are built (caffe2torch.limits.memory_limit)

        def restore() -> None:  # for this command only: a caller running several (tests, scripts) keeps its own
            if previous is None:
                os.environ.pop(ENVIRONMENT, None)
            else:
                os.environ[ENVIRONMENT] = previous

        ctx.call_on_close(restore)


memory_option = click.option("--max-memory", metavar="SIZE", expose_value=False, callback=_set_memory_limit,
                             help="Refuse nets needing more memory than this (e.g. 64G; default: the available memory).")
force_option = click.option("--force", is_flag=True,
                            help="Replace an earlier caffe2torch output in the output folder (never anything else).")
stage_option = click.option("--stage", "stages", multiple=True, metavar="NAME",
                            help="Build the net of this stage (repeatable), as a solver's test_state would: it joins "
                                 "the definition's state, and layers' include/exclude rules pick by it.")
unknown_option = click.option("--allow-unknown-fields", is_flag=True,
                              help="Convert even when a field our schema does not know may change a layer's "
                                   "forward (each is a warning; the net is built without it).")


def _note(message: str) -> None:
    click.echo(f"caffe2torch: note: {message}", err=True)


@main.command()
@memory_option
@model_argument
@prototxt_option
@shape_option
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output folder (default: beside MODEL, named after it).")
@click.option("--no-verify", is_flag=True, help="Accept a file whose md5 differs from the manifest's for its name.")
@force_option
@unknown_option
@stage_option
def convert(model: Path, prototxt: Path | None, input_shape: str | None, output: Path | None, no_verify: bool,
            force: bool, allow_unknown_fields: bool, stages: tuple[str, ...]) -> None:
    """Convert MODEL (.caffemodel or .caffemodel.h5) into a PyTorch model folder.

    The folder holds model.py (standalone PyTorch source), weights.pt (its state_dict),
    net.prototxt (the definition) and meta.json; load it with caffe2torch.load(folder) or
    model.py's load().
    """
    from caffe2torch.conversion import convert as run_convert
    from caffe2torch.folder import check_target, save_net
    from caffe2torch.protect import ReadFiles

    folder = output or model.with_name(weights_stem(model) + "_torch")
    # before the work, so a refusal costs nothing; again once the definition found beside the weights is known
    check_target(folder.absolute(), force, ReadFiles([(model, "the model being converted"),
                                                      (prototxt, "the net definition being used")]))
    conversion = run_convert(model, prototxt, _parse_shape(input_shape), verify_md5=not no_verify, on_warning=_warn,
                             allow_unknown_fields=allow_unknown_fields, stages=stages)
    for note in conversion.notes:
        _note(note)
    release = f" (known release {conversion.release.name})" if conversion.release is not None else ""
    # format_filename: a file name that is not UTF-8 is shown with replacement characters, not a crash
    click.echo(f"weights: {click.format_filename(model)}, md5 {conversion.md5}{release}")
    definition = conversion.prototxt_path or f"the net stored in {model.name}"
    click.echo(f"definition: {click.format_filename(str(definition))}")
    meta = {"source": model.name, "md5": conversion.md5,
            "prototxt": str(conversion.prototxt_path) if conversion.prototxt_path else "(stored in the caffemodel)",
            "release": conversion.release.name if conversion.release else None}
    save_net(conversion.net, folder, meta, force=force, read=conversion.read_files())
    info = conversion.net.meta["caffe"]
    click.echo(f"converted {len(info.modules)} layers; inputs {_shapes(info.inputs)}; outputs {', '.join(info.outputs)}")
    click.echo(f"wrote {folder}/  (load with: net = caffe2torch.load({str(folder)!r}), or model.py's load())")


def _shapes(shapes) -> str:
    return ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in shapes.items())


@main.command()
@memory_option
@model_argument
@prototxt_option
@click.option("--reference", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Reference .ref.h5 written from real Caffe.")
@click.option("--isolated", is_flag=True, help="Feed each layer Caffe's values of its bottoms.")
@click.option("--tolerance", type=click.FloatRange(min=0.0), help="Relative L2 tolerance (default 5e-4 free-running, 1e-5 isolated).")
@click.option("--no-verify", is_flag=True, help="Accept a file whose md5 differs from the manifest's.")
@click.option("--fast", is_flag=True, help="Check the fast inference graph (caffe2torch.fast.optimize: BN folded, ReLU fused, "
              "channels_last); records it no longer makes are listed apart.")
@click.option("--device", default="cpu", show_default=True, help="Where to run the net (cpu, cuda, cuda:1, ...).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="Also draw each top's rel L2 error in Caffe's order (log scale, the tolerance, failures named) "
                   "into this .png, .svg or .pdf file.")
@unknown_option
@stage_option
def verify(model: Path, prototxt: Path | None, reference: Path, isolated: bool, tolerance: float | None, no_verify: bool,
           fast: bool, device: str, plot: Path | None, allow_unknown_fields: bool, stages: tuple[str, ...]) -> None:
    """Run MODEL on the reference input and compare every recorded layer with Caffe's outputs.

    MODEL is a .caffemodel / .caffemodel.h5 or a folder written by `caffe2torch convert`.
    """
    if fast:
        if isolated:
            raise CaffeError("--fast checks the optimised net free-running; it cannot be combined with --isolated")
        from caffe2torch.fast import enable_huge_pages

        enable_huge_pages()  # before torch allocates anything large
    from caffe2torch.verify import (FREE_TOLERANCE, ISOLATED_TOLERANCE, format_report, read_reference,
                                    verify_free_running, verify_isolated)

    target = _device(device)
    if plot is not None:  # before the work: a bad name or a file this run reads
        from caffe2torch.plot import plot_format
        from caffe2torch.protect import ReadFiles

        plot_format(plot)
        ReadFiles([(model, "the model being verified"), (prototxt, "the net definition"),
                   (reference, "the reference")]).check_file(plot, "--plot")
    ref = read_reference(reference)
    if model.is_dir():
        from caffe2torch.folder import load

        if prototxt is not None or stages:
            raise CaffeError("--prototxt and --stage do not apply to a converted folder (it holds its definition)")
        net = load(model)
    else:
        if prototxt is None:
            from caffe2torch.reference import definition_beside

            prototxt, note = definition_beside(ref)
            if note:
                _note(f"{note}; give --prototxt to choose the definition")
        shapes = {name: value.shape for name, value in ref.inputs.items()}
        conversion = _convert_quietly(model, prototxt, shapes, not no_verify, allow_unknown_fields, stages)
        net = conversion.net
    net = net.to(target)
    tolerance = tolerance if tolerance is not None else (ISOLATED_TOLERANCE if isolated else FREE_TOLERANCE)
    mode = "isolated" if isolated else "free-running"
    if fast:
        from caffe2torch.fast import optimize

        mode = "free-running, fast path"
        net = optimize(net)
    if target.type != "cpu":
        mode += f", {target}"
    if isolated:
        from caffe2torch.verify import check_isolated_can_run

        check_isolated_can_run(net, ref)
    from caffe2torch.progress import Progress
    from caffe2torch.verify import verify_steps

    # A bar (after 2 s) or log lines (after 10 s) for large nets; a unit net finishes before either shows.
    with Progress(verify_steps(net, ref, isolated), "caffe2torch verify", "layer", delay=2.0) as progress, \
            _numerics(target):
        report = (verify_isolated if isolated else verify_free_running)(net, ref, tolerance, device=target,
                                                                         on_layer=progress.update)
    for line in format_report(report, tolerance, mode):
        click.echo(line)
    if plot is not None:
        from caffe2torch.plot import write_plot

        written = write_plot(plot, report, tolerance, f"{model.name} vs {reference.name} ({mode})")
        click.echo(f"wrote {click.format_filename(written)}")
    sys.exit(0 if report.ok else EXIT_MISMATCH)


def _convert_quietly(model: Path, prototxt: Path | None, shapes, verify_md5: bool, allow_unknown_fields: bool,
                     stages: tuple[str, ...] = ()):
    from caffe2torch.conversion import convert as run_convert

    return run_convert(model, prototxt, shapes, verify_md5=verify_md5, on_warning=_warn,
                       allow_unknown_fields=allow_unknown_fields, stages=stages)


def _device(name: str):
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as error:
        raise CaffeError(f"--device {name}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CaffeError(f"--device {name}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda") and not getattr(torch, device.type, None):
        raise CaffeError(f"--device {name}: this torch has no {device.type} backend")
    return device


def _numerics(device):
    """Parity is checked in full float32: no TF32 on a GPU (it rounds matmul inputs to 10 bits)."""
    import contextlib

    import torch

    if device.type != "cuda":
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def exact():
        matmul = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
                yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = matmul

    return exact()


@main.command()
@memory_option
@click.argument("file", type=click.Path(path_type=Path))
@prototxt_option
@shape_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--graph", type=click.Path(dir_okay=False, path_type=Path),
              help="Also draw the layer graph with blob shapes into this .svg file (or write it as Graphviz .dot).")
@stage_option
def inspect(file: Path, prototxt: Path | None, input_shape: str | None, as_json: bool, graph: Path | None,
            stages: tuple[str, ...]) -> None:
    """List the layers of FILE (.caffemodel, .caffemodel.h5, .prototxt or a converted folder) with shapes and
    parameter counts.

    A net with fields our schema does not know is described anyway, each such field shown as a warning
    (convert stops at those that may change a layer's forward unless --allow-unknown-fields).
    """
    from caffe2torch.inspect import describe

    if graph is not None:  # before the work: a bad name or a file this run reads
        from caffe2torch.graphsvg import graph_format
        from caffe2torch.protect import ReadFiles

        graph_format(graph)
        ReadFiles([(file, "the net being inspected"), (prototxt, "the net definition")]).check_file(graph, "--graph")
    info = describe(file, prototxt, _parse_shape(input_shape), stages)
    if graph is not None:
        from caffe2torch.graphsvg import render
        from caffe2torch.write import write_atomic

        write_atomic(graph, render(info, graph_format(graph)).encode())
        _note(f"wrote {click.format_filename(graph)}")
    for message in info["warnings"]:
        _warn(message)
    for message in info["notes"]:
        _note(message)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{'layer':<34} {'type':<13} {'bottoms':<30} {'tops':<30} {'output shape':<20} {'params':>10}")
    for layer in info["layers"]:
        shapes = "; ".join("x".join(map(str, s)) for s in layer["top_shapes"])
        click.echo(f"{layer['name']:<34} {layer['type']:<13} {','.join(layer['bottoms']):<30} "
                   f"{','.join(layer['tops']):<30} {shapes:<20} {layer['parameters']:>10}")
    click.echo(f"{len(info['layers'])} layers, {info['parameters']} parameters; inputs {info['inputs']}")
    if info.get("md5"):
        release = f" (known release {info['release']})" if info.get("release") else ""
        click.echo(f"weights md5 {info['md5']}{release}")


@main.command("fold-bn")
@memory_option
@model_argument
@prototxt_option
@shape_option
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--no-verify", is_flag=True, help="Accept a file whose md5 differs from the manifest's.")
@force_option
@unknown_option
def fold_bn(model: Path, prototxt: Path | None, input_shape: str | None, output: Path, no_verify: bool,
            force: bool, allow_unknown_fields: bool) -> None:
    """Fold BN / BatchNorm(+Scale) into the preceding convolutions; write a caffemodel, prototxt and PyTorch folder."""
    from caffe2torch.fold import fold_files

    written = fold_files(model, prototxt, output, verify_md5=not no_verify, on_warning=_warn,
                         input_shape=_parse_shape(input_shape), force=force, allow_unknown_fields=allow_unknown_fields)
    for line in written:
        click.echo(line)


@main.command()
@memory_option
@model_argument
@prototxt_option
@shape_option
@click.option("--format", "fmt", required=True, type=click.Choice(["onnx", "pt2", "torchscript", "safetensors"]),
              help="onnx (checked in onnxruntime), pt2 (torch.export), torchscript (jit.trace) or safetensors (state_dict).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="File to write.")
@click.option("--no-verify", is_flag=True, help="Accept a file whose md5 differs from the manifest's.")
@click.option("--tolerance", type=click.FloatRange(min=0.0), default=1e-4, show_default=True,
              help="Largest error allowed, relative to the largest output magnitude.")
@click.option("--force", is_flag=True, help="Replace an existing output file (never the model itself).")
@click.option("--dynamic", is_flag=True, help="Also leave height and width symbolic (onnx, pt2), over the range the "
              "net takes; the batch always is.")
@click.option("--fast", is_flag=True, help="Export the fast graph (norms folded, torch's Interp and pooling kernels).")
@unknown_option
@stage_option
def export(model: Path, prototxt: Path | None, input_shape: str | None, fmt: str, output: Path, no_verify: bool,
           tolerance: float, force: bool, dynamic: bool, fast: bool, allow_unknown_fields: bool,
           stages: tuple[str, ...]) -> None:
    """Export MODEL (a caffemodel or a converted folder) and check the file against the PyTorch net.

    The written file is run (onnxruntime, the loaded program, or the net with the file's
    tensors) on reference-style inputs; a mismatch deletes it and exits 1 naming the layer type
    to blame. ONNX inputs and outputs are named after the Caffe blobs.
    """
    from caffe2torch.export import ExportMismatch
    from caffe2torch.export import export as run_export

    from caffe2torch.protect import ReadFiles

    if model.is_dir():
        from caffe2torch.folder import load

        if prototxt is not None or input_shape is not None or stages:
            raise CaffeError("--prototxt, --input-shape and --stage do not apply to a converted folder")
        read = ReadFiles([(model, "the converted folder being exported")])
        read.check_file(output, "-o")  # before the work
        net = load(model)
    else:
        read = ReadFiles([(model, "the model being exported"), (prototxt, "the net definition being used")])
        read.check_file(output, "-o")  # before the work
        conversion = _convert_quietly(model, prototxt, _parse_shape(input_shape), not no_verify, allow_unknown_fields,
                                      stages)
        for note in conversion.notes:
            _note(note)
        net, read = conversion.net, conversion.read_files()
    try:
        check = run_export(net, fmt, output, tolerance, force=force, read=read, dynamic=dynamic, fast=fast)
    except ExportMismatch as error:
        _fail(str(error), EXIT_MISMATCH)
    sizes = " and ".join(", ".join("x".join(map(str, shape)) for shape in inputs) for inputs in check.sizes)
    if check.note:
        _note(check.note)
    click.echo(f"wrote {check.path} ({fmt}{', fast graph' if fast else ''}); sizes "
               f"{check.dynamic or 'fixed at the example'}")
    click.echo(f"checked against the PyTorch net at {sizes}: max abs error {check.max_abs:.3g}, relative "
               f"{check.max_rel:.3g} (tolerance {tolerance:g})")


if __name__ == "__main__":
    main()
