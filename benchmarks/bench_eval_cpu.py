"""End-to-end CPU cost of `icnet-eval` on full-size 1024x2048 frames: seconds per image, forward share.

Writes a few synthetic street scenes at Cityscapes size with trainId labels, evaluates them with
the merged ICNet reference weights (real-Caffe-written caffemodel, official deploy prototxt) at
1025x2049 in exact mode and with --fast-resize, each once, and prints a markdown table.

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
        print("| mode | images | s / image end to end | forward ms (median) | forward share |")
        print("|---|---|---|---|---|")
        for fast in (False, True):
            out = work / ("fast" if fast else "exact")
            options = EvalOptions(work / "list.txt", work, root / "icnet_merged_1025x2049.caffemodel", out, "cpu", 1, 2,
                                  fast, "trainids", None, root / "icnet_cityscapes.prototxt", resume=False, progress=False)
            start = time.perf_counter()
            report = evaluate(options, echo=lambda _: None)
            per_image = (time.perf_counter() - start) / count
            forward = report["timing"]["forward_ms_median"]
            mode = "fast (--fast-resize, oneDNN)" if fast else "exact (default)"
            print(f"| {mode} | {count} | {per_image:.2f} | {forward:.0f} | {100 * forward / 1000 / per_image:.0f}% |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
