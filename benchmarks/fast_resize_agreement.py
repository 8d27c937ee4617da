"""How far `--fast-resize` is from the exact MATLAB resize: argmax agreement on real Caffe logits.

Takes the full `conv6_cls` tensors that real Caffe wrote for the two ICNet reference nets
(19 x 257 x 513), upsamples them with the net's own `conv6_interp` (x4, Caffe-exact), applies the
authors' softmax, resizes the probabilities back to a 1024 x 2048 Cityscapes frame once with
MATLAB's bilinear imresize and once with the fast resize, and compares the argmax maps.

    python benchmarks/fast_resize_agreement.py [REFERENCE_DIR]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import h5py
import torch

from caffe2torch.conversion import convert
from caffe2torch.model import layer_module
from icnet_eval.predict import predict_train_ids
from icnet_eval.metrics import ConfusionCounts

FRAME = (1024, 2048)


def stored_logits(reference: Path) -> torch.Tensor:
    with h5py.File(reference, "r") as file:
        for key in file["layers"]:
            if file["layers"][key].attrs["name"] == "conv6_cls":
                return torch.from_numpy(file["layers"][key]["0"]["data"][()])
    raise SystemExit(f"{reference}: no stored conv6_cls")


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared" / "reference"
    print("| reference logits | identical argmax pixels | mIoU of fast vs exact (exact as labels) | exact s | fast s |")
    print("|---|---|---|---|---|")
    for name, prototxt in (("icnet_merged_1025x2049", "icnet_cityscapes.prototxt"),
                           ("icnet_bnnomerge_1025x2049", "icnet_cityscapes_bnnomerge.prototxt")):
        net = convert(root / f"{name}.caffemodel", root / prototxt).net
        with torch.inference_mode():
            logits = layer_module(net, "conv6_interp")(stored_logits(root / f"{name}.ref.h5"))[0]
            start = time.perf_counter()
            exact = predict_train_ids(logits, FRAME, fast=False)
            exact_s = time.perf_counter() - start
            start = time.perf_counter()
            fast = predict_train_ids(logits, FRAME, fast=True)
            fast_s = time.perf_counter() - start
        counts = ConfusionCounts()
        counts.add(fast, exact)
        summary = counts.summary()
        print(f"| {name} | {100 * float((exact == fast).mean()):.4f}% | {summary['miou']:.3f} | {exact_s:.2f} | {fast_s:.2f} |")


if __name__ == "__main__":
    main()
