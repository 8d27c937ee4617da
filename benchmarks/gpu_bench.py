"""The GPU figures of BENCHMARKS.md in one short run (for a session lent a GPU through the device tool).

1. `icnet-eval time` at 1x3x1025x2049: the net exact mode runs (fast graph in float32, TF32 off,
   deterministic cuDNN, CUDA graph) and the one --fast runs (float16, autotuned cuDNN, CUDA graph),
   median of `--iterations` CUDA-event-timed forwards, next to the paper's 33 ms on a TitanX.
2. End-to-end images/s of `icnet-eval` over a synthetic list of `--images` 1024x2048 frames
   (untrained weights at full size, which cost the same as the released ones), exact and --fast,
   with the median time per image of each stage (decode and resize in the workers; input, forward
   and post on the device; PNG writes in their threads) and the main loop's wait for the loader.

Writes JSON under --out (default $OUT or ./gpu-bench) and prints a markdown table.

    python benchmarks/gpu_bench.py --device cuda --images 500
    python benchmarks/gpu_bench.py --device cpu --images 2 --iterations 2 --input-size 257 513   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import torch
from click.testing import CliRunner

from icnet_eval.cli import main as icnet_eval
from icnet_eval.demo import street_scene
from icnet_eval.model import write_untrained_caffemodel


def synthetic_set(root: Path, images: int, size: tuple[int, int]) -> Path:
    """A few distinct scenes repeated under `images` names (decoding cost is what matters, not variety)."""
    distinct = [street_scene(seed, size) for seed in range(min(images, 8))]
    lines = []
    for index in range(images):
        image, label = distinct[index % len(distinct)]
        cv2.imwrite(str(root / f"s{index:04d}_leftImg8bit.png"), image[:, :, ::-1])
        cv2.imwrite(str(root / f"s{index:04d}_gtFine_labelTrainIds.png"), label)
        lines.append(f"s{index:04d}_leftImg8bit.png s{index:04d}_gtFine_labelTrainIds.png")
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    return root / "list.txt"


def invoke(args: list[str]) -> str:
    result = CliRunner().invoke(icnet_eval, args)
    if result.exit_code != 0:
        raise SystemExit(f"icnet-eval {' '.join(args)} failed:\n{result.output}")
    return result.output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--input-size", type=int, nargs=2, default=None)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-bench")))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    size = ["--input-size", *map(str, args.input_size)] if args.input_size else []
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    print(f"device: {name}; torch {torch.__version__}")

    rows = []
    for fast in (False, True):
        json_path = args.out / f"time_{'fast' if fast else 'exact'}.json"
        invoke(["time", "--device", args.device, "--iterations", str(args.iterations), "--warmup", "10",
                "--json", str(json_path), *size] + (["--fast"] if fast else []))
        record = json.loads(json_path.read_text())
        rows.append(f"| time, {'fast' if fast else 'exact fp32'} | {record['median_ms']:.2f} ms "
                    f"(p10 {record['p10_ms']:.2f}, p90 {record['p90_ms']:.2f}) | {record['fps']:.1f} fps | "
                    f"paper: 33 ms TitanX, ours {33.0 / record['median_ms']:.1f}x |")

    work = Path(tempfile.mkdtemp(prefix="icnet-gpu-bench-"))
    try:
        frame = (1024, 2048) if not args.input_size else (args.input_size[0] - 1, args.input_size[1] - 1)
        list_path = synthetic_set(work, args.images, frame)
        weights = write_untrained_caffemodel(work / "untrained.caffemodel")
        for fast in (False, True):
            out = work / ("fast" if fast else "exact")
            start = time.perf_counter()
            invoke(["--list", str(list_path), "--data-root", str(work), "--weights", str(weights), "--out", str(out),
                    "--device", args.device, "--workers", str(args.workers), "--batch-size", str(args.batch_size),
                    *size] + (["--fast"] if fast else []))
            seconds = time.perf_counter() - start
            report = json.loads((out / "report.json").read_text())
            shutil.copy(out / "report.json", args.out / f"report_{'fast' if fast else 'exact'}.json")
            stages = ", ".join(f"{stage} {ms:.1f}" for stage, ms in report["timing"]["stages_ms_median"].items()
                               if ms is not None)
            rows.append(f"| {args.images} images end to end, {'fast' if fast else 'exact'} | {seconds:.1f} s | "
                        f"{args.images / seconds:.2f} images/s (loop only: {report['timing']['images_per_second']:.2f}) | medians per image (ms): {stages}; loader wait "
                        f"{report['timing']['loader_wait_s']:.1f} s |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("| measure | value | rate | note |")
    print("|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
