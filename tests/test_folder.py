"""A converted folder stands alone: model.py needs only torch, names cannot inject code, loading refuses bad folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import caffe2torch
from caffe2torch.cli import main
from caffe2torch.errors import CaffeError
from caffe2torch.export import check_inputs
from caffe2torch.folder import load, save_net
from caffe2torch.model import layer_calls, layer_module, net_info
from tests.conftest import REFERENCE_NETS, convert_reference
from tests.public_nets import np_conv, write_caffemodel

# Runs model.py as `python model.py` would, with caffe2torch made unimportable.
STANDALONE = "import runpy, sys; sys.modules['caffe2torch'] = None; runpy.run_path('model.py', run_name='__main__')"


def _outputs(value):
    return value if isinstance(value, tuple) else (value,)


def _exec_model_py(folder):
    namespace = {"__file__": str(folder / "model.py"), "__name__": "converted_model"}
    exec(compile((folder / "model.py").read_text(encoding="utf-8"), str(folder / "model.py"), "exec"), namespace)
    return namespace


@pytest.mark.parametrize("name", REFERENCE_NETS)
def test_model_py_builds_the_same_net(tmp_path, name):
    net = convert_reference(name)
    folder = save_net(net, tmp_path / "out")
    namespace = _exec_model_py(folder)
    standalone = namespace["load"]()
    assert isinstance(standalone, namespace["Net"]) and not standalone.training
    assert list(standalone.state_dict()) == list(net.state_dict())
    assert [n for n, _ in standalone.named_children()] == [node.target for node, _ in layer_calls(net)]
    inputs = check_inputs(net)
    with torch.no_grad():
        for ours, theirs in zip(_outputs(standalone(*inputs)), _outputs(net(*inputs)), strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)
    # The weights are a plain state_dict whose keys are the module names.
    state = torch.load(folder / "weights.pt", weights_only=True)
    assert state.keys() == net.state_dict().keys()
    reloaded = load(folder)
    with torch.no_grad():
        for ours, theirs in zip(_outputs(reloaded(*inputs)), _outputs(net(*inputs)), strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("name", ["unit_interp", "unit_argmax", "icnet_257x513"])
def test_python_model_py_runs_without_caffe2torch(tmp_path, name):
    net = convert_reference(name)
    folder = save_net(net, tmp_path / "out")
    source = (folder / "model.py").read_text()
    assert "caffe2torch" not in "\n".join(line for line in source.splitlines() if line.startswith(("import", "from")))
    done = subprocess.run([sys.executable, "-c", STANDALONE], cwd=folder, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    info = net_info(net)
    expected = [f"{blob}: {info.blob_shapes[blob]}" for blob in info.outputs]
    assert done.stdout.splitlines() == expected


def test_model_py_is_readable_pytorch(tmp_path):
    folder = save_net(convert_reference("icnet_257x513"), tmp_path / "out")
    source = (folder / "model.py").read_text()
    assert "        self.conv1_1_3x3_s2 = nn.Conv2d(3, 32, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1)" in source
    assert "        self.conv5_3_pool1 = Pool2d(method='AVE', kernel=(9, 17)" in source
    assert "        conv5_3 = self.conv5_3_relu(conv5_3)  # 'conv5_3/relu' (ReLU)" in source
    assert "class Interp(nn.Module):" in source and "class ArgMax" not in source  # only the modules it uses
    assert "def load(folder=None" in source


HOSTILE_NET = r'''name: "evil\"\"\"\nimport os; os.system('touch PWNED')\n\"\"\" \303\274"
input: "da\"ta\n" input_shape { dim: 1 dim: 2 dim: 5 dim: 5 }
layer { name: "a.b" type: "Convolution" bottom: "da\"ta\n" top: "x" convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "a_b" type: "Convolution" bottom: "da\"ta\n" top: "y" convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "" type: "ReLU" bottom: "x" top: "x" }
layer { name: "_" type: "ReLU" bottom: "y" top: "y" }
layer { name: "__import__('os').system('touch PWNED')" type: "Eltwise" bottom: "x" bottom: "y" top: "forward" }
layer { name: "class" type: "TanH" bottom: "forward" top: "self" }
layer { name: "training" type: "Sigmoid" bottom: "self" top: "\"\"\"\n#" }
'''


def test_hostile_names_cannot_inject_code_or_swap_weights(tmp_path):
    prototxt = tmp_path / "evil.prototxt"
    prototxt.write_text(HOSTILE_NET, encoding="utf-8")
    rng = np.random.default_rng(0)
    weights = {name: [rng.standard_normal((2, 2, 1, 1)).astype(np.float32), rng.standard_normal(2).astype(np.float32)]
               for name in ("a.b", "a_b")}
    model = tmp_path / "caf\udcffe \"'.caffemodel"  # not UTF-8, quotes and a space in the file name
    write_caffemodel(HOSTILE_NET, weights, model)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["convert", str(model), "--prototxt", str(prototxt), "-o", str(out)])
    assert result.exit_code == 0, result.output
    net = caffe2torch.load(out)
    # Names that sanitise alike stay distinct modules, each with its own Caffe layer's weights; a name that is
    # already an identifier is its own module name ("a_b" is layer a_b, whichever comes first).
    assert {call.layer: node.target for node, call in layer_calls(net)} == {
        "a.b": "a_b_2", "a_b": "a_b", "": "layer", "_": "layer_2",
        "__import__('os').system('touch PWNED')": "import___os_system_touch_PWNED", "class": "layer_class",
        "training": "training_2"}
    assert torch.equal(layer_module(net, "a.b").weight, torch.from_numpy(weights["a.b"][0]))
    assert torch.equal(layer_module(net, "a_b").weight, torch.from_numpy(weights["a_b"][0]))
    x = torch.from_numpy(rng.standard_normal((1, 2, 5, 5)).astype(np.float32))
    conv = [np.maximum(np_conv(x.double().numpy(), *(w.astype(np.float64) for w in weights[n]), 1, 0, 1), 0)
            for n in ("a.b", "a_b")]
    expected = 1 / (1 + np.exp(-np.tanh(conv[0] + conv[1])))
    with torch.no_grad():
        np.testing.assert_allclose(net(x).double().numpy(), expected, rtol=1e-5, atol=1e-6)
    # Importing and running model.py executes no name: no PWNED file appears, the net is the same.
    np.save(out / "x.npy", x.numpy())
    code = STANDALONE.replace("run_name='__main__')", "run_name='m')") + \
        "; import numpy, torch; m = runpy.run_path('model.py'); net = m['load'](); " \
        "y = net(torch.from_numpy(numpy.load('x.npy'))); numpy.save('y.npy', y.detach().numpy())"
    done = subprocess.run([sys.executable, "-c", code], cwd=out, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not (out / "PWNED").exists() and not (tmp_path / "PWNED").exists()
    np.testing.assert_allclose(np.load(out / "y.npy"), expected, rtol=1e-5, atol=1e-6)
    compile((out / "model.py").read_text(encoding="utf-8"), "model.py", "exec")  # and it is valid Python


class Payload:
    """An arbitrary pickled object: torch.load(weights_only=True) refuses to build it."""


def _converted(tmp_path):
    return save_net(convert_reference("unit_conv_basic"), tmp_path / "good")


def test_load_refuses_bad_folders_with_one_clear_error(reference_dir, tmp_path):
    good = _converted(tmp_path)
    load(good)
    with pytest.raises(CaffeError, match="no such folder"):
        load(tmp_path / "missing")

    def broken(change) -> str:
        folder = tmp_path / f"broken{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        for item in good.iterdir():
            (folder / item.name).write_bytes(item.read_bytes())
        change(folder)
        with pytest.raises(CaffeError) as caught:
            load(folder)
        assert "\n" not in str(caught.value)
        return str(caught.value)

    assert "missing meta.json" in broken(lambda f: (f / "meta.json").unlink())
    assert "meta.json: cannot be read" in broken(lambda f: (f / "meta.json").write_text("{not json"))
    meta = json.loads((good / "meta.json").read_text())
    old = {k: v for k, v in meta.items() if k != "format"}
    assert "convert the caffemodel again" in broken(lambda f: (f / "meta.json").write_text(json.dumps(old)))
    bad_inputs = dict(meta, inputs={"data": ["x"]})
    assert "'inputs' must map" in broken(lambda f: (f / "meta.json").write_text(json.dumps(bad_inputs)))
    assert "cannot be read as a state_dict" in broken(lambda f: (f / "weights.pt").write_bytes(b"garbage"))
    assert "cannot be read as a state_dict" in broken(lambda f: torch.save({"conv_k3_p1.weight": Payload()}, f / "weights.pt"))
    assert "does not fit net.prototxt" in broken(lambda f: torch.save({"x": torch.zeros(1)}, f / "weights.pt"))
    state = torch.load(good / "weights.pt", weights_only=True)
    state["conv_k3_p1.weight"] = torch.zeros(1)
    assert "has shape (1,)" in broken(lambda f: torch.save(state, f / "weights.pt"))
    assert "net.prototxt:1" in broken(lambda f: (f / "net.prototxt").write_text("layer {"))


def test_outputs_never_go_into_links_or_user_folders(units_dir, tmp_path, monkeypatch):
    convert = ["convert", str(units_dir / "unit_conv_basic.caffemodel"), "-o"]
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    result = CliRunner().invoke(main, convert + [str(link)])
    assert result.exit_code == 2 and "symbolic link" in result.output
    assert link.is_symlink() and list(real.iterdir()) == []
    project = tmp_path / "project"
    project.mkdir()
    (project / "meta.json").write_text("{}")  # looks like ours at a glance: it is not
    (project / "main.py").write_text("print('my code')")
    monkeypatch.chdir(project)
    result = CliRunner().invoke(main, convert + ["."])
    assert result.exit_code == 2 and "not a caffe2torch output" in result.output
    assert sorted(p.name for p in project.iterdir()) == ["main.py", "meta.json"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent_is_one_line(units_dir, tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        result = CliRunner().invoke(main, ["convert", str(units_dir / "unit_conv_basic.caffemodel"),
                                           "-o", str(parent / "out")])
        assert result.exit_code == 2 and "cannot write the converted folder (Permission denied)" in result.output
        assert ".partial" not in result.output
    finally:
        parent.chmod(0o755)


def test_infinite_hyper_parameters_and_half_precision_survive_the_folder(tmp_path):
    from caffe2torch.model import from_net_parameter
    from caffe2torch.read import parse_prototxt

    definition = parse_prototxt('''name: "t"
input: "data" input_shape { dim: 1 dim: 2 dim: 5 dim: 5 }
layer { name: "p" type: "Power" bottom: "data" top: "p" power_param { power: -1 scale: 0 shift: 0 } }
layer { name: "t" type: "Threshold" bottom: "data" top: "t" threshold_param { threshold: inf } }
layer { name: "i" type: "Interp" bottom: "data" top: "i" interp_param { height: 7 width: 7 } }
layer { name: "a" type: "Pooling" bottom: "data" top: "a" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "c" type: "Convolution" bottom: "i" top: "c" convolution_param { num_output: 2 kernel_size: 1 } }
''')
    net = from_net_parameter(definition, {}, fill_missing=True, on_warning=lambda _: None)  # pow(0, -1) = inf
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 2, 5, 5)).astype(np.float32))
    folder = save_net(net, tmp_path / "out")
    namespace = _exec_model_py(folder)  # `inf` would be a NameError in generated source
    for ours, theirs in zip(namespace["load"]()(x), net(x), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)
    outputs = dict(zip(net_info(net).outputs, net(x)))
    assert torch.isinf(outputs["p"]).all() and not outputs["t"].any()
    half = save_net(net.half(), tmp_path / "half")  # tables that are not saved follow the input's dtype
    outputs = load(half).half()(x.half())  # a folder loads as float32 (exact from float16); .half() again
    assert all(o.dtype == torch.float16 for o in outputs)
    for ours, theirs in zip(outputs, net(x.half()), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)


def test_a_failed_replacement_keeps_the_earlier_output(tmp_path, monkeypatch):
    from caffe2torch import folder as folder_module

    net = convert_reference("unit_conv_basic")
    out = save_net(net, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rename = folder_module.Path.rename
    calls = []

    def failing(self, target):
        calls.append(self)
        if len(calls) == 2:  # the new folder moving into place
            raise OSError(5, "Input/output error")
        return rename(self, target)

    monkeypatch.setattr(folder_module.Path, "rename", failing)
    with pytest.raises(CaffeError, match="Input/output error"):
        save_net(net, out, force=True)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or backup left behind


def test_evaluation_only_graphs_are_not_saved(tmp_path):
    from caffe2torch.fast import optimize
    from caffe2torch.passes import caffe_order_norms

    net = convert_reference("unit_fork_bn")
    with pytest.raises(CaffeError, match="Caffe's order"):
        save_net(caffe_order_norms(net), tmp_path / "a")
    with pytest.raises(CaffeError, match="save the converted net itself"):
        save_net(optimize(net), tmp_path / "b")
    assert not any(tmp_path.iterdir())


def test_plugin_converters_from_conversion_to_model_py(tmp_path):
    """@caffe2torch.register_converter: a type the built-ins lack, and a Python layer told apart by module.layer."""
    import caffe2torch
    from caffe2torch.layers.registry import CONVERTERS
    from tests import plugin_example

    text = '''input: "data" input_shape { dim: 1 dim: 2 dim: 3 dim: 3 }
layer { name: "act" type: "HSwish" bottom: "data" top: "act" }
layer { name: "py" type: "Python" bottom: "act" top: "py"
        python_param { module: "rpn.scale_layer" layer: "ScaleLayer" param_str: "0.5" } }
'''
    (tmp_path / "net.prototxt").write_text(text)
    with pytest.raises(CaffeError, match=r"no converter for type 'HSwish'; register one with "
                                         r"@caffe2torch.register_converter\('HSwish'\)"):
        caffe2torch.convert(prototxt=tmp_path / "net.prototxt")
    plugin_example.register()
    try:
        net = caffe2torch.convert(prototxt=tmp_path / "net.prototxt")
        x = torch.linspace(-4, 4, 18).reshape(1, 2, 3, 3)
        torch.testing.assert_close(net(x), x * torch.clamp(x + 3, 0, 6) / 6 * 0.5)
        folder = save_net(net, tmp_path / "out")
        source = (folder / "model.py").read_text()
        assert "from tests.plugin_example import HSwish  # a plugin converter's module" in source
        assert "from tests.plugin_example import Scaled  # a plugin converter's module" in source
        torch.testing.assert_close(_exec_model_py(folder)["load"]()(x), net(x), rtol=0, atol=0)
        torch.testing.assert_close(caffe2torch.load(folder)(x), net(x), rtol=0, atol=0)
    finally:
        CONVERTERS.pop("HSwish", None)
        CONVERTERS.pop("Python:rpn.scale_layer.ScaleLayer", None)


def test_the_runtime_files_model_py_embeds_define_each_name_once():
    """codegen copies classes and helpers by name from several files: one name must mean one thing."""
    import inspect

    from caffe2torch import codegen

    owners: dict[str, list[str]] = {}
    for runtime in codegen._RUNTIME:
        for name, value in vars(runtime).items():
            if (inspect.isclass(value) or inspect.isfunction(value)) and value.__module__ == runtime.__name__:
                owners.setdefault(name, []).append(runtime.__name__)
    assert {name: files for name, files in owners.items() if len(files) > 1} == {}
