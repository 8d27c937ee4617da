"""caffe2torch export: ONNX (run in onnxruntime), pt2, TorchScript and safetensors files that compute what the net does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from caffe2torch.cli import main
from caffe2torch.errors import CaffeError
from caffe2torch.export import FORMATS, SUFFIXES, ExportMismatch, check_inputs, export
from caffe2torch.layers import registry
from caffe2torch.layers.registry import Converted
from caffe2torch.model import net_info
from caffe2torch.refinput import reference_input
from caffe2torch.verify import read_reference
from tests.conftest import REFERENCE_NETS, UNITS, convert_reference


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", REFERENCE_NETS)
def test_every_reference_net_exports_and_matches(tmp_path, name, fmt):
    net = convert_reference(name)
    check = export(net, fmt, tmp_path / f"net{SUFFIXES[fmt]}")
    assert check.max_rel <= 1e-4, check
    assert sorted(tmp_path.iterdir()) == [check.path]  # no temporary file left behind


def test_onnx_graph_names_are_caffe_blobs(tmp_path):
    import onnx
    import onnxruntime

    for name, inputs, outputs in (("unit_eltwise_concat", ["a", "b"], None), ("unit_power_exp_log", ["data"], None),
                                  ("icnet_257x513", ["data"], ["conv6_interp"])):
        net = convert_reference(name)
        path = export(net, "onnx", tmp_path / f"{name}.onnx").path
        graph = onnx.load(str(path)).graph
        assert [value.name for value in graph.input] == inputs
        assert [value.name for value in graph.output] == (outputs or net_info(net).outputs)
        onnx.checker.check_model(str(path))
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {value.name: x.numpy() for value, x in zip(graph.input, check_inputs(net))}
        assert len(session.run(None, feeds)) == len(graph.output)


def test_check_inputs_are_the_reference_generators(units_dir):
    """The export check feeds inputs made like the reference data's: the generator reproduces the stored ones."""
    for unit in UNITS:
        reference = read_reference(units_dir / f"{unit}.ref.h5")
        import h5py

        with h5py.File(reference.path) as file:
            seed = int(file.attrs["seed"])
        net = convert_reference(unit)
        for index, name in enumerate(net_info(net).input_names):
            np.testing.assert_array_equal(reference_input(reference.inputs[name].shape, seed + index, "unit"),
                                          reference.inputs[name], err_msg=unit)


def test_check_inputs_are_the_icnet_reference_generator(reference_dir):
    icnet = read_reference(reference_dir / "icnet_merged_257x513.ref.h5")
    np.testing.assert_array_equal(reference_input((1, 3, 257, 513), 11, "image"), icnet.inputs["data"])


class SumPool(torch.nn.Module):
    """A window sum through divisor_override, which torch's ONNX exporters drop without a word."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 2, 2, divisor_override=1)


def _sum_pool_converter(layer, inputs, blobs):
    n, c, h, w = inputs[0]
    return Converted(SumPool(), [(n, c, h // 2, w // 2)])


def test_a_silently_wrong_export_is_deleted_and_blamed(units_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(registry.CONVERTERS, "Pooling", _sum_pool_converter)
    output = tmp_path / "pool.onnx"
    result = CliRunner().invoke(main, ["export", str(units_dir / "unit_pool_ave.caffemodel"), "--prototxt",
                                       str(units_dir / "unit_pool_ave.prototxt"), "--format", "onnx", "-o", str(output)])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("caffe2torch: error")]
    assert len(errors) == 1 and "file deleted" in errors[0]
    assert "the first layer that differs alone: Pooling layer 'ave_k3_s2'" in errors[0]
    assert not output.exists() and list(tmp_path.iterdir()) == []
    # The same module is fine where the format keeps its meaning.
    net = convert_reference("unit_pool_ave")
    assert export(net, "pt2", tmp_path / "pool.pt2").max_rel == 0.0
    with pytest.raises(ExportMismatch, match="Pooling layer"):
        export(net, "onnx", tmp_path / "pool.onnx")


@pytest.mark.parametrize("fmt", FORMATS)
def test_cli_export_from_a_caffemodel_and_a_converted_folder(units_dir, tmp_path, fmt):
    runner = CliRunner()
    out = tmp_path / f"net{SUFFIXES[fmt]}"
    result = runner.invoke(main, ["export", str(units_dir / "unit_inplace_chain.caffemodel"), "--format", fmt, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out} ({fmt}); sizes " in result.output
    assert "checked against the PyTorch net at 1x3x9x11" in result.output and "max abs error" in result.output
    assert "note: using the net definition" in result.output and "unit_inplace_chain.prototxt" in result.output
    folder = tmp_path / "converted"
    assert runner.invoke(main, ["convert", str(units_dir / "unit_inplace_chain.caffemodel"), "-o", str(folder)]).exit_code == 0
    again = tmp_path / f"again{SUFFIXES[fmt]}"
    result = runner.invoke(main, ["export", str(folder), "--format", fmt, "-o", str(again)])
    assert result.exit_code == 0, result.output
    assert again.is_file()


def test_export_errors_are_one_line(units_dir, tmp_path, monkeypatch):
    runner = CliRunner()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = runner.invoke(main, ["export", str(units_dir / "unit_conv_basic.caffemodel"), "--format", "onnx",
                                  "-o", str(blocker / "net.onnx")])  # the parent is a file
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("caffe2torch: error")]
    assert len(errors) == 1 and f"{blocker}: is not a folder" in errors[0], errors
    result = runner.invoke(main, ["export", str(units_dir / "unit_conv_basic.caffemodel"), "--format", "pt2",
                                  "-o", str(tmp_path)])  # a folder, not a file: click's own usage error
    assert result.exit_code == 2 and "is a directory" in result.output
    monkeypatch.setitem(__import__("caffe2torch.writers", fromlist=["_NEEDS"])._NEEDS, "onnx", ("no_such_package_xyz",))
    result = runner.invoke(main, ["export", str(units_dir / "unit_conv_basic.caffemodel"), "--format", "onnx",
                                  "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code == 2 and "pip install 'caffe2torch[export]'" in result.output


@pytest.mark.parametrize("name", ["unit_argmax", "unit_power_exp_log", "unit_pool_empty_window", "icnet_257x513"])
def test_onnx_without_onnxscript_uses_torchs_older_exporter(tmp_path, monkeypatch, name):
    """Where onnxscript is missing (some GPU images), the TorchScript-based exporter writes the file; same check."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda module, *a: None if module == "onnxscript" else find_spec(module, *a))
    check = export(convert_reference(name), "onnx", tmp_path / "net.onnx")
    assert check.max_rel <= 1e-4


def test_export_never_overwrites_its_model_or_a_file_unasked(units_dir, tmp_path):
    import shutil

    model = tmp_path / "unit_conv_basic.caffemodel"
    shutil.copy(units_dir / "unit_conv_basic.caffemodel", model)
    shutil.copy(units_dir / "unit_conv_basic.prototxt", tmp_path / "unit_conv_basic.prototxt")
    original = model.read_bytes()
    runner = CliRunner()
    for extra in ((), ("--force",)):
        result = runner.invoke(main, ["export", str(model), "--format", "torchscript", "-o", str(model), *extra])
        assert result.exit_code == 2 and "is the model being exported, which this run reads" in result.output
        # the definition found beside the weights is read too: --force never replaces it
        definition = tmp_path / "unit_conv_basic.prototxt"
        before = definition.read_bytes()
        result = runner.invoke(main, ["export", str(model), "--format", "safetensors", "-o", str(definition), *extra])
        assert result.exit_code == 2 and "is the net definition being used, which this run reads" in result.output
        assert definition.read_bytes() == before
    assert model.read_bytes() == original
    mine = tmp_path / "mine.pt"
    mine.write_bytes(b"my own file")
    result = runner.invoke(main, ["export", str(model), "--format", "torchscript", "-o", str(mine)])
    assert result.exit_code == 2 and "pass --force to replace it" in result.output and mine.read_bytes() == b"my own file"
    assert runner.invoke(main, ["export", str(model), "--format", "torchscript", "-o", str(mine), "--force"]).exit_code == 0
    folder = tmp_path / "converted"
    assert runner.invoke(main, ["convert", str(model), "-o", str(folder)]).exit_code == 0
    result = runner.invoke(main, ["export", str(folder), "--format", "safetensors", "-o", str(folder / "weights.pt"),
                                  "--force"])
    assert result.exit_code == 2 and "is inside the converted folder being exported" in result.output


IN_PLACE_NETS = {  # outputs that are an input modified in place, beside a blob that takes the suffixed name
    "relu": ('layer { name: "relu" type: "ReLU" bottom: "data" top: "data" }\n', ["data_output"]),
    "dropout": ('layer { name: "d" type: "Dropout" bottom: "data" top: "data" }\n', ["data_output"]),
    "beside": ('layer { name: "c" type: "Convolution" bottom: "data" top: "data_output" '
               'convolution_param { num_output: 2 kernel_size: 1 } }\n'
               'layer { name: "relu" type: "ReLU" bottom: "data" top: "data" }\n', ["data_output2", "data_output"]),
}


@pytest.mark.parametrize("case", sorted(IN_PLACE_NETS))
def test_onnx_output_of_an_input_changed_in_place_gets_its_own_name(tmp_path, case):
    """`ReLU bottom: data top: data` on the input: ONNX defines every name once, so the output is data_output."""
    import onnx
    import onnxruntime

    from caffe2torch.conversion import convert

    layers, outputs = IN_PLACE_NETS[case]
    prototxt = tmp_path / "net.prototxt"
    prototxt.write_text('layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 3 '
                        'dim: 3 } } }\n' + layers)
    net = convert(None, prototxt).net
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.copy_(torch.linspace(-1, 1, parameter.numel()).reshape(parameter.shape))
    check = export(net, "onnx", tmp_path / "net.onnx")
    assert check.max_rel <= 1e-6
    graph = onnx.load(str(check.path)).graph
    assert [value.name for value in graph.input] == ["data"]
    assert [value.name for value in graph.output] == outputs
    onnx.checker.check_model(str(check.path))
    x = check_inputs(net)[0]
    got = onnxruntime.InferenceSession(str(check.path), providers=["CPUExecutionProvider"]).run(None, {"data": x.numpy()})
    with torch.no_grad():
        expected = net(x)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for ours, theirs in zip(got, expected, strict=True):
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6, atol=1e-6)
    # The renamed output is the blob `data` after the in-place layer (ReLU's, or Dropout's identity), not the input.
    changed = dict(zip(outputs, got))[outputs[0]]
    np.testing.assert_array_equal(changed, x.numpy() if case == "dropout" else np.maximum(x.numpy(), 0))


def test_onnx_outputs_that_are_an_input_or_share_a_value_are_copied(tmp_path):
    """The older exporter can make an output the input itself, or two outputs one value: each gets an Identity."""
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper

    from caffe2torch.writers import _rename_onnx

    value = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [value("x", TensorProto.FLOAT, [2])],
                              [value("x", TensorProto.FLOAT, [2]), value("y", TensorProto.FLOAT, [2]),
                               value("y", TensorProto.FLOAT, [2])])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    _rename_onnx(path, ["data"], ["data", "a", "b"])
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert [v.name for v in model.graph.input] == ["data"]
    assert [v.name for v in model.graph.output] == ["data_output", "a", "b"]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    results = session.run(None, {"data": np.array([-1.0, 2.0], np.float32)})
    assert [r.tolist() for r in results] == [[-1.0, 2.0], [0.0, 2.0], [0.0, 2.0]]


def _onnx_dims(path) -> list[list]:
    import onnx

    return [[d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            for value in onnx.load(str(path)).graph.input]


def test_exports_take_any_batch_and_with_dynamic_any_size_the_net_takes(tmp_path):
    """ONNX and pt2 files: a symbolic batch by default; --dynamic: symbolic height and width too, over the range the
    net takes, checked in onnxruntime (and the loaded program) at the converted size and at another one."""
    import onnxruntime

    from caffe2torch.dynamic import size_ranges

    net = convert_reference("unit_pool_max")  # converted for 1x3x13x17
    batch = export(net, "onnx", tmp_path / "batch.onnx")
    assert _onnx_dims(batch.path)[0][1:] == [3, 13, 17] and isinstance(_onnx_dims(batch.path)[0][0], str)
    assert batch.sizes == [[(1, 3, 13, 17)], [(2, 3, 13, 17)]] and batch.dynamic == "data: N x 3 x 13 x 17"
    full = export(net, "onnx", tmp_path / "full.onnx", dynamic=True)
    assert all(isinstance(d, str) for d in _onnx_dims(full.path)[0][::2] + _onnx_dims(full.path)[0][3:])
    low = size_ranges(net)["data"][2][0]
    assert full.dynamic == f"data: N x 3 x H (>= {low}) x W (>= {low})" and full.max_rel <= 1e-5
    session = onnxruntime.InferenceSession(str(full.path), providers=["CPUExecutionProvider"])
    for shape in ((3, 3, 40, 23), (1, 3, low, 64)):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
        got = session.run(None, {"data": x.numpy()})
        with torch.no_grad():
            want = net(x)
        for ours, theirs in zip(got, want, strict=True):
            np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-5, atol=1e-5)
    program = export(net, "pt2", tmp_path / "net.pt2", dynamic=True)
    loaded = torch.export.load(str(program.path))
    assert [spec.arg.name for spec in loaded.graph_signature.output_specs] == net_info(net).outputs
    x = torch.randn(2, 3, 31, 20)
    with torch.no_grad():
        for ours, theirs in zip(loaded.module()(x), net(x), strict=True):
            torch.testing.assert_close(ours, theirs)


def test_a_net_whose_weights_fix_its_size_exports_its_batch_only(tmp_path):
    net = convert_reference("unit_innerproduct")
    check = export(net, "pt2", tmp_path / "net.pt2", dynamic=True)
    assert check.dynamic == "data: N x 4 x 3 x 5"
    with pytest.raises(CaffeError, match="dynamic=True: a TorchScript trace keeps its example's sizes"):
        export(net, "torchscript", tmp_path / "net.pt", dynamic=True)
    assert not (tmp_path / "net.pt").exists()


FAST_NET = """input: "data" input_shape { dim: 1 dim: 3 dim: 24 dim: 32 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "bn" type: "BN" bottom: "conv" top: "conv" }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "up" type: "Interp" bottom: "pool" top: "up" interp_param { zoom_factor: 2 } }
"""


def test_export_of_the_fast_graph_matches_the_net(units_dir, tmp_path):
    """--fast: BN folded, torch's pooling and Interp kernels; checked against the converted net like every export."""
    import onnx

    from tests.conftest import random_net

    net = random_net(tmp_path, FAST_NET, std=0.3)
    with torch.no_grad():  # statistics a fold can show (var > 0)
        for name, buffer in net.named_buffers():
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
    check = export(net, "onnx", tmp_path / "fast.onnx", fast=True, dynamic=True)
    assert check.max_rel <= 1e-5
    kinds = {node.op_type for node in onnx.load(str(check.path)).graph.node}
    assert "BatchNormalization" not in kinds and "Conv" in kinds  # folded into the convolution
    result = CliRunner().invoke(main, ["export", str(units_dir / "unit_interp.caffemodel"), "--format",
                                       "onnx", "-o", str(tmp_path / "interp.onnx"), "--fast", "--dynamic"])
    assert result.exit_code == 0, result.output
    assert "(onnx, fast graph); sizes data: N x 3 x H (>= " in result.output


def test_onnx_keeps_every_epsilon_through_the_exporters_optimiser(tmp_path):
    """torch's dynamo exporter runs onnxscript's rewriter, whose add_0 rule drops `x + c` for |c| <= 1e-8: SSD's
    Normalize (eps 1e-10), MVN and SegNet's BN (1e-9) then divide 0 by 0 on an all-zero column. Added as a
    one-element vector, the epsilon stays, and onnxruntime gives torch's 0 there."""
    import onnxruntime

    from caffe2torch.conversion import convert

    text = """input: "data" input_shape { dim: 1 dim: 4 dim: 3 dim: 5 }
layer { name: "norm" type: "Normalize" bottom: "data" top: "norm" norm_param { across_spatial: false } }
layer { name: "whole" type: "Normalize" bottom: "data" top: "whole" }
layer { name: "mvn" type: "MVN" bottom: "data" top: "mvn" }
layer { name: "bn" type: "BN" bottom: "data" top: "bn" bn_param { bn_mode: LEARN } }
"""
    path = tmp_path / "eps.prototxt"
    path.write_text(text)
    net = convert(None, path).net
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.fill_(1.5)
    onnx_path = export(net, "onnx", tmp_path / "eps.onnx").path
    x = torch.randn(1, 4, 3, 5)
    x[:, :, 1, 2] = 0  # an all-zero pixel column: Normalize's sum of squares is 0
    x[:, 3] = 0  # an all-zero channel: MVN's and BN's variance is 0
    zeros = torch.zeros(1, 4, 3, 5)  # and all zero: the whole-item Normalize too
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for sample in (x, zeros):
        ours = session.run(None, {"data": sample.numpy()})
        with torch.no_grad():
            theirs = net(sample)
        for got, wanted in zip(ours, theirs):
            assert not np.isnan(got).any()
            np.testing.assert_allclose(got, wanted.numpy(), rtol=1e-5, atol=1e-5)
