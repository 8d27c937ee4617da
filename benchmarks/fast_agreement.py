"""--fast against exact: argmax agreement of the fast graph in half precision with the exact float32 net.

On the Caffe reference inputs of the three ICNet nets (calibrated random weights, which amplify
rounding about 1000-fold) and on the untrained demo weights at 1025x2049 and 257x513 (activations
of order 1, as trained weights keep them): the relative L2 error of the scores, the identical
argmax over all pixels and over the pixels whose exact top-2 margin is >= 0.1, 0.5 and 1.0.

    python benchmarks/fast_agreement.py [--device cuda] [--reference DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import h5py
import numpy as np
import torch

from caffe2torch.conversion import convert
from caffe2torch.fast import optimize
from icnet_eval.data import preprocess
from icnet_eval.demo import street_scene
from icnet_eval.model import untrained_model
from icnet_eval.predict import numerics

MARGINS = (0.1, 0.5, 1.0)
NETS = (("icnet_merged_257x513", "icnet_merged_1025x2049.caffemodel", "icnet_merged_257x513.prototxt"),
        ("icnet_merged_1025x2049", "icnet_merged_1025x2049.caffemodel", "icnet_cityscapes.prototxt"),
        ("icnet_bnnomerge_1025x2049", "icnet_bnnomerge_1025x2049.caffemodel", "icnet_cityscapes_bnnomerge.prototxt"))


def agreement(exact: torch.Tensor, other: torch.Tensor) -> dict:
    top2 = exact.topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]
    same = exact.argmax(1) == other.argmax(1)
    row = {"rel_l2": float((other - exact).norm() / exact.norm()), "max_abs": float((other - exact).abs().max()),
           "overall": float(same.float().mean())}
    for threshold in MARGINS:
        confident = margin >= threshold
        row[f"margin_{threshold}"] = float(same[confident].float().mean())
        row[f"share_{threshold}"] = float(confident.float().mean())
    return row


def compare(name: str, net: torch.nn.Module, x: torch.Tensor, device: torch.device) -> list[dict]:
    net, x = net.to(device).eval(), x.to(device)
    with torch.inference_mode(), numerics(device, exact=True):
        exact = net(x).float()
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        fast = optimize(net).to(dtype)
        with torch.inference_mode():
            rows.append(dict(net=name, dtype=str(dtype).replace("torch.", ""), **agreement(exact, fast(x.to(dtype)).float())))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reference", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "reference")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    for name, weights, prototxt in NETS:
        if not (args.reference / weights).is_file():
            print(f"skipped {name}: {args.reference / weights} not found")
            continue
        net = convert(args.reference / weights, args.reference / prototxt, on_warning=lambda _: None).net
        with h5py.File(args.reference / f"{name}.ref.h5", "r") as file:
            x = torch.from_numpy(file["input"][next(iter(file["input"]))][()])
        rows += compare(name, net, x, device)
    for size in ((1025, 2049), (257, 513)):
        image, _ = street_scene(0, (size[0] - 1, size[1] - 1))
        x = preprocess(np.ascontiguousarray(image[..., ::-1]), size)[None]
        rows += compare(f"untrained demo {size[0]}x{size[1]}", untrained_model(size).net, x, device)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}")
    print("| scores | dtype | rel L2 | max abs | identical argmax | margin >= 0.1 (share) | >= 0.5 | >= 1.0 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['net']} | {r['dtype']} | {r['rel_l2']:.2e} | {r['max_abs']:.3f} | {100 * r['overall']:.4f}% | "
              f"{100 * r['margin_0.1']:.4f}% ({100 * r['share_0.1']:.1f}%) | {100 * r['margin_0.5']:.4f}% | "
              f"{100 * r['margin_1.0']:.4f}% |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
