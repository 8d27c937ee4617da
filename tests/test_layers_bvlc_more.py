"""BVLC's Clip, Swish, Tile, Reduction and MVN, and the MobileNet forks' ReLU6, against loops of their CPU forward.

clip_layer.cpp, swish_layer.cpp (with sigmoid_layer.cpp's 0.5 * tanh(0.5 x) + 0.5), tile_layer.cpp,
reduction_layer.cpp, mvn_layer.cpp, and relu6_layer.cpp of eric612/MobileNet-YOLO.
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


MORE_BVLC = """name: "more"
input: "data" input_shape { dim: 1 dim: 3 dim: 6 dim: 6 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu6" type: "ReLU6" bottom: "conv" top: "conv" }
layer { name: "mvn" type: "MVN" bottom: "conv" top: "mvn" }
layer { name: "swish" type: "Swish" bottom: "mvn" top: "swish" swish_param { beta: 1.5 } }
layer { name: "clip" type: "Clip" bottom: "swish" top: "clip" clip_param { min: -1 max: 1 } }
layer { name: "tile" type: "Tile" bottom: "clip" top: "tile" tile_param { axis: 1 tiles: 2 } }
layer { name: "sum" type: "Reduction" bottom: "tile" top: "sum" reduction_param { operation: SUMSQ axis: 2 } }
"""


def test_more_bvlc_types_in_a_net_export_run_in_half_and_write_standalone_code(tmp_path):
    from caffe2torch.export import export
    from caffe2torch.folder import save_net

    net = random_net(tmp_path, MORE_BVLC, std=0.5)
    x = torch.randn(1, 3, 6, 6)
    out = net(x)
    assert out.shape == (1, 8)
    for fmt in ("onnx", "pt2", "torchscript"):
        assert export(net, fmt, tmp_path / f"net.{fmt}").max_rel <= 1e-5, fmt
    assert torch.allclose(copy.deepcopy(net).half()(x.half()).float(), out, rtol=0.05, atol=0.1)
    save_net(net, tmp_path / "folder")
    assert torch.equal(load_standalone(tmp_path / "folder")(x), net(x))
