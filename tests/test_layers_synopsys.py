"""synopsys-caffe's padding per side (pad_l/r/t/b), TensorFlow "SAME" (pad_type 1) and ResizeBilinear against loops
of its C++.

conv_layer.cpp / deconv_layer.cpp compute_output_shape, im2col.cpp's im2col_cpu and col2im_cpu (the near
side's pad, the SAME split), pooling_layer.cpp's Reshape (sizes, clip) and Forward_cpu (MAX, AVE, AVE_EXC_PAD),
resize_bilinear_layer.cpp.
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


def same_split(size: int, kernel: int, stride: int) -> int:
    """im2col.cpp, pad_type 1: the near side's padding (the undilated kernel's need, halved down)."""
    along = max(kernel - (stride if size % stride == 0 else size % stride), 0)
    return along // 2


def conv_reference(x, weight, bias, stride, dilation, top_left, out_size):
    """im2col_cpu + gemm: output (oh, ow) reads input (oh*s - pad_top + kh*d, ow*s - pad_left + kw*d), 0 outside."""
    n, c, height, width = x.shape
    out = np.zeros((n, weight.shape[0]) + tuple(out_size), np.float64)
    for oh in range(out_size[0]):
        for ow in range(out_size[1]):
            for kh in range(weight.shape[2]):
                for kw in range(weight.shape[3]):
                    h = oh * stride[0] - top_left[0] + kh * dilation[0]
                    w = ow * stride[1] - top_left[1] + kw * dilation[1]
                    if 0 <= h < height and 0 <= w < width:
                        out[:, :, oh, ow] += x[:, :, h, w].astype(np.float64) @ weight[:, :, kh, kw].T.astype(np.float64)
    return out + bias.reshape(1, -1, 1, 1)


@pytest.mark.parametrize("pads, stride", [((0, 1, 2, 0), (1, 1)), ((2, 0, 1, 1), (2, 3)), ((-1, 2, 0, -1), (1, 2))])
def test_convolution_pads_each_side_as_synopsys_im2col(pads, stride):
    left, right, top, bottom = pads
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (2, 3, 7, 8)).astype(F)
    weight, bias = rng.normal(0, 1, (4, 3, 3, 2)).astype(F), rng.normal(0, 1, 4).astype(F)
    layer = layer_from_text(f'name: "c" type: "Convolution" convolution_param {{ num_output: 4 kernel_h: 3 kernel_w: 2 '
                            f'stride_h: {stride[0]} stride_w: {stride[1]} pad_l: {left} pad_r: {right} pad_t: {top} '
                            f'pad_b: {bottom} }}')
    converted, out = run_layer(layer, [x.shape], [weight, bias], x)
    size = ((7 + top + bottom - 3) // stride[0] + 1, (8 + left + right - 2) // stride[1] + 1)  # compute_output_shape
    assert converted.top_shapes == [(2, 4) + size]
    np.testing.assert_allclose(out, conv_reference(x, weight, bias, stride, (1, 1), (top, left), size),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size, stride, dilation", [((7, 8), (2, 2), (1, 1)), ((9, 6), (3, 2), (2, 1)),
                                                    ((5, 5), (1, 1), (1, 3))])
def test_convolution_same_padding_as_synopsys_im2col(size, stride, dilation):
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, (1, 2) + size).astype(F)
    weight, bias = rng.normal(0, 1, (3, 2, 3, 3)).astype(F), rng.normal(0, 1, 3).astype(F)
    layer = layer_from_text(f'name: "c" type: "Convolution" convolution_param {{ num_output: 3 kernel_size: 3 '
                            f'stride_h: {stride[0]} stride_w: {stride[1]} dilation: {dilation[0]} '
                            f'dilation: {dilation[1]} pad_type: 1 }}')
    converted, out = run_layer(layer, [x.shape], [weight, bias], x)
    out_size = tuple(-(-n // s) for n, s in zip(size, stride))  # ceil(size / stride), whatever the kernel
    assert converted.top_shapes == [(1, 3) + out_size]
    top_left = tuple(same_split(n, 3, s) for n, s in zip(size, stride))
    np.testing.assert_allclose(out, conv_reference(x, weight, bias, stride, dilation, top_left, out_size),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pads, bias_term", [((1, 0, 2, 1), True), ((0, -1, -2, 1), False)])
def test_deconvolution_pads_each_side_as_synopsys_col2im(pads, bias_term):
    left, right, top, bottom = pads
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (1, 2, 4, 5)).astype(F)
    weight = rng.normal(0, 1, (2, 3, 3, 4)).astype(F)
    blobs = [weight] + ([rng.normal(0, 1, 3).astype(F)] if bias_term else [])
    layer = layer_from_text(f'name: "d" type: "Deconvolution" convolution_param {{ num_output: 3 kernel_h: 3 '
                            f'kernel_w: 4 stride: 2 bias_term: {str(bias_term).lower()} pad_l: {left} '
                            f'pad_r: {right} pad_t: {top} pad_b: {bottom} }}')
    converted, out = run_layer(layer, [x.shape], blobs, x)
    size = (2 * 3 + 3 - top - bottom, 2 * 4 + 4 - left - right)  # deconv_layer.cpp compute_output_shape
    assert converted.top_shapes == [(1, 3) + size]
    expected = np.zeros((1, 3) + size, np.float64)
    for i in range(4):  # col2im_cpu: input (i, j) through tap (kh, kw) lands on (i*s - pad_t + kh, j*s - pad_l + kw)
        for j in range(5):
            for kh in range(3):
                for kw in range(4):
                    h, w = i * 2 - top + kh, j * 2 - left + kw
                    if 0 <= h < size[0] and 0 <= w < size[1]:
                        expected[0, :, h, w] += x[0, :, i, j].astype(np.float64) @ weight[:, :, kh, kw]
    if bias_term:
        expected += blobs[1].reshape(1, -1, 1, 1)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def pool_reference(x, method, kernel, stride, near, far, out_size):
    """pooling_layer.cpp Forward_cpu with pad_top/left = near and pad_bottom/right = far."""
    _, _, height, width = x.shape
    out = np.zeros(x.shape[:2] + tuple(out_size), np.float64)
    for ph in range(out_size[0]):
        for pw in range(out_size[1]):
            hstart, wstart = ph * stride[0] - near[0], pw * stride[1] - near[1]
            if method == "MAX":
                hend, wend = min(hstart + kernel[0], height), min(wstart + kernel[1], width)
                hstart, wstart = max(hstart, 0), max(wstart, 0)
                window = x[:, :, hstart:hend, wstart:wend].reshape(x.shape[:2] + (-1,))
                out[:, :, ph, pw] = window.max(-1) if window.size else np.finfo(F).min
                continue
            hend, wend = min(hstart + kernel[0], height + far[0]), min(wstart + kernel[1], width + far[1])
            count = (hend - hstart) * (wend - wstart)
            hstart, wstart, hend, wend = max(hstart, 0), max(wstart, 0), min(hend, height), min(wend, width)
            if method == "AVE_EXC_PAD":
                count = (hend - hstart) * (wend - wstart)
            out[:, :, ph, pw] = x[:, :, hstart:hend, wstart:wend].sum((2, 3)) / count
    return out


@pytest.mark.parametrize("method", ["MAX", "AVE", "AVE_EXC_PAD"])
@pytest.mark.parametrize("pads, ceil", [((0, 1, 2, 0), True), ((1, 0, 0, 2), False), ((2, 2, 0, 1), True)])
def test_pooling_pads_each_side_as_synopsys_pooling(method, pads, ceil):
    left, right, top, bottom = pads
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, (1, 2, 7, 8)).astype(F)
    layer = layer_from_text(f'name: "p" type: "Pooling" pooling_param {{ pool: {method} kernel_h: 3 kernel_w: 3 '
                            f'stride: 2 pad_l: {left} pad_r: {right} pad_t: {top} pad_b: {bottom} '
                            f'ceil_mode: {str(ceil).lower()} }}')
    converted, out = run_layer(layer, [x.shape], [], x)
    rounding = (lambda v: -(-v // 2)) if ceil else (lambda v: v // 2)
    size = [rounding(7 + top + bottom - 3) + 1, rounding(8 + left + right - 3) + 1]  # Reshape, then the clip
    size = [o - 1 if (o - 1) * 2 >= n + p else o for o, n, p in zip(size, (7, 8), (top, left))]
    assert converted.top_shapes == [(1, 2) + tuple(size)]
    np.testing.assert_allclose(out, pool_reference(x, method, (3, 3), (2, 2), (top, left), (bottom, right), size),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("size, kernel, stride", [((7, 8), (3, 3), (2, 2)), ((6, 9), (2, 5), (3, 1))])
def test_pooling_same_padding_as_synopsys_pooling(method, size, kernel, stride):
    rng = np.random.default_rng(5)
    x = rng.normal(0, 1, (1, 2) + size).astype(F)
    layer = layer_from_text(f'name: "p" type: "Pooling" pooling_param {{ pool: {method} kernel_h: {kernel[0]} '
                            f'kernel_w: {kernel[1]} stride_h: {stride[0]} stride_w: {stride[1]} pad_type: 1 }}')
    converted, out = run_layer(layer, [x.shape], [], x)
    out_size = tuple(-(-n // s) for n, s in zip(size, stride))
    assert converted.top_shapes == [(1, 2) + out_size]
    near = tuple(same_split(n, k, s) for n, k, s in zip(size, kernel, stride))
    along = tuple(max(k - (s if n % s == 0 else n % s), 0) for n, k, s in zip(size, kernel, stride))
    far = tuple(a - b for a, b in zip(along, near))  # Forward_cpu: pad_bottom = pad_along - pad_top
    np.testing.assert_allclose(out, pool_reference(x, method, kernel, stride, near, far, out_size),
                               rtol=1e-6, atol=1e-6)


def test_padding_per_side_is_given_alone():
    shape = [(1, 2, 6, 6)]
    for text, match in [
        ('type: "Convolution" convolution_param { num_output: 1 kernel_size: 3 pad: 1 pad_l: 1 }', "give one of pad"),
        ('type: "Convolution" convolution_param { num_output: 1 kernel_size: 3 pad_type: 1 pad_t: 1 }',
         "give one of pad"),
        ('type: "Convolution" convolution_param { num_output: 1 kernel_size: 3 pad_type: 2 }', "unknown pad_type 2"),
        ('type: "Deconvolution" convolution_param { num_output: 1 kernel_size: 3 pad_type: 1 }',
         "pad_type 1 \\(SAME\\) is read by synopsys-caffe's Convolution only"),
        ('type: "Deconvolution" convolution_param { num_output: 1 kernel_size: 3 pad_l: -1 }',
         "a negative pad_l/r/t/b with a bias term"),
        ('type: "Pooling" pooling_param { kernel_size: 3 pad_h: 1 pad_w: 1 pad_b: 1 }', "give one of pad"),
        ('type: "Pooling" pooling_param { global_pooling: true pad_r: 1 }', "global_pooling takes no padding"),
    ]:
        layer = layer_from_text(f'name: "x" {text}')
        blobs = [np.zeros((1 if layer.type == "Convolution" else 2, 2 if layer.type == "Convolution" else 1, 3, 3), F),
                 np.zeros(1, F)] if layer.type != "Pooling" else []
        with pytest.raises(CaffeError, match=f"layer 'x' \\({layer.type}\\): {match}"):
            convert_layer(layer, shape, blobs)


def resize_reference(x, out_size, mode):
    """resize_bilinear_layer.cpp (NCHW): CalculateResizeScale, compute_interpolation_weights, compute_lerp, in float."""
    def table(n_in, n_out):
        if mode == "align_corners" and n_out > 1:
            scale = F(n_in - 1) / F(n_out - 1)
        else:
            scale = F(n_in) / F(n_out)
        rows = []
        for i in range(n_out):
            if mode == "align_corners" or mode == "asymmetric":
                position = F(i) * scale
            elif mode == "pytorch_half_pixel" and n_out == 1:
                position = F(-0.5)
            else:
                position = (F(i) + F(0.5)) * scale - F(0.5)
            low = np.floor(position)
            rows.append((max(int(low), 0), min(int(np.ceil(position)), n_in - 1), F(position - low)))
        return rows

    out = np.zeros(x.shape[:2] + tuple(out_size), F)
    for y, (y0, y1, y_lerp) in enumerate(table(x.shape[2], out_size[0])):
        for xo, (x0, x1, x_lerp) in enumerate(table(x.shape[3], out_size[1])):
            top = x[:, :, y0, x0] + (x[:, :, y0, x1] - x[:, :, y0, x0]) * x_lerp
            bottom = x[:, :, y1, x0] + (x[:, :, y1, x1] - x[:, :, y1, x0]) * x_lerp
            out[:, :, y, xo] = top + (bottom - top) * y_lerp
    return out


@pytest.mark.parametrize("mode", ["asymmetric", "align_corners", "half_pixel_centers", "pytorch_half_pixel"])
@pytest.mark.parametrize("size, out_size", [((5, 7), (13, 4)), ((9, 4), (1, 11)), ((3, 3), (65, 65))])
def test_resize_bilinear_is_synopsys_forward_bit_for_bit(mode, size, out_size):
    rng = np.random.default_rng(6)
    x = rng.normal(0, 1, (1, 2) + size).astype(F)
    flag = "" if mode == "asymmetric" else f"{mode}: true "
    layer = layer_from_text(f'name: "r" type: "ResizeBilinear" resize_bilinear_param {{ {flag}output_height: '
                            f'{out_size[0]} output_width: {out_size[1]} data_format: "NCHW" }}')
    converted, out = run_layer(layer, [x.shape], [], x)
    assert converted.top_shapes == [(1, 2) + out_size]
    np.testing.assert_array_equal(out, resize_reference(x, out_size, mode))


def test_resize_bilinear_scales_and_reads_nhwc_by_default():
    rng = np.random.default_rng(7)
    x = rng.normal(0, 1, (1, 6, 5, 3)).astype(F)  # N, H, W, C: the fork's default data_format
    layer = layer_from_text('name: "r" type: "ResizeBilinear" resize_bilinear_param { scale_height: 1.5 '
                            'scale_width: 2.3 }')
    converted, out = run_layer(layer, [x.shape], [], x)
    assert converted.top_shapes == [(1, 9, 11, 3)]  # floor(6 * 1.5), floor(5 * 2.3)
    expected = resize_reference(x.transpose(0, 3, 1, 2), (9, 11), "asymmetric").transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(out, expected)
    with pytest.raises(CaffeError, match="align_corners and half_pixel_centers exclude each other"):
        convert_layer(layer_from_text('name: "r" type: "ResizeBilinear" resize_bilinear_param { align_corners: true '
                                      'half_pixel_centers: true }'), [x.shape], [])


SYNOPSYS_LIKE = """name: "mini_synopsys"
input: "data" input_shape { dim: 1 dim: 3 dim: 9 dim: 10 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad_l: 0 pad_r: 1 pad_t: 0 pad_b: 1 } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" batch_norm_param { use_global_stats: true } }
layer { name: "same" type: "Convolution" bottom: "conv" top: "same" convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad_type: 1 } }
layer { name: "pool" type: "Pooling" bottom: "same" top: "pool" pooling_param { pool: AVE kernel_size: 2 stride: 1 pad_r: 1 pad_b: 1 } }
layer { name: "up" type: "Deconvolution" bottom: "pool" top: "up" convolution_param { num_output: 2 kernel_size: 4 stride: 2 pad_l: 1 pad_r: 2 pad_t: 1 pad_b: 2 } }
layer { name: "resize" type: "ResizeBilinear" bottom: "up" top: "resize" resize_bilinear_param { align_corners: true output_height: 9 output_width: 10 data_format: "NCHW" } }
"""


def test_padded_per_side_nets_export_run_in_half_and_write_standalone_code(tmp_path):
    from caffe2torch.export import export
    from caffe2torch.folder import save_net

    net = random_net(tmp_path, SYNOPSYS_LIKE, std=0.3)
    for module in net.modules():  # a usable variance for BatchNorm's stored statistics
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_var.abs_().add_(0.5)
    net.eval()
    x = torch.randn(1, 3, 9, 10)
    out = net(x)
    assert out.shape == (1, 2, 9, 10)  # conv 4x5, same 2x3, pool 2x3, up 3x5 (2*(n-1) + 4 - 3), resize
    for fmt in ("onnx", "pt2", "torchscript"):
        assert export(net, fmt, tmp_path / f"net.{fmt}").max_rel <= 1e-5, fmt
    assert torch.allclose(copy.deepcopy(net).half()(x.half()).float(), out, rtol=0.05, atol=0.05)
    save_net(net, tmp_path / "folder")
    assert torch.equal(load_standalone(tmp_path / "folder")(x), net(x))


def test_padding_that_the_fork_would_misread_is_refused():
    for text, shape, match in [
        ('type: "Pooling" pooling_param { pool: MAX kernel_size: 2 pad_l: 2 }', (1, 1, 4, 4),
         "pad_t/b 0/0 and pad_l/r 2/0 must be smaller than the kernel \\(2, 2\\)"),
        ('type: "Convolution" convolution_param { num_output: 1 kernel_size: 1 pad_l: -3 pad_r: -1 }', (1, 1, 4, 4),
         "pad -3 and -1 on axis W crop all 4 rows or columns away"),
        ('type: "Deconvolution" convolution_param { num_output: 1 kernel_h: 3 kernel_w: 1 stride_h: 1 stride_w: 2 '
         'bias_term: false pad_l: -2 pad_r: 2 }', (1, 1, 4, 1), "pad -2 and 2 on axis W crop all 1 rows"),
    ]:
        layer = layer_from_text(f'name: "x" {text}')
        blobs = [] if layer.type == "Pooling" else [np.zeros((1, 1, 3 if "kernel_h: 3" in text else 1,
                                                              1), F)] + ([np.zeros(1, F)] if "bias_term" not in text else [])
        with pytest.raises(CaffeError, match=f"layer 'x' \\({layer.type}\\): {match}"):
            convert_layer(layer, [shape], blobs)
    # synopsys checks pad_h / pad_w by value: explicit zeros beside pad_type 1 are fine
    layer = layer_from_text('name: "x" type: "Convolution" convolution_param { num_output: 1 kernel_size: 3 '
                            'pad_h: 0 pad_w: 0 pad_type: 1 stride: 2 }')
    assert convert_layer(layer, [(1, 1, 5, 5)], [np.zeros((1, 1, 3, 3), F), np.zeros(1, F)]).top_shapes == \
        [(1, 1, 3, 3)]


def test_synopsys_relu_caps_and_floors_and_zeroes_nan():
    x = np.array([[np.nan, -np.inf, -1.0, -0.01, 3.0, 7.0, np.inf]], F)
    for text, expected in [
        ("relu6: true", [0, 0, 0, 0, 3, 6, 6]),
        ("negative_slope: 0.1 maximum: 5 minimum: -0.05", [0, -0.05, -0.05, F(0.1) * F(-0.01), 3, 5, 5]),
        ("relu6: true maximum: 8", [0, 0, 0, 0, 3, 6, 6]),
    ]:
        _, out = run_layer(layer_from_text(f'name: "r" type: "ReLU" relu_param {{ {text} }}'), [x.shape], [], x)
        # relu_layer.cpp (synopsys): max(x, 0) + slope * min(x, 0); NaN -> 0; min(., 6); min(., maximum); max(., minimum)
        np.testing.assert_array_equal(out[0], np.array(expected, F))


def test_resize_bilinear_refuses_a_scale_that_is_no_size():
    for scale in ("inf", "nan", "-2", "0"):
        layer = layer_from_text(f'name: "r" type: "ResizeBilinear" resize_bilinear_param {{ data_format: "NCHW" '
                                f'output_width: 4 scale_height: {scale} }}')
        with pytest.raises(CaffeError, match="layer 'r' \\(ResizeBilinear\\): scale .* for a missing output_height "
                                             "must be a positive number"):
            convert_layer(layer, [(1, 1, 3, 3)], [])
