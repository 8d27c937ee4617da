"""Fine-tune ICNet (the variant with separate BN layers) in PyTorch and save a folder `icnet-eval --weights` reads.

    python examples/finetune_icnet.py                  # the demo set and untrained weights: minutes on a CPU
    python examples/finetune_icnet.py --weights icnet_cityscapes_train_30k_bnnomerge.caffemodel \\
        --list train.txt --data-root /data/cityscapes --size 1025 2049 --iterations 3000 -o icnet_ft
    icnet-eval --weights icnet_ft --list val.txt --data-root /data/cityscapes

The recipe, where the authors (Zhao et al., "ICNet for Real-Time Semantic Segmentation on High-Resolution
Images", ECCV 2018; hszhao/ICNet releases no training definition) say it:

* cascade label guidance: softmax cross-entropy (ignore label 255) on the three cascade outputs, weighted
  0.4 (1/16 size, `sub4`), 0.4 (1/8, `sub24`) and 1.0 (1/4, `sub124` = `conv6_cls`), each against the label
  shrunk to its size (nearest neighbour). The deploy net has no classifiers for the first two: two 1x1
  convolutions are added on the features the paper puts them on (`conv5_4_interp`, `sub24_sum_interp`) and
  dropped again when the net is saved;
* SGD, momentum 0.9, weight decay 1e-4 (on convolution weights; BN's and biases' decay is 0 as in Caffe's
  PSPNet-family definitions), the "poly" schedule lr * (1 - iteration / iterations) ^ 0.9, random mirroring;
  base lr 0.01 from untrained weights as the paper, 1e-4 to fine-tune trained ones: with BN's statistics
  frozen, BN no longer undoes a change of scale in the layers before it, and on the reference data's
  calibrated random BN weights lr 1e-3 and 1e-2 went to NaN within 4 steps, 1e-4 lowered the loss steadily;
* inputs exactly as the released net expects and icnet-eval feeds it: the image resized to the net's input
  size with MATLAB's imresize, BGR, minus the mean (B 103.939, G 116.779, R 123.68), on the 0-255 scale.

Not done here: the paper's random rescaling (0.5 to 2) and its batch size of 16 across GPUs. With a few images
per batch the BN statistics of a batch are too noisy to learn from, so they stay frozen (as the released
definition has them) while BN's weight and bias learn (`--train-bn-statistics` unfreezes them for large
batches). Merged-BN weights (icnet_cityscapes_train_30k.caffemodel) are refused: without BN the 0-255 inputs
reach every layer unnormalised and SGD diverges within a few steps; the `_bnnomerge` release is the same model.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import caffe2torch
from caffe2torch.errors import CaffeError
from caffe2torch.model import net_info
from icnet_eval.data import ListEntry, parse_list, preprocess, read_image_bgr, read_label_train_ids
from icnet_eval.model import generated_net, load_model, untrained_weights

IGNORE = 255
NUM_CLASSES = 19
# (blob the classifier reads, loss weight); None: the net's own classifier conv6_cls.
CASCADE = {"sub4": ("conv5_4_interp", 0.4), "sub24": ("sub24_sum_interp", 0.4), "sub124": ("conv6_cls", 1.0)}


class CascadeNet(nn.Module):
    """The converted ICNet returning its three cascade outputs: class scores at 1/16, 1/8 and 1/4 of the input."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.body = caffe2torch.with_outputs(net, [blob for blob, _ in CASCADE.values()])  # shares net's modules
        shapes = net_info(net).blob_shapes
        self.heads = nn.ModuleDict()
        for name, (blob, _) in CASCADE.items():
            if blob != "conv6_cls":
                head = nn.Conv2d(shapes[blob][1], NUM_CLASSES, 1)
                nn.init.normal_(head.weight, 0.0, 0.01)  # Caffe's gaussian filler of new classifiers
                nn.init.zeros_(head.bias)
                self.heads[name] = head

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = dict(zip(CASCADE, self.body(x)))
        return {name: self.heads[name](value) if name in self.heads else value for name, value in features.items()}


def cascade_loss(outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted sum of the three cross-entropies (labels N x H x W int64 trainIds, 255 ignored)."""
    total, parts = outputs["sub124"].new_zeros(()), {}
    for name, (_, weight) in CASCADE.items():
        scores = outputs[name]
        shrunk = F.interpolate(labels[:, None].float(), size=scores.shape[2:], mode="nearest")[:, 0].long()
        loss = F.cross_entropy(scores.float(), shrunk, ignore_index=IGNORE)
        if torch.isnan(loss):  # every pixel of the batch ignored at this size: nothing to learn from
            loss = scores.sum() * 0.0
        parts[name] = float(loss.detach())
        total = total + weight * loss
    return total, parts


class Cityscapes(torch.utils.data.Dataset):
    """List entries as (network input, trainId label at the input size), preprocessed as icnet-eval does."""

    def __init__(self, entries: list[ListEntry], size: tuple[int, int], mirror: bool = True) -> None:
        self.entries, self.size, self.mirror = entries, size, mirror

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self.entries[index]
        image, label = read_image_bgr(entry), read_label_train_ids(entry)
        if self.mirror and random.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        label = cv2.resize(np.ascontiguousarray(label), self.size[::-1], interpolation=cv2.INTER_NEAREST)
        return preprocess(np.ascontiguousarray(image), self.size), torch.from_numpy(label.astype(np.int64))


def icnet_with_bn(weights: str | None, size: tuple[int, int]) -> nn.Module:
    """The converted ICNet for inputs of `size`: from a caffemodel or converted folder with separate BN layers, or
    (no weights) untrained ones."""
    if weights is None:
        net, _, _ = generated_net(*size, untrained_weights(bn=True), bn=True)
        return net
    net = load_model(weights, input_size=size).net
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        raise CaffeError(f"--weights {weights}: BN is merged into the convolutions; fine-tuning such weights "
                         f"diverges (0-255 inputs reach every layer unnormalised): use the _bnnomerge release")
    return net


def poly(iteration: int, iterations: int, power: float = 0.9) -> float:
    return (1.0 - iteration / iterations) ** power


def optimizer_for(model: CascadeNet, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD with weight decay on convolution weights only (BN weight and bias, and biases: none, as in Caffe)."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() > 1 else no_decay).append(parameter)
    return torch.optim.SGD([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                           lr=lr, momentum=momentum)


@dataclass
class Result:
    losses: list[float]
    folder: Path


def finetune(net: nn.Module, entries: list[ListEntry], size: tuple[int, int], out: Path, iterations: int = 100,
             batch_size: int = 2, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 1e-4,
             train_statistics: bool = False, device: str = "cpu", seed: int = 0, log_every: int = 10,
             force: bool = False, echo=print) -> Result:
    """Train `net` in place on the entries; save it (without the auxiliary heads) as a converted folder `out`."""
    random.seed(seed)
    torch.manual_seed(seed)
    if train_statistics:
        caffe2torch.unfreeze_batchnorm(net)
    else:
        caffe2torch.freeze_batchnorm(net, affine=False)  # stored statistics; BN's weight and bias learn
    model = CascadeNet(net).to(device).train()
    optimizer = optimizer_for(model, lr, momentum, weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: poly(i, iterations))
    loader = torch.utils.data.DataLoader(Cityscapes(entries, size), batch_size=batch_size, shuffle=True,
                                         drop_last=len(entries) >= batch_size)
    losses: list[float] = []
    while len(losses) < iterations:
        for inputs, labels in loader:
            outputs = model(inputs.to(device))
            loss, parts = cascade_loss(outputs, labels.to(device))
            value = float(loss.detach())
            if not math.isfinite(value):
                raise CaffeError(f"iteration {len(losses) + 1}: the loss is {value}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(value)
            if len(losses) % log_every == 0 or len(losses) in (1, iterations):
                detail = ", ".join(f"{name} {value:.3f}" for name, value in parts.items())
                echo(f"iteration {len(losses):>5}/{iterations}  loss {losses[-1]:.4f}  ({detail})  "
                     f"lr {optimizer.param_groups[0]['lr']:.2e}")
            if len(losses) == iterations:
                break
    folder = caffe2torch.save(net.cpu().eval(), out, force=force)
    echo(f"saved {folder}  (icnet-eval --weights {folder} ...)")
    return Result(losses, folder)


def main(argv: list[str] | None = None) -> Result:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="caffemodel (with separate BN layers) or converted folder; default: "
                                          "untrained weights")
    parser.add_argument("--list", dest="list_path", help="'IMAGE LABEL' lines (default: a demo set made in a "
                                                         "temporary folder, as `icnet-eval demo` makes it)")
    parser.add_argument("--data-root", help="folder the list's paths are relative to")
    parser.add_argument("--size", nargs=2, type=int, default=(257, 513), metavar=("H", "W"),
                        help="network input size (default 257 513; the released net's is 1025 2049)")
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, help="base learning rate (default 0.01 from untrained weights, 1e-4 "
                                                 "with --weights)")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--train-bn-statistics", action="store_true", help="batch statistics (large batches only)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("-o", "--out", default="icnet_finetuned", help="converted folder to write")
    parser.add_argument("--force", action="store_true", help="replace an earlier output of this script")
    args = parser.parse_args(argv)
    size = tuple(args.size)
    if args.list_path is None:
        from icnet_eval.demo import make_demo_set

        root = Path(args.data_root or tempfile.mkdtemp(prefix="icnet-finetune-demo-"))
        list_path, _ = make_demo_set(root)
        print(f"demo set: {list_path} (data root {root})")
    elif args.data_root is None:
        parser.error("--list needs --data-root")
    else:
        list_path, root = Path(args.list_path), Path(args.data_root)
    entries = parse_list(list_path, root, need_labels=True)
    net = icnet_with_bn(args.weights, size)
    lr = args.lr if args.lr is not None else (0.01 if args.weights is None else 1e-4)
    return finetune(net, entries, size, Path(args.out), args.iterations, args.batch_size, lr, args.momentum,
                    args.weight_decay, args.train_bn_statistics, args.device, log_every=args.log_every,
                    force=args.force)


if __name__ == "__main__":
    try:
        main()
    except CaffeError as error:
        print(f"finetune_icnet: error: {error}", file=sys.stderr)
        sys.exit(2)
