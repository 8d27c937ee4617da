"""BVLC's LSTM / RNN / LSTMUnit and CTPN's Lstm / Reverse / Transpose against loops of the forks' C++ forward.

The references walk the unrolled nets of lstm_layer.cpp and rnn_layer.cpp layer by layer (InnerProduct, Scale by
cont, Eltwise SUM in bottom order, LSTMUnit's per-element loop, TanH) and CTPN's lstm_layer (pre-gate gemm plus
bias, the recurrent term where the stream continues, the per-element cell), in float32 with the nonlinearities
in double and rounded once, as libm's double exp / tanh on a float argument are.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from caffe2torch.errors import CaffeError, InputSizeError
from caffe2torch.layers import convert_layer
from tests.conftest import layer_from_text, load_standalone, random_net, run_layer

F = np.float32


def sigmoid(x) -> np.float32:
    return F(1.0 / (1.0 + math.exp(-float(x))))


def tanh_by_sigmoid(x) -> np.float32:
    """lstm_unit_layer.cpp's tanh<float>: 2. * sigmoid(2. * x) - 1., where 2. * x is a double, so sigmoid<double>
    and the rest run in double; one rounding to float at the return."""
    return F(2.0 * (1.0 / (1.0 + math.exp(-2.0 * float(x)))) - 1.0)


def inner_product(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """InnerProductLayer: gemm (summed in double here, rounded to float), then + bias in float."""
    out = (x.astype(np.float64) @ weight.T.astype(np.float64)).astype(F)
    return out if bias is None else (out + bias).astype(F)


def lstm_unit(c_prev: np.ndarray, gates: np.ndarray, cont: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """LSTMUnitLayer::Forward_cpu: per stream n and unit d, gates (i, f, o, g)."""
    num, hidden = c_prev.shape
    c, h = np.empty_like(c_prev), np.empty_like(c_prev)
    for n in range(num):
        for d in range(hidden):
            i = sigmoid(gates[n, d])
            f = F(0) if cont[n] == 0 else F(cont[n] * sigmoid(gates[n, hidden + d]))
            o = sigmoid(gates[n, 2 * hidden + d])
            g = tanh_by_sigmoid(gates[n, 3 * hidden + d])
            c[n, d] = F(F(f * c_prev[n, d]) + F(i * g))
            h[n, d] = F(o * tanh_by_sigmoid(c[n, d]))
    return c, h


def lstm_reference(x, cont, w_xc, b_c, w_hc, static=None, w_static=None, h0=None, c0=None):
    """lstm_layer.cpp's unrolled net: x_transform, then per step h_conted (Scale), transform_t (InnerProduct),
    gate_input_t (Eltwise SUM of W_hc h, W_xc x + b_c and W_xc_static x_static), unit_t (LSTMUnit)."""
    steps, num = cont.shape
    hidden = w_hc.shape[1]
    w_xc_x = inner_product(x.reshape(steps * num, -1), w_xc, b_c).reshape(steps, num, -1)
    static_term = inner_product(static.reshape(num, -1), w_static) if static is not None else None
    h = np.zeros((num, hidden), F) if h0 is None else h0.reshape(num, hidden)
    c = np.zeros((num, hidden), F) if c0 is None else c0.reshape(num, hidden)
    out = []
    for t in range(steps):
        h_conted = (h * cont[t][:, None]).astype(F)
        gate = (inner_product(h_conted, w_hc) + w_xc_x[t]).astype(F)
        if static_term is not None:
            gate = (gate + static_term).astype(F)
        c, h = lstm_unit(c, gate, cont[t])
        out.append(h)
    return np.stack(out), h[None], c[None]


def rnn_reference(x, cont, w_xh, b_h, w_hh, w_ho, b_o, static=None, w_static=None, h0=None):
    """rnn_layer.cpp's unrolled net: h_t = TanH(W_hh (cont_t h_{t-1}) + W_xh x_t + b_h), o_t = TanH(W_ho h_t + b_o)."""
    steps, num = cont.shape
    hidden = w_hh.shape[1]
    w_xh_x = inner_product(x.reshape(steps * num, -1), w_xh, b_h).reshape(steps, num, -1)
    static_term = inner_product(static.reshape(num, -1), w_static) if static is not None else None
    h = np.zeros((num, hidden), F) if h0 is None else h0.reshape(num, hidden)
    out = []
    for t in range(steps):
        pre = (inner_product((h * cont[t][:, None]).astype(F), w_hh) + w_xh_x[t]).astype(F)
        if static_term is not None:
            pre = (pre + static_term).astype(F)
        h = np.tanh(pre.astype(np.float64)).astype(F)
        out.append(np.tanh(inner_product(h, w_ho, b_o).astype(np.float64)).astype(F))
    return np.stack(out), h[None]


def _cont(steps: int, num: int) -> np.ndarray:
    """Sequence markers with a start at t = 0, a restart of stream 1 at t = 3, and one non-binary value."""
    cont = np.ones((steps, num), F)
    cont[0] = 0
    cont[3, 1] = 0
    cont[2, 0] = 0.5  # Caffe multiplies by cont: a fractional one scales h and f
    return cont


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("expose", [False, True])
def test_lstm_matches_the_unrolled_net(static, expose):
    rng = np.random.default_rng(3)
    steps, num, hidden = 5, 2, 4
    x = rng.normal(0, 1, (steps, num, 3, 2)).astype(F)
    cont = _cont(steps, num)
    blobs = [rng.normal(0, 0.6, (4 * hidden, 6)).astype(F), rng.normal(0, 0.3, 4 * hidden).astype(F)]
    extra, shapes = [], [x.shape, cont.shape]
    if static:
        blobs.append(rng.normal(0, 0.4, (4 * hidden, 7)).astype(F))
        extra.append(rng.normal(0, 1, (num, 7)).astype(F))
    blobs.append(rng.normal(0, 0.6, (4 * hidden, hidden)).astype(F))
    if expose:
        extra += [rng.normal(0, 1, (1, num, hidden)).astype(F), rng.normal(0, 1, (1, num, hidden)).astype(F)]
    shapes += [e.shape for e in extra]
    tops = 'top: "h" top: "hT" top: "cT"' if expose else 'top: "h"'
    layer = layer_from_text(f'name: "lstm" type: "LSTM" {tops} recurrent_param {{ num_output: {hidden} '
                            f'expose_hidden: {str(expose).lower()} }}')
    converted, out = run_layer(layer, shapes, blobs, x, cont, *extra)
    h0, c0 = (extra[-2], extra[-1]) if expose else (None, None)
    expected = lstm_reference(x, cont, blobs[0], blobs[1], blobs[-1], extra[0] if static else None,
                              blobs[2] if static else None, h0, c0)
    outputs = out if expose else (out,)
    assert converted.top_shapes == [(steps, num, hidden)] + [(1, num, hidden)] * (2 * expose)
    for got, want in zip(outputs, expected):
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-7)
    assert (np.abs(outputs[0][0]) > 1e-3).any()  # values, not an all-zero pass


@pytest.mark.parametrize("static", [False, True])
def test_rnn_matches_the_unrolled_net(static):
    rng = np.random.default_rng(4)
    steps, num, hidden = 6, 3, 5
    x = rng.normal(0, 1, (steps, num, 4)).astype(F)
    cont = _cont(steps, num)
    blobs = [rng.normal(0, 0.6, (hidden, 4)).astype(F), rng.normal(0, 0.3, hidden).astype(F)]
    extra = []
    if static:
        blobs.append(rng.normal(0, 0.5, (hidden, 2)).astype(F))
        extra.append(rng.normal(0, 1, (num, 2)).astype(F))
    blobs += [rng.normal(0, 0.6, (hidden, hidden)).astype(F), rng.normal(0, 0.6, (hidden, hidden)).astype(F),
              rng.normal(0, 0.3, hidden).astype(F)]
    layer = layer_from_text(f'name: "rnn" type: "RNN" top: "o" recurrent_param {{ num_output: {hidden} }}')
    converted, out = run_layer(layer, [x.shape, cont.shape] + [e.shape for e in extra], blobs, x, cont, *extra)
    w_hh, w_ho, b_o = blobs[-3:]
    expected, _ = rnn_reference(x, cont, blobs[0], blobs[1], w_hh, w_ho, b_o, extra[0] if static else None,
                                blobs[2] if static else None)
    assert converted.top_shapes == [(steps, num, hidden)]
    np.testing.assert_allclose(out, expected, rtol=2e-6, atol=2e-7)


def test_rnn_exposes_its_last_hidden_state():
    rng = np.random.default_rng(5)
    x, cont = rng.normal(0, 1, (4, 2, 3)).astype(F), np.ones((4, 2), F)
    h0 = rng.normal(0, 1, (1, 2, 3)).astype(F)
    blobs = [rng.normal(0, 0.5, shape).astype(F) for shape in [(3, 3), (3,), (3, 3), (3, 3), (3,)]]
    layer = layer_from_text('name: "rnn" type: "RNN" top: "o" top: "hT" recurrent_param { num_output: 3 '
                            'expose_hidden: true }')
    _, (o, h_last) = run_layer(layer, [x.shape, cont.shape, h0.shape], blobs, x, cont, h0)
    want_o, want_h = rnn_reference(x, cont, *blobs, h0=h0)
    np.testing.assert_allclose(o, want_o, rtol=2e-6, atol=2e-7)
    np.testing.assert_allclose(h_last, want_h, rtol=2e-6, atol=2e-7)


def test_lstm_unit_matches_its_loop():
    rng = np.random.default_rng(6)
    c_prev = rng.normal(0, 2, (1, 3, 4)).astype(F)
    gates = rng.normal(0, 3, (1, 3, 16)).astype(F)
    gates[0, 0, :4] = [1e-9, -40.0, 40.0, 0.0]  # saturation and tiny inputs, where 2 sigmoid(2x) - 1 differs from tanh
    cont = np.array([[1.0, 0.0, 0.25]], F)
    converted, (c, h) = run_layer(layer_from_text('name: "u" type: "LSTMUnit" top: "c" top: "h"'),
                                  [c_prev.shape, gates.shape, cont.shape], [], c_prev, gates, cont)
    want_c, want_h = lstm_unit(c_prev[0], gates[0], cont[0])
    assert converted.top_shapes == [(1, 3, 4), (1, 3, 4)]
    np.testing.assert_array_equal(c[0], want_c)
    np.testing.assert_array_equal(h[0], want_h)


def test_lstm_units_tanh_is_computed_in_double_and_rounded_once():
    """tanh<float>(x) = 2. * sigmoid(2. * x) - 1. calls sigmoid<double> (2. * x is a double): values compiled from
    lstm_unit_layer.cpp's templates with g++; a float sigmoid first would give 0 for 1e-9."""
    from caffe2torch.recurrent import caffe_tanh_by_sigmoid

    got = caffe_tanh_by_sigmoid(torch.tensor([1e-9, 1e-3, 0.3], dtype=torch.float32)).numpy()
    np.testing.assert_array_equal(got, np.array([1.00000008e-09, 0.000999999698, 0.291312635], F))
    gates = np.zeros((1, 1, 4), F)
    gates[0, 0, 3] = 1e-9  # g of a unit with i = sigmoid(0) = 0.5: c = 0.5 tanh(1e-9)
    _, (c, _) = run_layer(layer_from_text('name: "u" type: "LSTMUnit" top: "c" top: "h"'),
                          [(1, 1, 1), gates.shape, (1, 1)], [], np.zeros((1, 1, 1), F), gates, np.ones((1, 1), F))
    assert c.reshape(-1)[0] == F(F(0.5) * F(1.00000008e-09))


def fork_lstm_reference(x: np.ndarray, w_i: np.ndarray, w_h: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """CTPN's LstmLayer forward (each stream with its own recurrent term, as the GPU kernel; libm's tanh)."""
    steps, num = x.shape[:2]
    hidden = w_h.shape[1]
    pre_gate = inner_product(x.reshape(steps * num, -1), w_i, bias).reshape(steps, num, 4 * hidden)
    h, c = np.zeros((num, hidden), F), np.zeros((num, hidden), F)
    out = np.empty((steps, num, hidden), F)
    for t in range(steps):
        h_to_gate = inner_product(h, w_h)
        for n in range(num):
            cont = t > 0
            pre = (pre_gate[t, n] + h_to_gate[n]).astype(F) if cont else pre_gate[t, n]
            for d in range(hidden):
                i, o = sigmoid(pre[d]), sigmoid(pre[2 * hidden + d])
                f = sigmoid(pre[hidden + d]) if cont else F(0)
                g = F(math.tanh(float(pre[3 * hidden + d])))
                c[n, d] = F(F(f * c[n, d]) + F(i * g))
                out[t, n, d] = F(o * F(math.tanh(float(c[n, d]))))
        h = out[t].copy()
    return out


def test_ctpn_lstm_matches_its_loop_for_every_stream():
    rng = np.random.default_rng(7)
    x = rng.normal(0, 1, (6, 3, 5)).astype(F)  # T = 6 columns, N = 3 rows (CTPN's layout)
    blobs = [rng.normal(0, 0.5, (12, 5)).astype(F), rng.normal(0, 0.5, (12, 3)).astype(F),
             rng.normal(0, 0.3, 12).astype(F)]
    layer = layer_from_text('name: "lstm" type: "Lstm" top: "h" lstm_param { num_output: 3 }')
    converted, out = run_layer(layer, [x.shape], blobs, x)
    assert converted.top_shapes == [(6, 3, 3)]
    np.testing.assert_allclose(out, fork_lstm_reference(x, *blobs), rtol=2e-6, atol=2e-7)
    # Another sequence length runs (the fork's Reshape takes T from its input).
    longer = rng.normal(0, 1, (9, 3, 5)).astype(F)
    with torch.no_grad():
        got = converted.module(torch.from_numpy(longer)).numpy()
    np.testing.assert_allclose(got, fork_lstm_reference(longer, *blobs), rtol=2e-6, atol=2e-7)


def reverse_reference(x: np.ndarray, axis: int) -> np.ndarray:
    """reverse_layer.cpp (CTPN): to_index = counts[axis] * (axis_count - 2 ind - 1) + index."""
    counts = [int(np.prod(x.shape[i + 1:])) for i in range(x.ndim)]
    flat, top = x.reshape(-1), np.empty(x.size, x.dtype)
    for index in range(x.size):
        ind = (index // counts[axis]) % x.shape[axis]
        top[counts[axis] * (x.shape[axis] - 2 * ind - 1) + index] = flat[index]
    return top.reshape(x.shape)


def transpose_reference(x: np.ndarray, dims: list[int]) -> np.ndarray:
    """transpose_layer.cpp: from-index digits by bottom counts, to-index by top counts and the dim map."""
    top_shape = [x.shape[d] for d in dims]
    from_counts = [int(np.prod(x.shape[i + 1:])) for i in range(x.ndim)]
    to_counts = [int(np.prod(top_shape[i + 1:])) for i in range(x.ndim)]
    flat, top = x.reshape(-1), np.empty(x.size, x.dtype)
    for index in range(x.size):
        rest, digits = index, []
        for count in from_counts:
            digits.append(rest // count)
            rest %= count
        top[sum(digits[dims[i]] * to_counts[i] for i in range(x.ndim))] = flat[index]
    return top.reshape(top_shape)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_reverse_matches_the_fork_index_arithmetic(axis):
    x = np.arange(2 * 3 * 4, dtype=F).reshape(2, 3, 4)
    layer = layer_from_text(f'name: "r" type: "Reverse" bottom: "a" top: "b" reverse_param {{ axis: {axis} }}')
    _, out = run_layer(layer, [x.shape], [], x)
    np.testing.assert_array_equal(out, reverse_reference(x, axis))


def test_transpose_matches_the_fork_index_arithmetic():
    x = np.arange(2 * 3 * 4 * 5, dtype=F).reshape(2, 3, 4, 5)
    layer = layer_from_text('name: "t" type: "Transpose" bottom: "a" top: "b" '
                            'transpose_param { dim: 3 dim: 2 dim: 0 dim: 1 }')  # CTPN's im2col_transpose
    converted, out = run_layer(layer, [x.shape], [], x)
    assert converted.top_shapes == [(5, 4, 2, 3)]
    np.testing.assert_array_equal(out, transpose_reference(x, [3, 2, 0, 1]))


@pytest.mark.parametrize("text, shapes, blobs, message", [
    ('type: "LSTM" recurrent_param { num_output: 4 }', [(5, 2, 3), (5, 3)], 3, r"bottom 1 \(cont\) must have shape \(5, 2\)"),
    ('type: "LSTM" recurrent_param { num_output: 4 }', [(5, 2, 3), (5, 2)], 2, r"expected 3 parameter blobs, got 2"),
    ('type: "RNN" recurrent_param { num_output: 0 }', [(5, 2, 3), (5, 2)], 5, r"num_output must be positive"),
    ('type: "LSTM" recurrent_param { num_output: 4 }', [(5, 2), (5, 2)], 3, r"at least 3 axes"),
    ('type: "LSTM" recurrent_param { num_output: 4 expose_hidden: true } top: "h"', [(5, 2, 3), (5, 2), (1, 2, 3),
     (1, 2, 4)], 3, r"bottom 2 \(an exposed hidden state\) must have shape \(1, 2, 4\)"),
    ('type: "Transpose" transpose_param { dim: 0 dim: 0 }', [(2, 3)], 0, r"not an order of the axes"),
    ('type: "Reverse" reverse_param { axis: 2 }', [(2, 3)], 0, r"axis 2 must be in \[0, 2\)"),
])
def test_recurrent_layers_refuse_what_caffe_refuses(text, shapes, blobs, message):
    layer = layer_from_text(f'name: "l" {text}')
    weights = [np.zeros((4 * 4, 3), F), np.zeros(16, F), np.zeros((16, 4), F), np.zeros(4, F), np.zeros(4, F)][:blobs]
    with pytest.raises(CaffeError, match=message):
        convert_layer(layer, shapes, weights)


NET = '''
name: "captioner"
input: "x" input_shape { dim: 5 dim: 2 dim: 3 }
input: "cont" input_shape { dim: 5 dim: 2 }
input: "image" input_shape { dim: 2 dim: 6 }
layer { name: "lstm1" type: "LSTM" bottom: "x" bottom: "cont" bottom: "image" top: "h1" recurrent_param { num_output: 4 } }
layer { name: "lstm2" type: "LSTM" bottom: "h1" bottom: "cont" top: "h2" recurrent_param { num_output: 3 } }
layer { name: "rev" type: "Reverse" bottom: "h2" top: "r" reverse_param { axis: 0 } }
layer { name: "rnn" type: "RNN" bottom: "r" bottom: "cont" top: "o" recurrent_param { num_output: 2 } }
'''


def _inputs():
    generator = torch.Generator().manual_seed(0)
    cont = torch.ones(5, 2)
    cont[0] = 0
    return torch.randn(5, 2, 3, generator=generator), cont, torch.randn(2, 6, generator=generator)


def test_recurrent_net_trains_runs_standalone_and_keeps_its_time_steps(tmp_path):
    from caffe2torch.folder import save_net

    net = random_net(tmp_path, NET, 0.5)
    x, cont, image = _inputs()
    net.train()
    out = net(x, cont, image)
    out.square().sum().backward()
    grads = {name: p.grad for name, p in net.named_parameters()}
    assert set(grads) == {"lstm1.weight_xc", "lstm1.bias_c", "lstm1.weight_xc_static", "lstm1.weight_hc",
                          "lstm2.weight_xc", "lstm2.bias_c", "lstm2.weight_hc", "rnn.weight_xh", "rnn.bias_h",
                          "rnn.weight_hh", "rnn.weight_ho", "rnn.bias_o"}
    assert all(g is not None and bool(torch.isfinite(g).all()) and bool(g.abs().sum() > 0) for g in grads.values())
    net.eval()
    save_net(net, tmp_path / "folder")
    with torch.no_grad():
        assert torch.equal(load_standalone(tmp_path / "folder")(x, cont, image), net(x, cont, image))
    with pytest.raises(InputSizeError, match=r"layer 'lstm1' \(LSTM\).*6 time steps; the net was converted for 5"):
        net(torch.randn(6, 2, 3), torch.ones(6, 2), image)
    # Another batch size (N) is fine, as in Caffe's Reshape.
    assert net(torch.randn(5, 3, 3), torch.ones(5, 3), torch.randn(3, 6)).shape == (5, 3, 2)


def test_lstm_gradients_are_the_math_of_its_forward():
    from caffe2torch.recurrent import caffe_lstm

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 2, dtype=torch.float64, generator=generator, requires_grad=True)
    cont = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    weights = [torch.randn(shape, dtype=torch.float64, generator=generator, requires_grad=True)
               for shape in [(8, 2), (8,), (8, 2)]]
    assert torch.autograd.gradcheck(lambda x, w, b, u: caffe_lstm(x, cont, None, None, None, w, b, None, u, 3)[0],
                                    (x, *weights))


@pytest.mark.parametrize("fmt", ["onnx", "pt2", "torchscript"])
def test_recurrent_net_exports_at_its_time_steps(tmp_path, fmt):
    from caffe2torch.export import export

    net = random_net(tmp_path, NET, 0.5)
    check = export(net, fmt, tmp_path / f"net.{fmt}")
    assert check.max_rel <= 1e-5, check


def test_continuation_indicator_marks_each_sequence_start():
    """continuation_indicator_layer.cpp: t == 0 ? 0 : 1 for every stream; N from a bottom's axis or batch_size."""
    x = np.zeros((2, 3, 7), F)
    layer = layer_from_text('name: "indicator" type: "ContinuationIndicator" continuation_indicator_param { '
                            'time_step: 4 axis: 1 }')
    converted, out = run_layer(layer, [x.shape], [], x)
    assert converted.top_shapes == [(4, 3)]
    np.testing.assert_array_equal(out, [[0, 0, 0]] + [[1, 1, 1]] * 3)
    layer = layer_from_text('name: "indicator" type: "ContinuationIndicator" continuation_indicator_param { '
                            'time_step: 2 batch_size: 2 }')
    _, out = run_layer(layer, [], [])
    np.testing.assert_array_equal(out, [[0, 0], [1, 1]])
    # Without a bottom the markers follow the module's device and dtype (net.to moves its empty buffer).
    from caffe2torch.recurrent import ContinuationIndicator

    module = ContinuationIndicator(2, batch=3).to(torch.float64)
    assert module().dtype == torch.float64 and module().shape == (2, 3)
