"""BVLC's Clip, Swish, Tile, Reduction, MVN, SPP, Embed, Parameter, BatchReindex and Im2col, and the MobileNet
forks' ReLU6, against loops of their CPU forward.

clip_layer.cpp, swish_layer.cpp (with sigmoid_layer.cpp's 0.5 * tanh(0.5 x) + 0.5), tile_layer.cpp,
reduction_layer.cpp, mvn_layer.cpp, spp_layer.cpp (over pooling_layer.cpp), embed_layer.cpp,
parameter_layer.hpp, batch_reindex_layer.cpp, im2col.cpp, and relu6_layer.cpp of eric612/MobileNet-YOLO.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from caffe2torch.errors import CaffeError
from caffe2torch.layers import convert_layer
from tests.conftest import layer_from_text, load_standalone, random_net, run_layer

F = np.float32


def test_clip_is_max_of_min_so_nan_becomes_the_minimum():
    x = np.array([[-3.0, -1.5, 0.0, 0.25, 2.0, np.nan, np.inf, -np.inf]], F)
    converted, out = run_layer(layer_from_text('name: "c" type: "Clip" clip_param { min: -1.5 max: 0.3 }'),
                               [x.shape], [], x)
    expected = [max(F(-1.5), min(v, F(0.3))) if not np.isnan(v) else F(-1.5) for v in x[0]]  # std::max(min, std::min)
    np.testing.assert_array_equal(out[0], np.array(expected, F))
    with pytest.raises(CaffeError, match="layer 'c' \\(Clip\\): min 2.0 exceeds max 1.0"):
        convert_layer(layer_from_text('name: "c" type: "Clip" clip_param { min: 2 max: 1 }'), [x.shape], [])


@pytest.mark.parametrize("beta", [1.0, 0.5, 2.5])
def test_swish_is_x_times_sigmoid_of_beta_x(beta):
    x = np.linspace(-8, 8, 33, dtype=F).reshape(1, 3, 11)
    _, out = run_layer(layer_from_text(f'name: "s" type: "Swish" swish_param {{ beta: {beta} }}'), [x.shape], [], x)
    scaled = x * F(beta)
    sigmoid = F(0.5) * np.tanh(F(0.5) * scaled) + F(0.5)  # sigmoid_layer.cpp
    # Caffe's float32 0.5 * tanh + 0.5 resolves sigmoid only to 2^-25 near 0: |x| * 3e-8 apart there at most.
    np.testing.assert_allclose(out, x * sigmoid, rtol=2e-6, atol=8 * 3e-8)


@pytest.mark.parametrize("text, slope", [("", 0.0), ("relu6_param { negative_slope: 0.1 }", 0.1),
                                         ("relu_param { negative_slope: 0.2 }", 0.2)])
def test_relu6_clamps_at_six_after_the_slope(text, slope):
    x = np.array([[-70.0, -2.0, -0.0, 0.5, 5.99, 6.0, 7.5]], F)
    _, out = run_layer(layer_from_text(f'name: "r" type: "ReLU6" {text}'), [x.shape], [], x)
    expected = [min(max(v, F(0)) + F(slope) * min(v, F(0)), F(6)) for v in x[0]]  # relu6_layer.cpp
    np.testing.assert_array_equal(out[0], np.array(expected, F))


@pytest.mark.parametrize("axis, tiles", [(1, 3), (-1, 2), (0, 2)])
def test_tile_repeats_the_trailing_block(axis, tiles):
    x = np.arange(2 * 3 * 4, dtype=F).reshape(2, 3, 4)
    converted, out = run_layer(layer_from_text(f'name: "t" type: "Tile" tile_param {{ axis: {axis} tiles: {tiles} }}'),
                               [x.shape], [], x)
    axis %= 3
    outer, inner = int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:]))
    flat, expected = x.reshape(-1), []
    for i in range(outer):  # tile_layer.cpp: each outer slice's inner block copied `tiles` times
        for _ in range(tiles):
            expected.append(flat[i * inner:(i + 1) * inner])
    shape = x.shape[:axis] + (x.shape[axis] * tiles,) + x.shape[axis + 1:]
    assert converted.top_shapes == [shape]
    np.testing.assert_array_equal(out, np.concatenate(expected).reshape(shape))


@pytest.mark.parametrize("operation", ["SUM", "ASUM", "SUMSQ", "MEAN"])
@pytest.mark.parametrize("axis, coeff", [(1, 1.0), (2, -0.3), (0, 2.0)])
def test_reduction_reduces_everything_from_its_axis(operation, axis, coeff):
    rng = np.random.default_rng(8)
    x = rng.normal(0, 1, (2, 3, 5)).astype(F)
    layer = layer_from_text(f'name: "r" type: "Reduction" reduction_param {{ operation: {operation} axis: {axis} '
                            f'coeff: {coeff} }}')
    converted, out = run_layer(layer, [x.shape], [], x)
    slices = x.reshape(int(np.prod(x.shape[:axis])), -1).astype(np.float64)
    value = {"SUM": slices.sum(1), "MEAN": slices.sum(1), "ASUM": np.abs(slices).sum(1),
             "SUMSQ": (slices ** 2).sum(1)}[operation]
    scale = F(coeff) / F(slices.shape[1]) if operation == "MEAN" else F(coeff)  # Reshape: coeff_ /= dim_
    assert converted.top_shapes == [x.shape[:axis]]
    np.testing.assert_allclose(out, (value * scale).reshape(x.shape[:axis]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("normalize_variance, across_channels", [(True, False), (False, False), (True, True)])
def test_mvn_subtracts_the_mean_and_divides_by_the_deviation_plus_eps(normalize_variance, across_channels):
    rng = np.random.default_rng(9)
    x = rng.normal(2, 3, (2, 3, 4, 5)).astype(F)
    layer = layer_from_text(f'name: "m" type: "MVN" mvn_param {{ normalize_variance: {str(normalize_variance).lower()} '
                            f'across_channels: {str(across_channels).lower()} eps: 0.01 }}')
    _, out = run_layer(layer, [x.shape], [], x)
    groups = x.reshape(2, -1) if across_channels else x.reshape(6, -1)
    centred = groups - groups.mean(1, keepdims=True, dtype=np.float64)
    if normalize_variance:  # var(X) = E((X - EX)^2), then sqrt, then + eps
        centred = centred / (np.sqrt((centred ** 2).mean(1, keepdims=True)) + F(0.01))
    np.testing.assert_allclose(out, centred.reshape(x.shape), rtol=1e-5, atol=1e-5)
    with pytest.raises(CaffeError, match="layer 'm' \\(MVN\\): input must have 4 axes"):
        convert_layer(layer, [(2, 3)], [])


def caffe_pool(x, method, kernel, stride, pad):
    """pooling_layer.cpp: ceil output size, the padding clip, MAX from -FLT_MAX, AVE over the padded window."""
    _, _, height, width = x.shape
    out_size = []
    for n, k, s, p in zip((height, width), kernel, stride, pad):
        o = -(-(n + 2 * p - k) // s) + 1
        if any(pad) and (o - 1) * s >= n + p:
            o -= 1
        out_size.append(o)
    out = np.zeros(x.shape[:2] + tuple(out_size), np.float64)
    for ph in range(out_size[0]):
        for pw in range(out_size[1]):
            hs, ws = ph * stride[0] - pad[0], pw * stride[1] - pad[1]
            he, we = min(hs + kernel[0], height + pad[0]), min(ws + kernel[1], width + pad[1])
            count = (he - hs) * (we - ws)
            hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, height), min(we, width)
            window = x[:, :, hs:he, ws:we]
            out[:, :, ph, pw] = window.max((2, 3)) if method == "MAX" else window.sum((2, 3)) / count
    return out


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("height, size", [(3, (7, 9)), (1, (5, 6)), (2, (6, 6))])
def test_spp_pools_each_pyramid_level_as_caffe_and_concatenates(method, height, size):
    rng = np.random.default_rng(13)
    x = rng.normal(0, 1, (2, 3) + size).astype(F)
    layer = layer_from_text(f'name: "spp" type: "SPP" spp_param {{ pyramid_height: {height} pool: {method} }}')
    converted, out = run_layer(layer, [x.shape], [], x)
    levels = []
    for level in range(height):  # GetPoolingParam: kernel = stride = ceil(size / 2^level), pad (remainder + 1) / 2
        kernels = [int(np.ceil(n / 2 ** level)) for n in size]
        pads = [(k * 2 ** level - n + 1) // 2 for k, n in zip(kernels, size)]
        levels.append(caffe_pool(x, method, kernels, kernels, pads))
    expected = levels[0] if height == 1 else np.concatenate([v.reshape(2, -1) for v in levels], axis=1)
    assert converted.top_shapes == [expected.shape]
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_embed_picks_rows_by_index_and_adds_the_bias():
    rng = np.random.default_rng(14)
    weight, bias = rng.normal(0, 1, (6, 4)).astype(F), rng.normal(0, 1, 4).astype(F)
    x = np.array([[0, 5, 2], [3, 3, 1]], F)
    layer = layer_from_text('name: "e" type: "Embed" embed_param { num_output: 4 input_dim: 6 }')
    converted, out = run_layer(layer, [x.shape], [weight, bias], x)
    assert converted.top_shapes == [(2, 3, 4)]
    np.testing.assert_array_equal(out, weight[x.astype(int)] + bias)  # caffe_copy of row index, then + bias


def test_batch_reindex_and_parameter_and_im2col():
    x = np.arange(4 * 3, dtype=F).reshape(4, 3)
    _, out = run_layer(layer_from_text('name: "b" type: "BatchReindex"'), [x.shape, (5,)], [],
                       x, np.array([3, 0, 0, 2, 1], F))
    np.testing.assert_array_equal(out, x[[3, 0, 0, 2, 1]])
    value = np.arange(6, dtype=F).reshape(2, 3)
    converted, out = run_layer(layer_from_text('name: "p" type: "Parameter" parameter_param { shape { dim: 2 dim: 3 '
                                               '} }'), [], [value])
    assert converted.top_shapes == [(2, 3)]
    np.testing.assert_array_equal(out, value)
    image = np.arange(2 * 2 * 5 * 6, dtype=F).reshape(2, 2, 5, 6)
    layer = layer_from_text('name: "i" type: "Im2col" convolution_param { kernel_h: 3 kernel_w: 2 stride: 2 pad: 1 '
                            'dilation: 1 }')
    converted, out = run_layer(layer, [image.shape], [], image)
    out_h, out_w = (5 + 2 - 3) // 2 + 1, (6 + 2 - 2) // 2 + 1
    expected = np.zeros((2, 2 * 3 * 2, out_h, out_w), F)
    for c in range(2):  # im2col_cpu: channel c, kernel row, kernel column, then output rows and columns
        for kh in range(3):
            for kw in range(2):
                for oh in range(out_h):
                    for ow in range(out_w):
                        h, w = oh * 2 - 1 + kh, ow * 2 - 1 + kw
                        if 0 <= h < 5 and 0 <= w < 6:
                            expected[:, (c * 3 + kh) * 2 + kw, oh, ow] = image[:, c, h, w]
    assert converted.top_shapes == [expected.shape]
    np.testing.assert_array_equal(out, expected)


MORE_BVLC = """name: "more"
input: "data" input_shape { dim: 1 dim: 3 dim: 6 dim: 6 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu6" type: "ReLU6" bottom: "conv" top: "conv" }
layer { name: "mvn" type: "MVN" bottom: "conv" top: "mvn" }
layer { name: "swish" type: "Swish" bottom: "mvn" top: "swish" swish_param { beta: 1.5 } }
layer { name: "clip" type: "Clip" bottom: "swish" top: "clip" clip_param { min: -1 max: 1 } }
layer { name: "tile" type: "Tile" bottom: "clip" top: "tile" tile_param { axis: 1 tiles: 2 } }
layer { name: "sum" type: "Reduction" bottom: "tile" top: "sum" reduction_param { operation: SUMSQ axis: 2 } }
layer { name: "spp" type: "SPP" bottom: "conv" top: "spp" spp_param { pyramid_height: 2 pool: AVE } }
layer { name: "cols" type: "Im2col" bottom: "conv" top: "cols" convolution_param { kernel_size: 2 stride: 2 } }
layer { name: "bias" type: "Parameter" top: "bias" parameter_param { shape { dim: 1 dim: 20 } } }
layer { name: "spp_bias" type: "Eltwise" bottom: "spp" bottom: "bias" top: "spp_bias" }
"""


def test_more_bvlc_types_in_a_net_export_run_in_half_and_write_standalone_code(tmp_path):
    from caffe2torch.export import export
    from caffe2torch.folder import save_net

    net = random_net(tmp_path, MORE_BVLC, std=0.5)
    x = torch.randn(1, 3, 6, 6)
    outputs = net(x)  # Caffe's output blobs, sorted by name: cols, spp_bias, sum
    assert [tuple(o.shape) for o in outputs] == [(1, 16, 2, 2), (1, 20), (1, 8)]
    for fmt in ("onnx", "pt2", "torchscript"):
        assert export(net, fmt, tmp_path / f"net.{fmt}").max_rel <= 1e-5, fmt
    half = copy.deepcopy(net).half()(x.half())
    assert all(torch.allclose(h.float(), o, rtol=0.05, atol=0.1) for h, o in zip(half, outputs))
    save_net(net, tmp_path / "folder")
    assert all(torch.equal(a, b) for a, b in zip(load_standalone(tmp_path / "folder")(x), net(x)))


@pytest.mark.parametrize("kind, why", [("Filter", "a layer whose output size depends on the data")])
def test_the_bvlc_types_left_out_say_why(kind, why):
    with pytest.raises(CaffeError, match=f"layer 'l': {why} .*type '{kind}'; register one with "
                                         f"@caffe2torch.register_converter\\('{kind}'\\)"):
        convert_layer(layer_from_text(f'name: "l" type: "{kind}"'), [(2, 3)], [])


def test_sums_over_large_planes_stay_right_in_half_precision():
    """MVN and Reduction sum in float32 under float16 (a 256 x 256 plane's sum of squares overflows it)."""
    torch.manual_seed(0)
    x = torch.randn(1, 2, 256, 256) * 2 + 1
    mvn = convert_layer(layer_from_text('name: "m" type: "MVN"'), [tuple(x.shape)], []).module
    half = mvn(x.half())
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), mvn(x), rtol=0.01, atol=0.01)
    mean = convert_layer(layer_from_text('name: "r" type: "Reduction" reduction_param { operation: MEAN axis: 1 }'),
                         [tuple(x.shape)], []).module
    torch.testing.assert_close(mean(x.half()).float(), mean(x), rtol=0.01, atol=0.01)


def test_clip_in_half_precision_and_at_infinities():
    clip = convert_layer(layer_from_text('name: "c" type: "Clip" clip_param { min: -1e6 max: 1e6 }'), [(5,)], []).module
    x = torch.tensor([float("nan"), float("-inf"), -2.0, 3.0, float("inf")])
    # std::max(min, std::min(x, max)) in float32: NaN -> min, infinities -> the bounds
    assert clip(x).tolist() == [-1e6, -1e6, -2.0, 3.0, 1e6]
    # In float16 the bounds are +-inf (as a cast makes them): NaN -> -inf, the rest unchanged.
    assert clip(x.half()).tolist() == [float("-inf"), float("-inf"), -2.0, 3.0, float("inf")]
