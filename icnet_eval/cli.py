"""The `icnet-eval` command line: evaluate (default), score, prototxt, time and demo."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from caffe2torch.cli import memory_option
from caffe2torch.errors import CaffeError, command_line_terms

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def _fail(message: str, code: int = EXIT_ERROR) -> None:
    # one line, whatever the message holds
    click.echo(f"icnet-eval: error: {' '.join(str(message).split())}", err=True)
    sys.exit(code)


_shown: set[str] = set()  # messages printed by this command, so an error repeats only the others


def _note(message: str) -> None:
    _shown.add(message.removeprefix("warning: "))
    click.echo(f"icnet-eval: {message}", err=True)


class _Group(click.Group):
    """Turns our errors (and the file system's) into one line on stderr instead of a traceback."""

    def invoke(self, ctx: click.Context):
        _shown.clear()  # a new command (tests and scripts run several in one process)
        try:
            with command_line_terms():
                return super().invoke(ctx)
        except CaffeError as error:
            for message in error.warnings:  # gathered before the error (skipped fields may explain it)
                if message not in _shown:
                    _note(f"warning: {message}")
            _fail(str(error))
        except OSError as error:
            where = f"{error.filename}: " if error.filename else ""
            _fail(f"{where}{error.strerror or error}")
        except KeyboardInterrupt:
            _fail("interrupted; run the same command again to resume", EXIT_INTERRUPTED)


def _check_not_read(target: Path, read: list) -> None:
    from caffe2torch.protect import ReadFiles

    ReadFiles(read).check_file(target, "--json")


def _entries(list_path: Path, data_root: Path) -> list:
    from icnet_eval.data import parse_list

    return parse_list(list_path, data_root, need_images=False, need_labels=True)


def _path(**kwargs) -> click.Path:
    # existence is checked by our code, which names the option and fits on one line
    return click.Path(path_type=Path, **kwargs)


input_size_option = click.option("--input-size", nargs=2, type=int, default=None, metavar="H W",
                                  help="Network input size (default 1025 2049, the authors').")
device_option = click.option("--device", default=None,
                             help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available).")


@click.group(cls=_Group, invoke_without_command=True)
@click.option("--list", "list_path", type=_path(), help="Evaluation list: 'IMAGE [LABEL]' per line.")
@click.option("--data-root", type=_path(), help="Folder the list's paths are relative to.")
@click.option("--weights", type=_path(), help="ICNet .caffemodel (a released one needs no prototxt), or a folder written by caffe2torch convert / save (e.g. fine-tuned).")
@click.option("--out", type=_path(), default=Path("icnet-results"), show_default=True,
              help="Output folder: gray/, color/ (or labelids/), report.json, report.html and its charts.")
@device_option
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True, help="Processes decoding and resizing images.")
@click.option("--fast-resize", is_flag=True,
              help="Approximate mode: PyTorch's antialiased resize of the class scores instead of MATLAB's, the fast "
                   "graph in float32 and PyTorch's fastest kernels (TF32, oneDNN), whose last bits vary with the "
                   "thread count.")
@click.option("--fast", is_flag=True,
              help="Fastest approximate mode: the fast graph in half precision on a GPU (float32 on a CPU), "
                   "PyTorch's resizes, CUDA graphs of whole batches. See BENCHMARKS.md for its agreement with exact.")
@click.option("--fast-dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="The net's dtype under --fast  [default: float16 on a GPU, float32 on a CPU]")
@click.option("--format", "output_format", default="trainids", show_default=True,
              help="trainids: gray trainId PNGs as the authors; labelids: labelId PNGs for the benchmark server.")
@input_size_option
@click.option("--prototxt", type=_path(), help="Deploy net definition for weights the manifest does not know.")
@click.option("--no-verify", is_flag=True, help="Accept a release-named file whose md5 differs.")
@click.option("--redo", is_flag=True, help="Recompute every image, even those whose outputs exist.")
@click.option("--per-image", is_flag=True, help="Add each image's own mIoU and pixel accuracy to report.json.")
@click.option("--overlay", is_flag=True, help="Also write overlay/: each image with the colour map blended over it.")
@click.option("--error-maps", is_flag=True, help="Also write errors/: wrong pixels in red over the dimmed image, "
                                                 "ignored pixels pale.")
@memory_option
@click.version_option(package_name="caffe2torch")
@click.pass_context
def main(ctx: click.Context, list_path, data_root, weights, out, device, batch_size, workers, fast_resize, fast,
         fast_dtype, output_format, input_size, prototxt, no_verify, redo, per_image, overlay, error_maps) -> None:
    """Evaluate ICNet on Cityscapes as its authors did (eval_sub.m + eval_acc.m).

    \b
    icnet-eval --list val.txt --data-root CITYSCAPES --weights icnet_cityscapes_train_30k.caffemodel
    icnet-eval demo          # try it on synthetic images with untrained weights
    """
    if ctx.invoked_subcommand is not None:
        if list_path or data_root or weights:
            raise CaffeError(f"put --list/--data-root/--weights after '{ctx.invoked_subcommand}', or leave out the subcommand")
        return
    if list_path is None and data_root is None and weights is None:
        click.echo(ctx.get_help())
        return
    for option, value in (("--list", list_path), ("--data-root", data_root), ("--weights", weights)):
        if value is None:
            raise CaffeError(f"{option} is required")
    from icnet_eval.pipeline import EvalOptions, evaluate
    from icnet_eval.report import format_report

    options = EvalOptions(list_path, data_root, weights, out, device, batch_size, workers, fast_resize,
                          output_format, tuple(input_size) if input_size else None, prototxt,
                          verify_md5=not no_verify, resume=not redo, per_image=per_image, overlay=overlay, fast=fast,
                          fast_dtype=fast_dtype, error_maps=error_maps)
    report = evaluate(options, echo=_note)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun the first process speaks for all
    click.echo(format_report(report))
    timing = report["timing"]
    _note(f"{timing['images_inferred']} images inferred, {timing['images_resumed']} taken from earlier outputs, "
          f"{timing['seconds']:.1f} s; report: {Path(out) / 'report.json'}, page: {Path(out) / 'report.html'}")


@main.command()
@click.option("--list", "list_path", type=_path(), required=True)
@click.option("--data-root", type=_path(), required=True)
@click.option("--pred-dir", type=_path(), required=True, help="Folder of gray trainId PNGs (or an --out folder).")
@click.option("--json", "json_path", type=_path(), help="Also write the scores to this JSON file.")
@click.option("--format", "pred_format", type=click.Choice(["auto", "trainids", "labelids"]), default="auto",
              show_default=True, help="What the prediction PNGs hold (auto: what an --out folder recorded; trainIds "
                                      "otherwise, refusing values no trainId has).")
@click.option("--out", type=_path(), default=None,
              help="Also write report.json, report.html and its charts here, as an evaluation does.")
@click.option("--per-image", is_flag=True, help="Add each image's own mIoU and pixel accuracy to the JSON.")
@click.option("--error-maps", is_flag=True, help="Also write --out/errors/: wrong pixels in red over the dimmed image.")
def score(list_path: Path, data_root: Path, pred_dir: Path, json_path: Path | None, pred_format: str,
          out: Path | None, per_image: bool, error_maps: bool) -> None:
    """Score existing predictions against the labels, exactly as eval_acc.m."""
    from icnet_eval.report import format_report, score_predictions, write_json

    if json_path is not None:
        if json_path.is_dir():
            raise CaffeError(f"--json {json_path}: is a folder, expected a file name")
        _check_not_read(json_path, [(list_path, "the list"), (pred_dir, "the prediction folder")] +
                        [(entry.label, f"the label of {entry.where}") for entry in _entries(list_path, data_root)])
    report = score_predictions(list_path, data_root, pred_dir, echo=_note, pred_format=pred_format,
                               per_image=per_image, out=out, error_maps=error_maps)
    click.echo(format_report(report))
    if json_path is not None:
        write_json(json_path, report)
    if out is not None:
        _note(f"report: {out / 'report.json'}, page: {out / 'report.html'}")


@main.command()
@click.option("--height", type=int, required=True)
@click.option("--width", type=int, required=True)
@click.option("--bn", is_flag=True, help="Separate BN layers (the *_bnnomerge weights).")
@click.option("-o", "--output", type=_path(), help="Write to this file instead of stdout.")
def prototxt(height: int, width: int, bn: bool, output: Path | None) -> None:
    """Print the ICNet deploy prototxt for an input of HEIGHT x WIDTH."""
    from caffe2torch.write import write_atomic
    from icnet_eval.netdef import icnet_prototxt

    text = icnet_prototxt(height, width, bn)
    if output is None:
        click.echo(text, nl=False)
    elif output.is_dir():
        raise CaffeError(f"-o {output}: is a folder, expected a file name")
    else:
        write_atomic(output, text.encode())


@main.command("time")
@click.option("--weights", type=_path(), help="caffemodel to time (default: untrained ICNet, same cost).")
@click.option("--prototxt", type=_path())
@input_size_option
@device_option
@click.option("--iterations", type=int, default=100, show_default=True)
@click.option("--warmup", type=int, default=10, show_default=True)
@click.option("--fast", is_flag=True, help="The net as --fast evaluations run it (half precision on a GPU).")
@click.option("--no-verify", is_flag=True)
@click.option("--json", "json_path", type=_path(dir_okay=False), help="Also write the figures as JSON (for BENCHMARKS.md).")
def time_command(weights, prototxt, input_size, device, iterations, warmup, fast, no_verify, json_path) -> None:
    """Time the forward pass (no pre/post-processing) and compare it with the paper's 33 ms."""
    from icnet_eval.pipeline import resolve_device
    from icnet_eval.predict import numerics, resolve_mode
    from icnet_eval.model import OFFICIAL_INPUT_SIZE, load_model, untrained_model
    from icnet_eval.timing import format_timing, time_forward

    if json_path is not None:  # before the work
        _check_not_read(json_path, [(weights, "the weights"), (prototxt, "the net definition")])
    torch_device = resolve_device(device)
    size = tuple(input_size) if input_size else None
    if weights is None:
        if prototxt is not None:
            raise CaffeError("--prototxt needs --weights")
        model = untrained_model(size or OFFICIAL_INPUT_SIZE)
    else:
        model = load_model(weights, prototxt, size, not no_verify, on_warning=lambda m: _note(f"warning: {m}"))
    mode = resolve_mode(fast, False, None, torch_device)
    with numerics(torch_device, exact=mode.exact):
        result = time_forward(model, torch_device, iterations, warmup, mode=mode)
    click.echo(format_timing(result, model.definition))
    if json_path is not None:
        from icnet_eval.report import write_json

        write_json(json_path, dict(result.as_dict(), definition=model.definition, fast=fast, mode=mode.name,
                                   dtype=mode.dtype_name))


@main.command()
@click.option("--dir", "root", type=_path(), default=Path("icnet-demo"), show_default=True,
              help="Folder for the sample set, the untrained weights and the results.")
@device_option
@click.option("--workers", type=int, default=0, show_default=True)
@click.option("--images", type=click.IntRange(1, 20), default=3, show_default=True, help="How many sample images.")
def demo(root: Path, device: str | None, workers: int, images: int) -> None:
    """Run the whole pipeline on a generated sample with untrained weights (seconds on a CPU)."""
    from icnet_eval.demo import DEMO_INPUT_SIZE, make_demo_set, released_weights_note
    from icnet_eval.pipeline import EvalOptions, evaluate
    from icnet_eval.report import format_report

    if root.exists() and not root.is_dir():
        raise CaffeError(f"--dir {root}: is a file, expected a folder")
    list_path, weights = make_demo_set(root, images)
    _note(f"sample set and untrained weights written under {root}")
    options = EvalOptions(list_path, root, weights, root / "results", device, 1, workers,
                          input_size=DEMO_INPUT_SIZE, resume=False, extra={"demo": True})
    report = evaluate(options, echo=_note)
    click.echo(format_report(report))
    click.echo(f"predictions: {root / 'results'} (gray/, color/), report: {root / 'results' / 'report.json'}, "
               f"page: {root / 'results' / 'report.html'}")
    released_weights_note(click.echo)


@main.command("segment")
@click.argument("source", type=_path())
@click.option("--weights", type=_path(), required=True, help="ICNet .caffemodel or a converted folder.")
@click.option("-o", "--out", type=_path(), default=Path("icnet-segment"), show_default=True,
              help="Folder for <name>_<format>.png (a video: <name>_<format>.mp4).")
@click.option("--format", "formats", multiple=True, metavar="FORMAT",
              help="trainids, labelids (gray PNGs of class numbers), color, overlay; repeat it or separate by commas "
                   "[default: color and overlay; a video: overlay]")
@device_option
@click.option("--fast-resize", is_flag=True, help="PyTorch's resize of the class scores instead of MATLAB's.")
@click.option("--fast", is_flag=True, help="As icnet-eval --fast: half precision on a GPU, PyTorch's resizes.")
@click.option("--fast-dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="The net's dtype under --fast  [default: float16 on a GPU, float32 on a CPU]")
@input_size_option
@click.option("--prototxt", type=_path(), help="Deploy net definition for weights the manifest does not know.")
@memory_option
def segment_command(source: Path, weights: Path, out: Path, formats: tuple[str, ...], device: str | None,
                    fast_resize: bool, fast: bool, fast_dtype: str | None, input_size, prototxt: Path | None) -> None:
    """Segment SOURCE (an image, a folder of images or a video) without labels: colour maps and overlays, or the
    class numbers (trainIds, labelIds)."""
    from icnet_eval.segment import segment_input

    kinds = [kind.strip() for text in formats for kind in text.split(",") if kind.strip()] if formats else None
    written = segment_input(source, weights, out, device, fast_resize, prototxt,
                            tuple(input_size) if input_size else None, echo=_note, fast=fast, fast_dtype=fast_dtype,
                            formats=kinds)
    _note(f"wrote {len(written)} files to {out}")


if __name__ == "__main__":
    main()
