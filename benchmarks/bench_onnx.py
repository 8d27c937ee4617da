"""ICNet's ONNX exports in onnxruntime: the plain export against `export --fast` (the fast graph), and the cost of
making sizes symbolic (`--dynamic`); prints markdown for BENCHMARKS.md.

Each variant is exported once through `caffe2torch.export.export` (so it is checked against the PyTorch net), then
run in onnxruntime (CPU, default threads) on the reference input: one warm-up, then --runs timed runs taken in turns
(plain, fast, plain, ...) so that load from other processes hits both alike; medians reported.

    python benchmarks/bench_onnx.py [--runs 7] [--net merged|bnnomerge] [--dynamic]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
REFERENCE = REPO.parent / "shared" / "reference"
NETS = {"merged": ("icnet_merged_1025x2049", "icnet_cityscapes.prototxt"),
        "bnnomerge": ("icnet_bnnomerge_1025x2049", "icnet_cityscapes_bnnomerge.prototxt")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--net", choices=sorted(NETS), default="merged")
    parser.add_argument("--dynamic", action="store_true", help="Also export with symbolic height and width.")
    args = parser.parse_args()

    import onnxruntime
    import torch

    from caffe2torch.conversion import convert
    from caffe2torch.export import check_inputs, export

    stem, prototxt = NETS[args.net]
    net = convert(REFERENCE / f"{stem}.caffemodel", REFERENCE / prototxt, on_warning=lambda _: None).net
    x = check_inputs(net)[0].numpy()
    variants = [("plain", dict()), ("--fast", dict(fast=True))]
    if args.dynamic:
        variants += [("--dynamic", dict(dynamic=True)), ("--fast --dynamic", dict(fast=True, dynamic=True))]
    folder = Path(tempfile.mkdtemp(prefix="bench_onnx_"))
    sessions, exported = {}, {}
    for name, options in variants:
        started = time.perf_counter()
        check = export(net, "onnx", folder / f"{name.strip('-').replace(' --', '_') or 'plain'}.onnx", **options)
        exported[name] = (time.perf_counter() - started, check)
        sessions[name] = onnxruntime.InferenceSession(str(check.path), providers=["CPUExecutionProvider"])
        sessions[name].run(None, {"data": x})  # warm-up
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    for _ in range(args.runs):
        for name, _ in variants:
            started = time.perf_counter()
            sessions[name].run(None, {"data": x})
            times[name].append((time.perf_counter() - started) * 1000.0)
    base = statistics.median(times["plain"])
    print(f"ICNet {args.net} 1x3x1025x2049, onnxruntime {onnxruntime.__version__} (CPU), torch {torch.__version__}, "
          f"{args.runs} runs each, medians")
    print()
    print("| export | export + check (s) | max rel error vs PyTorch | sizes | onnxruntime ms | speed-up |")
    print("|---|---|---|---|---|---|")
    for name, _ in variants:
        seconds, check = exported[name]
        median = statistics.median(times[name])
        print(f"| {name} | {seconds:.1f} | {check.max_rel:.2g} | {check.dynamic or 'fixed'} | {median:.0f} | "
              f"{base / median:.2f}x |")


if __name__ == "__main__":
    main()
