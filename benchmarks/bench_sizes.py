"""Runtime sizes on ICNet 1x3x1025x2049: the CPU fast path against another checkout (e.g. a66255b, which built its
tables at conversion), and the first call at a new input size against later calls; prints markdown.

The comparison runs each checkout in its own child process, in turns (this, other, this, ...) for --rounds rounds,
each timing --runs forwards of the fast graph (`caffe2torch.fast.optimize`) after one warm-up; it reports the median
of every forward of each checkout. The size table converts the official definition at 1025x2049 and runs the net
(the converted net, exact numerics, and the fast graph) at 1025x2049, then at 1027x2051 (a size the definition
takes: its pyramid pooling fixes the conv5_3 map): the first call at a size builds that size's pooling and Interp
tables, later calls reuse them.

    python benchmarks/bench_sizes.py [--other /path/to/checkout] [--rounds 3] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"
CHILD = """
import json, sys, time, torch
sys.path.insert(0, {checkout!r})
from caffe2torch.fast import enable_huge_pages
enable_huge_pages()
from caffe2torch.conversion import convert
from caffe2torch.export import check_inputs
from caffe2torch.fast import optimize
net = convert({weights!r}, {prototxt!r}, on_warning=lambda _: None).net
fast = optimize(net)
x, = check_inputs(net)
times = []
with torch.inference_mode():
    fast(x)
    for _ in range({runs}):
        start = time.perf_counter(); fast(x); times.append((time.perf_counter() - start) * 1000)
print(json.dumps(times))
"""


def _child_times(checkout: Path, runs: int) -> list[float]:
    code = CHILD.format(checkout=str(checkout), weights=str(REFERENCE / "icnet_merged_1025x2049.caffemodel"),
                        prototxt=str(REFERENCE / "icnet_cityscapes.prototxt"), runs=runs)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    return json.loads(result.stdout.strip().splitlines()[-1])


def compare(other: Path, rounds: int, runs: int) -> None:
    ours, theirs = [], []
    for _ in range(rounds):
        ours += _child_times(REPO, runs)
        theirs += _child_times(other, runs)
    mine, base = statistics.median(ours), statistics.median(theirs)
    print(f"| fast path, ICNet merged 1x3x1025x2049 (median of {len(ours)} forwards) | ms |")
    print("|---|---|")
    print(f"| this checkout (sizes at run time) | {mine:.0f} |")
    print(f"| {other} | {base:.0f} |")
    print(f"| ratio | {mine / base:.3f} |")
    print()


def first_and_later(runs: int) -> None:
    sys.path.insert(0, str(REPO))
    import torch

    from caffe2torch.conversion import convert
    from caffe2torch.fast import enable_huge_pages, optimize
    from caffe2torch.modules import TableCache
    from caffe2torch.refinput import reference_input

    enable_huge_pages()
    net = convert(REFERENCE / "icnet_merged_1025x2049.caffemodel", REFERENCE / "icnet_cityscapes.prototxt",
                  on_warning=lambda _: None).net
    fast = optimize(net)
    print("| net | input | first call (ms) | later calls, median (ms) | tables kept |")
    print("|---|---|---|---|---|")
    for label, model in (("converted (exact)", net), ("fast graph", fast)):
        TableCache.tables.clear()
        for size in ((1025, 2049), (1027, 2051)):
            x = torch.from_numpy(reference_input((1, 3, *size), 0, "image"))
            with torch.inference_mode():
                start = time.perf_counter()
                model(x)
                first = (time.perf_counter() - start) * 1000
                later = []
                for _ in range(runs):
                    start = time.perf_counter()
                    model(x)
                    later.append((time.perf_counter() - start) * 1000)
            print(f"| {label} | {size[0]}x{size[1]} | {first:.0f} | {statistics.median(later):.0f} | "
                  f"{len(TableCache.tables)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", type=Path, help="Another checkout to compare the fast path with.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if args.other is not None:
        compare(args.other, args.rounds, args.runs)
    first_and_later(args.runs)


if __name__ == "__main__":
    main()
