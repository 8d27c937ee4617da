"""End-to-end CPU cost of `icnet-eval` on full-size 1024x2048 frames: seconds per image, forward share.

Writes a few synthetic street scenes at Cityscapes size with trainId labels, evaluates them with
the merged ICNet reference weights (real-Caffe-written caffemodel, official deploy prototxt) at
1025x2049 in exact mode, with --fast-resize and with --fast (float32 on a CPU), each once, and prints
a markdown table with the median time per image of each stage.

    python benchmarks/bench_eval_cpu.py [REFERENCE_DIR] [IMAGES]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2

from icnet_eval.demo import street_scene
from icnet_eval.pipeline import EvalOptions, evaluate


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared" / "reference"
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    work = Path(tempfile.mkdtemp(prefix="icnet-bench-"))
    try:
        lines = []
        for index in range(count):
            image, label = street_scene(index, (1024, 2048))
            cv2.imwrite(str(work / f"frame{index}_leftImg8bit.png"), image[:, :, ::-1])
            cv2.imwrite(str(work / f"frame{index}_gtFine_labelTrainIds.png"), label)
            lines.append(f"frame{index}_leftImg8bit.png frame{index}_gtFine_labelTrainIds.png")
        (work / "list.txt").write_text("\n".join(lines) + "\n")
        print("| mode | images | s / image end to end | forward ms (median) | forward share | stage medians (ms) |")
        print("|---|---|---|---|---|---|")
        for mode, fast_resize, fast in (("exact (default)", False, False), ("--fast-resize", True, False),
                                        ("--fast (float32 on a CPU)", False, True)):
            out = work / mode.split()[0].strip("-")
            options = EvalOptions(work / "list.txt", work, root / "icnet_merged_1025x2049.caffemodel", out, "cpu", 1, 2,
                                  fast_resize, "trainids", None, root / "icnet_cityscapes.prototxt", resume=False,
                                  progress=False, fast=fast)
            start = time.perf_counter()
            report = evaluate(options, echo=lambda _: None)
            per_image = (time.perf_counter() - start) / count
            forward = report["timing"]["forward_ms_median"]
            stages = ", ".join(f"{stage} {ms:.0f}" for stage, ms in report["timing"]["stages_ms_median"].items()
                               if ms is not None)
            print(f"| {mode} | {count} | {per_image:.2f} | {forward:.0f} | {100 * forward / 1000 / per_image:.0f}% | "
                  f"{stages} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
