"""Tests of the ICNet net generator against the official prototxts and Caffe's shape rules."""

import math

import pytest
from google.protobuf import text_format

from caffe2torch.errors import CaffeError
from icnet_eval.netdef import icnet_net, icnet_prototxt
from proto import caffe_pb2

OTHER_SIZES = [(513, 1025), (720, 960), (300, 400), (1024, 2048), (1023, 511), (480, 480)]


def parse_prototxt(path) -> caffe_pb2.NetParameter:
    return text_format.Parse(path.read_text(), caffe_pb2.NetParameter())


def assert_same_net(got: caffe_pb2.NetParameter, want: caffe_pb2.NetParameter) -> None:
    """Layer-by-layer comparison naming the first differing layer, then the whole message."""
    assert got.name == want.name
    assert list(got.input) == list(want.input)
    assert list(got.input_dim) == list(want.input_dim)
    for index, (got_layer, want_layer) in enumerate(zip(got.layer, want.layer)):
        assert got_layer == want_layer, (
            f"layer {index} ({want_layer.name!r}) differs:\n--- generated\n{got_layer}--- official\n{want_layer}"
        )
    assert len(got.layer) == len(want.layer)
    assert got == want


def _axis_param(values, single, default):
    """Caffe's rule for kernel/pad/stride: the _h/_w field if set, else the repeated or plain field."""
    if single is not None:
        return single
    if isinstance(values, int):
        return values
    return values[0] if len(values) else default


def blob_shapes(net: caffe_pb2.NetParameter) -> dict[str, tuple[int, int, int, int]]:
    """Shapes of every blob by Caffe's rules; asserts Eltwise bottoms agree (as Caffe's Reshape does)."""
    shapes = {net.input[0]: tuple(net.input_dim)}
    for layer in net.layer:
        n, c, h, w = shapes[layer.bottom[0]]
        if layer.type == "Convolution":
            p = layer.convolution_param
            k, s = p.kernel_size[0], (p.stride[0] if p.stride else 1)
            pad, d = (p.pad[0] if p.pad else 0), (p.dilation[0] if p.dilation else 1)
            ext = d * (k - 1) + 1
            out = (n, p.num_output, (h + 2 * pad - ext) // s + 1, (w + 2 * pad - ext) // s + 1)
        elif layer.type == "Pooling":
            p = layer.pooling_param
            kh = p.kernel_h if p.HasField("kernel_h") else p.kernel_size
            kw = p.kernel_w if p.HasField("kernel_w") else p.kernel_size
            sh = p.stride_h if p.HasField("stride_h") else p.stride
            sw = p.stride_w if p.HasField("stride_w") else p.stride
            pad = p.pad
            dims = []
            for size, k, s in ((h, kh, sh), (w, kw, sw)):
                o = math.ceil((size + 2 * pad - k) / s) + 1
                if pad > 0 and (o - 1) * s >= size + pad:
                    o -= 1
                dims.append(o)
            out = (n, c, *dims)
        elif layer.type == "Interp":
            p = layer.interp_param
            if p.HasField("height") or p.HasField("width"):
                assert p.height > 0 and p.width > 0, layer.name
                out = (n, c, p.height, p.width)
            else:
                hh, ww = (h - 1) // p.shrink_factor + 1, (w - 1) // p.shrink_factor + 1
                f = p.zoom_factor
                out = (n, c, hh + (hh - 1) * (f - 1), ww + (ww - 1) * (f - 1))
        elif layer.type == "Eltwise":
            bottom_shapes = {b: shapes[b] for b in layer.bottom}
            assert len(set(bottom_shapes.values())) == 1, f"{layer.name}: bottoms differ {bottom_shapes}"
            out = (n, c, h, w)
        else:
            assert layer.type in ("ReLU", "BN", "Scale"), layer.type
            out = (n, c, h, w)
        shapes[layer.top[0]] = out
    return shapes


@pytest.mark.parametrize(
    "bn, file_name", [(False, "icnet_cityscapes.prototxt"), (True, "icnet_cityscapes_bnnomerge.prototxt")]
)
def test_equals_official_prototxt_at_1025x2049(reference_dir, bn, file_name):
    assert_same_net(icnet_net(1025, 2049, bn), parse_prototxt(reference_dir / file_name))


def test_equals_reference_merged_257x513(reference_dir):
    assert_same_net(icnet_net(257, 513, False), parse_prototxt(reference_dir / "icnet_merged_257x513.prototxt"))


def test_official_shapes_at_1025x2049():
    shapes = blob_shapes(icnet_net(1025, 2049, False))
    assert shapes["conv5_3"] == (1, 1024, 33, 65)
    assert shapes["conv3_1"] == (1, 256, 65, 129)
    assert shapes["conv3_sub1"] == (1, 64, 129, 257)
    assert shapes["conv6_cls"] == (1, 19, 257, 513)
    assert shapes["conv6_interp"] == (1, 19, 1025, 2049)


@pytest.mark.parametrize("height, width", [(1025, 2049), (257, 513)] + OTHER_SIZES)
def test_bn_variant_is_merged_variant_plus_bn_layers(height, width):
    with_bn = icnet_net(height, width, True)
    stripped = caffe_pb2.NetParameter()
    stripped.CopyFrom(with_bn)
    del stripped.layer[:]
    for layer in with_bn.layer:
        if layer.type == "BN":
            assert layer.bottom == layer.top and layer.name == f"{layer.bottom[0]}/bn"
            continue
        copy = stripped.layer.add()
        copy.CopyFrom(layer)
        if layer.type == "Convolution" and layer.name != "conv6_cls":
            assert not layer.convolution_param.bias_term
            copy.convolution_param.ClearField("bias_term")
    assert sum(layer.type == "BN" for layer in with_bn.layer) == 63
    assert stripped == icnet_net(height, width, False)


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("height, width", OTHER_SIZES)
def test_other_sizes_pool_into_pyramid_bins_and_fuse_matching_maps(height, width, bn):
    net = icnet_net(height, width, bn)
    assert list(net.input_dim) == [1, 3, height, width]
    shapes = blob_shapes(net)  # also asserts every Eltwise gets equal bottom shapes
    conv5_3 = shapes["conv5_3"]
    for bins in (1, 2, 3, 6):
        assert shapes[f"conv5_3_pool{bins}"][2:] == (bins, bins)
        assert shapes[f"conv5_3_pool{bins}_interp"] == conv5_3
    # each upsampled coarse map equals the finer map it is summed with
    assert shapes["conv5_4_interp"][2:] == shapes["conv3_1_sub2_proj"][2:]
    assert shapes["sub24_sum_interp"][2:] == shapes["conv3_sub1_proj"][2:]
    assert shapes["conv_sub4"] == shapes["conv3_1_sub2_proj"]
    assert shapes["conv_sub2"] == shapes["conv3_sub1_proj"]


def test_pyramid_geometry_for_a_non_2to1_map():
    # 720x960: conv5_3 is 23x31; stride = floor((S-1)/n), kernel = S - (n-1)*stride per axis
    pools = {layer.name: layer.pooling_param for layer in icnet_net(720, 960, False).layer
             if layer.type == "Pooling"}
    geometry = {name: (p.kernel_h, p.kernel_w, p.stride_h, p.stride_w) for name, p in pools.items()
                if name.startswith("conv5_3_pool")}
    assert geometry == {
        "conv5_3_pool1": (23, 31, 23, 31),
        "conv5_3_pool2": (12, 16, 11, 15),
        "conv5_3_pool3": (9, 11, 7, 10),
        "conv5_3_pool6": (8, 6, 3, 5),
    }


def test_zoom_replaced_by_explicit_size_only_where_it_would_not_match():
    official = {layer.name: layer.interp_param for layer in icnet_net(1025, 2049, False).layer}
    assert official["sub24_sum_interp"].zoom_factor == 2
    assert not official["sub24_sum_interp"].HasField("height")
    # 1024x2048: the 1/2 branch is 65x129, zoom 2 would give 129x257, the full-res branch is 128x256
    other = {layer.name: layer.interp_param for layer in icnet_net(1024, 2048, False).layer}
    assert (other["sub24_sum_interp"].height, other["sub24_sum_interp"].width) == (128, 256)
    assert not other["sub24_sum_interp"].HasField("zoom_factor")
    assert other["conv5_4_interp"].zoom_factor == 2
    assert other["conv6_interp"].zoom_factor == 4


@pytest.mark.parametrize("bn", [False, True])
def test_prototxt_text_parses_back_to_the_same_net(bn):
    text = icnet_prototxt(720, 960, bn)
    assert 'input: "data"' in text
    assert text_format.Parse(text, caffe_pb2.NetParameter()) == icnet_net(720, 960, bn)


def test_input_too_small_for_pyramid_pooling_raises():
    # 100x100: conv5_3 is 4x4, too small for 6 bins
    with pytest.raises(CaffeError, match="conv5_3_pool6.*4x4"):
        icnet_net(100, 100, False)


@pytest.mark.parametrize("height, width", [(0, 513), (257, -1), (257.0, 513)])
def test_bad_input_size_raises(height, width):
    with pytest.raises(CaffeError, match="positive integer"):
        icnet_net(height, width, True)
