"""Torch modules for Caffe's recurrent layers and the sequence layers of the OCR and text-detection forks.

BVLC Caffe (src/caffe/layers/recurrent_layer.cpp, lstm_layer.cpp, lstm_unit_layer.cpp, rnn_layer.cpp): `LSTM`,
`RNN` and `LSTMUnit`, time-major (T x N x ...), with the `cont` sequence markers, an optional static input and
expose_hidden. CTPN's caffe (tianzhi0549/CTPN, junhyukoh/caffe-lstm's layer, also in senlinuc/caffe_ocr): `Lstm`,
`Reverse` and `Transpose`; BVLC's ctc branch has the same `Reverse`.

The same contract as caffe2torch.modules (torch, math and caffe2torch.modules only, so a standalone `model.py`
embeds them; `extra_repr` is the constructor's keyword arguments). The time loops run in Python over torch ops in
Caffe's order of float operations, so they train (autograd) and trace; an export unrolls them for the converted
sequence length. Caffe's nonlinearities come from libm in double (`1. / (1. + exp(-x))` with a float argument
calls the double exp) and are rounded to float once: they are evaluated in float64 here and rounded once too.

What none of these keep: Caffe's recurrent layers carry the last hidden state of one forward into the next (BVLC's
without expose_hidden, where it only matters where cont_0 is 1; CTPN's Lstm with its clip bottom). A converted net
is a function of its inputs: every call starts from zeros, as Caffe's first call does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from caffe2torch.errors import InputSizeError
from caffe2torch.modules import _concrete, _kwargs, _wide, dims


def caffe_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """LSTMUnit's sigmoid: 1. / (1. + exp(-x)) in double, rounded to x's dtype once."""
    return _wide(torch.sigmoid, x)


def caffe_tanh_by_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """LSTMUnit's tanh: 2. * sigmoid(2. * x) - 1. The argument 2. * x is a double, so the template's sigmoid is
    sigmoid<double>: the whole expression is computed in double and rounded to x's dtype once (near 0 a float
    sigmoid would lose the value: tanh(1e-9) is 1e-9, not 0)."""
    return _wide(lambda wide: 2.0 * torch.sigmoid(2.0 * wide) - 1.0, x)


def _check_steps(x: torch.Tensor, steps: int, kind: str, layer: str = "") -> None:
    (length,) = dims(x, 0)
    if _concrete(length) and length != steps:  # RecurrentLayer::Reshape's CHECK_EQ
        where = f"layer {layer!r} ({kind})" if layer else kind
        raise InputSizeError(f"{where}: the input has {length} time steps; the net was converted for {steps} "
                             f"(Caffe's recurrent layers keep the number of time steps of their setup)")


@torch.fx.wrap
def caffe_lstm(x: torch.Tensor, cont: torch.Tensor, x_static: torch.Tensor | None, h: torch.Tensor | None,
               c: torch.Tensor | None, weight_xc: torch.Tensor, bias_c: torch.Tensor,
               weight_xc_static: torch.Tensor | None, weight_hc: torch.Tensor, steps: int, layer: str = ""):
    """BVLC's unrolled LSTM net (see CaffeLSTM): (h [T, N, H], h_T [1, N, H], c_T [1, N, H])."""
    _check_steps(x, steps, "LSTM", layer)
    (batch,) = dims(x, 1)
    hidden = weight_hc.shape[1]
    gates_x = F.linear(x.flatten(2), weight_xc, bias_c)  # x_transform: W_xc x + b_c, all time steps at once
    static = F.linear(x_static.flatten(1), weight_xc_static) if x_static is not None else None
    h = x.new_zeros(batch, hidden) if h is None else h.reshape(batch, hidden)
    c = x.new_zeros(batch, hidden) if c is None else c.reshape(batch, hidden)
    outputs = []
    for t in range(steps):
        marker = cont[t].reshape(batch, 1).to(x.dtype)
        gate = F.linear(h * marker, weight_hc) + gates_x[t]  # Eltwise SUM: W_hc h_conted, then W_xc x_t + b_c
        if static is not None:
            gate = gate + static
        i, f, o, g = gate.split(hidden, dim=1)  # Caffe's gate order
        forget = torch.where(marker == 0, torch.zeros_like(f), marker * caffe_sigmoid(f))
        c = forget * c + caffe_sigmoid(i) * caffe_tanh_by_sigmoid(g)
        h = caffe_sigmoid(o) * caffe_tanh_by_sigmoid(c)
        outputs.append(h)
    return torch.stack(outputs), h.unsqueeze(0), c.unsqueeze(0)


class CaffeLSTM(nn.Module):
    """BVLC's LSTM (lstm_layer.cpp's unrolled net, lstm_unit_layer.cpp's cell): bottoms x [T, N, ...], cont [T, N],
    optionally x_static [N, ...], with expose_hidden h_0 and c_0 [1, N, H]; tops h [T, N, H] (and h_T, c_T).

    At each step: h_conted = cont_t * h_{t-1}; gates = W_hc h_conted + (W_xc x_t + b_c) (+ W_xc_static x_static),
    in the gate order i, f, o, g; i, o = sigmoid, f = 0 where cont_t is 0 else cont_t * sigmoid, g = tanh;
    c_t = f c_{t-1} + i g; h_t = o tanh(c_t), tanh being LSTMUnit's 2 sigmoid(2x) - 1. The blobs are W_xc
    [4H, D], b_c [4H], W_xc_static [4H, S] (with a static input) and W_hc [4H, H].
    """

    def __init__(self, input_size: int, hidden: int, steps: int, static_size: int = 0,
                 expose_hidden: bool = False, layer: str = "") -> None:
        super().__init__()
        self.input_size, self.hidden, self.steps = int(input_size), int(hidden), int(steps)
        self.static_size, self.expose_hidden, self.layer = int(static_size), bool(expose_hidden), str(layer)
        self.weight_xc = nn.Parameter(torch.empty(4 * self.hidden, self.input_size))
        self.bias_c = nn.Parameter(torch.empty(4 * self.hidden))
        self.weight_xc_static = nn.Parameter(torch.empty(4 * self.hidden, self.static_size)) \
            if self.static_size else None
        self.weight_hc = nn.Parameter(torch.empty(4 * self.hidden, self.hidden))

    def forward(self, x: torch.Tensor, cont: torch.Tensor, *extra: torch.Tensor):
        x_static = extra[0] if self.static_size else None
        state = extra[1:] if self.static_size else extra
        h0, c0 = state if self.expose_hidden else (None, None)
        h, h_last, c_last = caffe_lstm(x, cont, x_static, h0, c0, self.weight_xc, self.bias_c,
                                       self.weight_xc_static, self.weight_hc, self.steps, self.layer)
        return (h, h_last, c_last) if self.expose_hidden else h

    def extra_repr(self) -> str:
        return _kwargs(input_size=self.input_size, hidden=self.hidden, steps=self.steps,
                       static_size=self.static_size, expose_hidden=self.expose_hidden, layer=self.layer)


@torch.fx.wrap
def caffe_rnn(x: torch.Tensor, cont: torch.Tensor, x_static: torch.Tensor | None, h: torch.Tensor | None,
              weight_xh: torch.Tensor, bias_h: torch.Tensor, weight_xh_static: torch.Tensor | None,
              weight_hh: torch.Tensor, weight_ho: torch.Tensor, bias_o: torch.Tensor, steps: int, layer: str = ""):
    """BVLC's unrolled RNN net (see CaffeRNN): (o [T, N, H], h_T [1, N, H])."""
    _check_steps(x, steps, "RNN", layer)
    (batch,) = dims(x, 1)
    hidden = weight_hh.shape[1]
    inputs = F.linear(x.flatten(2), weight_xh, bias_h)
    static = F.linear(x_static.flatten(1), weight_xh_static) if x_static is not None else None
    h = x.new_zeros(batch, hidden) if h is None else h.reshape(batch, hidden)
    outputs = []
    for t in range(steps):
        marker = cont[t].reshape(batch, 1).to(x.dtype)
        pre = F.linear(h * marker, weight_hh) + inputs[t]
        if static is not None:
            pre = pre + static
        h = _wide(torch.tanh, pre)  # TanHLayer: libm's tanh
        outputs.append(_wide(torch.tanh, F.linear(h, weight_ho, bias_o)))
    return torch.stack(outputs), h.unsqueeze(0)


class CaffeRNN(nn.Module):
    """BVLC's RNN (rnn_layer.cpp's unrolled net): h_t = tanh(W_hh (cont_t h_{t-1}) + (W_xh x_t + b_h)
    (+ W_xh_static x_static)), o_t = tanh(W_ho h_t + b_o); tops o [T, N, num_output] (and with expose_hidden h_T).
    The blobs are W_xh [H, D], b_h [H], W_xh_static [H, S] (with a static input), W_hh [H, H], W_ho [H, H], b_o [H].
    """

    def __init__(self, input_size: int, hidden: int, steps: int, static_size: int = 0,
                 expose_hidden: bool = False, layer: str = "") -> None:
        super().__init__()
        self.input_size, self.hidden, self.steps = int(input_size), int(hidden), int(steps)
        self.static_size, self.expose_hidden, self.layer = int(static_size), bool(expose_hidden), str(layer)
        self.weight_xh = nn.Parameter(torch.empty(self.hidden, self.input_size))
        self.bias_h = nn.Parameter(torch.empty(self.hidden))
        self.weight_xh_static = nn.Parameter(torch.empty(self.hidden, self.static_size)) if self.static_size else None
        self.weight_hh = nn.Parameter(torch.empty(self.hidden, self.hidden))
        self.weight_ho = nn.Parameter(torch.empty(self.hidden, self.hidden))
        self.bias_o = nn.Parameter(torch.empty(self.hidden))

    def forward(self, x: torch.Tensor, cont: torch.Tensor, *extra: torch.Tensor):
        x_static = extra[0] if self.static_size else None
        state = extra[1:] if self.static_size else extra
        h0 = state[0] if self.expose_hidden else None
        o, h_last = caffe_rnn(x, cont, x_static, h0, self.weight_xh, self.bias_h, self.weight_xh_static,
                              self.weight_hh, self.weight_ho, self.bias_o, self.steps, self.layer)
        return (o, h_last) if self.expose_hidden else o

    def extra_repr(self) -> str:
        return _kwargs(input_size=self.input_size, hidden=self.hidden, steps=self.steps,
                       static_size=self.static_size, expose_hidden=self.expose_hidden, layer=self.layer)


class LSTMUnit(nn.Module):
    """BVLC's LSTMUnit (lstm_unit_layer.cpp): bottoms c_prev [1, N, H], gates [1, N, 4H] (i, f, o, g), cont [1, N];
    tops c [1, N, H] and h [1, N, H], as one step of CaffeLSTM."""

    def forward(self, c_prev: torch.Tensor, gates: torch.Tensor, cont: torch.Tensor):
        hidden = c_prev.shape[-1]
        marker = cont.unsqueeze(-1).to(gates.dtype)
        i, f, o, g = gates.split(hidden, dim=-1)
        forget = torch.where(marker == 0, torch.zeros_like(f), marker * caffe_sigmoid(f))
        c = forget * c_prev + caffe_sigmoid(i) * caffe_tanh_by_sigmoid(g)
        return c, caffe_sigmoid(o) * caffe_tanh_by_sigmoid(c)


@torch.fx.wrap
def fork_lstm(x: torch.Tensor, clip: torch.Tensor | None, weight_i: torch.Tensor, weight_h: torch.Tensor,
              bias: torch.Tensor) -> torch.Tensor:
    """CTPN's Lstm (see ForkLstm): h [T, N, H] for whatever T and N x has."""
    steps, batch = dims(x, 0, 1)
    hidden = weight_h.shape[1]
    gates_x = F.linear(x.flatten(2), weight_i, bias)  # pre_gate = x W_i^T, then + bias (a second gemm)
    h = x.new_zeros(batch, hidden)
    c = x.new_zeros(batch, hidden)
    outputs = []
    for t in range(steps):
        if clip is None:  # `cont = t > 0` for every stream
            gate = gates_x[t] + F.linear(h, weight_h) if t > 0 else gates_x[t]
            i, f, o, g = gate.split(hidden, dim=1)
            forget = caffe_sigmoid(f) if t > 0 else torch.zeros_like(f)
        else:  # `const bool cont = clip_t[n]`: the recurrent term and f only where it is non-zero
            cont = clip[t].reshape(batch, 1) != 0
            gate = torch.where(cont, gates_x[t] + F.linear(h, weight_h), gates_x[t])
            i, f, o, g = gate.split(hidden, dim=1)
            forget = torch.where(cont, caffe_sigmoid(f), torch.zeros_like(f))
        c = forget * c + caffe_sigmoid(i) * _wide(torch.tanh, g)
        h = caffe_sigmoid(o) * _wide(torch.tanh, c)
        outputs.append(h)
    return torch.stack(outputs)


class ForkLstm(nn.Module):
    """CTPN's Lstm (junhyukoh/caffe-lstm's lstm_layer.cpp/.cu): bottom x [T, N, ...] (and an optional clip [T, N]),
    top h [T, N, H]; blobs W_i [4H, D], W_h [4H, H], bias [4H]; gate order i, f, o, g.

    pre_gate = W_i x_t + b, plus W_h h_{t-1} where the stream continues (t > 0, or clip_t[n] non-zero); f is 0
    where it does not; c_t = f c_{t-1} + i g, h_t = o tanh(c_t), with libm's tanh as the CPU code. Each stream adds
    its own recurrent term, as the GPU kernel (ClipAdd) computes; the CPU loop adds stream 0's to every stream (it
    never advances its h_to_gate pointer), which differs only when N > 1 (CTPN's rows) and is not reproduced.
    Unlike BVLC's LSTM the number of time steps may change from call to call (its Reshape takes it from the input).
    """

    def __init__(self, input_size: int, hidden: int) -> None:
        super().__init__()
        self.input_size, self.hidden = int(input_size), int(hidden)
        self.weight_i = nn.Parameter(torch.empty(4 * self.hidden, self.input_size))
        self.weight_h = nn.Parameter(torch.empty(4 * self.hidden, self.hidden))
        self.bias = nn.Parameter(torch.empty(4 * self.hidden))

    def forward(self, x: torch.Tensor, clip: torch.Tensor | None = None) -> torch.Tensor:
        return fork_lstm(x, clip, self.weight_i, self.weight_h, self.bias)

    def extra_repr(self) -> str:
        return _kwargs(input_size=self.input_size, hidden=self.hidden)


class Reverse(nn.Module):
    """The Reverse layer of CTPN's fork and of BVLC's ctc branch: the blob with one axis in reverse order."""

    def __init__(self, axis: int = 0) -> None:
        super().__init__()
        self.axis = int(axis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flip(x, [self.axis])

    def extra_repr(self) -> str:
        return _kwargs(axis=self.axis)


class Transpose(nn.Module):
    """CTPN's Transpose: top axis i is bottom axis dims[i] (transpose_layer.cpp's index map), as a copy."""

    def __init__(self, dims: tuple) -> None:
        super().__init__()
        self.dims = tuple(int(d) for d in dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(self.dims).contiguous()

    def extra_repr(self) -> str:
        return _kwargs(dims=self.dims)


class ContinuationIndicator(nn.Module):
    """jolibrain's ContinuationIndicator (continuation_indicator_layer.cpp): the cont markers [time_step, N] of an
    LSTM, 0 at t = 0 and 1 after; N is bottom 0's size along `axis`, or (the layer's first version, no bottom)
    `batch`."""

    def __init__(self, time_step: int, axis: int = 0, batch: int = 0) -> None:
        super().__init__()
        self.time_step, self.axis, self.batch = int(time_step), int(axis), int(batch)
        # Without a bottom, the markers take the net's device and dtype from this empty buffer (net.to() moves it).
        self.register_buffer("like", torch.zeros(0), persistent=False)

    def forward(self, *bottoms: torch.Tensor) -> torch.Tensor:
        return continuation_markers(bottoms[0] if bottoms else self.like, self.time_step, self.axis,
                                    self.batch if not bottoms else 0)

    def extra_repr(self) -> str:
        return _kwargs(time_step=self.time_step, axis=self.axis, batch=self.batch)


@torch.fx.wrap
def continuation_markers(x: torch.Tensor, time_step: int, axis: int, batch: int) -> torch.Tensor:
    """[time_step, N] markers; `batch` > 0: N is `batch` (x only gives the device and dtype)."""
    if batch > 0:
        return torch.cat([x.new_zeros(1, batch), x.new_ones(time_step - 1, batch)])
    (size,) = dims(x, axis)
    first = x.new_zeros(1, size)
    return torch.cat([first, torch.ones_like(first).expand(time_step - 1, size)])
