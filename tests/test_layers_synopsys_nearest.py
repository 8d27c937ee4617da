"""synopsys-caffe's ResizeNearestNeighbor and Squeeze against loops of resize_nearest_neighbor_layer.cpp and
squeeze_layer.cpp."""
import math

import numpy as np
import pytest
import torch

from caffe2torch.errors import CaffeError
from caffe2torch.layers import convert_layer
from tests.conftest import layer_from_text, load_standalone, random_net, run_layer

F = np.float32


def _source(o: int, size: int, scale: np.float32, mode: str) -> int:
    """One output index's input index, as Forward_cpu computes in_h / in_w."""
    if mode == "half_pixel_onnx":  # floorf((float(h) + 0.5f) * scale - 0.5): the double difference back to float
        return max(min(int(math.floor(F(float(F(F(o) + F(0.5)) * scale) - 0.5))), size - 1), 0)
    if mode == "half_pixel_centers":
        return max(min(int(math.floor(F(F(o) + F(0.5)) * scale)), size - 1), 0)
    product = float(F(F(o) * scale))
    if mode == "align_corners":  # roundf: halves away from zero
        return min(int(math.floor(product + 0.5)) if product - math.floor(product) >= 0.5 else int(math.floor(product)),
                   size - 1)
    return min(int(math.floor(product)), size - 1)


def nearest_reference(x: np.ndarray, out: tuple, mode: str) -> np.ndarray:
    n, c, h, w = x.shape
    scales = [F(F(size - 1) / F(o - 1)) if mode == "align_corners" and o > 1 else F(F(size) / F(o))
              for size, o in ((h, out[0]), (w, out[1]))]
    top = np.empty((n, c) + out, F)
    for i in range(out[0]):
        for j in range(out[1]):
            top[:, :, i, j] = x[:, :, _source(i, h, scales[0], mode), _source(j, w, scales[1], mode)]
    return top


@pytest.mark.parametrize("mode", ["asymmetric", "align_corners", "half_pixel_centers", "half_pixel_onnx"])
@pytest.mark.parametrize("size, given", [((5, 7), "output_height: 11 output_width: 3"),
                                         ((6, 4), "scale_height: 2.5 scale_width: 0.75"),
                                         ((3, 9), "output_height: 1 output_width: 20")])
def test_resize_nearest_matches_the_fork_loop(mode, size, given):
    x = np.random.default_rng(4).normal(0, 1, (2, 3) + size).astype(F)
    flag = "" if mode == "asymmetric" else f"{mode}: true"
    layer = layer_from_text(f'name: "r" type: "ResizeNearestNeighbor" resize_nearest_neighbor_param {{ {given} '
                            f'data_format: "NCHW" {flag} }}')
    converted, got = run_layer(layer, [x.shape], [], x)
    out = tuple(converted.top_shapes[0][2:])
    if "scale" in given:
        assert out == (math.floor(F(size[0]) * F(2.5)), math.floor(F(size[1]) * F(0.75)))
    np.testing.assert_array_equal(got, nearest_reference(x, out, mode))


def test_resize_nearest_nhwc_and_its_checks():
    x = np.random.default_rng(5).normal(0, 1, (1, 4, 6, 3)).astype(F)  # N x H x W x C, the fork's default
    layer = layer_from_text('name: "r" type: "ResizeNearestNeighbor" resize_nearest_neighbor_param { '
                            'output_height: 8 output_width: 9 align_corners: true }')
    converted, got = run_layer(layer, [x.shape], [], x)
    assert converted.top_shapes == [(1, 8, 9, 3)]
    want = nearest_reference(x.transpose(0, 3, 1, 2), (8, 9), "align_corners").transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(CaffeError, match="align_corners and half_pixel_onnx exclude each other"):
        convert_layer(layer_from_text('name: "r" type: "ResizeNearestNeighbor" resize_nearest_neighbor_param { '
                                      'align_corners: true half_pixel_onnx: true }'), [x.shape], [])


def test_squeeze_removes_the_axes_of_size_one_as_the_fork():
    x = np.arange(6, dtype=F).reshape(1, 6, 1, 1)
    converted, got = run_layer(layer_from_text('name: "s" type: "Squeeze"'), [x.shape], [], x)
    assert converted.top_shapes == [(6,)] and got.shape == (6,)
    converted, got = run_layer(layer_from_text('name: "s" type: "Squeeze" squeeze_param { axis: 2 axis: -1 }'),
                               [x.shape], [], x)
    assert converted.top_shapes == [(1, 6)] and got.shape == (1, 6)
    np.testing.assert_array_equal(got.reshape(-1), x.reshape(-1))
    with pytest.raises(CaffeError, match="axis 1 has size 6: only axes of size 1 can be removed"):
        convert_layer(layer_from_text('name: "s" type: "Squeeze" squeeze_param { axis: 1 }'), [x.shape], [])


def test_a_tensorflow_port_head_runs_at_another_size_and_standalone(tmp_path):
    net = random_net(tmp_path, """input: "data" input_shape { dim: 1 dim: 3 dim: 8 dim: 10 }
layer { name: "up" type: "ResizeNearestNeighbor" bottom: "data" top: "up"
  resize_nearest_neighbor_param { scale_height: 2 scale_width: 2 data_format: "NCHW" half_pixel_centers: true } }
layer { name: "pool" type: "Pooling" bottom: "up" top: "pool" pooling_param { pool: AVE global_pooling: true } }
layer { name: "squeeze" type: "Squeeze" bottom: "pool" top: "logits" }
""", 0.5)
    x = torch.randn(1, 3, 8, 10)
    with torch.no_grad():
        assert net(x).shape == (3,)
        assert net(torch.randn(2, 3, 5, 7)).shape == (2, 3)  # Caffe's Reshape: the batch of 2 stays
        want = net(x)
    from caffe2torch.folder import save_net

    save_net(net, tmp_path / "folder")
    with torch.no_grad():
        assert torch.equal(load_standalone(tmp_path / "folder")(x), want)
