"""The ICNet net for evaluation: from a released caffemodel, a user prototxt, or a generated definition; untrained demo weights."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from caffe2torch import manifest
from caffe2torch.errors import CaffeError, UnknownFieldError, term
from caffe2torch.model import from_net_parameter, net_info, unmatched_weights
from caffe2torch.read import read_weights
from caffe2torch.write import with_blobs, write_atomic
from icnet_eval.netdef import NUM_CLASSES, icnet_net
from proto import caffe_pb2

OFFICIAL_INPUT_SIZE = (1025, 2049)
BN_EPS = 1e-5
# RMS of a mean-subtracted Cityscapes-like image: the first convolutions' statistics are set for it.
INPUT_RMS = 50.0


@dataclass
class LoadedModel:
    """A converted ICNet and where it came from (what the report and the resume check record)."""

    net: torch.nn.Module
    input_size: tuple[int, int]
    weights: Path | None
    md5: str | None
    release: manifest.Release | None
    definition: str  # in words, for messages and the report
    definition_md5: str  # of the net definition actually used, so a resume can tell runs apart

    def evaluation_net(self, exact: bool = True) -> torch.nn.Module:
        """The net to run: in exact mode with BN in Caffe's order of operations (made once, then kept)."""
        if not exact:
            return self.net
        if getattr(self, "_exact", None) is None:
            from caffe2torch.passes import caffe_order_norms

            self._exact = caffe_order_norms(self.net)
        return self._exact


def _definition_md5(net_param: caffe_pb2.NetParameter) -> str:
    return hashlib.md5(net_param.SerializeToString(deterministic=True)).hexdigest()


def weights_have_bn(weights: Mapping[str, list[np.ndarray]], stored: caffe_pb2.NetParameter | None) -> bool:
    """Whether a caffemodel holds separate BN layers (the `bnnomerge` variant) rather than BN folded into convs."""
    if stored is not None and any(layer.type == "BN" for layer in stored.layer):
        return True
    return any(name.endswith("/bn") and len(blobs) == 4 for name, blobs in weights.items())


def _input_size_of(net: torch.nn.Module, source: str) -> tuple[int, int]:
    shapes = list(net_info(net).inputs.values())
    if len(shapes) != 1 or len(shapes[0]) != 4 or shapes[0][1] != 3:
        raise CaffeError(f"{source}: ICNet evaluation needs one 1x3xHxW input, the net declares {shapes}")
    return int(shapes[0][2]), int(shapes[0][3])


def _check_output(net: torch.nn.Module, source: str) -> None:
    info = net_info(net)
    outputs = info.outputs
    if len(outputs) != 1:
        raise CaffeError(f"{source}: the net has {len(outputs)} output blobs {outputs}; ICNet has one score blob")
    shape = info.blob_shapes[outputs[0]]
    if len(shape) != 4 or shape[1] != NUM_CLASSES:
        raise CaffeError(f"{source}: output blob {outputs[0]!r} has shape {tuple(shape)}; "
                         f"expected 1x{NUM_CLASSES}xHxW Cityscapes scores")


def generated_net(height: int, width: int, weights: Mapping[str, list[np.ndarray]], bn: bool,
                  on_warning: Callable[[str], None] | None = None, weights_source: str = "the weights") -> tuple[torch.nn.Module, caffe_pb2.NetParameter, str]:
    """ICNet built from `netdef` for HxW with the given weights by layer name."""
    net_param = icnet_net(height, width, bn)
    source = f"generated ICNet {height}x{width} ({'separate BN' if bn else 'BN merged'})"
    unused = unmatched_weights(net_param, weights, weights_source, source)
    net = from_net_parameter(net_param, weights, source, None, on_warning)
    if unused and on_warning is not None:
        on_warning(f"{len(unused)} layers of the weights file are not in ICNet and are ignored: {', '.join(unused[:5])}")
    return net, net_param, source


def load_model(weights: str | os.PathLike | None, prototxt: str | os.PathLike | None = None,
               input_size: tuple[int, int] | None = None, verify_md5: bool = True,
               on_warning: Callable[[str], None] | None = None, allow_unknown_fields: bool = False) -> LoadedModel:
    """The net to evaluate.

    * `prototxt` given: that definition (its input resized to `input_size` if given), as Caffe would load it.
    * a known release at the official size: the deploy prototxt the manifest names.
    * otherwise the ICNet definition generated for `input_size` (default 1025x2049), with or without
      separate BN layers as the weights have them (the manifest's `bn_merged` for a release).
    """
    from caffe2torch.conversion import convert as run_convert

    def convert(*args, **kwargs):
        try:
            return run_convert(*args, **kwargs, allow_unknown_fields=allow_unknown_fields)
        except UnknownFieldError as error:  # icnet-eval has no such option: it takes the converted folder instead
            again = UnknownFieldError(error.finding, "convert it with `caffe2torch convert --allow-unknown-fields` "
                                      "and give the folder as --weights")
            again.warnings = error.warnings
            raise again from None

    if weights is None:
        raise CaffeError(f"{term('--weights', 'weights')} is required (a .caffemodel; run `icnet-eval demo` to try the tool "
                         f"without one)")
    weights_path = Path(weights)
    if weights_path.is_dir():
        return _converted_folder(weights_path, prototxt, input_size)
    if not weights_path.is_file():
        raise CaffeError(f"{term('--weights', 'weights')} {weights_path}: no such file")
    if prototxt is not None:
        shape = (1, 3, *input_size) if input_size is not None else None
        conversion = convert(weights_path, prototxt, shape, verify_md5=verify_md5, on_warning=on_warning)
        net, source = conversion.net, str(prototxt)
        _check_output(net, source)
        return LoadedModel(net, _input_size_of(net, source), weights_path, conversion.md5, conversion.release,
                           f"prototxt {prototxt}", _definition_md5(conversion.definition))
    md5 = manifest.md5_file(weights_path)
    release = manifest.check_release(weights_path, md5, verify=verify_md5)
    if release is not None and input_size in (None, OFFICIAL_INPUT_SIZE):
        conversion = convert(weights_path, None, None, verify_md5=verify_md5, on_warning=on_warning)
        source = str(conversion.prototxt_path)
        _check_output(conversion.net, source)
        return LoadedModel(conversion.net, OFFICIAL_INPUT_SIZE, weights_path, md5, release,
                           f"official {release.prototxt}", _definition_md5(conversion.definition))
    trained, stored = read_weights(weights_path)
    bn = (not release.bn_merged) if release is not None else weights_have_bn(trained, stored)
    height, width = input_size or OFFICIAL_INPUT_SIZE
    net, net_param, source = generated_net(height, width, trained, bn, on_warning, str(weights_path))
    _check_output(net, source)
    return LoadedModel(net, (height, width), weights_path, md5, release, source, _definition_md5(net_param))


def _converted_folder(folder: Path, prototxt, input_size) -> LoadedModel:
    """A folder written by `caffe2torch convert` or `caffe2torch.save` (e.g. a fine-tuned ICNet), as it is."""
    from caffe2torch.folder import DEFINITION, WEIGHTS, load

    if prototxt is not None:
        raise CaffeError(f"{term('--weights', 'weights')} {folder}: a converted folder holds its definition; leave out "
                         f"{term('--prototxt', 'prototxt')}")
    net = load(folder)
    source = f"converted folder {folder}"
    size = _input_size_of(net, source)
    if input_size is not None and tuple(input_size) != size:
        raise CaffeError(f"{term('--weights', 'weights')} {folder}: the net was converted for {size[0]}x{size[1]}, not "
                         f"{term('--input-size', 'input_size')} "
                         f"{input_size[0]} {input_size[1]}; convert it again for that size")
    _check_output(net, source)
    definition_md5 = hashlib.md5((folder / DEFINITION).read_bytes()).hexdigest()
    return LoadedModel(net, size, folder, manifest.md5_file(folder / WEIGHTS), None, source, definition_md5)


# --- untrained weights (demo, timing) ---------------------------------------------------------------

def _channels(net_param: caffe_pb2.NetParameter) -> dict[str, int]:
    """Channel count of every blob (only convolutions change it in ICNet)."""
    channels = {name: int(net_param.input_dim[4 * i + 1]) for i, name in enumerate(net_param.input)}
    for layer in net_param.layer:
        if layer.type == "Convolution":
            channels[layer.top[0]] = layer.convolution_param.num_output
        else:
            channels[layer.top[0]] = channels[layer.bottom[0]]
    return channels


def untrained_weights(bn: bool, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Deterministic random ICNet weights with activations of order 1 through the whole net.

    He-normal convolutions and BN statistics set for the scale the He init gives (the input's
    scale for the convolutions that read the image). The last BN of every residual branch is
    damped so the residual sums do not grow with depth, and the classifier gets per-class
    offsets so the untrained argmax is spread over the classes. With `bn=False` the same BN is
    folded into the convolutions, so both variants compute the same function.
    """
    rng = np.random.default_rng(seed)
    net_param = icnet_net(*OFFICIAL_INPUT_SIZE, bn=True)  # parameter shapes do not depend on the input size
    channels = _channels(net_param)
    weights: dict[str, list[np.ndarray]] = {}
    for layer in net_param.layer:
        if layer.type == "Scale":  # data_sub1: identity scale of the image
            weights[layer.name] = [np.ones(channels[layer.bottom[0]], dtype=np.float32)]
            continue
        if layer.type != "Convolution":
            continue
        conv = layer.convolution_param
        in_channels, out_channels, kernel = channels[layer.bottom[0]], conv.num_output, conv.kernel_size[0]
        fan_in = in_channels * kernel * kernel
        weight = rng.standard_normal((out_channels, in_channels, kernel, kernel)) * np.sqrt(2.0 / fan_in)
        if layer.name == "conv6_cls":
            bias = rng.normal(0.0, 0.3, out_channels)
            # ReLU features are all positive: zero-mean weights keep their common level out of the logits
            weight -= weight.mean(axis=1, keepdims=True)
            weights[layer.name] = [weight.astype(np.float32) * 4, bias.astype(np.float32)]
            continue
        input_scale = INPUT_RMS if layer.bottom[0].startswith("data") else 1.0
        damping = 0.6 if layer.name.endswith(("_1x1_increase", "_1x1_proj")) or layer.name.startswith("conv_sub") else 1.0
        slope = rng.uniform(0.8, 1.2, out_channels) * damping
        shift = rng.normal(0.0, 0.1, out_channels)
        mean = rng.normal(0.0, 0.05, out_channels) * input_scale
        variance = rng.uniform(0.8, 1.25, out_channels) * (2.0 * input_scale**2)
        stats = [slope, shift, mean, variance]
        if bn:
            weights[layer.name] = [weight.astype(np.float32)]
            weights[f"{layer.name}/bn"] = [s.astype(np.float32).reshape(1, -1, 1, 1) for s in stats]
        else:
            factor = slope / np.sqrt(variance + BN_EPS)
            folded_bias = shift - mean * factor
            weights[layer.name] = [(weight * factor[:, None, None, None]).astype(np.float32),
                                   folded_bias.astype(np.float32)]
    return weights


def write_untrained_caffemodel(path: str | os.PathLike, bn: bool = False, seed: int = 0) -> Path:
    """Write `untrained_weights` as a real .caffemodel (definition at 1025x2049, as the official files)."""
    path = Path(path)
    net_param = icnet_net(*OFFICIAL_INPUT_SIZE, bn=bn)
    net_param.name = "ICNet_untrained_demo"
    write_atomic(path, with_blobs(net_param, untrained_weights(bn, seed)).SerializeToString())
    return path


def untrained_model(input_size: tuple[int, int] = OFFICIAL_INPUT_SIZE, bn: bool = False,
                    seed: int = 0) -> LoadedModel:
    """The untrained net in memory (for timing without weights)."""
    net, net_param, source = generated_net(*input_size, untrained_weights(bn, seed), bn)
    return LoadedModel(net, input_size, None, None, None, f"{source}, untrained random weights (seed {seed})",
                       _definition_md5(net_param))
