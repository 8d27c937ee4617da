"""Convolution, Pooling, normalization and Interp converters against Caffe's outputs and its formulas as loops."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffe2torch.errors import CaffeError
from caffe2torch.layers import convert_layer
from caffe2torch.modules import interp_table
from proto import caffe_pb2

FLT_MAX = np.finfo(np.float32).max
FAMILY_TYPES = {"Convolution", "Deconvolution", "InnerProduct", "Pooling", "BatchNorm", "BN", "Scale", "Bias",
                "LRN", "Interp"}
# unit net -> number of its recorded layers this family converts
UNITS = {
    "unit_conv_basic": 6, "unit_conv_group_dilation": 5, "unit_innerproduct": 5, "unit_pool_ave": 6,
    "unit_pool_max": 6, "unit_pool_clip_a": 2, "unit_pool_empty_window": 2, "unit_batchnorm_scale_bias": 8,
    "unit_fork_bn": 3, "unit_interp": 9,
}
# Exact in Caffe's order of float32 operations here; BN and BatchNorm are torch's BatchNorm, a few ulp apart.
BIT_EXACT_TYPES = {"Interp", "Pooling", "Scale", "Bias"}


def layer_from_text(text: str) -> caffe_pb2.LayerParameter:
    return text_format.Parse(text, caffe_pb2.LayerParameter())


def run(layer: caffe_pb2.LayerParameter, bottoms: list[np.ndarray], blobs: list[np.ndarray] = ()):
    converted = convert_layer(layer, [b.shape for b in bottoms], [np.asarray(b, np.float32) for b in blobs])
    tensors = [torch.from_numpy(np.asarray(b, np.float32)) for b in bottoms]
    with torch.no_grad():
        if converted.per_bottom:  # Caffe applies one convolution to each bottom in turn
            out = tuple(converted.module(x) for x in tensors)
        else:
            out = converted.module(*tensors)
    tops = [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]
    assert [t.shape for t in tops] == [tuple(s) for s in converted.top_shapes]
    assert all(t.dtype == np.float32 for t in tops)
    return tops


def assert_caffe_close(actual: np.ndarray, expected: np.ndarray, what: str, tolerance: float = 1e-6) -> None:
    """Relative L2 error <= tolerance over ordinary values; NaN and -FLT_MAX at exactly the same places."""
    assert actual.shape == expected.shape, what
    for special in (np.isnan, lambda a: a == -FLT_MAX):
        np.testing.assert_array_equal(special(actual), special(expected), err_msg=what)
    ordinary = ~np.isnan(expected) & (expected != -FLT_MAX)
    diff = actual[ordinary].astype(np.float64) - expected[ordinary]
    scale = max(np.linalg.norm(expected[ordinary].astype(np.float64)), 1e-30)
    assert np.linalg.norm(diff) / scale <= tolerance, f"{what}: relative L2 error {np.linalg.norm(diff) / scale:.3g}"


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_unit_net_layers_match_caffe(units_dir, unit: str) -> None:
    net = text_format.Parse((units_dir / f"{unit}.prototxt").read_text(), caffe_pb2.NetParameter())
    layers = {layer.name: layer for layer in net.layer}
    checked = []
    with h5py.File(units_dir / f"{unit}.ref.h5", "r") as ref, h5py.File(units_dir / f"{unit}.caffemodel.h5", "r") as weights:
        latest = {name: ref["input"][name][()] for name in ref["input"]}  # blob name -> tensor as Caffe had it
        for key in sorted(ref["layers"]):
            record = ref["layers"][key]
            name, kind, tops = record.attrs["name"], record.attrs["type"], list(record.attrs["tops"])
            if kind in FAMILY_TYPES:
                layer = layers[name]
                group = weights["data"].get(name, {})
                blobs = [group[i][()] for i in sorted(group, key=int)]
                outputs = run(layer, [latest[b] for b in layer.bottom], blobs)
                for k, output in enumerate(outputs):
                    expected = record[str(k)]["data"][()]
                    assert_caffe_close(output, expected, f"{unit}/{name}")
                    if kind in BIT_EXACT_TYPES:
                        np.testing.assert_array_equal(output, expected, err_msg=f"{unit}/{name}")
                checked.append(name)
            for k, top in enumerate(tops):
                latest[top] = record[str(k)]["data"][()]
    assert len(checked) == UNITS[unit], checked


def test_empty_pooling_windows_are_caffe_sentinels(units_dir) -> None:
    """Stride 3 > kernel 2 on 12 rows: Caffe's 5th window row lies wholly outside the image."""
    with h5py.File(units_dir / "unit_pool_empty_window.ref.h5", "r") as ref:
        x = ref["input"]["data"][()]
    max_top, = run(layer_from_text('name: "m" type: "Pooling" pooling_param { pool: MAX kernel_size: 2 stride: 3 }'),
                   [x])
    ave_top, = run(layer_from_text('name: "a" type: "Pooling" pooling_param { pool: AVE kernel_size: 2 stride: 3 }'),
                   [x])
    assert max_top.shape == ave_top.shape == (1, 2, 5, 4)
    assert (max_top[:, :, 4, :] == -FLT_MAX).all() and (max_top[:, :, :4, :] > -FLT_MAX).all()
    assert np.isnan(ave_top[:, :, 4, :]).all() and not np.isnan(ave_top[:, :, :4, :]).any()


# --- explicit loops from Caffe's C++ (pooling_layer.cpp, deconv col2im, lrn_layer.cpp, interp.cpp) ---

def pool_loops(x, method, kernel, stride, pad, out):
    n, c, h, w = x.shape
    top = np.zeros((n, c) + out, np.float32)
    for ph in range(out[0]):
        for pw in range(out[1]):
            hs, ws = ph * stride[0] - pad[0], pw * stride[1] - pad[1]
            if method == "MAX":
                window = x[:, :, max(hs, 0):min(hs + kernel[0], h), max(ws, 0):min(ws + kernel[1], w)]
                best = np.full((n, c), -FLT_MAX, np.float32)
                for value in window.reshape(n, c, -1).transpose(2, 0, 1):
                    best = np.where(value > best, value, best)  # NaN never wins
                top[:, :, ph, pw] = best
            else:
                count = (min(hs + kernel[0], h + pad[0]) - hs) * (min(ws + kernel[1], w + pad[1]) - ws)
                total = x[:, :, max(hs, 0):min(hs + kernel[0], h), max(ws, 0):min(ws + kernel[1], w)].sum((2, 3))
                with np.errstate(invalid="ignore", divide="ignore"):
                    top[:, :, ph, pw] = total / np.float32(count)
    return top


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("params,out", [
    ("kernel_size: 3 stride: 2 pad_h: 1 pad_w: 0", (4, 5)),  # one axis padded: clip rule checks both
    ("kernel_h: 2 kernel_w: 1 stride_h: 3 stride_w: 4", (3, 4)),  # width: last window past the image
    ("kernel_size: 4 stride: 3 pad: 2", (3, 4)),  # clipped on both axes
    ("kernel_size: 2 stride: 99999", (2, 2)),  # the second window lies 99999 rows out: a constant, no huge pad
])
def test_pooling_matches_caffe_loops(method, params, out) -> None:
    x = np.random.default_rng(3).standard_normal((2, 3, 7, 10)).astype(np.float32)
    x[0, 0, 1, 1], x[0, 1, 2, 2], x[1, 2, 0, :] = np.nan, -np.inf, -np.inf
    layer = layer_from_text(f'name: "p" type: "Pooling" pooling_param {{ pool: {method} {params} }}')
    pool = convert_layer(layer, [x.shape], []).module
    assert pool.output_size(x.shape[2:]) == out
    top, = run(layer, [x])
    expected = pool_loops(x, method, pool.kernel, pool.stride, pool.pad, out)
    np.testing.assert_allclose(top, expected, rtol=1e-6, atol=1e-6, equal_nan=True)


def deconv_loops(x, weight, bias, stride, pad, dilation, group):
    n, channels, height, width = x.shape
    per_group_out, kh, kw = weight.shape[1:]
    per_group_in = channels // group
    out_h = stride[0] * (height - 1) + dilation[0] * (kh - 1) + 1 - 2 * pad[0]
    out_w = stride[1] * (width - 1) + dilation[1] * (kw - 1) + 1 - 2 * pad[1]
    top = np.zeros((n, per_group_out * group, out_h, out_w))
    for c in range(channels):
        outs = slice((c // per_group_in) * per_group_out, (c // per_group_in + 1) * per_group_out)
        for h in range(height):
            for w in range(width):
                for i in range(kh):
                    for j in range(kw):
                        oh = h * stride[0] - pad[0] + i * dilation[0]
                        ow = w * stride[1] - pad[1] + j * dilation[1]
                        if 0 <= oh < out_h and 0 <= ow < out_w:
                            top[:, outs, oh, ow] += x[:, c, h, w, None] * weight[c, :, i, j]
    if bias is not None:
        top += bias[None, :, None, None]
    return top


@pytest.mark.parametrize("params,bias", [
    ("num_output: 6 kernel_size: 3 stride: 2 pad: 1 group: 2", True),
    ("num_output: 2 kernel_h: 2 kernel_w: 3 stride_h: 3 stride_w: 1 pad_h: 0 pad_w: 1 dilation: 2", True),
    ("num_output: 4 kernel_size: 1 stride: 2 pad: 1 group: 4 bias_term: false", False),  # pad > kernel extent
    ("num_output: 3 kernel_size: 4 stride: 2 pad: 1 dilation: 1 dilation: 2", True),
])
def test_deconvolution_matches_caffe_loops(params, bias) -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 4, 5, 6)).astype(np.float32)
    layer = layer_from_text(f'name: "d" type: "Deconvolution" convolution_param {{ {params} }}')
    param = layer.convolution_param
    kernel = (param.kernel_h, param.kernel_w) if param.kernel_h else (param.kernel_size[0],) * 2
    weight = rng.standard_normal((4, param.num_output // param.group) + kernel).astype(np.float32)
    blobs = [weight] + ([rng.standard_normal(param.num_output).astype(np.float32)] if bias else [])
    stride = (param.stride_h, param.stride_w) if param.stride_h else (param.stride[0],) * 2
    pad = (param.pad_h, param.pad_w) if param.HasField("pad_h") else (param.pad[0],) * 2
    dilation = tuple(param.dilation) * (3 - len(param.dilation)) if param.dilation else (1, 1)
    top, = run(layer, [x], blobs)
    expected = deconv_loops(x, weight, blobs[1] if bias else None, stride, pad, dilation, param.group)
    assert_caffe_close(top, expected.astype(np.float32), params)


@pytest.mark.parametrize("region,size", [("ACROSS_CHANNELS", 3), ("ACROSS_CHANNELS", 5), ("WITHIN_CHANNEL", 3),
                                         ("WITHIN_CHANNEL", 5)])
def test_lrn_matches_caffe_loops(region, size) -> None:
    x = np.random.default_rng(7).standard_normal((2, 4, 6, 5)).astype(np.float32) * 2
    alpha, beta, k = 0.7, 0.6, 1.5
    layer = layer_from_text(f'name: "n" type: "LRN" lrn_param {{ local_size: {size} alpha: {alpha} beta: {beta} '
                            f'k: {k} norm_region: {region} }}')
    top, = run(layer, [x])
    xd, half = x.astype(np.float64), (size - 1) // 2
    expected = np.empty_like(xd)
    _, channels, height, width = x.shape
    for c in range(channels):
        for h in range(height):
            for w in range(width):
                if region == "ACROSS_CHANNELS":
                    s = (xd[:, max(c - half, 0):c + half + 1, h, w] ** 2).sum(1)
                    expected[:, c, h, w] = xd[:, c, h, w] * (k + alpha / size * s) ** -beta
                else:  # k unused; the AVE divisor counts padded positions: always size * size here
                    hs, ws = h - half, w - half
                    count = (min(hs + size, height + half) - hs) * (min(ws + size, width + half) - ws)
                    s = (xd[:, c, max(hs, 0):hs + size, max(ws, 0):ws + size] ** 2).sum((1, 2))
                    expected[:, c, h, w] = xd[:, c, h, w] * (1 + alpha * s / count) ** -beta
    assert_caffe_close(top, expected.astype(np.float32), f"LRN {region} {size}")


def interp_loops(x, pad_beg, eff, out):
    """caffe_cpu_interp2 (non-packed) on the crop at offset -pad_beg, scalar float32 as in C++."""
    f32 = np.float32
    crop = x[:, :, -pad_beg:-pad_beg + eff[0], -pad_beg:-pad_beg + eff[1]]
    if tuple(eff) == tuple(out):
        return crop.copy()
    rh = f32(eff[0] - 1) / f32(out[0] - 1) if out[0] > 1 else f32(0)
    rw = f32(eff[1] - 1) / f32(out[1] - 1) if out[1] > 1 else f32(0)
    top = np.empty(x.shape[:2] + tuple(out), np.float32)
    for h2 in range(out[0]):
        h1r = f32(rh * f32(h2))
        h1 = int(h1r)
        h1p = 1 if h1 < eff[0] - 1 else 0
        h1l = f32(h1r - f32(h1))
        h0l = f32(1) - h1l
        for w2 in range(out[1]):
            w1r = f32(rw * f32(w2))
            w1 = int(w1r)
            w1p = 1 if w1 < eff[1] - 1 else 0
            w1l = f32(w1r - f32(w1))
            w0l = f32(1) - w1l
            p = crop[:, :, h1:h1 + 2, w1:w1 + 2]
            top[:, :, h2, w2] = (h0l * (w0l * p[:, :, 0, 0] + w1l * p[:, :, 0, w1p])
                                 + h1l * (w0l * p[:, :, h1p, 0] + w1l * p[:, :, h1p, w1p]))
    return top


@pytest.mark.parametrize("params,out", [
    ("zoom_factor: 3 pad_beg: -1 pad_end: -2", (13, 28)),
    ("shrink_factor: 2 pad_beg: -2", (3, 6)),
    ("height: 13 width: 1 pad_end: -1", (13, 1)),
    ("height: 6 width: 11 pad_beg: -1 pad_end: -1", (6, 11)),  # crop only: a copy
    ("height: 3 width: 21", (3, 21)),  # downsampling rows path
    ("zoom_factor: 2 shrink_factor: 3", (5, 9)),
])
def test_interp_is_bit_exact_with_caffe_loops(params, out) -> None:
    x = np.random.default_rng(11).standard_normal((2, 3, 8, 13)).astype(np.float32)
    layer = layer_from_text(f'name: "i" type: "Interp" interp_param {{ {params} }}')
    top, = run(layer, [x])
    pad_beg, pad_end = layer.interp_param.pad_beg, layer.interp_param.pad_end
    eff = (8 + pad_beg + pad_end, 13 + pad_beg + pad_end)
    assert top.shape == (2, 3) + out
    np.testing.assert_array_equal(top, interp_loops(x, pad_beg, eff, out))


def test_icnet_interp_layers_are_bit_exact(reference_dir) -> None:
    """The 257x513 ICNet file keeps the Interp inputs but only samples of the outputs: match them exactly."""
    net = text_format.Parse((reference_dir / "icnet_merged_257x513.prototxt").read_text(), caffe_pb2.NetParameter())
    layers = {layer.name: layer for layer in net.layer}
    with h5py.File(reference_dir / "icnet_merged_257x513.ref.h5", "r") as ref:
        records = {ref["layers"][key].attrs["name"]: ref["layers"][key]["0"] for key in ref["layers"]}
        for name in ["conv5_3_pool1_interp", "conv5_3_pool2_interp", "conv5_3_pool3_interp",
                     "conv5_3_pool6_interp", "conv6_interp"]:
            layer = layers[name]
            top, = run(layer, [records[layer.bottom[0]]["data"][()]])
            record = records[name]
            np.testing.assert_array_equal(top.reshape(-1)[record["sample_index"][()]], record["sample_value"][()],
                                          err_msg=name)
            assert (top.min(), top.max()) == (record.attrs["min"], record.attrs["max"]), name
        np.testing.assert_array_equal(top[0].argmax(0), ref["final"]["argmax"][()])


def test_interp_tables_keep_float32_ratio() -> None:
    """1025 -> 2049 style: ratio (n-1)/(m-1) rounded to float32, product in float32, +1 clamped."""
    index, next_index, near, far = (t.numpy() for t in interp_table(257, 1025))
    ratio = np.float32(256) / np.float32(1024)
    np.testing.assert_array_equal(far, ratio * np.arange(1025, dtype=np.float32) - index.astype(np.float32))
    assert index[-1] == 256 and next_index[-1] == 256 and (near + far == 1).all()


def test_modules_take_their_sizes_from_the_input() -> None:
    """Window layouts and Interp tables follow the input, as Caffe's Reshape(): each module shows only its
    parameters, and gives Caffe's sizes at any input size (global pooling: one window over the whole input)."""
    pool = layer_from_text('name: "p" type: "Pooling" pooling_param { pool: AVE global_pooling: true }')
    interp = layer_from_text('name: "i" type: "Interp" interp_param { zoom_factor: 2 }')
    pooled = convert_layer(pool, [(1, 2, 5, 7)], []).module
    zoomed = convert_layer(interp, [(1, 2, 5, 7)], []).module
    assert repr(pooled) == "Pool2d(method='AVE', kernel=None, stride=(1, 1), pad=(0, 0), ceil=True)"
    assert repr(zoomed) == "Interp(zoom=2, pad_beg=0, pad_end=0)"
    x = torch.arange(2 * 9 * 4, dtype=torch.float32).reshape(1, 2, 9, 4)
    assert torch.equal(pooled(x), x.mean((2, 3), keepdim=True))
    assert zoomed(x).shape == (1, 2, 17, 7) and zoomed.output_size((9, 4)) == (17, 7)
    assert torch.equal(zoomed(x)[:, :, ::2, ::2], x)


def test_convolution_forms_axis_and_several_bottoms() -> None:
    rng = np.random.default_rng(13)
    x = rng.standard_normal((2, 3, 3, 9, 8)).astype(np.float32)
    weight, bias = rng.standard_normal((4, 3, 3, 5)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    hw = layer_from_text('name: "c" type: "Convolution" convolution_param { num_output: 4 kernel_h: 3 kernel_w: 5 '
                         'pad_h: 1 pad_w: 2 stride_h: 2 stride_w: 1 }')
    repeated = layer_from_text('name: "c" type: "Convolution" convolution_param { num_output: 4 kernel_size: 3 '
                               'kernel_size: 5 pad: 1 pad: 2 stride: 2 stride: 1 axis: 2 }')
    reference, = run(hw, [x[0]], [weight, bias])
    tops = run(repeated, [x, x[::-1].copy()], [weight, bias])
    np.testing.assert_array_equal(tops[0][0], reference)
    np.testing.assert_array_equal(tops[1][1], reference)
    k1 = layer_from_text('name: "c" type: "Convolution" '
                         'convolution_param { num_output: 1 kernel_size: 1 bias_term: false }')
    top, = run(k1, [x[0]], [np.full((1, 3, 1, 1), 2, np.float32)])
    np.testing.assert_allclose(top[:, 0], 2 * x[0].sum(1), rtol=1e-6)


def test_inner_product_transpose_and_axis() -> None:
    rng = np.random.default_rng(17)
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    weight, bias = rng.standard_normal((6, 20)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    plain = layer_from_text('name: "f" type: "InnerProduct" inner_product_param { num_output: 6 axis: -2 }')
    flipped = layer_from_text('name: "f" type: "InnerProduct" '
                              'inner_product_param { num_output: 6 axis: 2 transpose: true }')
    top, = run(plain, [x], [weight, bias])
    assert top.shape == (2, 3, 6)
    np.testing.assert_allclose(top, x.reshape(2, 3, 20) @ weight.T + bias, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run(flipped, [x], [weight.T.copy(), bias])[0], top, rtol=1e-6, atol=1e-6)


def test_batchnorm_zero_scale_factor_and_scale_without_weights() -> None:
    x = np.random.default_rng(19).standard_normal((2, 3, 4)).astype(np.float32)
    bn = layer_from_text('name: "b" type: "BatchNorm" batch_norm_param { eps: 0.25 }')
    blobs = [np.ones(3, np.float32), np.ones(3, np.float32), np.zeros(1, np.float32)]
    np.testing.assert_array_equal(run(bn, [x], blobs)[0], x / np.float32(0.5))
    scale = layer_from_text('name: "s" type: "Scale" scale_param { bias_term: true '
                            'bias_filler { type: "constant" value: 0.5 } }')
    converted = convert_layer(scale, [x.shape], [])
    assert converted.warnings
    np.testing.assert_array_equal(run(scale, [x])[0], x + np.float32(0.5))


@pytest.mark.parametrize("text,shapes,blobs,message", [
    ('type: "Convolution" convolution_param { num_output: 2 kernel_size: 3 kernel_h: 3 kernel_w: 3 }',
     [(1, 3, 5, 5)], [(2, 3, 3, 3), (2,)], "kernel_size or kernel_h/kernel_w"),
    ('type: "Convolution" convolution_param { num_output: 2 kernel_size: 3 group: 2 }',
     [(1, 3, 5, 5)], [], "group 2"),
    ('type: "Convolution" convolution_param { num_output: 2 kernel_size: 3 }',
     [(1, 3, 5, 5)], [(2, 3, 3, 2), (2,)], r"weight blob has shape \(2, 3, 3, 2\), expected \(2, 3, 3, 3\)"),
    ('type: "Convolution" convolution_param { num_output: 2 kernel_size: 7 }',
     [(1, 3, 5, 5)], [(2, 3, 7, 7), (2,)], "kernel extent 7"),
    ('type: "Convolution" convolution_param { num_output: 2 kernel_size: 3 kernel_size: 3 kernel_size: 3 }',
     [(1, 3, 5, 5)], [(2, 3, 3, 3), (2,)], "given 3 times"),
    ('type: "InnerProduct" inner_product_param { num_output: 4 }',
     [(2, 3, 5)], [(4, 14), (4,)], "weight blob"),
    ('type: "Pooling" pooling_param { pool: MAX kernel_size: 2 pad: 2 }', [(1, 1, 5, 5)], [], "smaller than kernel"),
    ('type: "Pooling" pooling_param { pool: STOCHASTIC kernel_size: 2 }', [(1, 1, 5, 5)], [], "STOCHASTIC"),
    ('type: "Pooling" pooling_param { pool: MAX global_pooling: true kernel_size: 2 }', [(1, 1, 5, 5)], [],
     "global_pooling"),
    ('type: "Pooling" pooling_param { pool: AVE kernel_h: 2 }', [(1, 1, 5, 5)], [], "kernel_h and kernel_w"),
    ('type: "Interp" interp_param { zoom_factor: 2 pad_beg: 1 }', [(1, 1, 5, 5)], [], "must be <= 0"),
    ('type: "Interp" interp_param { height: 5 }', [(1, 1, 5, 5)], [], "both height and width"),
    ('type: "Interp" interp_param { shrink_factor: 0 }', [(1, 1, 5, 5)], [], "shrink_factor must be >= 1"),
    ('type: "Interp" interp_param { zoom_factor: 2 pad_beg: -3 pad_end: -3 }', [(1, 1, 5, 5)], [], "empty"),
    ('type: "BN"', [(1, 2, 3, 3)], [(1, 2, 1, 1)] * 3, "expected 4 parameter blobs"),
    ('type: "BN"', [(1, 2, 3, 3)], [(1, 3, 1, 1)] * 4, "slope blob"),
    ('type: "Scale"', [(2, 3, 4), (4,)], [], "does not match"),
    ('type: "Scale" scale_param { filler { type: "gaussian" } }', [(2, 3, 4)], [], "random"),
    ('type: "Bias" bias_param { axis: 1 num_axes: 3 }', [(2, 3, 4)], [], "extend past"),
    ('type: "LRN" lrn_param { local_size: 4 }', [(1, 2, 3, 3)], [], "odd"),
])
def test_bad_parameters_name_the_layer(text, shapes, blobs, message) -> None:
    layer = layer_from_text(f'name: "bad_layer" {text}')
    with pytest.raises(CaffeError, match=message) as caught:
        convert_layer(layer, shapes, [np.zeros(s, np.float32) for s in blobs])
    assert "bad_layer" in str(caught.value)


def test_batch_norm_without_global_stats_uses_batch_statistics() -> None:
    """`use_global_stats: false` in TEST: Caffe normalises with the batch's own mean and (biased) variance."""
    layer = layer_from_text('name: "b" type: "BatchNorm" batch_norm_param { use_global_stats: false eps: 0.001 }')
    x = np.random.default_rng(5).standard_normal((3, 2, 4, 5)).astype(np.float32) * 3 + 1
    blobs = [np.ones(2, np.float32), np.ones(2, np.float32), np.ones(1, np.float32)]  # ignored by Caffe here
    module = convert_layer(layer, [x.shape], blobs).module
    assert isinstance(module, torch.nn.BatchNorm2d) and not module.track_running_stats
    top, = run(layer, [x], blobs)
    mean, var = x.mean(axis=(0, 2, 3), keepdims=True), x.var(axis=(0, 2, 3), keepdims=True)
    np.testing.assert_allclose(top, (x - mean) / np.sqrt(var + np.float32(0.001)), rtol=2e-5, atol=2e-5)
