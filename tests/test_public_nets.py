"""Well-known public architectures rebuilt by generators: Caffe's shapes, parameter totals, weight files, NumPy forward."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from caffe2torch.cli import main
from caffe2torch.conversion import convert
from caffe2torch.inspect import describe
from caffe2torch.model import blobs as net_blobs
from caffe2torch.model import layer_calls, layer_module, net_info
from tests.public_nets import (L, LENET_V1, MOBILENET_BLOCKS, alexnet, conv, fcn32s, googlenet, inception,
                               input_layer, lenet_train_test, mobilenet, np_conv, np_forward, pool, fc, random_blobs,
                               relu, resnet, squeezenet, write_caffemodel, write_caffemodel_h5)

# ---------------------------------------------------------------- shapes and parameter totals of the full-size nets


def _save(tmp_path, name, text):
    path = tmp_path / f"{name}.prototxt"
    path.write_text(text)
    return path


SHAPES = {  # blob -> Caffe's shape, derived by hand: conv floor((n + 2p - k)/s) + 1, pooling ceil(...) + 1
    "alexnet": (alexnet, {"conv1": (1, 96, 55, 55), "pool1": (1, 96, 27, 27), "pool2": (1, 256, 13, 13),
                          "conv5": (1, 256, 13, 13), "pool5": (1, 256, 6, 6), "fc6": (1, 4096), "prob": (1, 1000)}),
    "googlenet": (googlenet, {"conv1/7x7_s2": (1, 64, 112, 112), "pool1/3x3_s2": (1, 64, 56, 56),
                              "pool2/3x3_s2": (1, 192, 28, 28), "inception_3b/output": (1, 480, 28, 28),
                              "pool3/3x3_s2": (1, 480, 14, 14), "inception_4e/output": (1, 832, 14, 14),
                              "inception_5b/output": (1, 1024, 7, 7), "pool5/7x7_s1": (1, 1024, 1, 1)}),
    "resnet50": (resnet, {"conv1": (1, 64, 112, 112), "pool1": (1, 64, 56, 56), "res2c": (1, 256, 56, 56),
                          "res3d": (1, 512, 28, 28), "res4f": (1, 1024, 14, 14), "res5c": (1, 2048, 7, 7),
                          "pool5": (1, 2048, 1, 1), "prob": (1, 1000)}),
    "resnet101": (lambda: resnet((3, 4, 23, 3)), {"res3b3": (1, 512, 28, 28), "res4b22": (1, 1024, 14, 14), "res5c": (1, 2048, 7, 7)}),
    "squeezenet": (squeezenet, {"conv1": (1, 64, 113, 113), "pool1": (1, 64, 56, 56), "fire3/concat": (1, 128, 56, 56),
                                "pool3": (1, 128, 28, 28), "pool5": (1, 256, 14, 14), "conv10": (1, 1000, 14, 14),
                                "pool10": (1, 1000, 1, 1)}),
    "mobilenet": (mobilenet, {"conv1": (1, 32, 112, 112), "conv2_2/dw": (1, 64, 56, 56), "conv4_2/sep": (1, 512, 14, 14),
                              "conv6/sep": (1, 1024, 7, 7), "pool6": (1, 1024, 1, 1), "fc7": (1, 1000, 1, 1)}),
    "fcn32s": (lambda: fcn32s(div=16), {"conv1_1": (1, 4, 698, 698), "pool1": (1, 4, 349, 349), "pool2": (1, 8, 175, 175),
                                        "pool3": (1, 16, 88, 88), "pool4": (1, 32, 44, 44), "pool5": (1, 32, 22, 22),
                                        "fc6": (1, 256, 16, 16), "upscore": (1, 21, 544, 544), "score": (1, 21, 500, 500)}),
    "lenet": (lenet_train_test, {"conv1": (1, 20, 24, 24), "pool1": (1, 20, 12, 12), "pool2": (1, 50, 4, 4),
                                 "ip1": (1, 500), "prob": (1, 10)}),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_prototxt_alone_gives_caffe_shapes(tmp_path, name):
    generate, expected = SHAPES[name]
    net = convert(None, _save(tmp_path, name, generate()), on_warning=lambda _: None).net
    assert {blob: net_info(net).blob_shapes[blob] for blob in expected} == expected
    assert net_info(net).outputs == (["score"] if name == "fcn32s" else ["prob"])


def bn_total(c):  # BatchNorm mean, variance, scale factor + Scale gamma, beta
    return 2 * c + 1 + 2 * c


def resnet_total(blocks):
    total, channels = 3 * 49 * 64 + 64 + bn_total(64), 64
    for stage, count in enumerate(blocks):
        mid, out = 64 << stage, 256 << stage
        for index in range(count):
            total += channels * mid + 9 * mid * mid + mid * out + 2 * bn_total(mid) + bn_total(out)
            total += channels * out + bn_total(out) if index == 0 else 0
            channels = out
    return total + 2048 * 1000 + 1000


def mobilenet_total():
    total, channels = 3 * 9 * 32 + bn_total(32), 32
    for out, _ in MOBILENET_BLOCKS:
        total += 9 * channels + bn_total(channels) + channels * out + bn_total(out)
        channels = out
    return total + 1024 * 1000 + 1000


TOTALS = {  # well-known totals of the released models (weights + biases; + BatchNorm statistics where present)
    "alexnet": (alexnet, 60_965_224), "googlenet": (googlenet, 6_998_552), "squeezenet": (squeezenet, 1_235_496),
    "lenet": (lenet_train_test, 431_080), "lenet_v1": (lambda: LENET_V1, 431_080), "resnet50": (resnet, resnet_total((3, 4, 6, 3))),
    "resnet101": (lambda: resnet((3, 4, 23, 3)), resnet_total((3, 4, 23, 3))), "mobilenet": (mobilenet, mobilenet_total()),
}


def test_known_totals_of_the_formulas():
    # torchvision counts conv + BN affine + fc; Caffe adds the running statistics and one scale factor per BatchNorm.
    assert resnet_total((3, 4, 6, 3)) == 25_557_032 + 64 + 26_560 * 2 + 53
    assert mobilenet_total() == 4_231_976 + 10_944 * 2 + 27


@pytest.mark.parametrize("name", sorted(TOTALS))
def test_cli_inspect_json_counts_parameters(tmp_path, name):
    generate, total = TOTALS[name]
    result = CliRunner().invoke(main, ["inspect", str(_save(tmp_path, name, generate())), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["parameters"] == total
    by_name = {layer["name"]: layer for layer in info["layers"]}
    if name == "alexnet":
        assert by_name["conv2"]["blob_shapes"] == [[256, 48, 5, 5], [256]]  # group 2 halves the input channels
        assert by_name["fc6"]["blob_shapes"] == [[4096, 9216], [4096]]

# ---------------------------------------------------------------- small nets with random weights against NumPy


def inception_net():
    text = input_layer((2, 3, 15, 15)) + conv("conv1", "data", 8, 3, p=1) + relu("relu1", "conv1")
    text += inception("inception_3a", "conv1", 4, 3, 6, 2, 3, 3) + pool("pool", "inception_3a/output", "AVE", k=3, s=2)
    return text + fc("classifier", "pool", 5) + L("prob", "Softmax", "classifier")


SMALL = {  # reduced widths and input sizes, same layer rules (pool ceil rounding matters in alexnet at 71)
    "alexnet": lambda: alexnet((8, 12, 12, 12, 8, 16, 16, 10), size=71),
    "inception": inception_net,
    "resnet": lambda: resnet((2, 1), base=4, size=32, classes=10),
    "squeezenet": lambda: squeezenet(size=47, div=8, classes=10),
    "mobilenet": lambda: mobilenet(size=32, div=8, classes=10, blocks=MOBILENET_BLOCKS[:4]),
    "fcn_group_deconv": lambda: fcn32s(size=32, div=16, classes=3, group=3),
    "lenet_phases": lambda: lenet_train_test(batch=2),
}


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("form", ["caffemodel", "caffemodel.h5"])
def test_random_weights_match_numpy_forward(tmp_path, name, form):
    text = SMALL[name]()
    prototxt = _save(tmp_path, name, text)
    weights = random_blobs(prototxt, seed=len(name))
    model = tmp_path / f"{name}.{form}"
    (write_caffemodel_h5 if form.endswith("h5") else write_caffemodel)(text, weights, model)
    net = convert(model, prototxt).net
    shape = net_info(net).inputs["data"]
    x = np.random.default_rng(1).uniform(-2, 2, shape).astype(np.float32)
    with torch.no_grad():
        got = net_blobs(net, torch.from_numpy(x))
    want = np_forward(text, weights, {"data": x})
    assert set(net_info(net).outputs) <= set(want)
    for blob in net_info(net).blob_shapes:
        assert tuple(got[blob].shape) == want[blob].shape, blob
        scale = np.abs(want[blob]).max() + 1e-6
        np.testing.assert_allclose(got[blob].double().numpy(), want[blob], rtol=0, atol=2e-5 * scale, err_msg=blob)


def test_v1_lenet_with_param_names_and_legacy_blob_dims(tmp_path):
    """V1 prototxt (`layers`, enum types, blobs_lr, shared `param` names) and a V1 caffemodel with 4-D legacy dims."""
    text = lenet_train_test(batch=2)
    weights = random_blobs(_save(tmp_path, "lenet", text), seed=3)
    model = tmp_path / "lenet_v1.caffemodel"
    write_caffemodel(LENET_V1, weights, model, v1=True)
    x = np.random.default_rng(2).uniform(-2, 2, (2, 1, 28, 28)).astype(np.float32)
    want = np_forward(text, weights, {"data": x})["prob"]
    for prototxt in (_save(tmp_path, "lenet_v1", LENET_V1), None):  # None: the net stored in the caffemodel
        net = convert(model, prototxt, find_prototxt=False).net
        assert [call.type for _, call in layer_calls(net)] == ["Convolution", "Pooling", "Convolution", "Pooling",
                                                     "InnerProduct", "ReLU", "InnerProduct", "Softmax"]
        with torch.no_grad():
            np.testing.assert_allclose(net(torch.from_numpy(x)).numpy(), want, rtol=0, atol=1e-6)


def test_inplace_layers_after_a_split_leave_the_other_readers_alone(tmp_path):
    """`conv` is read by four layers (Caffe inserts a Split); in-place layers rewrite only their own blob."""
    text = input_layer((1, 2, 5, 5)) + conv("conv", "data", 3, 3, p=1)
    text += L("copy", "Dropout", "conv", "copy")  # TEST-phase Dropout copies its bottom
    text += relu("copy_relu", "copy") + L("copy_scale", "Scale", "copy", "copy", "scale_param { bias_term: true }")
    text += L("flat", "Flatten", "conv", "flat") + L("sum", "Eltwise", ["conv", "copy"])
    prototxt = _save(tmp_path, "split", text)
    weights = random_blobs(prototxt, seed=5)
    model = tmp_path / "split.caffemodel"
    write_caffemodel(text, weights, model)
    net = convert(model, prototxt).net
    x = torch.from_numpy(np.random.default_rng(4).uniform(-2, 2, (1, 2, 5, 5)).astype(np.float32))
    x_before = x.clone()
    with torch.no_grad():
        first, again = net_blobs(net, x), net_blobs(net, x)
    w, b = (a.astype(np.float64) for a in weights["conv"])
    conv_np = np_conv(x_before.double().numpy(), w, b, 1, 1, 1)
    gamma, beta = (a.astype(np.float64)[None, :, None, None] for a in weights["copy_scale"])
    copy_np = np.maximum(conv_np, 0) * gamma + beta
    for blobs in (first, again):
        np.testing.assert_allclose(blobs["conv"].numpy(), conv_np, atol=1e-5)
        np.testing.assert_allclose(blobs["copy"].numpy(), copy_np, atol=1e-5)
        np.testing.assert_allclose(blobs["flat"].numpy(), conv_np.reshape(1, -1), atol=1e-5)
        np.testing.assert_allclose(blobs["sum"].numpy(), conv_np + copy_np, atol=1e-5)
    assert torch.equal(x, x_before)  # the caller's input is never written
    assert net_info(net).outputs == ["flat", "sum"]


def test_cli_converts_h5_weights_with_a_deploy_prototxt(tmp_path):
    import caffe2torch

    text = SMALL["resnet"]()
    prototxt = _save(tmp_path, "resnet", text)
    weights = random_blobs(prototxt, seed=7)
    model = tmp_path / "resnet_small.caffemodel.h5"
    write_caffemodel_h5(text, weights, model)
    result = CliRunner().invoke(main, ["convert", str(model), "--prototxt", str(prototxt)])
    assert result.exit_code == 0, result.output
    net = caffe2torch.load(tmp_path / "resnet_small_torch")
    x = np.random.default_rng(6).uniform(-2, 2, (1, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        got = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, np_forward(text, weights, {"data": x})["prob"], rtol=0, atol=1e-6)


def test_upstream_caffemodel_alone_keeps_its_input_and_crop_params(tmp_path):
    """Upstream Caffe writes input_param/crop_param as fields 143/144 (the fork's interp/seg_accuracy numbers)."""
    text = SMALL["fcn_group_deconv"]()
    weights = random_blobs(_save(tmp_path, "fcn", text), seed=9)
    model = tmp_path / "fcn.caffemodel"
    write_caffemodel(text, weights, model, upstream=True)
    net = convert(model, find_prototxt=False).net  # the net stored in the caffemodel is the definition
    assert net_info(net).inputs == {"data": (1, 3, 32, 32)}
    assert layer_module(net, "score").offsets == (19, 19)
    x = np.random.default_rng(8).uniform(-2, 2, (1, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        got = net(torch.from_numpy(x)).numpy()
    want = np_forward(text, weights, {"data": x})["score"]
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_silence_consumes_blobs_without_a_module(tmp_path):
    """Deploy nets use Silence to swallow unused tops; Caffe then does not list them as net outputs."""
    text = input_layer((1, 4, 3, 3)) + input_layer((1,), name="label")
    text += L("halves", "Slice", "data", ["kept", "dropped"], "slice_param { axis: 1 }")
    text += L("silence", "Silence", ["dropped", "label"], ()) + relu("relu", "kept")
    net = convert(None, _save(tmp_path, "silence", text)).net
    assert [call.layer for _, call in layer_calls(net)] == ["halves", "relu"]
    assert net_info(net).outputs == ["kept"]
    x = torch.arange(-18.0, 18.0).reshape(1, 4, 3, 3)
    with torch.no_grad():
        assert torch.equal(net(x, torch.zeros(1)), torch.relu(x[:, :2]))


def test_prototxt_alone_with_random_scale_fillers(tmp_path):
    """Inspecting a structure needs no values: Scale/Bias with gaussian fillers get placeholder blobs too."""
    text = input_layer((1, 3, 4, 4)) + L("scale", "Scale", "data", None,
                                         'scale_param { filler { type: "gaussian" } bias_term: true }')
    text += L("bias", "Bias", "scale", None, 'bias_param { filler { type: "msra" } }')
    text += L("scale_hw", "Scale", "bias", None, 'scale_param { axis: 2 num_axes: -1 filler { type: "xavier" } }')
    info = describe(_save(tmp_path, "fillers", text))
    assert [layer["blob_shapes"] for layer in info["layers"]] == [[[3], [3]], [[3]], [[4, 4]]]
    assert info["parameters"] == 6 + 3 + 16
