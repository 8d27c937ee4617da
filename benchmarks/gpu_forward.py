"""GPU forward of the converted ICNet at 1025x2049: fp32 (TF32 off) and fp16, eager and in a CUDA graph, batch 1 and 4.

Prepared for a session lent a GPU (one short run); on the CPU it runs the eager rows only (smoke test).
Each row: the fast graph (`caffe2torch.fast.optimize`) of the converted net with the reference
weights, `--warmup` untimed forwards, then `--iterations` forwards timed with CUDA events; median
per image. The fp32 rows also report `verify --fast` parity on the reference (argmax agreement).

    python benchmarks/gpu_forward.py [--iterations 50] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"


def _timed(run, iterations: int, warmup: int, cuda: bool) -> list[float]:
    for _ in range(warmup):
        run()
    if not cuda:
        times = []
        for _ in range(iterations):
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1000)
        return times
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iterations)]
    for begin, end in events:
        begin.record()
        run()
        end.record()
    torch.cuda.synchronize()
    return [begin.elapsed_time(end) for begin, end in events]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--reference", type=Path, default=REFERENCE, help="folder with the ICNet reference files")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from caffe2torch.conversion import convert
    from caffe2torch.fast import cuda_graph, optimize
    from caffe2torch.verify import read_reference, verify_free_running

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    net = convert(args.reference / "icnet_merged_1025x2049.caffemodel", args.reference / "icnet_cityscapes.prototxt",
                  on_warning=lambda _: None).net.to(device)
    reference = read_reference(args.reference / "icnet_merged_1025x2049.ref.h5")
    x1 = torch.from_numpy(reference.inputs["data"]).to(device)
    name = torch.cuda.get_device_name(0) if cuda else "CPU"
    print(f"device: {name}; torch {torch.__version__}; TF32 off; cudnn.benchmark on")
    rows = []
    for dtype in (torch.float32, torch.float16):
        fast = optimize(copy.deepcopy(net).to(dtype))
        parity = ""
        if dtype == torch.float32:
            report = verify_free_running(fast, reference, device=device)
            parity = f"verify --fast: {'ok' if report.ok else 'FAIL'}, argmax {100 * report.argmax_agreement:.4f}%"
        for batch in (1, 4):
            x = x1.to(dtype).expand(batch, -1, -1, -1).contiguous()
            modes = [("eager", lambda: fast(x))]
            if cuda:
                graphed = cuda_graph(fast, [x])
                modes.append(("CUDA graph", lambda: graphed(x)))
            for mode, run in modes:
                with torch.inference_mode():
                    times = _timed(run, args.iterations, args.warmup, cuda)
                per_image = statistics.median(times) / batch
                rows.append({"dtype": str(dtype).replace("torch.", ""), "batch": batch, "mode": mode,
                             "median_ms_per_image": per_image, "median_ms_per_batch": statistics.median(times),
                             "parity": parity})
                print(f"| {rows[-1]['dtype']} | {batch} | {mode} | {per_image:.2f} | {statistics.median(times):.2f} | {parity} |",
                      flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
