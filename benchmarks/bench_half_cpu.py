"""ICNet's forward on the CPU in float32, bfloat16 and float16: the converted net and the fast graph; prints markdown.

The merged reference ICNet (../shared/reference) at 1x3x1025x2049 on the reference input (cast to each dtype), one
warm-up each, then --runs forwards timed in turns (every variant once per round) so that load from other processes
hits them alike; median and min per variant, with the load average before and after.

    python benchmarks/bench_half_cpu.py [--runs 5] [--dtypes float32,bfloat16,float16] [--size 1025,2049]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("CAFFE2TORCH_REFERENCE") or REPO.parent / "shared" / "reference")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--size", default="1025,2049")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import torch

    from caffe2torch.conversion import convert
    from caffe2torch.fast import enable_huge_pages, optimize

    enable_huge_pages()
    height, width = (int(n) for n in args.size.split(","))
    net = convert(REFERENCE / "icnet_merged_1025x2049.caffemodel", REFERENCE / "icnet_cityscapes.prototxt",
                  (1, 3, height, width), on_warning=lambda _: None).net
    x = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0)) * 50
    variants = {}
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        variants[f"converted net, {name}"] = (copy.deepcopy(net).to(dtype), x.to(dtype))
        variants[f"fast graph, {name}"] = (optimize(copy.deepcopy(net).to(dtype)), x.to(dtype))
    times: dict[str, list[float]] = {key: [] for key in variants}
    load = os.getloadavg()[0]
    with torch.inference_mode():
        for model, inputs in variants.values():  # warm-up
            model(inputs)
        for _ in range(args.runs):
            for key, (model, inputs) in variants.items():
                start = time.perf_counter()
                model(inputs)
                times[key].append((time.perf_counter() - start) * 1000)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {height}x{width}, {args.runs} runs; load "
          f"average {load:.2f} before, {os.getloadavg()[0]:.2f} after\n")
    base = {kind: statistics.median(times[f"{kind}, float32"]) for kind in ("converted net", "fast graph")
            if f"{kind}, float32" in times}
    print("| variant | median ms | min ms | vs float32 |\n|---|---|---|---|")
    for key, values in times.items():
        kind = key.split(",")[0]
        ratio = f"{base[kind] / statistics.median(values):.2f}x" if kind in base else ""
        print(f"| {key} | {statistics.median(values):.0f} | {min(values):.0f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
