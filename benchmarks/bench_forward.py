"""Forward time of the converted ICNet at 1x3x1025x2049, plain and fast path, against real Caffe; prints markdown.

Each net (merged, bnnomerge) is converted once; the converted GraphModule and the fast graph
(`caffe2torch.fast.optimize`) run on the reference input, one warm-up each, then --runs timed
forwards taken in turns (plain, fast, plain, ...) so that a burst of load from other processes
hits both alike. Ratios are Caffe's median over ours (Caffe: README of ../shared/reference,
1 warm-up + 11 runs on this 2-core VM). Parity: the fast path checked free-running against
the reference file (`verify --fast`). --levers adds a table that switches the levers off one
at a time (huge pages in a child process); --jit and --compile add rows
for torch.jit trace+freeze and torch.compile of the fast path (compiled in a fresh cache).

    python benchmarks/bench_forward.py [--runs 7] [--nets merged,bnnomerge] [--levers] [--jit] [--compile]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"
NETS = {
    "merged": ("icnet_merged_1025x2049", "icnet_cityscapes.prototxt", 1576.0),
    "bnnomerge": ("icnet_bnnomerge_1025x2049", "icnet_cityscapes_bnnomerge.prototxt", 2113.0),
}
# Leave one out: the fast path with one lever switched off (the levers interact: channels_last,
# for one, only pays once the lean kernels keep tensors in that layout).
LEVER_ROWS = [
    ("fast path (all levers)", dict()),
    ("without channels_last", dict(channels_last=False)),
    ("without BN folding", dict(fold=False)),
    ("without lean kernels (exact Interp, MAX pool, ReLU, SUM)", dict(fast_kernels=False)),
    ("without in-place ReLU / SUM", dict(in_place=False)),
    ("without the oneDNN ReLU fusion", dict(fuse_relu=False)),
    ("every lever off", dict(fold=False, channels_last=False, fast_kernels=False, in_place=False, fuse_relu=False)),
]


def _setup(no_huge_pages: bool, warm_compile_cache: bool) -> None:
    if no_huge_pages:
        os.environ["THP_MEM_ALLOC_ENABLE"] = "0"
    if not warm_compile_cache:
        # A fresh inductor cache, so the compile time shown is what a first user waits.
        import atexit
        import shutil
        import tempfile

        cache = tempfile.mkdtemp(prefix="bench_forward_inductor_")
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    sys.path.insert(0, str(REPO))
    from caffe2torch.fast import enable_huge_pages

    enable_huge_pages()  # before the first large tensor


def _load(net_key: str):
    from caffe2torch.conversion import convert
    from caffe2torch.verify import read_reference

    stem, prototxt, _ = NETS[net_key]
    conversion = convert(REFERENCE / f"{stem}.caffemodel", REFERENCE / prototxt, on_warning=lambda _: None)
    reference = read_reference(REFERENCE / f"{stem}.ref.h5")
    return conversion.net, reference


def _time_in_turns(models: dict, inputs, runs: int) -> dict[str, list[float]]:
    import torch

    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(*inputs)
        for _ in range(runs):
            for name, model in models.items():
                start = time.perf_counter()
                model(*inputs)
                times[name].append((time.perf_counter() - start) * 1000)
    return times


def _inputs(net, reference):
    import torch

    from caffe2torch.model import net_info

    return [torch.from_numpy(reference.inputs[name].copy()) for name in net_info(net).input_names]


def _traced(fast, inputs):
    """torch.jit.trace + freeze + optimize_for_inference of the fast path."""
    import warnings

    import torch

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the shape checks become constants: intended
        traced = torch.jit.trace(fast, tuple(inputs), check_trace=False)
        return torch.jit.optimize_for_inference(torch.jit.freeze(traced))


def _row(name: str, times: list[float], caffe_ms: float | None, parity: str = "") -> str:
    median = statistics.median(times)
    ratio = f"{caffe_ms / median:.2f}x" if caffe_ms else ""
    return f"| {name} | {median:.0f} | {min(times):.0f} | {max(times):.0f} | {ratio} | {parity} |"


def main_table(args) -> None:
    import torch

    from caffe2torch.fast import optimize
    from caffe2torch.verify import verify_free_running

    print("| net | path | median ms | min ms | max ms | Caffe median / ours | parity (verify --fast) |")
    print("|---|---|---|---|---|---|---|")
    compiled_parity: dict[str, str] = {}
    for key in args.nets:
        net, reference = _load(key)
        caffe_ms = NETS[key][2]
        fast = optimize(net)
        report = verify_free_running(fast, reference)
        parity = (f"{report.passed}/{len(report.comparisons)} records ok, argmax {100 * report.argmax_agreement:.3f}%"
                  + (f", {len(report.folded)} pre-BN/pre-ReLU records not made" if report.folded else "")
                  + ("" if report.ok else " **FAIL**"))
        inputs = _inputs(net, reference)
        models = {"plain": net, "fast": fast}
        if args.jit:
            models["fast, jit trace+freeze"] = _traced(fast, inputs)
        if args.compile:
            compiled = torch.compile(optimize(net))
            start = time.perf_counter()
            with torch.inference_mode():
                output = compiled(*inputs)
            compile_s = time.perf_counter() - start
            agreement = (output[0].argmax(0).numpy() == reference.final_argmax).mean()
            compiled_parity[key] = (f"first call (compiling) {compile_s:.0f} s; final argmax {100 * agreement:.3f}% "
                                    f"of Caffe's; per-layer records not checked (verify runs the graph eagerly)")
            models["fast + torch.compile"] = compiled
        times = _time_in_turns(models, inputs, args.runs)
        print(f"| {key} | Caffe (reference README) | {caffe_ms:.0f} | | | 1.00x | |")
        notes = {"fast": parity, "fast + torch.compile": compiled_parity.get(key, "")}
        for name, values in times.items():
            print(_row(f"{key} | {name}", values, caffe_ms, notes.get(name, "")), flush=True)


def lever_table(args) -> None:
    from caffe2torch.fast import optimize

    key = args.nets[0]
    net, reference = _load(key)
    inputs = _inputs(net, reference)
    models = {"plain converted net": net}
    models.update((name, optimize(net, **levers)) for name, levers in LEVER_ROWS)
    times = _time_in_turns(models, inputs, args.runs)
    child = subprocess.run([sys.executable, __file__, "--child-no-thp", "--runs", str(args.runs), "--nets", key],
                           check=True, capture_output=True, text=True)
    times["without huge pages (THP_MEM_ALLOC_ENABLE=0, separate process)"] = json.loads(
        child.stdout.strip().splitlines()[-1])
    print(f"\nLevers on {key} (each row switches one lever off; huge pages on unless said):\n")
    print("| levers | median ms | min ms | max ms | Caffe median / ours | |")
    print("|---|---|---|---|---|---|")
    for name, values in times.items():
        print(_row(name, values, NETS[key][2]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--nets", default="merged,bnnomerge")
    parser.add_argument("--levers", action="store_true", help="also time each lever (on the first net)")
    parser.add_argument("--jit", action="store_true", help="also time torch.jit trace + freeze of the fast path")
    parser.add_argument("--compile", action="store_true", help="also time the fast path with torch.compile (slow to build)")
    parser.add_argument("--warm-compile-cache", action="store_true",
                        help="keep torch.compile's default on-disk cache (the compile time then shows a cache hit)")
    parser.add_argument("--no-huge-pages", action="store_true", help="leave PyTorch's allocator on 4 KiB pages")
    parser.add_argument("--child-no-thp", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.nets = [n.strip() for n in args.nets.split(",") if n.strip()]
    unknown = [n for n in args.nets if n not in NETS]
    if unknown:
        sys.exit(f"unknown nets {unknown}; choose from {', '.join(NETS)}")
    _setup(args.no_huge_pages or args.child_no_thp, args.warm_compile_cache)
    if args.child_no_thp:
        from caffe2torch.fast import optimize

        net, reference = _load(args.nets[0])
        print(json.dumps(_time_in_turns({"fast": optimize(net)}, _inputs(net, reference), args.runs)["fast"]))
        return
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    print(f"CPU: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"huge pages {os.environ.get('THP_MEM_ALLOC_ENABLE')}; {args.runs} timed runs per row, taken in turns")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}\n")
    main_table(args)
    if args.levers:
        lever_table(args)
    print(f"\nload average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
