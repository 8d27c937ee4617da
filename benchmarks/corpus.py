"""Run `caffe2torch inspect` over a folder of third-party prototxts and count what builds, per model family.

    python benchmarks/corpus.py CORPUS_DIR [--manifest CORPUS_DIR/manifest.tsv] [--timeout 300] [--run]

CORPUS_DIR holds the .prototxt files (kept out of this repository); the optional manifest is a TSV
with a header and the columns index, repo, commit, path, family, model, where a file's name starts
with its index. Prints one line per file (OK with the outputs and their shapes, or the one-line
error) and then the counts; exits 0 whatever the counts. With --run, each net that builds is also
given random weights (seed 0; N(0, 0.05), or N(0, 0.005) where a layer refuses what the larger ones make) and
run at batch 1 on random inputs (at the converted shapes where axis 0 is no batch: a recurrent net's time steps;
zeros for word indices), saved as a folder, and its standalone
model.py run on the same inputs: OK only when the outputs are identical (NaN where the net gives NaN). Progress (files/s, ETA) goes
to stderr: a bar on a terminal, a line every 10 s and 5% in a log.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path


def inspect_file(path: Path, timeout: int) -> tuple[bool, str]:
    try:
        result = subprocess.run([sys.executable, "-m", "caffe2torch", "inspect", str(path), "--json"],
                                capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout} s"
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        return False, lines[-1] if lines else f"exit status {result.returncode}"
    info = json.loads(result.stdout)
    shapes = {layer_top: shape for layer in info["layers"] for layer_top, shape in zip(layer["tops"],
                                                                                        layer["top_shapes"])}
    outputs = ", ".join(f"{name} {'x'.join(map(str, shapes.get(name, [])))}" for name in info["outputs"])
    return True, f"{len(info['layers'])} layers; {outputs}"


def run_file(path: Path, timeout: int) -> str:
    try:
        result = subprocess.run([sys.executable, __file__, str(path), "--check"], capture_output=True, text=True,
                                timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout} s"
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        return "failed: " + (lines[-1] if lines else f"exit status {result.returncode}")
    return result.stdout.strip()


def run_check(path: Path) -> str:
    """In this process: convert (at inspect's assumed size where the net gives none), run, save, rerun model.py."""
    import importlib.util
    import tempfile

    import torch

    from caffe2torch.conversion import convert
    from caffe2torch.errors import ShapelessInput
    from caffe2torch.folder import save_net
    from caffe2torch.inspect import ASSUMED_SIZES

    try:
        net = convert(None, path, on_warning=lambda _: None).net
    except ShapelessInput:
        for size in ASSUMED_SIZES:
            try:
                net = convert(None, path, on_warning=lambda _: None, assumed_size=size).net
                break
            except Exception:  # noqa: BLE001 - the next usual size
                continue
    from caffe2torch.bvlc import Embed
    from caffe2torch.errors import CaffeError, InputSizeError

    def draw(std: float) -> None:
        torch.manual_seed(0)
        with torch.no_grad():
            for parameter in net.parameters():
                parameter.normal_(0, std)

    # Inputs read by an Embed layer are word indices: 0 (randn truncated could be negative).
    indices = {arg.meta.get("caffe_blob") for node in net.graph.nodes if node.op == "call_module"
               and isinstance(net.get_submodule(node.target), Embed) for arg in node.args
               if getattr(arg, "op", None) == "placeholder"}

    def make_inputs(batch_one: bool) -> list:
        inputs = []
        for name, shape in net.meta["caffe"].inputs.items():
            shape = (1,) + tuple(shape[1:]) if batch_one else tuple(shape)
            if name == "im_info":  # R-CNN: height, width, scale
                inputs.append(torch.tensor([600.0, 800.0, 1.0] + [1.0] * (math.prod(shape) - 3)).reshape(shape))
            elif name == "rois":  # one region in image 0
                inputs.append(torch.tensor([0.0, 1.0, 1.0, 50.0, 50.0]).reshape(shape))
            elif name in indices:
                inputs.append(torch.zeros(shape))
            else:
                inputs.append(torch.randn(shape))
        return inputs

    note = ""
    draw(0.05)
    with torch.no_grad():
        inputs = make_inputs(True)
        try:
            outputs = net(*inputs)
        except (InputSizeError, RuntimeError):  # axis 0 is no batch (time steps, a Reshape that fixes it)
            inputs, note = make_inputs(False), " (at the converted shapes)"
            outputs = net(*inputs)
        except CaffeError:  # a layer refused what random weights made (regions at infinity): smaller weights
            draw(0.005)
            note = " (weights N(0, 0.005))"
            outputs = net(*inputs)
        folder = Path(tempfile.mkdtemp()) / "net"
        save_net(net, folder)
        spec = importlib.util.spec_from_file_location("standalone", folder / "model.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        again = module.load(folder)(*inputs)
    outputs, again = (o if isinstance(o, tuple) else (o,) for o in (outputs, again))
    # Identical values, NaN where the net gives NaN (random weights overflow in some nets).
    same = len(outputs) == len(again) and all(a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)
                                              for a, b in zip(outputs, again))
    return ("OK" if same else "DIFFERENT") + note + "\t" + ", ".join("x".join(map(str, o.shape)) for o in outputs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--manifest", type=Path)
    parser.add_argument("--timeout", type=int, default=300)
    parser.add_argument("--run", action="store_true", help="also run each net and its standalone model.py")
    parser.add_argument("--check", action="store_true", help=argparse.SUPPRESS)  # one file, in this process
    args = parser.parse_args()
    if args.check:
        print(run_check(args.corpus))
        return 0
    manifest = args.manifest or args.corpus / "manifest.tsv"
    families: dict[str, str] = {}
    if manifest.is_file():
        with manifest.open() as handle:
            for row in csv.DictReader(handle, delimiter="\t"):
                families[row["index"]] = row["family"]
    files = sorted(args.corpus.rglob("*.prototxt"))
    from caffe2torch.progress import Progress

    built, total, ran = Counter(), Counter(), Counter()
    with Progress(len(files), "corpus", "file") as progress:
        for path in files:
            ok, text = inspect_file(path, args.timeout)
            family = families.get(path.name.split("_")[0], "unlabelled")
            total[family] += 1
            built[family] += ok
            # through the bar, so that a terminal showing both streams gets whole lines
            progress.write(f"{'OK' if ok else 'FAIL'}\t{path.name}\t{text}", file=sys.stdout)
            if ok and args.run:
                outcome = run_file(path, args.timeout)
                ran[family] += outcome.startswith("OK")
                progress.write(f"  run: {outcome}", file=sys.stdout)
            progress.update()
    print(f"\n{sum(built.values())} of {len(files)} build: " +
          ", ".join(f"{family} {built[family]}/{total[family]}" for family in sorted(total)))
    if args.run:
        print(f"{sum(ran.values())} run, and their model.py gives the same outputs: " +
              ", ".join(f"{family} {ran[family]}/{built[family]}" for family in sorted(total)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
