"""caffe2torch export: ONNX (run in onnxruntime), pt2, TorchScript and safetensors files that compute what the net does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from caffe2torch.cli import main
from caffe2torch.export import FORMATS, SUFFIXES, ExportMismatch, check_inputs, export
from caffe2torch.layers import registry
from caffe2torch.layers.registry import Converted
from caffe2torch.model import net_info
from caffe2torch.refinput import reference_input
from caffe2torch.verify import read_reference
from tests.conftest import REFERENCE_NETS, UNITS, convert_reference


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", REFERENCE_NETS)
def test_every_reference_net_exports_and_matches(reference_dir, tmp_path, name, fmt):
    net = convert_reference(reference_dir, name)
    check = export(net, fmt, tmp_path / f"net{SUFFIXES[fmt]}")
    assert check.max_rel <= 1e-4, check
    assert sorted(tmp_path.iterdir()) == [check.path]  # no temporary file left behind


def test_onnx_graph_names_are_caffe_blobs(reference_dir, tmp_path):
    import onnx
    import onnxruntime

    for name, inputs, outputs in (("unit_eltwise_concat", ["a", "b"], None), ("unit_power_exp_log", ["data"], None),
                                  ("icnet_257x513", ["data"], ["conv6_interp"])):
        net = convert_reference(reference_dir, name)
        path = export(net, "onnx", tmp_path / f"{name}.onnx").path
        graph = onnx.load(str(path)).graph
        assert [value.name for value in graph.input] == inputs
        assert [value.name for value in graph.output] == (outputs or net_info(net).outputs)
        onnx.checker.check_model(str(path))
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {value.name: x.numpy() for value, x in zip(graph.input, check_inputs(net))}
        assert len(session.run(None, feeds)) == len(graph.output)


def test_check_inputs_are_the_reference_generators(reference_dir):
    """The export check feeds inputs made like ../shared/reference's: the generator reproduces the stored ones."""
    for unit in UNITS:
        reference = read_reference(reference_dir / "units" / f"{unit}.ref.h5")
        import h5py

        with h5py.File(reference.path) as file:
            seed = int(file.attrs["seed"])
        net = convert_reference(reference_dir, unit)
        for index, name in enumerate(net_info(net).input_names):
            np.testing.assert_array_equal(reference_input(reference.inputs[name].shape, seed + index, "unit"),
                                          reference.inputs[name], err_msg=unit)
    icnet = read_reference(reference_dir / "icnet_merged_257x513.ref.h5")
    np.testing.assert_array_equal(reference_input((1, 3, 257, 513), 11, "image"), icnet.inputs["data"])


class SumPool(torch.nn.Module):
    """A window sum through divisor_override, which torch's ONNX exporters drop without a word."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 2, 2, divisor_override=1)


def _sum_pool_converter(layer, inputs, blobs):
    n, c, h, w = inputs[0]
    return Converted(SumPool(), [(n, c, h // 2, w // 2)])


def test_a_silently_wrong_export_is_deleted_and_blamed(reference_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(registry.CONVERTERS, "Pooling", _sum_pool_converter)
    units = reference_dir / "units"
    output = tmp_path / "pool.onnx"
    result = CliRunner().invoke(main, ["export", str(units / "unit_pool_ave.caffemodel"), "--prototxt",
                                       str(units / "unit_pool_ave.prototxt"), "--format", "onnx", "-o", str(output)])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("caffe2torch: error")]
    assert len(errors) == 1 and "file deleted" in errors[0]
    assert "the first layer that differs alone: Pooling layer 'ave_k3_s2'" in errors[0]
    assert not output.exists() and list(tmp_path.iterdir()) == []
    # The same module is fine where the format keeps its meaning.
    net = convert_reference(reference_dir, "unit_pool_ave")
    assert export(net, "pt2", tmp_path / "pool.pt2").max_rel == 0.0
    with pytest.raises(ExportMismatch, match="Pooling layer"):
        export(net, "onnx", tmp_path / "pool.onnx")


@pytest.mark.parametrize("fmt", FORMATS)
def test_cli_export_from_a_caffemodel_and_a_converted_folder(reference_dir, tmp_path, fmt):
    units = reference_dir / "units"
    runner = CliRunner()
    out = tmp_path / f"net{SUFFIXES[fmt]}"
    result = runner.invoke(main, ["export", str(units / "unit_inplace_chain.caffemodel"), "--format", fmt, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out} ({fmt}); checked against the PyTorch net: max abs error" in result.output
    assert "note: using the net definition" in result.output and "unit_inplace_chain.prototxt" in result.output
    folder = tmp_path / "converted"
    assert runner.invoke(main, ["convert", str(units / "unit_inplace_chain.caffemodel"), "-o", str(folder)]).exit_code == 0
    again = tmp_path / f"again{SUFFIXES[fmt]}"
    result = runner.invoke(main, ["export", str(folder), "--format", fmt, "-o", str(again)])
    assert result.exit_code == 0, result.output
    assert again.is_file()


def test_export_errors_are_one_line(reference_dir, tmp_path, monkeypatch):
    units = reference_dir / "units"
    runner = CliRunner()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = runner.invoke(main, ["export", str(units / "unit_conv_basic.caffemodel"), "--format", "onnx",
                                  "-o", str(blocker / "net.onnx")])  # the parent is a file
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("caffe2torch: error")]
    assert len(errors) == 1 and f"{blocker}: is not a folder" in errors[0], errors
    result = runner.invoke(main, ["export", str(units / "unit_conv_basic.caffemodel"), "--format", "pt2",
                                  "-o", str(tmp_path)])  # a folder, not a file: click's own usage error
    assert result.exit_code == 2 and "is a directory" in result.output
    monkeypatch.setitem(__import__("caffe2torch.export", fromlist=["_NEEDS"])._NEEDS, "onnx", ("no_such_package_xyz",))
    result = runner.invoke(main, ["export", str(units / "unit_conv_basic.caffemodel"), "--format", "onnx",
                                  "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code == 2 and "pip install 'caffe2torch[export]'" in result.output


@pytest.mark.parametrize("name", ["unit_argmax", "unit_power_exp_log", "unit_pool_empty_window", "icnet_257x513"])
def test_onnx_without_onnxscript_uses_torchs_older_exporter(reference_dir, tmp_path, monkeypatch, name):
    """Where onnxscript is missing (some GPU images), the TorchScript-based exporter writes the file; same check."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda module, *a: None if module == "onnxscript" else find_spec(module, *a))
    check = export(convert_reference(reference_dir, name), "onnx", tmp_path / "net.onnx")
    assert check.max_rel <= 1e-4


def test_export_never_overwrites_its_model_or_a_file_unasked(reference_dir, tmp_path):
    import shutil

    model = tmp_path / "unit_conv_basic.caffemodel"
    shutil.copy(reference_dir / "units" / "unit_conv_basic.caffemodel", model)
    shutil.copy(reference_dir / "units" / "unit_conv_basic.prototxt", tmp_path / "unit_conv_basic.prototxt")
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
