"""Fields our schema does not know (a fork's): which are known not to change the float forward, and the rule for
the rest.

A field the schema lacks is skipped by the readers (`read.UnknownField`). On a layer the net keeps (or on the net
itself) it may change what Caffe computes, so `check_unknown` stops the conversion with one line naming it, unless
it is on the documented list below, or the caller allows unknown fields (`--allow-unknown-fields`,
`allow_unknown_fields=True`): then each is a warning and the net is built without it. Layers a conversion leaves
out (data, loss, accuracy) are not looked at.
"""

from __future__ import annotations

from typing import Callable, Iterable

from caffe2torch.errors import UnknownFieldError, term
from caffe2torch.read import UnknownField
from proto import caffe_pb2

FILLER = "a filler only initialises a blob, which the trained weights replace"
ENGINE = "it picks an implementation (cuDNN, MKL, MKL-DNN, a convolution algorithm), not what the layer computes"
PRECISION = ("NVCaffe's storage and math precision (its float16 modes); the converted net computes in float32, as "
             "its FLOAT setting does (net.half() for half precision)")
TRAINING = ("training only (gradient scaling, random seeds, memory sharing, multi-node "
            "settings)")
INTEL_QUANTISATION = ("Intel Caffe's int8 calibration (scales, bit widths), read only by its int8 MKL-DNN path; its "
                      "float forward ignores it")
SYNOPSYS_IDENTITY = "synopsys-caffe's quantisation at its identity value, with which its forward is the float one"
INERT = "declared in NVCaffe's caffe.proto (caffe-0.17) but read by none of its layers"

# By the unknown field's own name (the last part of its path), wherever it sits.
_BY_NAME = {
    **dict.fromkeys(("engine", "conv_algorithm", "cudnn_convolution_algo_seeker", "conv_algos_override",
                     "cudnn_math_override", "default_conv_algos_override", "default_cudnn_math_override"), ENGINE),
    **dict.fromkeys(("forward_type", "backward_type", "forward_math", "backward_math", "default_forward_type",
                     "default_backward_type", "default_forward_math", "default_backward_math"), PRECISION),
    **dict.fromkeys(("global_grad_scale", "global_grad_scale_adaptive", "reduce_buckets", "eltwise_mem_sharing",
                     "debug", "random_seed", "multinode",
                     "mn_activation_param", "mn_grad_compress_param", "compile_net_state"), TRAINING),
    "quantization_param": INTEL_QUANTISATION,
}
# By the whole path, harmless only at the values given (None: any value). NVCaffe declares torch_pooling and reads it
# nowhere, but it came from Facebook's Caffe, where true means torch's floor rounding of the pooled size: a prototxt
# that sets it true may have been written for that.
_BY_PATH = {"pooling_param.torch_pooling": (INERT, {"false", "False", "f", "0"})}  # the text format's falses
# Intel Caffe's BatchNorm statistics over sub-batches of this size (mkldnn_batch_norm_layer.cpp): they change the
# forward where the layer normalises by its batch (use_global_stats: false), not where it uses the stored ones.
SUB_BATCHES = ("bn_stats_batch_size", "stats_batch_size")
STORED_STATISTICS = "Intel Caffe's statistics over sub-batches, unused where BatchNorm uses its stored statistics"
# synopsys-caffe's quantisation fields: harmless only at the value with which its forward is the float one
# (conv_layer.cpp and the others scale and shift only when a scale differs from 1 or a zero point from 0).
_SYNOPSYS_IDENTITY = {
    **dict.fromkeys(("input_scale", "output_scale", "weight_scale", "bias_scale"), {"1", "1.0"}),
    **dict.fromkeys(("input_zero_point", "output_zero_point", "weight_zero_point", "bias_zero_point"), {"0"}),
    "saturate": {"None"},
    "quantize_method": None,  # which rounding a quantised forward uses: none happens at the identity values
}
# A binary's fields by number, at the layer's level: NVCaffe's forward_type, backward_type, forward_math,
# backward_math (145-148), debug (149) and cudnn_math_override (150) are varints where this schema has PSPNet's
# messages, so they arrive as unknown numbers.
_BINARY_LAYER = {f"#{number}": PRECISION for number in range(145, 151)}


def harmless_reason(item: UnknownField, batch_statistics: frozenset[str] = frozenset()) -> str | None:
    """Why the field cannot change the float forward, or None when it may. `batch_statistics`: the BatchNorm
    layers that normalise by their batch (use_global_stats: false)."""
    name = item.field.rsplit(".", 1)[-1]
    if name in SUB_BATCHES:  # on a BatchNorm, or for all of them on the net
        uses_batch = item.layer in batch_statistics if item.layer is not None else bool(batch_statistics)
        return None if uses_batch else STORED_STATISTICS
    if name.startswith("#"):
        return _BINARY_LAYER.get(item.field) if item.layer is not None else None
    if name == "filler" or name.endswith("_filler"):
        return FILLER
    if item.field in _BY_PATH:
        reason, values = _BY_PATH[item.field]
        return reason if values is None or item.value in values else None
    if name in _SYNOPSYS_IDENTITY:
        wanted = _SYNOPSYS_IDENTITY[name]
        return SYNOPSYS_IDENTITY if wanted is None or item.value in wanted else None
    return _BY_NAME.get(name)


def _changing(item: UnknownField) -> str:
    return f"{item.where}: {item.what} is unknown to our Caffe schema and may change what the layer computes"


def batch_statistics_layers(net: caffe_pb2.NetParameter) -> frozenset[str]:
    """The BatchNorm layers that normalise by their batch at test time (use_global_stats: false, which Caffe's
    default for the TEST phase, true, is not)."""
    return frozenset(layer.name or "(unnamed)" for layer in net.layer if layer.type == "BatchNorm"
                     and layer.batch_norm_param.HasField("use_global_stats")
                     and not layer.batch_norm_param.use_global_stats)


def check_unknown(unknown: Iterable[UnknownField], kept: set[str], allow: bool, warn: Callable[[str], None],
                  batch_statistics: frozenset[str] = frozenset()) -> None:
    """Apply the rule to the fields the readers skipped: harmless ones and (with `allow`) the others are warnings;
    without `allow`, a field that may change the forward is an error naming it (the others are warned first).
    `batch_statistics`: batch_statistics_layers of the net."""
    relevant = [item for item in unknown if item.layer is None or item.layer in kept]
    changing = []
    for item in relevant:
        reason = harmless_reason(item, batch_statistics & kept)
        if reason is None:
            changing.append(item)
        else:
            warn(f"{item.where}: {item.what} is unknown to our Caffe schema; ignored: {reason}")
    if not changing:
        return
    if allow:
        for item in changing:
            flag = term("--allow-unknown-fields", "allow_unknown_fields=True")
            warn(f"{_changing(item)}; skipped (without {flag}, convert stops here)")
        return
    for item in changing[1:]:
        warn(_changing(item))
    more = f" ({len(changing) - 1} more such fields above)" if len(changing) > 1 else ""
    raise UnknownFieldError(f"{_changing(changing[0])}, so the converted net could differ from Caffe's{more}",
                            f"convert anyway with {term('--allow-unknown-fields', 'allow_unknown_fields=True')}, or "
                            "remove the field if the net computes the same without it")
