"""How far torch's BatchNorm is from Caffe's order of float32 operations, on the reference nets; prints markdown.

Every BN (fork) and BatchNorm layer of the nets below runs, on the input it gets in the
converted net, once as the converted `nn.BatchNorm` and once in Caffe's own order:
fork BN `((x - mean) * powf(var + eps, -0.5)) * slope + bias`, BatchNorm `(x - mean) / sqrt(var + eps)`
(powf/sqrt correctly rounded, each operation rounded to float32). Reported: the share of values that
differ at all, the largest difference relative to the tensor's largest magnitude (in float32 epsilons,
2^-23), and the relative L2 error. (Counting ulps per value would mislead: near zero the two orders
differ by cancellation, e.g. 1e-9 against -2e-9, which is many ulps and no error worth the name.)

    python benchmarks/batchnorm_ulp.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"
NETS = {
    "unit_fork_bn": ("units/unit_fork_bn.caffemodel", "units/unit_fork_bn.prototxt", "units/unit_fork_bn.ref.h5"),
    "unit_batchnorm_scale_bias": ("units/unit_batchnorm_scale_bias.caffemodel", "units/unit_batchnorm_scale_bias.prototxt",
                                  "units/unit_batchnorm_scale_bias.ref.h5"),
    "unit_inplace_chain": ("units/unit_inplace_chain.caffemodel", "units/unit_inplace_chain.prototxt",
                           "units/unit_inplace_chain.ref.h5"),
    "icnet_bnnomerge_1025x2049": ("icnet_bnnomerge_1025x2049.caffemodel", "icnet_cityscapes_bnnomerge.prototxt",
                                  "icnet_bnnomerge_1025x2049.ref.h5"),
}


def caffe_order(module: torch.nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean, var = module.running_mean.reshape(shape), module.running_var.reshape(shape)
    centred = x - mean
    if module.affine:  # the fork's BN
        inv_std = torch.pow((module.running_var + module.eps).double(), -0.5).float().reshape(shape)
        return (centred * inv_std) * module.weight.reshape(shape) + module.bias.reshape(shape)
    return centred / torch.sqrt((module.running_var + module.eps).double()).float().reshape(shape)


def main() -> None:
    sys.path.insert(0, str(REPO))
    from caffe2torch.conversion import convert
    from caffe2torch.model import run_layers
    from caffe2torch.verify import read_reference

    print("| net | norm layers | values that differ | largest difference / largest magnitude | worst rel L2 |")
    print("|---|---|---|---|---|")
    for name, (model, prototxt, ref) in NETS.items():
        net = convert(REFERENCE / model, REFERENCE / prototxt, on_warning=lambda _: None).net
        reference = read_reference(REFERENCE / ref)
        modules = {node_target: module for node_target, module in net.named_children()
                   if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)}
        current = {k: torch.from_numpy(v) for k, v in reference.inputs.items()}
        worst_eps, differing, total, worst_rel, layers = 0.0, 0, 0, 0.0, 0

        def after_layer(call, tops) -> None:
            nonlocal worst_eps, differing, total, worst_rel, layers
            module = modules.get(net.meta["caffe"].modules[call.layer])
            if module is not None:
                x = current[call.bottoms[0]]
                ours, caffe = tops[0].numpy().astype(np.float64), caffe_order(module, x).numpy().astype(np.float64)
                difference = np.abs(ours - caffe)
                worst_eps = max(worst_eps, float(difference.max() / np.abs(caffe).max() / 2.0**-23))
                differing, total, layers = differing + int((difference > 0).sum()), total + difference.size, layers + 1
                worst_rel = max(worst_rel, float(np.linalg.norm(ours - caffe) / np.linalg.norm(caffe)))
            current.update(zip(call.tops, tops))

        with torch.inference_mode():
            run_layers(net, **current, after_layer=after_layer)
        print(f"| {name} | {layers} | {100 * differing / total:.1f}% | {worst_eps:.2f} eps | {worst_rel:.2g} |")


if __name__ == "__main__":
    main()
