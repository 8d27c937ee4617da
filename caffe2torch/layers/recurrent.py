"""Converters for BVLC's recurrent layers (LSTM, RNN, LSTMUnit) and the sequence layers of the OCR and
text-detection forks (CTPN's Lstm, Reverse, Transpose; jolibrain's ContinuationIndicator)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from caffe2torch.layers.convolution import fit_blob
from caffe2torch.layers.registry import (Converted, Shape, assign, converter, expect_blobs, expect_bottoms,
                                         layer_error, on_meta)
from caffe2torch.recurrent import CaffeLSTM, CaffeRNN, ContinuationIndicator, ForkLstm, LSTMUnit, Reverse, Transpose


def _recurrent_layout(layer, inputs: Sequence[Shape]) -> tuple[int, int, int, int, bool]:
    """RecurrentLayer::LayerSetUp's checks: (T, N, input size, static input size or 0, expose_hidden)."""
    recurrent_blobs = 2 if layer.type == "LSTM" else 1  # h_0 (and c_0) with expose_hidden
    expose = bool(layer.recurrent_param.expose_hidden)
    exposed = recurrent_blobs if expose else 0
    expect_bottoms(layer, inputs, 2 + exposed, 3 + exposed)
    x, cont = tuple(inputs[0]), tuple(inputs[1])
    if len(x) < 3:  # the InnerProduct of the unrolled net works on axis 2
        raise layer_error(layer, f"bottom 0 must have at least 3 axes (T, N, ...), has shape {x}")
    steps, batch = x[:2]
    if cont != (steps, batch):
        raise layer_error(layer, f"bottom 1 (cont) must have shape ({steps}, {batch}) (T, N), has shape {cont}")
    static = 0
    if len(inputs) > 2 + exposed:
        shape = tuple(inputs[2])
        if len(shape) < 2 or shape[0] != batch:
            raise layer_error(layer, f"bottom 2 (the static input) must have shape ({batch}, ...), has shape {shape}")
        static = math.prod(shape[1:])
    hidden = int(layer.recurrent_param.num_output)
    if hidden <= 0:
        raise layer_error(layer, "num_output must be positive")
    for index in range(2 + bool(static), len(inputs)):
        if tuple(inputs[index]) != (1, batch, hidden):  # RecurrentLayer::Reshape's check of the hidden state
            raise layer_error(layer, f"bottom {index} (an exposed hidden state) must have shape (1, {batch}, "
                              f"{hidden}), has shape {tuple(inputs[index])}")
    return steps, batch, math.prod(x[2:]), static, expose


def recurrent_blob_shapes(layer, inputs: Sequence[Shape]) -> list[Shape]:
    """The blobs each recurrent type owns, in Caffe's order, for bottoms of `inputs` (fill.py's placeholders)."""
    if layer.type == "Lstm":
        hidden = int(layer.lstm_param.num_output)
        size = math.prod(inputs[0][2:]) if inputs else 0
        return [(4 * hidden, size), (4 * hidden, hidden), (4 * hidden,)]
    _, _, size, static, _ = _recurrent_layout(layer, inputs)
    hidden = int(layer.recurrent_param.num_output)
    if layer.type == "LSTM":
        return [(4 * hidden, size), (4 * hidden,)] + [(4 * hidden, static)] * bool(static) + [(4 * hidden, hidden)]
    return ([(hidden, size), (hidden,)] + [(hidden, static)] * bool(static) +
            [(hidden, hidden), (hidden, hidden), (hidden,)])


@converter("LSTM", "RNN")
def convert_recurrent(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """BVLC's unrolled LSTM / RNN (recurrent_layer.cpp, lstm_layer.cpp, rnn_layer.cpp): time-major bottoms
    x [T, N, ...] and cont [T, N], an optional static input, expose_hidden's state bottoms and tops."""
    steps, batch, size, static, expose = _recurrent_layout(layer, inputs)
    hidden = int(layer.recurrent_param.num_output)
    wanted = recurrent_blob_shapes(layer, inputs)
    expect_blobs(layer, blobs, len(wanted))
    names = ["W_xc", "b_c"] + ["W_xc_static"] * bool(static) + ["W_hc"] if layer.type == "LSTM" else \
        ["W_xh", "b_h"] + ["W_xh_static"] * bool(static) + ["W_hh", "W_ho", "b_o"]
    tensors = [fit_blob(layer, f"blob {index} ({name})", blob, shape)
               for index, (name, blob, shape) in enumerate(zip(names, blobs, wanted))]
    if static:
        static_weight = tensors.pop(2)
    if layer.type == "LSTM":
        module = on_meta(CaffeLSTM, size, hidden, steps, static, expose, layer.name)
        assign(module, weight_xc=tensors[0], bias_c=tensors[1], weight_hc=tensors[2],
               **({"weight_xc_static": static_weight} if static else {}))
        tops = [(steps, batch, hidden)] + [(1, batch, hidden)] * (2 if expose else 0)
    else:
        module = on_meta(CaffeRNN, size, hidden, steps, static, expose, layer.name)
        assign(module, weight_xh=tensors[0], bias_h=tensors[1], weight_hh=tensors[2], weight_ho=tensors[3],
               bias_o=tensors[4], **({"weight_xh_static": static_weight} if static else {}))
        tops = [(steps, batch, hidden)] + [(1, batch, hidden)] * (1 if expose else 0)
    if len(layer.top) != len(tops):
        raise layer_error(layer, f"has {len(layer.top)} tops; it makes {len(tops)} (the output"
                          f"{' and the last hidden state' + ('s' if layer.type == 'LSTM' else '') if expose else ''})")
    return Converted(module, tops)


@converter("LSTMUnit")
def convert_lstm_unit(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """One LSTM step (lstm_unit_layer.cpp): bottoms c_prev [1, N, H], gates [1, N, 4H], cont [1, N]; tops c, h."""
    expect_bottoms(layer, inputs, 3)
    expect_blobs(layer, blobs, 0)
    c_prev, gates, cont = (tuple(shape) for shape in inputs)
    if len(c_prev) != 3 or c_prev[0] != 1:
        raise layer_error(layer, f"bottom 0 (c_prev) must have shape (1, N, H), has shape {c_prev}")
    batch, hidden = c_prev[1:]
    if gates != (1, batch, 4 * hidden):
        raise layer_error(layer, f"bottom 1 (the gates) must have shape (1, {batch}, {4 * hidden}), has shape {gates}")
    if cont != (1, batch):
        raise layer_error(layer, f"bottom 2 (cont) must have shape (1, {batch}), has shape {cont}")
    if len(layer.top) != 2:
        raise layer_error(layer, f"has {len(layer.top)} tops; it makes 2 (c and h)")
    return Converted(LSTMUnit(), [c_prev, c_prev])


@converter("Lstm")
def convert_fork_lstm(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """CTPN's (junhyukoh/caffe-lstm's) Lstm: x [T, N, ...] (and an optional clip) to h [T, N, num_output]."""
    expect_bottoms(layer, inputs, 1, 2)
    x = tuple(inputs[0])
    if len(x) < 2:
        raise layer_error(layer, f"bottom 0 must have at least 2 axes (T, N, ...), has shape {x}")
    hidden = int(layer.lstm_param.num_output)
    if hidden <= 0:
        raise layer_error(layer, "lstm_param.num_output must be positive")
    if len(inputs) == 2:
        clip = tuple(inputs[1])
        # The fork CHECKs num() == count() and reads stream n of step t at clip[t + n]: a vector of T values,
        # meaningful for one stream only.
        if math.prod(clip) != clip[0] or clip[0] != x[0] or x[1] != 1:
            raise layer_error(layer, f"the clip bottom (shape {clip}) must hold one value per time step of a single "
                              f"stream ({x[0]} for a bottom 0 of shape {x}): the fork reads clip[t + n]")
    shapes = recurrent_blob_shapes(layer, inputs)
    expect_blobs(layer, blobs, 3)
    weight_i, weight_h, bias = (fit_blob(layer, f"blob {index}", blob, shape)
                                for index, (blob, shape) in enumerate(zip(blobs, shapes)))
    module = assign(on_meta(ForkLstm, shapes[0][1], hidden), weight_i=weight_i, weight_h=weight_h, bias=bias)
    return Converted(module, [(x[0], x[1], hidden)])


@converter("Reverse")
def convert_reverse(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """One axis in reverse order (CTPN's reverse_layer.cpp, BVLC's ctc branch)."""
    expect_bottoms(layer, inputs, 1)
    expect_blobs(layer, blobs, 0)
    shape = tuple(inputs[0])
    axis = int(layer.reverse_param.axis)
    if not 0 <= axis < len(shape):  # CHECK_GE(axis, 0), CHECK_LT(axis, num_axes)
        raise layer_error(layer, f"axis {axis} must be in [0, {len(shape)}) for a bottom of shape {shape}")
    if layer.bottom and layer.top and layer.bottom[0] == layer.top[0]:
        raise layer_error(layer, "does not work in place (the fork refuses it)")
    return Converted(Reverse(axis), [shape])


@converter("Transpose")
def convert_transpose(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """CTPN's Transpose: top axis i is bottom axis dim[i]."""
    expect_bottoms(layer, inputs, 1)
    expect_blobs(layer, blobs, 0)
    shape = tuple(inputs[0])
    order = [int(d) for d in layer.transpose_param.dim]
    if len(order) != len(shape):
        raise layer_error(layer, f"transpose_param gives {len(order)} dims for a bottom of {len(shape)} axes {shape}")
    if sorted(order) != list(range(len(shape))):  # unchecked by the fork, whose copy would then mix up values
        raise layer_error(layer, f"transpose_param's dims {order} are not an order of the axes 0..{len(shape) - 1}")
    if layer.bottom and layer.top and layer.bottom[0] == layer.top[0]:
        raise layer_error(layer, "does not work in place (the fork refuses it)")
    return Converted(Transpose(tuple(order)), [tuple(shape[d] for d in order)])


@converter("ContinuationIndicator")
def convert_continuation_indicator(layer, inputs: Sequence[Shape], blobs: Sequence[np.ndarray]) -> Converted:
    """jolibrain's cont markers [time_step, N]: 0 at the first step, 1 after; N from bottom 0's `axis` (or, in
    the layer's first version without a bottom, batch_size)."""
    expect_bottoms(layer, inputs, 0, 1)
    expect_blobs(layer, blobs, 0)
    param = layer.continuation_indicator_param
    if param.time_step <= 0:
        raise layer_error(layer, "time_step must be positive")
    if inputs:
        shape = tuple(inputs[0])
        if not 0 <= param.axis < len(shape):
            raise layer_error(layer, f"axis {param.axis} is not an axis of bottom 0 {shape}")
        module, batch = ContinuationIndicator(param.time_step, param.axis), shape[param.axis]
    else:
        if param.batch_size <= 0:
            raise layer_error(layer, "needs batch_size (or a bottom to take the batch size from)")
        module, batch = ContinuationIndicator(param.time_step, batch=param.batch_size), param.batch_size
    return Converted(module, [(int(param.time_step), int(batch))])
