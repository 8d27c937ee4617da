"""NVCaffe, Intel Caffe and DeconvNet / DecoupledNet layers against explicit loops of each fork's forward.

NVCaffe (NVIDIA/caffe caffe-0.17): batch_norm_layer.cpp (scale_bias), elu_layer.cpp (lambda), blob.cpp's raw_data.
Intel Caffe (intel/caffe): mkldnn_batch_norm_layer.cpp, mkldnn_concat_layer.cpp (per_fla_fuse),
mkldnn_convolution_layer.cpp (relu, SUM_FUSION), mkldnn_inner_product_layer.cpp, mkldnn_pooling_layer.cpp
(avg_include_pad), mkldnn_relu_layer.cpp (fuse), spatial_dropout_layer.cpp. DeconvNet (HyeonwooNoh/caffe):
unpooling_layer.cpp, relu_layer.cpp's mask, its V1 types; caffe-yolo9000's reorg default.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe2torch.errors import CaffeError
from caffe2torch.read import parse_caffemodel, parse_prototxt
from proto import caffe_pb2
from tests.conftest import layer_from_text, load_standalone, run_layer, wire_field

F = np.float32


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---------------------------------------------------------------- NVCaffe


def test_nvcaffe_batch_norm_scale_bias_matches_its_test_forward():
    # TEST: (x - mean) * (var + max(eps, 1e-5))^-0.5 * scale + bias; blobs[2] unread, use_global_stats ignored.
    rng = _rng()
    x = rng.standard_normal((2, 3, 4, 5)).astype(F)
    mean, var = rng.standard_normal(3).astype(F), (rng.random(3) + 0.1).astype(F)
    scale, bias = rng.standard_normal(3).astype(F), rng.standard_normal(3).astype(F)
    blobs = [mean, var, np.array([7.0], F), scale, bias]
    layer = layer_from_text('name: "bn" type: "BatchNorm" batch_norm_param { scale_bias: true eps: 1e-7 '
                            'use_global_stats: false }')
    _, got = run_layer(layer, [x.shape], blobs, x)
    eps = max(F(1e-7), F(1e-5))
    want = np.empty_like(x)
    for c in range(3):
        inv = np.power(var[c] + eps, F(-0.5), dtype=F)
        want[:, c] = ((x[:, c] - mean[c]) * inv) * scale[c] + bias[c]
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
    # Three blobs with scale_bias is a file NVCaffe refuses too.
    with pytest.raises(CaffeError, match="expected 5 parameter blobs, got 3"):
        run_layer(layer, [x.shape], blobs[:3], x)


def test_nvcaffe_fillers_imply_scale_bias_and_fill_a_missing_blob():
    layer = layer_from_text('name: "bn" type: "BatchNorm" batch_norm_param { scale_filler { type: "constant" '
                            'value: 2 } }')
    x = np.ones((1, 2, 1, 1), F)
    # No weights: zero statistics, factor 1, scale from the filler, bias 0: 2 * 1 / sqrt(0 + 1e-5).
    _, got = run_layer(layer, [x.shape], [], x)
    np.testing.assert_allclose(got, np.full_like(x, 2 / np.sqrt(F(1e-5))), rtol=1e-6)


def test_nvcaffe_elu_lambda():
    layer = layer_from_text('name: "elu" type: "ELU" elu_param { alpha: 1.6732632 lambda: 1.0507010 }')
    x = np.linspace(-4, 4, 41, dtype=F).reshape(1, 41)
    _, got = run_layer(layer, [x.shape], [], x)
    alpha, lam = F(1.6732632), F(1.0507010)
    want = np.array([lam * (max(v, F(0)) + alpha * (np.exp(min(v, F(0))) - F(1))) for v in x[0]], F)[None]
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)


def test_nvcaffe_float16_raw_blobs_are_read():
    # blob.cpp FromProto: raw_data of raw_data_type FLOAT16 (as NVCaffe stores float16 nets), count checked.
    weight = _rng().standard_normal((2, 3, 1, 1)).astype(np.float16)
    layer = caffe_pb2.LayerParameter(name="conv", type="Convolution", top=["y"], bottom=["x"])
    layer.convolution_param.num_output, layer.convolution_param.bias_term = 2, False
    layer.convolution_param.kernel_size.append(1)
    blob = layer.blobs.add()
    blob.shape.dim.extend(weight.shape)
    blob.raw_data_type = caffe_pb2.BlobProto.FLOAT16
    blob.raw_data = weight.tobytes()
    net = parse_caffemodel(caffe_pb2.NetParameter(layer=[layer]).SerializeToString(), "half.caffemodel")
    from caffe2torch.read import trained_blobs

    np.testing.assert_array_equal(trained_blobs(net, "half.caffemodel")["conv"][0], weight.astype(F))
    blob.raw_data = weight.tobytes()[:-1]
    with pytest.raises(CaffeError, match="raw_data of 11 bytes is not a whole number of FLOAT16 values"):
        parse_caffemodel(caffe_pb2.NetParameter(layer=[layer]).SerializeToString(), "cut.caffemodel")
    blob.raw_data, blob.raw_data_type = weight.tobytes(), caffe_pb2.BlobProto.INT
    with pytest.raises(CaffeError, match="raw_data of type INT, which NVCaffe cannot read"):
        parse_caffemodel(caffe_pb2.NetParameter(layer=[layer]).SerializeToString(), "int.caffemodel")


# ---------------------------------------------------------------- Intel Caffe


def _conv_loop(x, w, b):
    """A stride-1, unpadded convolution, loop by loop."""
    n, c, h, wd = x.shape
    o, _, k, _ = w.shape
    out = np.zeros((n, o, h - k + 1, wd - k + 1), F)
    for i in range(n):
        for j in range(o):
            for y in range(h - k + 1):
                for z in range(wd - k + 1):
                    out[i, j, y, z] = np.sum(x[i, :, y:y + k, z:z + k] * w[j], dtype=F) + b[j]
    return out


def test_intel_batch_norm_scale_and_fused_relu():
    # MKL-DNN engine: mean and variance divided by blobs[2]; blob 3 scale (use_weight_bias), no bias (bias_term
    # false), then the ReLU post-op.
    rng = _rng(1)
    x = rng.standard_normal((2, 3, 2, 2)).astype(F)
    sums, square_sums, factor = rng.standard_normal(3).astype(F), (rng.random(3) + 0.5).astype(F), F(4)
    scale = rng.standard_normal(3).astype(F)
    layer = layer_from_text('name: "bn" type: "BatchNorm" batch_norm_param { bias_term: false relu: true '
                            'eps: 1e-6 }')
    _, got = run_layer(layer, [x.shape], [sums, square_sums, np.array([factor]), scale], x)
    mean, var = sums * (1 / factor), square_sums * (1 / factor)
    want = np.maximum((x - mean[None, :, None, None]) / np.sqrt(var + F(1e-6))[None, :, None, None]
                      * scale[None, :, None, None], 0)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)


def test_intel_per_fla_fuse_concat():
    rng = _rng(2)
    a, b = rng.standard_normal((2, 4, 3, 3)).astype(F), rng.standard_normal((2, 6, 1, 2)).astype(F)
    layer = layer_from_text('name: "cat" type: "Concat" concat_param { axis: 1 per_fla_fuse: true }')
    converted, got = run_layer(layer, [a.shape, b.shape], [], a, b)
    want = np.zeros((2, 36 + 12, 1, 1), F)
    for n in range(2):  # each bottom's count(1) values in memory order, one after the other
        want[n, :, 0, 0] = np.concatenate([a[n].reshape(-1), b[n].reshape(-1)])
    assert converted.top_shapes == [(2, 48, 1, 1)]
    np.testing.assert_array_equal(got, want)
    # Its CAFFE engine ignores the field: a plain Concat, which these shapes do not allow.
    with pytest.raises(CaffeError, match="all axes but 1 must agree"):
        run_layer(layer_from_text('name: "cat" type: "Concat" concat_param { per_fla_fuse: true engine: CAFFE }'),
                  [a.shape, b.shape], [], a, b)


def test_intel_convolution_relu_and_sum_fusion():
    rng = _rng(3)
    x = rng.standard_normal((1, 2, 5, 5)).astype(F)
    w, bias = rng.standard_normal((3, 2, 3, 3)).astype(F), rng.standard_normal(3).astype(F)
    residual = rng.standard_normal((1, 3, 3, 3)).astype(F)
    conv = _conv_loop(x, w, bias)
    layer = layer_from_text('name: "c" type: "Convolution" convolution_param { num_output: 3 kernel_size: 3 '
                            'relu: true negative_slope: 0.25 }')
    _, got = run_layer(layer, [x.shape], [w, bias], x)
    np.testing.assert_allclose(got, np.where(conv > 0, conv, F(0.25) * conv), rtol=1e-5, atol=1e-5)
    fused = layer_from_text('name: "c" type: "Convolution" bottom: "x" bottom: "r" top: "y" convolution_param { '
                            'num_output: 3 kernel_size: 3 relu: true fusion_type: SUM_FUSION coeff: 3 coeff: 5 }')
    converted, got = run_layer(fused, [x.shape, residual.shape], [w, bias], x, residual)
    assert converted.top_shapes == [(1, 3, 3, 3)]  # one top; coeff scales only the int8 path
    np.testing.assert_allclose(got, np.maximum(conv + residual, 0), rtol=1e-5, atol=1e-5)
    with pytest.raises(CaffeError, match="SUM_FUSION's bottom 1 has shape"):
        run_layer(fused, [x.shape, x.shape], [w, bias], x, x)


def test_intel_inner_product_relu_and_relu_fuse():
    rng = _rng(4)
    x, w, b = (rng.standard_normal(s).astype(F) for s in ((2, 5), (3, 5), (3,)))
    layer = layer_from_text('name: "ip" type: "InnerProduct" inner_product_param { num_output: 3 relu: true }')
    _, got = run_layer(layer, [x.shape], [w, b], x)
    np.testing.assert_allclose(got, np.maximum(x @ w.T + b, 0), rtol=1e-5, atol=1e-6)
    # A ReLU the net compiler marked `fuse` (the layer before applies it) passes its bottom on.
    _, got = run_layer(layer_from_text('name: "r" type: "ReLU" relu_param { fuse: true negative_slope: 0.1 }'),
                       [x.shape], [], x)
    np.testing.assert_array_equal(got, x)


def test_intel_average_pooling_without_padding_in_the_count():
    x = _rng(5).standard_normal((1, 1, 5, 5)).astype(F)
    layer = layer_from_text('name: "p" type: "Pooling" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 '
                            'avg_include_pad: false }')
    _, got = run_layer(layer, [x.shape], [], x)
    want = np.zeros((1, 1, 3, 3), F)
    for ph in range(3):
        for pw in range(3):
            h0, w0 = ph * 2 - 1, pw * 2 - 1
            window = x[0, 0, max(h0, 0):min(h0 + 3, 5), max(w0, 0):min(w0 + 3, 5)]
            want[0, 0, ph, pw] = window.sum() / window.size  # exclude padding: in-image values only
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_intel_spatial_dropout_and_deconvnet_dropout_channel_are_identity_at_test():
    x = _rng(6).standard_normal((1, 4, 2, 2)).astype(F)
    for text in ('name: "d" type: "SpatialDropout" spatial_dropout_param { dropout_ratio: 0.3 }',
                 'name: "d" type: "DropoutChannel" dropout_param { dropout_ratio: 0.3 }'):
        converted, got = run_layer(layer_from_text(text), [x.shape], [], x)
        np.testing.assert_array_equal(got, x)
        assert converted.module.p == pytest.approx(0.3)


# ---------------------------------------------------------------- DeconvNet / DecoupledNet


def unpool_reference(x, mask, method, kernel, stride, out):
    """unpooling_layer.cpp's Forward_cpu (pad 0), onto a zeroed top."""
    n, c, h, w = x.shape
    top = np.zeros((n, c) + out, F)
    for i in range(n):
        for j in range(c):
            plane = top[i, j].reshape(-1)
            for ph in range(h):
                for pw in range(w):
                    if method == "MAX":
                        uph, upw = max(0, min(ph * stride, out[0] - 1)), max(0, min(pw * stride, out[1] - 1))
                        index = int(mask[i, j, ph, pw]) if mask is not None else uph * out[1] + upw
                        plane[index] = x[i, j, ph, pw]
                        continue
                    hs, ws = ph * stride, pw * stride
                    he, we = min(hs + kernel, out[0]), min(ws + kernel, out[1])
                    size = (he - hs) * (we - ws)
                    for y in range(hs, he):
                        for z in range(ws, we):
                            top[i, j, y, z] += x[i, j, ph, pw] / F(size) if method == "AVE" else x[i, j, ph, pw]
    return top


@pytest.mark.parametrize("method, kernel, stride, size", [
    ("MAX", 2, 2, (7, 9)), ("MAX", 3, 2, (6, 5)), ("AVE", 3, 2, (7, 9)), ("AVE", 2, 2, (5, 7)), ("TILE", 3, 1, (4, 4)),
])
def test_unpooling_matches_the_fork_loop(method, kernel, stride, size):
    x = _rng(7).standard_normal((1, 2, 3, 4)).astype(F)
    extra = f"unpool_h: {size[0]} unpool_w: {size[1]}" if size else ""
    layer = layer_from_text(f'name: "u" type: "Unpooling" unpooling_param {{ unpool: {method} kernel_size: {kernel} '
                            f'stride: {stride} {extra} }}')
    converted, got = run_layer(layer, [x.shape], [], x)
    out = size or (max(2 * stride + kernel, 3 * stride + 1), max(3 * stride + kernel, 4 * stride + 1))
    assert converted.top_shapes == [(1, 2) + out]
    np.testing.assert_allclose(got, unpool_reference(x, None, method, kernel, stride, out), rtol=1e-6, atol=1e-7)


def test_unpooling_with_a_pooling_mask_and_relu_mask_in_a_v1_net(tmp_path):
    # DecoupledNet's pattern in its V1 format: pooling with a mask, ReLU with a mask top, MAX unpooling by mask.
    text = """name: "v1"
input: "data" input_dim: 1 input_dim: 2 input_dim: 4 input_dim: 4
layers { bottom: "data" top: "pool" top: "pool_mask" name: "pool" type: POOLING
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layers { bottom: "pool" top: "pool" top: "relu_mask" name: "relu" type: RELU relu_param { negative_slope: -0.5 } }
layers { bottom: "pool" bottom: "pool_mask" top: "unpool" name: "unpool" type: UNPOOLING
  unpooling_param { unpool: MAX kernel_size: 2 stride: 2 unpool_size: 4 } }
layers { bottom: "unpool" top: "bn" name: "bn" type: BN
  bn_param { scale_filler { type: "constant" value: 1 } shift_filler { type: "constant" value: 0.001 }
             bn_mode: INFERENCE } }
"""
    net = parse_prototxt(text, "v1.prototxt")
    assert [layer.type for layer in net.layer] == ["Pooling", "ReLU", "Unpooling", "BN"]
    from caffe2torch.model import from_net_parameter

    x = _rng(8).standard_normal((1, 2, 4, 4)).astype(F)
    scale, shift = np.full((1, 2, 1, 1), 2, F), np.full((1, 2, 1, 1), 0.5, F)
    model = from_net_parameter(net, {"bn": [scale, shift]}, "v1.prototxt")
    with torch.no_grad():
        blobs = dict(zip(("bn", "relu_mask"), model(torch.from_numpy(x))))
    pooled = x.reshape(1, 2, 2, 2, 2, 2).max(axis=(3, 5))
    relu = np.where(pooled > 0, pooled, F(-0.5) * pooled)
    np.testing.assert_array_equal(blobs["relu_mask"].numpy(), (relu > 0).astype(F))  # in place: of the output
    mask = np.zeros((1, 2, 2, 2), F)
    for c in range(2):
        for ph in range(2):
            for pw in range(2):
                window = x[0, c, 2 * ph:2 * ph + 2, 2 * pw:2 * pw + 2]
                dh, dw = np.unravel_index(np.argmax(window), (2, 2))
                mask[0, c, ph, pw] = (2 * ph + dh) * 4 + 2 * pw + dw
    want = unpool_reference(relu, mask, "MAX", 2, 2, (4, 4)) * 2 + F(0.5)
    np.testing.assert_array_equal(blobs["bn"].numpy(), want)


def test_deconvnet_v1_types_in_a_binary():
    # Its numbers: BN 43 (bn_param at V1 field 45, DeepLab v1's padding_param here), UNPOOLING 42, CROP 40.
    bn = caffe_pb2.V1LayerParameter(name="bn", type=43, bottom=["x"], top=["x"]).SerializeToString()
    bn += wire_field(45, caffe_pb2.SegNetBNParameter(bn_mode=caffe_pb2.SegNetBNParameter.INFERENCE).SerializeToString())
    unpool = caffe_pb2.V1LayerParameter(name="u", type=42, bottom=["x", "m"], top=["y"])
    unpool.unpooling_param.kernel_size = 2
    crop = caffe_pb2.V1LayerParameter(name="c", type=40, bottom=["y", "x"], top=["z"])
    layers = [bn, unpool.SerializeToString(), crop.SerializeToString()]
    net = parse_caffemodel(b"".join(wire_field(2, layer) for layer in layers),
                           "deconvnet.caffemodel")
    assert [(layer.type, layer.HasField("segnet_bn_param")) for layer in net.layer] == [
        ("BN", True), ("Unpooling", False), ("AutoCrop", False)]
    assert net.layer[0].segnet_bn_param.bn_mode == caffe_pb2.SegNetBNParameter.INFERENCE
    assert net.layer[1].unpooling_param.kernel_size == 2


def test_converted_vendor_nets_save_and_rebuild(tmp_path):
    text = """name: "vendors"
input: "data" input_shape { dim: 1 dim: 2 dim: 4 dim: 4 }
layer { name: "c" type: "Convolution" bottom: "data" top: "c" convolution_param { num_output: 2 kernel_size: 1
  relu: true } }
layer { name: "s" type: "Convolution" bottom: "data" bottom: "c" top: "s" convolution_param { num_output: 2
  kernel_size: 1 fusion_type: SUM_FUSION } }
layer { name: "bn" type: "BatchNorm" bottom: "s" top: "bn" batch_norm_param { scale_bias: true } }
layer { name: "e" type: "ELU" bottom: "bn" top: "e" elu_param { lambda: 2 } }
layer { name: "u" type: "Unpooling" bottom: "e" top: "u" unpooling_param { unpool: AVE kernel_size: 2 stride: 2 unpool_size: 9 } }
layer { name: "cat" type: "Concat" bottom: "u" bottom: "e" top: "cat" concat_param { per_fla_fuse: true } }
"""
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    from caffe2torch.conversion import convert
    from caffe2torch.folder import save_net

    net = convert(None, path).net
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.normal_(0, 0.5)
    x = torch.randn(1, 2, 4, 4)
    save_net(net, tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(net(x), load_standalone(tmp_path / "out")(x))
    assert net(x).shape == (1, 2 * 9 * 9 + 2 * 16, 1, 1)


def test_reorg_stride_defaults_to_two():
    x = np.arange(16, dtype=F).reshape(1, 4, 2, 2).repeat(2, axis=2).repeat(2, axis=3)
    converted, _ = run_layer(layer_from_text('name: "r" type: "Reorg"'), [x.shape], [], x)
    assert converted.top_shapes == [(1, 16, 2, 2)]


def test_v1_data_layer_transformation_fields_move_to_transform_param():
    net = parse_prototxt('layers { name: "d" type: IMAGE_DATA top: "data" top: "label" '
                         'image_data_param { source: "x" crop_size: 227 mirror: true batch_size: 5 } }', "v1")
    assert net.layer[0].transform_param.crop_size == 227 and net.layer[0].transform_param.mirror
    assert not net.layer[0].image_data_param.HasField("crop_size")


def test_deconvnet_bn_learn_with_batch_mean_and_variance_tops():
    # bn_layer.cpp LEARN: E[x] and E[x^2] - E[x]^2 over batch and positions, copied to tops 1 and 2 before eps.
    x = _rng(9).standard_normal((2, 3, 2, 3)).astype(F)
    layer = layer_from_text('name: "bn" type: "BN" top: "y" top: "mean" top: "var" bn_param { bn_mode: LEARN }')
    scale, shift = np.full((1, 3, 1, 1), 1.5, F), np.full((1, 3, 1, 1), -0.5, F)
    converted, (y, mean, var) = run_layer(layer, [x.shape], [scale, shift], x)
    assert converted.top_shapes == [x.shape, (1, 3, 1, 1), (1, 3, 1, 1)]
    want_mean = x.mean(axis=(2, 3)).mean(axis=0)
    want_var = (x * x).mean(axis=(2, 3)).mean(axis=0) - want_mean * want_mean
    np.testing.assert_allclose(mean.reshape(-1), want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var.reshape(-1), want_var, rtol=1e-5, atol=1e-6)
    want = (x - want_mean[None, :, None, None]) / np.sqrt(want_var + F(1e-9))[None, :, None, None] * 1.5 - 0.5
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
