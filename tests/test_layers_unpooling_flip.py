"""HyeonwooNoh/caffe's Unpooling (DeconvNet, deep image matting ports) and happynear/caffe-windows' Flip against
loops of unpooling_layer.cpp and flip_layer.cpp."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe2torch.errors import CaffeError
from caffe2torch.layers import convert_layer
from tests.conftest import layer_from_text, load_standalone, random_net, run_layer

F = np.float32


def unpool_reference(x: np.ndarray, method: str, kernel, stride, size, mask=None) -> np.ndarray:
    """UnpoolingLayer::Forward_cpu (pad 0)."""
    num, channels, height, width = x.shape
    (kh, kw), (sh, sw), (uh, uw) = kernel, stride, size
    top = np.zeros((num, channels, uh, uw), F)
    for n in range(num):
        for c in range(channels):
            plane = top[n, c].reshape(-1)
            for ph in range(height):
                for pw in range(width):
                    value = x[n, c, ph, pw]
                    if method == "MAX":
                        if mask is not None:
                            plane[int(mask[n, c, ph, pw])] = value
                        else:
                            plane[max(0, min(ph * sh, uh - 1)) * uw + max(0, min(pw * sw, uw - 1))] = value
                        continue
                    hstart, wstart = ph * sh, pw * sw
                    hend, wend = min(hstart + kh, uh), min(wstart + kw, uw)
                    pool_size = (hend - hstart) * (wend - wstart)
                    for h in range(max(hstart, 0), min(hend, uh)):
                        for w in range(max(wstart, 0), min(wend, uw)):
                            plane[h * uw + w] = F(plane[h * uw + w] + (F(value / F(pool_size)) if method == "AVE"
                                                                        else value))
            top[n, c] = plane.reshape(uh, uw)
    return top


@pytest.mark.parametrize("method, kernel, stride, size", [
    ("MAX", (2, 2), (2, 2), (8, 10)),
    ("MAX", (3, 3), (2, 2), (7, 7)),  # clipped targets repeat: the later value wins
    ("AVE", (3, 2), (2, 2), (9, 10)),  # overlapping windows, cut at the map's edge
    ("TILE", (3, 3), (2, 1), (8, 7)),
])
def test_unpooling_without_mask_matches_the_fork_loop(method, kernel, stride, size):
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (2, 3, 4, 5)).astype(F)
    layer = layer_from_text(f'name: "unpool" type: "Unpooling" unpooling_param {{ unpool: {method} kernel_h: {kernel[0]} '
                            f'kernel_w: {kernel[1]} stride_h: {stride[0]} stride_w: {stride[1]} unpool_h: {size[0]} '
                            f'unpool_w: {size[1]} }}')
    converted, out = run_layer(layer, [x.shape], [], x)
    assert converted.top_shapes == [(2, 3) + size]
    np.testing.assert_array_equal(out, unpool_reference(x, method, kernel, stride, size))


def test_unpooling_with_the_pooling_mask_matches_the_fork_loop():
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, (1, 2, 3, 4)).astype(F)
    mask = np.stack([rng.permutation(6 * 8)[:12] for _ in range(2)]).reshape(1, 2, 3, 4).astype(F)
    layer = layer_from_text('name: "unpool5" type: "Unpooling" unpooling_param { unpool: MAX kernel_size: 2 stride: 2 '
                            'unpool_h: 6 unpool_w: 8 }')
    _, out = run_layer(layer, [x.shape, mask.shape], [], x, mask)
    np.testing.assert_array_equal(out, unpool_reference(x, "MAX", (2, 2), (2, 2), (6, 8), mask))


@pytest.mark.parametrize("text, message", [
    ("unpool: MAX kernel_size: 2 stride: 2", "needs unpool_size"),
    ("unpool: MAX kernel_size: 2 pad: 1 unpool_size: 4", r"pad \(1, 1\): the fork allows only zero padding"),
    ("unpool: AVE stride: 2 unpool_size: 4", "needs a positive kernel_size"),
])
def test_unpooling_refuses_what_the_fork_checks(text, message):
    with pytest.raises(CaffeError, match=message):
        convert_layer(layer_from_text(f'name: "u" type: "Unpooling" unpooling_param {{ {text} }}'), [(1, 2, 2, 2)], [])


@pytest.mark.parametrize("text, axes", [("", (3,)), ("flip_param { flip_height: true }", (2, 3)),
                                        ("flip_param { flip_width: false flip_height: true }", (2,))])
def test_flip_matches_the_fork_loop(text, axes):
    x = np.arange(2 * 3 * 4 * 5, dtype=F).reshape(2, 3, 4, 5)
    converted, out = run_layer(layer_from_text(f'name: "f" type: "Flip" {text}'), [x.shape], [], x)
    expected = np.empty_like(x)
    for n, c, h, w in np.ndindex(*x.shape):  # flip_layer.cpp's index arithmetic
        expected[n, c, h, w] = x[n, c, x.shape[2] - 1 - h if 2 in axes else h, x.shape[3] - 1 - w if 3 in axes else w]
    np.testing.assert_array_equal(out, expected)


MATTING = '''
name: "matting"
input: "data" input_shape { dim: 1 dim: 4 dim: 16 dim: 16 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 6 kernel_size: 3 pad: 1 } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" top: "pool1_mask" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2" convolution_param { num_output: 6 kernel_size: 3 pad: 1 } }
layer { name: "unpool1" type: "Unpooling" bottom: "conv2" bottom: "pool1_mask" top: "unpool1"
  unpooling_param { unpool: MAX kernel_size: 2 stride: 2 unpool_size: 16 } }
layer { name: "flip" type: "Flip" bottom: "unpool1" top: "flipped" }
layer { name: "alpha" type: "Convolution" bottom: "flipped" top: "alpha" convolution_param { num_output: 1 kernel_size: 3 pad: 1 } }
'''


def test_matting_net_trains_exports_and_runs_standalone(tmp_path):
    from caffe2torch.export import export
    from caffe2torch.folder import save_net

    net = random_net(tmp_path, MATTING, 0.3)
    data = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    net.train()
    net(data).square().sum().backward()
    assert bool(net.conv1.weight.grad.abs().sum() > 0)
    net.eval()
    save_net(net, tmp_path / "folder")
    with torch.no_grad():
        assert torch.equal(load_standalone(tmp_path / "folder")(data), net(data))
    assert export(net, "onnx", tmp_path / "net.onnx").max_rel <= 1e-5
