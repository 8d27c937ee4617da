"""Conversion time and peak memory of caffe2torch.convert on the ICNet caffemodel; prints a markdown table.

Time: median of --runs conversions in one process, after the interpreter, torch and caffe2torch
are imported (the first, colder conversion is shown apart). Memory: in a fresh process per
measurement, the peak resident set (VmHWM, reset through /proc/self/clear_refs after the
imports) minus the resident set after the imports, i.e. what the conversion itself adds on top
of the loaded libraries, compared with the file size.

    python benchmarks/bench_convert.py [--runs 7] [--memory-runs 3]
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
MODEL = REFERENCE / "icnet_merged_1025x2049.caffemodel"
PROTOTXT = REFERENCE / "icnet_cityscapes.prototxt"
TIME_TARGET_S = 0.5
MEMORY_TARGET_FACTOR = 3.0


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_memory() -> dict:
    """Run in a child process: RSS growth of one conversion over the imported libraries."""
    sys.path.insert(0, str(REPO))
    import torch  # noqa: F401 - imported first so that it does not count
    from caffe2torch.conversion import convert

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    baseline = _status_kib("VmRSS")
    conversion = convert(MODEL, PROTOTXT, on_warning=lambda _: None)
    peak = _status_kib("VmHWM")
    after = _status_kib("VmRSS")
    del conversion
    return {"baseline_kib": baseline, "peak_kib": peak, "after_kib": after}


def measure_time(runs: int) -> tuple[float, list[float]]:
    sys.path.insert(0, str(REPO))
    import torch  # noqa: F401
    from caffe2torch.conversion import convert

    times = []
    for _ in range(runs + 1):
        start = time.perf_counter()
        convert(MODEL, PROTOTXT, on_warning=lambda _: None)
        times.append(time.perf_counter() - start)
    return times[0], times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--memory-runs", type=int, default=3)
    parser.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        print(json.dumps(measure_memory()))
        return
    if not MODEL.is_file():
        sys.exit(f"reference model not found: {MODEL}")

    load_before = os.getloadavg()[0]
    first, times = measure_time(args.runs)
    samples = []
    for _ in range(args.memory_runs):
        output = subprocess.run([sys.executable, __file__, "--child-memory"], check=True, capture_output=True, text=True)
        samples.append(json.loads(output.stdout.strip().splitlines()[-1]))
    load_after = os.getloadavg()[0]

    size_mb = MODEL.stat().st_size / 1e6
    peaks = [(s["peak_kib"] - s["baseline_kib"]) * 1024 / 1e6 for s in samples]
    kept = [(s["after_kib"] - s["baseline_kib"]) * 1024 / 1e6 for s in samples]
    median_time, peak = statistics.median(times), statistics.median(peaks)
    print(f"model: {MODEL.name} ({size_mb:.1f} MB) with {PROTOTXT.name}; python {sys.version.split()[0]}")
    print(f"load average {load_before:.2f} before, {load_after:.2f} after\n")
    print("| measure | value | target | met |")
    print("|---|---|---|---|")
    print(f"| conversion time, median of {len(times)} (min {min(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms) "
          f"| {median_time * 1000:.0f} ms | <= {TIME_TARGET_S * 1000:.0f} ms | {'yes' if median_time <= TIME_TARGET_S else 'NO'} |")
    print(f"| first conversion in the process (lazy imports) | {first * 1000:.0f} ms | | |")
    print(f"| peak memory over imported libraries, median of {len(peaks)} processes "
          f"| {peak:.1f} MB = {peak / size_mb:.2f}x file | <= {MEMORY_TARGET_FACTOR:g}x file "
          f"({MEMORY_TARGET_FACTOR * size_mb:.0f} MB) | {'yes' if peak <= MEMORY_TARGET_FACTOR * size_mb else 'NO'} |")
    print(f"| memory still held by the converted net | {statistics.median(kept):.1f} MB | | |")


if __name__ == "__main__":
    main()
