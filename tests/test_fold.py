"""BN folding (caffe2torch.fold) and the fast inference path (caffe2torch.fast) give the unfolded net's outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from google.protobuf import text_format

from caffe2torch.cli import main
from caffe2torch.conversion import convert
from caffe2torch.fast import optimize
from caffe2torch.fold import fold_files, fold_net
from caffe2torch.folder import load
from caffe2torch.model import blobs as net_blobs
from caffe2torch.model import from_net_parameter, layer_calls, layer_module, run_layers
from caffe2torch.read import parse_prototxt, read_net_definition, read_prototxt, read_weights
from caffe2torch.verify import format_report, read_reference, verify_free_running

SMALL = (257, 513)  # the smallest usual size whose conv5_3 map (9x17) still pools into 6 bins


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().norm() / b.double().norm())


def _run(definition, blobs, x: np.ndarray) -> dict[str, torch.Tensor]:
    net = from_net_parameter(definition, blobs, on_warning=lambda _: None)
    with torch.inference_mode():
        return net_blobs(net, torch.from_numpy(x))


def _folds(fast) -> dict[str, str]:
    """Removed layer -> the convolution it went into, read off an optimised graph's bookkeeping."""
    folded = {}
    for _, call in layer_calls(fast):
        if call.absorbed:
            conv, *members = list(call.absorbed) + [call.layer]
            folded.update({member: conv for member in members})
    return folded


# ---------------------------------------------------------------- small synthetic nets

SYNTHETIC = """
input: "data" input_shape { dim: 2 dim: 4 dim: 7 dim: 9 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "c"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1 group: 2 } }
layer { name: "bn" type: "BatchNorm" bottom: "c" top: "c_bn" batch_norm_param { eps: 0.001 } }
layer { name: "scale" type: "Scale" bottom: "c_bn" top: "c_bn" scale_param { bias_term: true } }
layer { name: "deconv" type: "Deconvolution" bottom: "c_bn" top: "d"
        convolution_param { num_output: 4 kernel_size: 2 stride: 2 group: 2 bias_term: false } }
layer { name: "d_bn" type: "BN" bottom: "d" top: "d" bn_param { eps: 0.0001 } }
layer { name: "zero_stats" type: "Convolution" bottom: "d" top: "z" convolution_param { num_output: 3 kernel_size: 1 } }
layer { name: "z_bn" type: "BatchNorm" bottom: "z" top: "z" }
layer { name: "shared" type: "Convolution" bottom: "z" top: "s" convolution_param { num_output: 3 kernel_size: 1 } }
layer { name: "s_bn" type: "BN" bottom: "s" top: "s_bn" }
layer { name: "s_relu" type: "ReLU" bottom: "s" top: "s_relu" }
layer { name: "sum" type: "Eltwise" bottom: "s_bn" bottom: "s_relu" top: "out" }
"""


def _synthetic_blobs() -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(7)

    def normal(*shape, scale=0.5):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def positive(*shape):
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)

    return {
        "conv": [normal(6, 2, 3, 3), normal(6)],
        "bn": [normal(6) * 3.0, positive(6) * 3.0, np.array([3.0], np.float32)],
        "scale": [positive(6), normal(6)],
        "deconv": [normal(6, 2, 2, 2)],
        "d_bn": [positive(1, 4, 1, 1), normal(1, 4, 1, 1), normal(1, 4, 1, 1), positive(1, 4, 1, 1)],
        "zero_stats": [normal(3, 4, 1, 1), normal(3)],
        "z_bn": [normal(3), positive(3), np.zeros(1, np.float32)],  # factor 0: Caffe's never-updated statistics
        "shared": [normal(3, 3, 1, 1), normal(3)],
        "s_bn": [positive(1, 3, 1, 1), normal(1, 3, 1, 1), normal(1, 3, 1, 1), positive(1, 3, 1, 1)],
    }


def test_fold_net_synthetic_chains():
    definition, blobs = parse_prototxt(SYNTHETIC), _synthetic_blobs()
    folded_definition, folded_blobs, folded = fold_net(definition, blobs)
    # The conv read by both a BN and a ReLU keeps its BN; every other norm chain folds.
    assert folded == {"bn": "conv", "scale": "conv", "d_bn": "deconv", "z_bn": "zero_stats"}
    layers = {layer.name: layer for layer in folded_definition.layer}
    assert list(layers) == ["conv", "deconv", "zero_stats", "shared", "s_bn", "s_relu", "sum"]
    assert list(layers["conv"].top) == ["c_bn"]  # a chain that is not in place renames the conv's top
    assert layers["deconv"].convolution_param.bias_term and folded_blobs["deconv"][1].shape == (4,)
    assert "bn" not in folded_blobs and folded_blobs["shared"] is not None

    x = np.random.default_rng(3).standard_normal((2, 4, 7, 9)).astype(np.float32)
    before, after = _run(definition, blobs, x), _run(folded_definition, folded_blobs, x)
    for blob in ("c_bn", "d", "z", "out"):
        assert _rel(after[blob], before[blob]) < 1e-6, blob

    # The fast path folds the same chains on the converted modules, leaving the net it came from alone.
    net = from_net_parameter(definition, blobs, on_warning=lambda _: None)
    layout = {name: (t.stride(), t.data_ptr()) for name, t in net.state_dict().items()}
    fast = optimize(net)
    assert {name: (t.stride(), t.data_ptr()) for name, t in net.state_dict().items()} == layout
    assert _folds(fast) == folded
    assert [node.target for node, _ in layer_calls(fast)] == ["conv", "deconv", "zero_stats", "shared", "s_bn", "s_relu", "sum"]
    assert _rel(fast(torch.from_numpy(x)), before["out"]) < 1e-6


def test_fold_net_keeps_train_only_layers_out_and_unusual_norms_in():
    text = SYNTHETIC + """
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "out" bottom: "data" top: "loss" include { phase: TRAIN } }
"""
    definition = parse_prototxt(text.replace('batch_norm_param { eps: 0.001 }',
                                             'batch_norm_param { eps: 0.001 use_global_stats: false }'))
    folded_definition, _, folded = fold_net(definition, _synthetic_blobs())
    names = [layer.name for layer in folded_definition.layer]
    assert "loss" not in names  # the written net is the TEST net
    assert "bn" in names and "scale" in names and "bn" not in folded  # batch statistics cannot fold


# ---------------------------------------------------------------- reference unit net

def test_unit_inplace_chain_folded_equals_unfolded(units_dir):
    conversion = convert(units_dir / "unit_inplace_chain.caffemodel", units_dir / "unit_inplace_chain.prototxt")
    definition, blobs, folded = fold_net(conversion.definition, conversion.trained)
    assert folded == {"conv1_bn": "conv1", "conv2_bn": "conv2", "conv2_scale": "conv2"}
    assert [layer.type for layer in definition.layer] == ["Convolution", "ReLU", "Convolution", "ReLU", "Dropout", "Eltwise"]
    reference = read_reference(units_dir / "unit_inplace_chain.ref.h5")
    x = reference.inputs["data"]
    before, after = _run(conversion.definition, conversion.trained, x), _run(definition, blobs, x)
    assert _rel(after["sum"], before["sum"]) < 1e-6
    caffe_sum = torch.from_numpy(reference.layers[-1].values[0].data)
    assert _rel(after["sum"], caffe_sum) < 1e-6


def test_fast_path_on_unit_chain_lists_folded_records(units_dir):
    conversion = convert(units_dir / "unit_inplace_chain.caffemodel", units_dir / "unit_inplace_chain.prototxt")
    reference = read_reference(units_dir / "unit_inplace_chain.ref.h5")
    fast = optimize(conversion.net, fuse_relu=False)
    report = verify_free_running(fast, reference, tolerance=1e-5)
    assert report.ok and report.passed == 6 and not report.unchecked
    assert [entry.split(" ")[0] for entry in report.folded] == ["conv1", "conv2", "conv2_bn"]
    assert format_report(report, 1e-5, "fast")[-1].endswith("; 3 pre-BN/pre-ReLU records folded away (not compared)")
    # The record of a removed norm layer is checked against the convolution it went into.
    assert {c.layer for c in report.comparisons} >= {"conv1_bn", "conv2_scale"}
    # With the ReLU fused into the convolution (the default), the pre-ReLU records are not made either.
    fused = verify_free_running(optimize(conversion.net), reference, tolerance=1e-5)
    assert fused.ok and fused.passed == 4 and not fused.unchecked
    assert [entry.split(" ")[0] for entry in fused.folded] == ["conv1", "conv1_bn", "conv2", "conv2_bn", "conv2_scale"]
    assert {c.layer for c in fused.comparisons} == {"conv1_relu", "conv2_relu", "conv2_drop", "sum"}


def test_cli_fold_bn_and_verify_fast(units_dir, tmp_path):
    model, prototxt = units_dir / "unit_inplace_chain.caffemodel", units_dir / "unit_inplace_chain.prototxt"
    runner = CliRunner()
    result = runner.invoke(main, ["fold-bn", str(model), "--prototxt", str(prototxt), "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "folded 3 layers (1 BN, 1 BatchNorm, 1 Scale) into 2 convolutions" in result.output
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["meta.json", "model.py", "net.prototxt", "unit_inplace_chain_folded.caffemodel",
                       "unit_inplace_chain_folded.prototxt", "weights.pt"]
    # The folder is a converted folder of the folded net.
    assert [call.type for _, call in layer_calls(load(tmp_path))] == ["Convolution", "ReLU", "Convolution", "ReLU",
                                                                     "Dropout", "Eltwise"]
    result = runner.invoke(main, ["verify", str(model), "--prototxt", str(prototxt),
                                  "--reference", str(units_dir / "unit_inplace_chain.ref.h5"), "--fast"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1].startswith("4/4 layers within tolerance (free-running, fast path")
    assert "5 pre-BN/pre-ReLU records folded away" in result.output.splitlines()[-1]


# ---------------------------------------------------------------- ICNet

@pytest.fixture(scope="module")
def icnet_small(reference_dir):
    """The bnnomerge ICNet at 257x513 (its official pooling needs 1025x2049), unfolded and folded, run once.

    Returns the folded definition and blobs, and per net the conv6_cls output and, for every
    folded convolution, its input and its output after the norm layers (unfolded net only).
    """
    from icnet_eval.netdef import icnet_net

    definition = icnet_net(*SMALL, bn=True)
    blobs, _ = read_weights(reference_dir / "icnet_bnnomerge_1025x2049.caffemodel")
    x = torch.from_numpy(read_reference(reference_dir / "icnet_merged_257x513.ref.h5").inputs["data"])
    folded_definition, folded_blobs, folded = fold_net(definition, blobs)
    unfolded = from_net_parameter(definition, blobs, on_warning=lambda _: None)
    current: dict[str, torch.Tensor] = {"data": x}
    conv_inputs, normalised = {}, {}

    def after_layer(call, tops):
        if call.layer in folded.values():
            conv_inputs[call.layer] = current[call.bottoms[0]]
        if call.layer in folded:
            normalised[folded[call.layer]] = tops[0]
        current.update(zip(call.tops, tops))

    with torch.inference_mode():
        run_layers(unfolded, x, after_layer=after_layer)
        before = current["conv6_cls"]
        after = _run(folded_definition, folded_blobs, x.numpy())["conv6_cls"]
    return dict(definition=folded_definition, blobs=folded_blobs, folded=folded, x=x, before=before, after=after,
                conv_inputs=conv_inputs, normalised=normalised)


def test_icnet_bnnomerge_folded_equals_unfolded(icnet_small):
    folded = icnet_small["folded"]
    assert len(folded) == 63 and all(name.endswith("/bn") for name in folded)
    assert not [layer.name for layer in icnet_small["definition"].layer if layer.type == "BN"]
    net = from_net_parameter(icnet_small["definition"], icnet_small["blobs"], on_warning=lambda _: None)
    with torch.inference_mode():
        for conv, x in icnet_small["conv_inputs"].items():
            # Each folded convolution alone equals convolution + BN to float32 rounding (sums of
            # up to 1024*9 products: a few 1e-7, 1e-6 at most here).
            assert _rel(layer_module(net, conv)(x), icnet_small["normalised"][conv]) < 5e-6, conv
    # End to end, 60 layers amplify rounding differences: running the same unfolded net with
    # channels_last convolutions alone moves conv6_cls by 3.5e-5, so 1e-5 would test float32 noise.
    assert _rel(icnet_small["after"], icnet_small["before"]) < 1e-4
    assert (icnet_small["after"].argmax(1) == icnet_small["before"].argmax(1)).double().mean() >= 0.9995


def test_icnet_fold_files_reread(reference_dir, tmp_path, icnet_small):
    model = reference_dir / "icnet_bnnomerge_1025x2049.caffemodel"
    prototxt = reference_dir / "icnet_cityscapes_bnnomerge.prototxt"
    lines = fold_files(model, prototxt, tmp_path, verify_md5=True, on_warning=lambda _: None)
    assert lines[0] == "folded 63 layers (63 BN) into 63 convolutions"
    expected_definition, expected_blobs, _ = fold_net(read_prototxt(prototxt), read_weights(model)[0])

    written = read_prototxt(tmp_path / "icnet_bnnomerge_1025x2049_folded.prototxt")
    assert text_format.MessageToString(written) == text_format.MessageToString(expected_definition)
    stored_definition = read_net_definition(tmp_path / "icnet_bnnomerge_1025x2049_folded.caffemodel")
    assert [layer.name for layer in stored_definition.layer] == [layer.name for layer in written.layer]
    reread, _ = read_weights(tmp_path / "icnet_bnnomerge_1025x2049_folded.caffemodel")
    assert reread.keys() == expected_blobs.keys() == icnet_small["blobs"].keys()
    assert all(np.array_equal(a, b) and a.shape == b.shape
               for name in reread for a, b in zip(reread[name], expected_blobs[name]))
    # The reread weights, in the small net, give exactly the folded output.
    output = _run(icnet_small["definition"], reread, icnet_small["x"].numpy())["conv6_cls"]
    assert torch.equal(output, icnet_small["after"])

    torch_folder = load(tmp_path)
    calls = [call for _, call in layer_calls(torch_folder)]
    assert len(calls) == 156 and not [call for call in calls if call.type == "BN"]
    assert not [m for m in torch_folder.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def test_icnet_fast_path_small_reference(reference_dir):
    reference = read_reference(reference_dir / "icnet_merged_257x513.ref.h5")
    conversion = convert(reference_dir / "icnet_merged_1025x2049.caffemodel",
                         reference_dir / "icnet_merged_257x513.prototxt")
    for fuse_relu, not_made in ((False, 0), (True, 39)):
        report = verify_free_running(optimize(conversion.net, fuse_relu=fuse_relu), reference)
        failures = [(c.layer, c.rel_l2) for c in report.comparisons if not c.ok]
        assert not failures and report.argmax_agreement >= 0.9995
        # Every record is compared, except the convolutions' pre-ReLU outputs once the ReLU is fused.
        assert len(report.folded) == not_made
        assert len(report.comparisons) == len(reference.layers) - not_made
