"""Fold BN / BatchNorm (+ Scale) layers into the convolution before them, in the Caffe definition and blobs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Protocol, Sequence

import numpy as np
from google.protobuf import text_format
from numpy.typing import ArrayLike

from caffe2torch.errors import CaffeError
from caffe2torch.graph import included
from caffe2torch.write import weights_stem, with_blobs
from proto import caffe_pb2

CONV_TYPES = ("Convolution", "Deconvolution")
NORM_TYPES = ("BN", "BatchNorm")


class LayerLike(Protocol):
    """What the chain search needs of a layer: a graph Layer or a model Step both fit."""

    name: str
    type: str
    bottoms: Sequence[str]
    tops: Sequence[str]


# ---------------------------------------------------------------- arithmetic (float64, per channel)

@dataclass
class Affine:
    """A per-channel map applied after the convolution: y = scale * (x - centre) + shift."""

    scale: np.ndarray
    centre: np.ndarray
    shift: np.ndarray


def _f64(values: ArrayLike) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).reshape(-1)


def bn_affine(slope: ArrayLike, bias: ArrayLike, mean: ArrayLike, variance: ArrayLike, eps: float) -> Affine:
    """The fork's BN: slope * (x - mean) / sqrt(variance + eps) + bias."""
    scale = _f64(slope) / np.sqrt(_f64(variance) + float(np.float32(eps)))
    return Affine(scale, _f64(mean), _f64(bias))


def batch_norm_affine(mean_sum: ArrayLike, variance_sum: ArrayLike, scale_factor: ArrayLike, eps: float) -> Affine:
    """Caffe BatchNorm on stored statistics: factor 0 when the stored scale factor is 0 (Caffe's guard)."""
    stored = float(np.asarray(scale_factor, dtype=np.float64).reshape(-1)[0])
    factor = 0.0 if stored == 0 else 1.0 / stored
    scale = 1.0 / np.sqrt(factor * _f64(variance_sum) + float(np.float32(eps)))
    return Affine(scale, factor * _f64(mean_sum), np.zeros_like(scale))


def scale_affine(gamma: ArrayLike, beta: ArrayLike | None = None) -> Affine:
    gamma = _f64(gamma)
    shift = _f64(beta) if beta is not None else np.zeros_like(gamma)
    return Affine(gamma, np.zeros_like(gamma), shift)


def fold_into_conv(layer_type: str, group: int, weight: np.ndarray, bias: np.ndarray | None,
                   stages: Sequence[Affine]) -> tuple[np.ndarray, np.ndarray]:
    """W' = W * a and b' = (b - mean) * a + beta per output channel, stage after stage; float64 then float32."""
    channels = stages[0].scale.size
    total = np.ones(channels)
    shifted = _f64(bias) if bias is not None else np.zeros(channels)
    for stage in stages:
        shifted = (shifted - stage.centre) * stage.scale + stage.shift
        total = total * stage.scale
    weight64 = np.asarray(weight, dtype=np.float64)
    if layer_type == "Deconvolution":
        # Deconvolution weights are [in, out/group, k...]: output channel g*(out/group)+j sits at [g-th in block, j].
        blocks = weight64.reshape((group, weight64.shape[0] // group) + weight64.shape[1:])
        factors = total.reshape((group, 1, weight64.shape[1]) + (1,) * (weight64.ndim - 2))
        folded = (blocks * factors).reshape(weight64.shape)
    else:
        folded = weight64 * total.reshape((-1,) + (1,) * (weight64.ndim - 1))
    return folded.astype(np.float32), shifted.astype(np.float32)


# ---------------------------------------------------------------- which layers fold

def value_readers(layers: Sequence[LayerLike], index: int, blob: str) -> list[int]:
    """Indices of the layers that read the value layer `index` wrote to `blob` (up to its next writer)."""
    readers = []
    for later in range(index + 1, len(layers)):
        if blob in layers[later].bottoms:
            readers.append(later)
        if blob in layers[later].tops:
            break
    return readers


@dataclass
class Chain:
    """A convolution and the norm (+ Scale) layers that fold into it; `top` is what the conv writes afterwards."""

    conv: int
    members: list[int]
    top: str


def find_chains(layers: Sequence[LayerLike], eligible: Callable[[int], bool]) -> list[Chain]:
    """Convolutions whose output only a BN/BatchNorm reads, optionally followed by a Scale that alone reads that.

    `eligible(i)` says whether layer i's parameters allow folding (blobs present, channel axis 1, ...).
    """
    chains = []
    for index, conv in enumerate(layers):
        if conv.type not in CONV_TYPES or len(conv.bottoms) != 1 or len(conv.tops) != 1 or not eligible(index):
            continue
        members: list[int] = []
        current, blob, wanted = index, conv.tops[0], NORM_TYPES
        while wanted:
            readers = value_readers(layers, current, blob)
            if len(readers) != 1:
                break
            candidate = layers[readers[0]]
            if (candidate.type not in wanted or list(candidate.bottoms) != [blob] or len(candidate.tops) != 1
                    or not eligible(readers[0])):
                break
            members.append(readers[0])
            current, blob = readers[0], candidate.tops[0]
            wanted = ("Scale",) if candidate.type in NORM_TYPES else ()
        if not members:
            continue
        top = layers[members[-1]].tops[0]
        if top != conv.tops[0] and _touched_between(layers, index, members, top):
            continue  # writing `top` early would clobber a value some layer in between still uses
        chains.append(Chain(index, members, top))
    return chains


def _touched_between(layers: Sequence[LayerLike], conv: int, members: list[int], blob: str) -> bool:
    for between in range(conv + 1, members[-1]):
        if between not in members and (blob in layers[between].bottoms or blob in layers[between].tops):
            return True
    return False


# ---------------------------------------------------------------- Caffe level

@dataclass
class _Entry:
    name: str
    type: str
    bottoms: list[str]
    tops: list[str]
    param: caffe_pb2.LayerParameter


def _channels_of(blob: np.ndarray) -> int:
    return int(np.asarray(blob).size)


def _eligible_layer(entry: _Entry, blobs: Mapping[str, Sequence[np.ndarray]]) -> bool:
    """Parameters that allow folding; anything unusual is left to the converter, unfolded."""
    param, arrays = entry.param, list(blobs.get(entry.name, []))
    if entry.type in CONV_TYPES:
        conv = param.convolution_param
        shared = any(spec.name for spec in param.param)  # weights shared by name must stay as they are
        # A Deconvolution padded by a negative amount has outputs no kernel reaches: a folded bias would differ there.
        grown = entry.type == "Deconvolution" and min(conv.pad_l, conv.pad_r, conv.pad_t, conv.pad_b) < 0
        # Intel Caffe's fused ReLU or sum would come before the folded norm.
        fused = conv.relu or conv.fusion_type != caffe_pb2.ConvolutionParameter.NONE_FUSION
        return (conv.axis == 1 and not shared and not grown and not fused
                and len(arrays) == 1 + bool(conv.bias_term) and arrays[0].ndim >= 3)
    if entry.type == "BN":
        return len(arrays) == 4 and len({_channels_of(a) for a in arrays}) == 1
    if entry.type == "BatchNorm":
        from caffe2torch.layers.normalization import batch_norm_fork

        norm = param.batch_norm_param
        if norm.HasField("use_global_stats") and not norm.use_global_stats or batch_norm_fork(param) is not None:
            return False  # batch statistics, or a fork's own affine, eps rule or ReLU: left to the converter
        return len(arrays) == 3 and _channels_of(arrays[0]) == _channels_of(arrays[1]) and _channels_of(arrays[2]) == 1
    if entry.type == "Scale":
        scale = param.scale_param
        return (scale.axis == 1 and scale.num_axes == 1 and len(arrays) == 1 + bool(scale.bias_term)
                and len({_channels_of(a) for a in arrays}) == 1)
    return False


def layer_affine(layer_type: str, param: caffe_pb2.LayerParameter, arrays: Sequence[np.ndarray]) -> Affine:
    if layer_type == "BN":
        slope, bias, mean, variance = arrays
        return bn_affine(slope, bias, mean, variance, param.bn_param.eps)
    if layer_type == "BatchNorm":
        return batch_norm_affine(arrays[0], arrays[1], arrays[2], param.batch_norm_param.eps)
    return scale_affine(arrays[0], arrays[1] if len(arrays) > 1 else None)


def _conv_output_channels(entry: _Entry, weight: np.ndarray) -> int:
    if entry.type == "Deconvolution":
        return weight.shape[1] * max(int(entry.param.convolution_param.group), 1)
    return weight.shape[0]


def fold_net(definition: caffe_pb2.NetParameter, blobs: Mapping[str, Sequence[np.ndarray]]
             ) -> tuple[caffe_pb2.NetParameter, dict[str, list[np.ndarray]], dict[str, str]]:
    """The TEST net with every foldable norm chain folded away.

    Returns the new definition, the blobs by layer name (folded convolutions get new weights
    and a bias; removed layers lose theirs) and `folded`: removed layer name -> its convolution.
    """
    state = caffe_pb2.NetState()
    state.CopyFrom(definition.state)
    state.phase = caffe_pb2.TEST
    entries = [_Entry(layer.name, layer.type, list(layer.bottom), list(layer.top), layer)
               for layer in definition.layer if included(layer, state)]
    eligible = [_eligible_layer(entry, blobs) for entry in entries]
    chains = find_chains(entries, lambda i: eligible[i])

    new_blobs = {name: list(arrays) for name, arrays in blobs.items()}
    folded: dict[str, str] = {}
    removed: set[int] = set()
    renamed: dict[int, str] = {}
    for chain in chains:
        conv = entries[chain.conv]
        weight, *rest = new_blobs[conv.name]
        channels = _conv_output_channels(conv, weight)
        stages = []
        for member in chain.members:
            entry = entries[member]
            stage = layer_affine(entry.type, entry.param, new_blobs[entry.name])
            if stage.scale.size != channels:
                raise CaffeError(f"layer {entry.name!r} ({entry.type}): its blobs have {stage.scale.size} "
                                 f"channels, convolution {conv.name!r} makes {channels}")
            stages.append(stage)
        group = int(conv.param.convolution_param.group) or 1
        new_blobs[conv.name] = list(fold_into_conv(conv.type, group, weight, rest[0] if rest else None, stages))
        for member in chain.members:
            folded[entries[member].name] = conv.name
            removed.add(member)
            new_blobs.pop(entries[member].name, None)
        renamed[chain.conv] = chain.top

    result = caffe_pb2.NetParameter()
    result.CopyFrom(definition)
    del result.layer[:]
    for index, entry in enumerate(entries):
        if index in removed:
            continue
        layer = result.layer.add()
        layer.CopyFrom(entry.param)
        del layer.blobs[:]
        if index in renamed:
            layer.top[0] = renamed[index]
            layer.convolution_param.bias_term = True
    return result, new_blobs, folded


# ---------------------------------------------------------------- files

def fold_files(model: str | os.PathLike, prototxt: str | os.PathLike | None, output_dir: str | os.PathLike,
               verify_md5: bool = True, on_warning: Callable[[str], None] | None = None,
               input_shape=None, force: bool = False, allow_unknown_fields: bool = False) -> list[str]:
    """Fold MODEL's norm layers into OUTPUT: a converted folder of the folded net that also holds
    <stem>_folded.prototxt and <stem>_folded.caffemodel; returns report lines."""
    from caffe2torch.conversion import convert
    from caffe2torch.folder import check_target, save_net
    from caffe2torch.model import from_net_parameter
    from caffe2torch.protect import ReadFiles

    model, output_dir = Path(model), Path(output_dir)
    check_target(output_dir.absolute(), force, ReadFiles([(model, "the model being folded"),
                                                          (prototxt, "the net definition being used")]))
    conversion = convert(model, prototxt, input_shape, verify_md5=verify_md5, on_warning=on_warning,
                         allow_unknown_fields=allow_unknown_fields)
    definition, blobs, folded = fold_net(conversion.definition, conversion.trained)
    source = f"{conversion.prototxt_path or model} (folded)"
    info = conversion.net.meta["caffe"]
    # The folded net repeats the original's warnings, which were shown already.
    net = from_net_parameter(definition, blobs, source, info.inputs, on_warning=lambda _: None)

    stem = weights_stem(model)
    prototxt_name, caffemodel_name = f"{stem}_folded.prototxt", f"{stem}_folded.caffemodel"
    extra = {prototxt_name: text_format.MessageToString(definition).encode(),
             caffemodel_name: with_blobs(definition, blobs).SerializeToString()}
    meta = {"source": model.name, "md5": conversion.md5, "folded": folded,
            "prototxt": str(conversion.prototxt_path) if conversion.prototxt_path else "(stored in the caffemodel)",
            "release": conversion.release.name if conversion.release else None}
    save_net(net, output_dir, meta, force=force, extra=extra, read=conversion.read_files())

    kinds: dict[str, int] = {}
    types = {layer.name: layer.type for layer in conversion.definition.layer}
    for name in folded:
        kinds[types[name]] = kinds.get(types[name], 0) + 1
    detail = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))
    lines = [f"folded {len(folded)} layers ({detail or 'none'}) into {len(set(folded.values()))} convolutions"]
    kept = [layer.name for layer in definition.layer if layer.type in NORM_TYPES]
    if kept:
        lines.append(f"left {len(kept)} norm layers unfolded (output shared, no convolution before them, "
                     f"or unusual parameters): {', '.join(kept[:10])}{' ...' if len(kept) > 10 else ''}")
    lines += [f"wrote {output_dir / prototxt_name}", f"wrote {output_dir / caffemodel_name}",
              f"wrote {output_dir}/  (load the folded net with: net = caffe2torch.load({str(output_dir)!r}))"]
    return lines
