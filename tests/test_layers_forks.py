"""Other forks' layers against explicit loops of each fork's C++ forward.

SegNet (alexgkendall/caffe-segnet: pooling_layer.cpp's mask, upsample_layer.cpp, bn_layer.cpp),
the ceil_mode forks (BVLC PR #3057), DeepLab v1's `hole` (im2col.cpp), ShuffleNet's
shuffle_channel_layer.cpp, SENet ports' axpy_layer.cpp, conv_dw_layer.cpp and lltcggie's CropCenter.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe2torch.errors import CaffeError
from tests.conftest import layer_from_text, load_standalone, random_net, run_layer
from caffe2torch.layers import convert_layer
from caffe2torch.read import parse_caffemodel
from proto import caffe_pb2

F = np.float32
LOWEST = np.finfo(F).min


# ---------------------------------------------------------------- MAX pooling's mask top, ceil_mode


def max_pool_reference(x, kernel, stride, pad, ceil):
    """pooling_layer.cpp: output size, the padding clip, then MAX with a mask (strict >, from -FLT_MAX)."""
    n, c, height, width = x.shape
    sizes = []
    for size, k, s, p in zip((height, width), kernel, stride, pad):
        span = size + 2 * p - k
        out = (-(-span // s) if ceil else span // s) + 1
        if any(pad) and (out - 1) * s >= size + p:
            out -= 1
        sizes.append(out)
    top = np.full((n, c, *sizes), LOWEST, F)
    mask = np.full((n, c, *sizes), -1, F)
    for i in range(n):
        for j in range(c):
            for ph in range(sizes[0]):
                for pw in range(sizes[1]):
                    hstart, wstart = ph * stride[0] - pad[0], pw * stride[1] - pad[1]
                    hend, wend = min(hstart + kernel[0], height), min(wstart + kernel[1], width)
                    for h in range(max(hstart, 0), hend):
                        for w in range(max(wstart, 0), wend):
                            if x[i, j, h, w] > top[i, j, ph, pw]:
                                top[i, j, ph, pw] = x[i, j, h, w]
                                mask[i, j, ph, pw] = h * width + w
    return top, mask


@pytest.mark.parametrize("param, ceil", [
    ("kernel_size: 2 stride: 2", True),
    ("kernel_size: 3 stride: 2 pad: 1", True),
    ("kernel_size: 3 stride: 2 ceil_mode: false", False),
    ("kernel_h: 2 kernel_w: 3 stride_h: 3 stride_w: 2 pad_h: 1 pad_w: 0 ceil_mode: true", True),
    ("kernel_size: 2 stride: 2 round_mode: FLOOR", False),
])
def test_max_pooling_mask_matches_fork_loop(param, ceil):
    rng = np.random.default_rng(3)
    x = np.round(rng.normal(0, 2, (2, 3, 7, 9))).astype(F)  # many ties: the first maximum must win
    x[0, 0, 0, :3] = np.nan
    x[1, 1, 2:5, 2:5] = -np.inf
    layer = layer_from_text(f'name: "pool" type: "Pooling" top: "pool" top: "mask" pooling_param {{ pool: MAX {param} }}')
    p = layer.pooling_param
    kernel = (p.kernel_h, p.kernel_w) if p.HasField("kernel_h") else (p.kernel_size,) * 2
    stride = (p.stride_h, p.stride_w) if p.HasField("stride_h") else (p.stride,) * 2
    pad = (p.pad_h, p.pad_w) if p.HasField("pad_h") else (p.pad,) * 2
    converted, (top, mask) = run_layer(layer, [x.shape], [], x)
    expected_top, expected_mask = max_pool_reference(x, kernel, stride, pad, ceil)
    assert converted.top_shapes == [expected_top.shape] * 2
    np.testing.assert_array_equal(top, expected_top)
    np.testing.assert_array_equal(mask, expected_mask)


def test_ceil_mode_false_floors_and_conflicts_are_refused():
    layer = layer_from_text('name: "pool" type: "Pooling" pooling_param { pool: AVE kernel_size: 3 stride: 2 ceil_mode: false }')
    assert convert_layer(layer, [(1, 1, 8, 8)], []).top_shapes == [(1, 1, 3, 3)]  # ceil would give 4
    layer.pooling_param.round_mode = caffe_pb2.PoolingParameter.CEIL
    with pytest.raises(CaffeError, match="round_mode and ceil_mode disagree"):
        convert_layer(layer, [(1, 1, 8, 8)], [])
    layer = layer_from_text('name: "pool" type: "Pooling" top: "a" top: "b" pooling_param { pool: AVE kernel_size: 2 }')
    with pytest.raises(CaffeError, match="only MAX pooling has a second"):
        convert_layer(layer, [(1, 1, 8, 8)], [])


# ---------------------------------------------------------------- SegNet's Upsample


def upsample_reference(x, mask, out_h, out_w):
    top = np.zeros(x.shape[:2] + (out_h, out_w), F)
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            plane = top[n, c].reshape(-1)
            for i, (value, index) in enumerate(zip(x[n, c].reshape(-1), mask[n, c].reshape(-1))):
                plane[int(index)] = value
    return top


@pytest.mark.parametrize("param, pool, shape, size", [
    ("scale: 2", "kernel_size: 2 stride: 2", (2, 3, 10, 12), (10, 12)),
    ("scale: 2 pad_out_h: true", "kernel_size: 2 stride: 2", (2, 3, 9, 12), (9, 12)),
    ("upsample_h: 9 upsample_w: 11", "kernel_size: 2 stride: 2", (2, 3, 9, 11), (9, 11)),
    ("scale_h: 2 scale_w: 3", "kernel_h: 2 kernel_w: 3 stride_h: 2 stride_w: 3", (2, 3, 10, 18), (10, 18)),
])
def test_upsample_with_mask_matches_fork_loop(param, pool, shape, size):
    x = np.random.default_rng(5).normal(0, 1, shape).astype(F)
    pooling = layer_from_text(f'name: "pool" type: "Pooling" top: "p" top: "m" pooling_param {{ pool: MAX {pool} }}')
    _, (pooled, mask) = run_layer(pooling, [x.shape], [], x)
    layer = layer_from_text(f'name: "up" type: "Upsample" upsample_param {{ {param} }}')
    converted, out = run_layer(layer, [pooled.shape, mask.shape], [], pooled, mask)
    assert converted.top_shapes == [pooled.shape[:2] + size]
    np.testing.assert_array_equal(out, upsample_reference(pooled, mask, *size))


def test_upsample_with_one_bottom_is_nearest_neighbour():
    x = np.arange(6, dtype=F).reshape(1, 1, 2, 3)
    layer = layer_from_text('name: "up" type: "Upsample" upsample_param { scale: 2 }')
    converted, out = run_layer(layer, [x.shape], [], x)
    assert converted.top_shapes == [(1, 1, 4, 6)]
    np.testing.assert_array_equal(out[0, 0], np.repeat(np.repeat(x[0, 0], 2, 0), 2, 1))


def test_upsample_checks():
    with pytest.raises(CaffeError, match=r"'up' \(Upsample\): the mask \(bottom 1\) has shape"):
        convert_layer(layer_from_text('name: "up" type: "Upsample"'), [(1, 2, 4, 4), (1, 2, 4, 5)], [])
    with pytest.raises(CaffeError, match="pad_out_h / pad_out_w need scale 2"):
        convert_layer(layer_from_text('name: "up" type: "Upsample" upsample_param { scale: 3 pad_out_w: true }'),
                      [(1, 2, 4, 4)] * 2, [])


# ---------------------------------------------------------------- SegNet's BN


def test_segnet_bn_inference_is_scale_times_x_plus_shift_exactly():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 3, (2, 4, 3, 5)).astype(F)
    scale, shift = rng.normal(0, 1, (1, 4, 1, 1)).astype(F), rng.normal(0, 1, (1, 4, 1, 1)).astype(F)
    layer = layer_from_text('name: "bn" type: "BN" bn_param { bn_mode: INFERENCE scale_filler { type: "constant" value: 1 } '
                   'shift_filler { type: "constant" value: 0.001 } }')
    _, out = run_layer(layer, [x.shape], [scale, shift], x)
    np.testing.assert_array_equal(out, x * scale + shift)  # caffe_mul, then caffe_add


def test_segnet_bn_learn_uses_the_batch_statistics_formula():
    rng = np.random.default_rng(2)
    x = rng.normal(5, 3, (3, 4, 6, 5)).astype(F)
    scale, shift = rng.normal(1, 0.1, (1, 4, 1, 1)).astype(F), rng.normal(0, 1, (1, 4, 1, 1)).astype(F)
    layer = layer_from_text('name: "bn" type: "BN" bn_param { bn_mode: LEARN }')
    converted, out = run_layer(layer, [x.shape], [scale, shift], x)
    mean = x.astype(np.float64).mean(axis=(2, 3)).mean(0)
    variance = (x.astype(np.float64) ** 2).mean(axis=(2, 3)).mean(0) - mean ** 2  # E(X^2) - (EX)^2
    expected = (x - mean[:, None, None]) / np.sqrt(variance + 1e-9)[:, None, None] * scale + shift
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert "bn_mode LEARN" in converted.warnings[0]


def test_segnet_and_pspnet_bn_are_told_apart_in_binaries():
    """SegNet stores bn_param at 45 (PSPNet's is 152): the layer still says which it is."""
    layer = caffe_pb2.LayerParameter(name="bn", type="BN")
    layer.segnet_bn_param.bn_mode = caffe_pb2.SegNetBNParameter.INFERENCE
    for value in (2.0, 0.5):
        blob = layer.blobs.add()
        blob.shape.dim.extend([1, 2, 1, 1])
        blob.data.extend([value] * 2)
    net = parse_caffemodel(caffe_pb2.NetParameter(layer=[layer]).SerializeToString(), "segnet.caffemodel")
    read = net.layer[0]
    blobs = [np.array(b.data, F).reshape(1, 2, 1, 1) for b in read.blobs]
    _, out = run_layer(read, [(1, 2, 1, 1)], blobs, np.ones((1, 2, 1, 1), F))
    np.testing.assert_array_equal(out, np.full((1, 2, 1, 1), 2.5, F))


def test_segnet_upsample_param_in_a_binary_is_recovered():
    """SegNet numbers upsample_param 137, BVLC's embed_param here: the layer type says which was meant."""
    wire = caffe_pb2.UpsampleParameter(upsample_h=9, upsample_w=11).SerializeToString()
    layer = caffe_pb2.LayerParameter(name="up", type="Upsample").SerializeToString()
    layer += bytes([(137 << 3 | 2) & 0x7F | 0x80, (137 << 3 | 2) >> 7, len(wire)]) + wire
    net = parse_caffemodel(bytes([(100 << 3 | 2) & 0x7F | 0x80, (100 << 3 | 2) >> 7, len(layer)]) + layer, "x")
    assert net.layer[0].upsample_param.upsample_h == 9 and not net.layer[0].HasField("embed_param")


# ---------------------------------------------------------------- DeepLab v1's hole


def conv_reference(x, weight, bias, stride, pad, dilation, group):
    """Direct convolution with DeepLab's effective kernel k + (k - 1)(hole - 1)."""
    n, c, height, width = x.shape
    out_c, per_group, kh, kw = weight.shape
    ext_h, ext_w = kh + (kh - 1) * (dilation[0] - 1), kw + (kw - 1) * (dilation[1] - 1)
    out_h, out_w = (height + 2 * pad - ext_h) // stride + 1, (width + 2 * pad - ext_w) // stride + 1
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    top = np.zeros((n, out_c, out_h, out_w))
    for o in range(out_c):
        g = o // (out_c // group)
        for i in range(out_h):
            for j in range(out_w):
                patch = padded[:, g * per_group:(g + 1) * per_group,
                               i * stride:i * stride + ext_h:dilation[0], j * stride:j * stride + ext_w:dilation[1]]
                top[:, o, i, j] = (patch * weight[o]).sum(axis=(1, 2, 3)) + bias[o]
    return top


def test_deeplab_hole_is_dilation():
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, (1, 3, 13, 11)).astype(F)
    weight, bias = rng.normal(0, 1, (4, 3, 3, 3)).astype(F), rng.normal(0, 1, 4).astype(F)
    layer = layer_from_text('name: "fc6" type: "Convolution" convolution_param { num_output: 4 kernel_size: 3 pad: 2 hole: 2 }')
    converted, out = run_layer(layer, [x.shape], [weight, bias], x)
    np.testing.assert_allclose(out, conv_reference(x, weight, bias, 1, 2, (2, 2), 1), rtol=1e-5, atol=1e-5)
    layer.convolution_param.dilation.append(2)
    with pytest.raises(CaffeError, match="give dilation or hole, not both"):
        convert_layer(layer, [x.shape], [weight, bias])


# ---------------------------------------------------------------- ShuffleChannel, Axpy, depthwise, CropCenter


def test_shuffle_channel_matches_fork_pointer_loop():
    x = np.arange(2 * 12 * 2 * 3, dtype=F).reshape(2, 12, 2, 3)
    group = 3
    expected = np.empty_like(x)
    rows, columns = group, 12 // group
    for n in range(2):
        for i in range(rows):
            for j in range(columns):
                expected[n, j * rows + i] = x[n, i * columns + j]  # p_o = out + (j * group_row + i) * len
    layer = layer_from_text(f'name: "shuffle" type: "ShuffleChannel" shuffle_channel_param {{ group: {group} }}')
    _, out = run_layer(layer, [x.shape], [], x)
    np.testing.assert_array_equal(out, expected)
    with pytest.raises(CaffeError, match="group 5 must divide the channels"):
        convert_layer(layer_from_text('name: "s" type: "ShuffleChannel" shuffle_channel_param { group: 5 }'), [x.shape], [])


def test_axpy_is_a_times_x_plus_y():
    rng = np.random.default_rng(6)
    a, x, y = rng.normal(0, 1, (2, 4, 1, 1)).astype(F), rng.normal(0, 1, (2, 4, 3, 3)).astype(F), \
        rng.normal(0, 1, (2, 4, 3, 3)).astype(F)
    _, out = run_layer(layer_from_text('name: "axpy" type: "Axpy"'), [a.shape, x.shape, y.shape], [], a, x, y)
    np.testing.assert_array_equal(out, y + a * x)
    with pytest.raises(CaffeError, match="bottom 0 \\(the scale\\) has shape"):
        convert_layer(layer_from_text('name: "axpy" type: "Axpy"'), [(2, 4, 3, 3), x.shape, y.shape], [])


@pytest.mark.parametrize("kind", ["ConvolutionDepthwise", "DepthwiseConvolution"])
def test_depthwise_convolutions(kind):
    rng = np.random.default_rng(8)
    x = rng.normal(0, 1, (2, 6, 7, 7)).astype(F)
    weight, bias = rng.normal(0, 1, (6, 1, 3, 3)).astype(F), rng.normal(0, 1, 6).astype(F)
    # ConvolutionDepthwise reads neither num_output nor group; DepthwiseConvolution is Convolution.
    param = "kernel_size: 3 stride: 2 pad: 1" + (" num_output: 6 group: 6" if kind == "DepthwiseConvolution" else "")
    converted, out = run_layer(layer_from_text(f'name: "dw" type: "{kind}" convolution_param {{ {param} }}'), [x.shape],
                          [weight, bias], x)
    assert converted.top_shapes == [(2, 6, 4, 4)]
    np.testing.assert_allclose(out, conv_reference(x, weight, bias, 2, 1, (1, 1), 6), rtol=1e-5, atol=1e-5)


def test_crop_center_crops_each_axis_symmetrically():
    x = np.arange(2 * 3 * 8 * 9, dtype=F).reshape(2, 3, 8, 9)
    layer = layer_from_text('name: "crop" type: "CropCenter" crop_center_param { crop_size: 0 crop_size: 0 '
                   'crop_size: 2 crop_size: 3 }')
    converted, out = run_layer(layer, [x.shape], [], x)
    np.testing.assert_array_equal(out, x[:, :, 2:-2, 3:-3])
    assert converted.top_shapes == [(2, 3, 4, 3)]
    _, larger = run_layer(layer, [x.shape], [], np.concatenate([x, x]))  # the batch axis stays free
    assert larger.shape == (4, 3, 4, 3)


SEGNET_LIKE = """name: "mini_segnet"
input: "data" input_shape { dim: 1 dim: 3 dim: 12 dim: 14 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "bn1" type: "BN" bottom: "conv1" top: "conv1" bn_param { bn_mode: INFERENCE } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" top: "pool1_mask" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "shuffle" type: "ShuffleChannel" bottom: "pool1" top: "shuffled" shuffle_channel_param { group: 2 } }
layer { name: "dw" type: "ConvolutionDepthwise" bottom: "shuffled" top: "dw" convolution_param { kernel_size: 3 pad: 1 } }
layer { name: "upsample1" type: "Upsample" bottom: "dw" bottom: "pool1_mask" top: "up1" upsample_param { scale: 2 } }
layer { name: "crop" type: "CropCenter" bottom: "up1" top: "crop" crop_center_param { crop_size: 0 crop_size: 0 crop_size: 1 crop_size: 2 } }
layer { name: "drop" type: "Dropout" bottom: "crop" top: "crop" dropout_param { dropout_ratio: 0.25 scale_train: false } }
layer { name: "score" type: "Convolution" bottom: "crop" top: "score" convolution_param { num_output: 2 kernel_size: 1 } }
"""


def test_fork_layers_in_a_net_export_run_in_half_and_write_standalone_code(tmp_path):
    from caffe2torch.export import export
    from caffe2torch.folder import save_net

    net = random_net(tmp_path, SEGNET_LIKE, std=0.5)
    x = torch.randn(1, 3, 12, 14)
    out = net(x)
    assert out.shape == (1, 2, 10, 10)
    for fmt in ("onnx", "pt2", "torchscript"):
        check = export(net, fmt, tmp_path / f"net.{fmt}")
        assert check.max_rel <= 1e-5, fmt
    half = net.half()(x.half())
    assert half.dtype == torch.float16 and torch.allclose(half.float(), out, rtol=0.05, atol=0.05)
    net.float()
    save_net(net, tmp_path / "folder")
    assert torch.equal(load_standalone(tmp_path / "folder")(x), net(x))


DEEPLAB_V1_TEST = """name: "deeplab_v1_test"
layers { name: "data" type: IMAGE_SEG_DATA top: "data" top: "label"
  image_data_param { source: "list.txt" batch_size: 1 label_type: PIXEL }
  transform_param { mean_value: 104 mean_value: 117 mean_value: 123 crop_size: 65 } include: { phase: TEST } }
layers { bottom: "data" top: "fc6" name: "fc6" type: CONVOLUTION blobs_lr: 1 blobs_lr: 2
  convolution_param { num_output: 4 pad: 12 kernel_size: 3 hole: 12 } }
layers { bottom: "fc6" top: "fc6" name: "relu6" type: RELU }
layers { bottom: "fc6" top: "fc8_interp" name: "fc8_interp" type: INTERP interp_param { zoom_factor: 2 } }
layers { name: "fc8_mat" type: MAT_WRITE bottom: "fc8_interp" mat_write_param { prefix: "out/" source: "list.txt" } }
layers { name: "silence" type: SILENCE bottom: "label" include: { phase: TEST } }
"""


def test_deeplab_v1_test_net_in_the_v1_format_converts(tmp_path):
    from caffe2torch.conversion import convert

    path = tmp_path / "test.prototxt"
    path.write_text(DEEPLAB_V1_TEST)
    conversion = convert(None, path)
    info = conversion.net.meta["caffe"]
    assert dict(info.inputs) == {"data": (1, 3, 65, 65)}
    assert info.blob_shapes["fc8_interp"] == (1, 4, 129, 129)
    assert conversion.net.fc6.dilation == (12, 12)  # hole 12, the LargeFOV setting
    assert any("'fc8_mat' (MatWrite)" in note for note in conversion.notes)
    assert conversion.warnings == []  # label_type is ImageSegData's own field, but that layer is left out


# ---------------------------------------------------------------- smaller fork types


def test_ave_exc_pad_pooling_divides_by_the_window_inside_the_image():
    rng = np.random.default_rng(9)
    x = rng.normal(0, 1, (1, 2, 5, 6)).astype(F)
    layer = layer_from_text('name: "p" type: "Pooling" pooling_param { pool: AVE_EXC_PAD kernel_size: 3 stride: 2 '
                            'pad: 1 }')
    converted, out = run_layer(layer, [x.shape], [], x)
    expected = np.zeros(converted.top_shapes[0], np.float64)
    for ph in range(expected.shape[2]):  # synopsys-caffe pooling_layer.cpp, AVE_EXC_PAD
        for pw in range(expected.shape[3]):
            hstart, wstart = ph * 2 - 1, pw * 2 - 1
            hend, wend = min(hstart + 3, 5 + 1), min(wstart + 3, 6 + 1)
            hstart, wstart, hend, wend = max(hstart, 0), max(wstart, 0), min(hend, 5), min(wend, 6)
            expected[0, :, ph, pw] = x[0, :, hstart:hend, wstart:wend].sum((1, 2)) / ((hend - hstart) * (wend - wstart))
    assert converted.top_shapes == [(1, 2, 3, 4)]
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_padding_pads_or_crops_both_spatial_axes():
    x = np.arange(2 * 4 * 5, dtype=F).reshape(1, 2, 4, 5)
    _, out = run_layer(layer_from_text('name: "p" type: "Padding" padding_param { pad_beg: 1 pad_end: 2 }'),
                       [x.shape], [], x)
    np.testing.assert_array_equal(out, np.pad(x, ((0, 0), (0, 0), (1, 2), (1, 2))))
    _, out = run_layer(layer_from_text('name: "p" type: "Padding" padding_param { pad_beg: -1 pad_end: -2 }'),
                       [x.shape], [], x)
    np.testing.assert_array_equal(out, x[:, :, 1:-2, 1:-2])
    with pytest.raises(CaffeError, match="must both be >= 0 or both <= 0"):
        convert_layer(layer_from_text('name: "p" type: "Padding" padding_param { pad_beg: -1 pad_end: 2 }'),
                      [x.shape], [])


def test_mish_and_enets_spatial_dropout():
    x = np.linspace(-5, 5, 24, dtype=F).reshape(1, 2, 3, 4)
    _, out = run_layer(layer_from_text('name: "m" type: "Mish"'), [x.shape], [], x)
    np.testing.assert_allclose(out, x * np.tanh(np.log1p(np.exp(x.astype(np.float64)))), rtol=1e-6, atol=1e-6)
    layer = caffe_pb2.LayerParameter(name="drop", type="Python")
    layer.python_param.module, layer.python_param.layer = "spatial_dropout", "SpatialDropoutLayer"
    layer.python_param.param_str = "{'phase': 'TEST', 'p': '0.01'}"
    converted, out = run_layer(layer, [x.shape], [], x)
    np.testing.assert_array_equal(out, x)  # identity at test time
    assert isinstance(converted.module, torch.nn.Dropout2d) and converted.module.p == 0.01


def test_a_python_data_layer_becomes_an_input(tmp_path):
    from caffe2torch.conversion import convert

    path = tmp_path / "val.prototxt"
    path.write_text('layer { name: "data" type: "Python" top: "data" top: "label" python_param { module: '
                    '"voc_layers" layer: "VOCSegDataLayer" param_str: "{}" } }\n'
                    'layer { name: "conv" type: "Convolution" bottom: "data" top: "score" '
                    'convolution_param { num_output: 2 kernel_size: 1 } }\n'
                    'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss" }\n')
    with pytest.raises(CaffeError, match=r"input 'data' has no shape \(data layer 'data' \(Python voc_layers.VOCSegDataLayer\) does not say"):
        convert(None, path)
    conversion = convert(None, path, input_shape=(1, 3, 8, 8))
    assert dict(conversion.net.meta["caffe"].inputs) == {"data": (1, 3, 8, 8)}
    assert any("'data' (Python) reads a dataset" in note for note in conversion.notes)
    # inspect describes such a net at a usual size and says so; the label (used by the loss only) is gone.
    from caffe2torch.inspect import describe

    info = describe(path)
    assert info["inputs"] == {"data": [1, 3, 224, 224]} and info["layers"][0]["top_shapes"] == [[1, 2, 224, 224]]
    assert ("input 'data' (from data layer 'data' (Python voc_layers.VOCSegDataLayer)) has no size in the net: "
            "shown for 1x3x224x224; give input_shape= for the size you use") in info["notes"]  # the API's words
    assert describe(path, input_shape=(1, 3, 8, 8))["inputs"] == {"data": [1, 3, 8, 8]}
    # A size the user gives is kept while another input's is assumed.
    path.write_text(path.read_text().replace(
        'layer { name: "conv"', 'layer { name: "aux" type: "ImageData" top: "aux" image_data_param { source: "x" } }\n'
        'layer { name: "join" type: "Concat" bottom: "data" bottom: "aux" top: "both" }\nlayer { name: "conv"')
        .replace('bottom: "data" top: "score"', 'bottom: "both" top: "score"'))
    info = describe(path, input_shape={"aux": (1, 1, 224, 224)})
    assert info["inputs"] == {"data": [1, 3, 224, 224], "aux": [1, 1, 224, 224]}


def test_inspect_describes_a_shapeless_net_at_the_first_usual_size_it_builds_at(tmp_path):
    from caffe2torch.inspect import describe

    segnet = tmp_path / "segnet_inference.prototxt"  # SegNet's pad_out_h fits CamVid's 360 rows, not 224
    segnet.write_text('layer { name: "data" type: "DenseImageData" top: "data" top: "label" '
                      'dense_image_data_param { source: "test.txt" batch_size: 1 } }\n' + "".join(
                          f'layer {{ name: "pool{i}" type: "Pooling" bottom: "{b}" top: "pool{i}" top: "mask{i}" '
                          f'pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}\n'
                          for i, b in ((1, "data"), (2, "pool1"), (3, "pool2"), (4, "pool3"))) +
                      'layer { name: "up4" type: "Upsample" bottom: "pool4" bottom: "mask4" top: "up4" '
                      'upsample_param { scale: 2 pad_out_h: true } }\n'
                      'layer { name: "up3" type: "Upsample" bottom: "up4" bottom: "mask3" top: "up3" '
                      'upsample_param { scale: 2 } }\n')
    info = describe(segnet)
    assert info["inputs"] == {"data": [1, 3, 360, 480]} and info["layers"][-1]["top_shapes"] == [[1, 3, 90, 120]]
    assert any("shown for 1x3x360x480" in note for note in info["notes"])
    segnet.write_text(segnet.read_text().replace("stride: 2 } }\nlayer { name: \"up4\"", "stride: 2 } }\n"
                      'layer { name: "crop" type: "Crop" bottom: "pool4" bottom: "pool1" top: "crop" }\n'
                      'layer { name: "up4"'))
    with pytest.raises(CaffeError, match=r"segnet_inference.prototxt: a data layer does not say its input size and "
                                         r"none of the usual sizes builds \(at 224x224: layer 'crop'"):
        describe(segnet)


V0_NET = """name: "v0"
input: "data"
input_dim: 1 input_dim: 3 input_dim: 9 input_dim: 9
layers { layer { name: "pad1" type: "padding" pad: 2 } bottom: "data" top: "pad1" }
layers { layer { name: "conv1" type: "conv" num_output: 4 kernelsize: 3 stride: 2 biasterm: false group: 1 }
  bottom: "pad1" top: "conv1" }
layers { layer { name: "relu1" type: "relu" } bottom: "conv1" top: "conv1" }
layers { layer { name: "pool1" type: "pool" pool: AVE kernelsize: 2 stride: 2 } bottom: "conv1" top: "pool1" }
layers { layer { name: "norm1" type: "lrn" local_size: 3 alpha: 0.0001 beta: 0.75 } bottom: "pool1" top: "norm1" }
layers { layer { name: "fc" type: "innerproduct" num_output: 5 } bottom: "norm1" top: "fc" }
layers { layer { name: "drop" type: "dropout" dropout_ratio: 0.4 } bottom: "fc" top: "fc" }
layers { layer { name: "prob" type: "softmax" } bottom: "fc" top: "prob" }
"""


def test_v0_nets_are_upgraded_as_caffe_does():
    from caffe2torch.read import parse_prototxt

    net = parse_prototxt(V0_NET, "v0.prototxt")
    assert [layer.type for layer in net.layer] == ["Convolution", "ReLU", "Pooling", "LRN", "InnerProduct",
                                                   "Dropout", "Softmax"]
    conv = net.layer[0]
    assert list(conv.bottom) == ["data"]  # the padding layer is folded into the convolution
    assert list(conv.convolution_param.pad) == [2] and not conv.convolution_param.bias_term
    assert net.layer[2].pooling_param.pool == caffe_pb2.PoolingParameter.AVE
    assert net.layer[3].lrn_param.local_size == 3 and net.layer[5].dropout_param.dropout_ratio == F(0.4)
    with pytest.raises(CaffeError, match="V0 layer 'x' has type 'warp'"):
        parse_prototxt('layers { layer { name: "x" type: "warp" } }', "v0.prototxt")


def test_caffe_fast_rcnn_dropout_without_train_scaling_scales_at_test_time():
    x = np.linspace(-1, 1, 12, dtype=F).reshape(1, 3, 2, 2)
    layer = layer_from_text('name: "drop6" type: "Dropout" dropout_param { dropout_ratio: 0.5 scale_train: false }')
    converted, out = run_layer(layer, [x.shape], [], x)
    np.testing.assert_array_equal(out, x * F(0.5))  # dropout_layer.cpp: caffe_scal(count, 1. / scale_, top)
    converted.module.train()
    torch.manual_seed(0)
    trained = converted.module(torch.ones(10000)).numpy()
    assert set(np.unique(trained)) == {0.0, 1.0} and 0.45 < trained.mean() < 0.55  # kept values are not rescaled
