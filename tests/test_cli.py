"""The caffe2torch command line: convert, load, verify, inspect, and its one-line errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import caffe2torch
from caffe2torch.cli import main
from caffe2torch.verify import read_reference


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def _assert_one_line_error(result):
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.startswith("caffe2torch: error")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output


def test_convert_writes_a_folder_that_plain_torch_loads(units_dir, tmp_path):
    model = tmp_path / "unit_inplace_chain.caffemodel"
    shutil.copy(units_dir / "unit_inplace_chain.caffemodel", model)
    result = run("convert", model, "--prototxt", units_dir / "unit_inplace_chain.prototxt")
    assert result.exit_code == 0, result.output
    folder = tmp_path / "unit_inplace_chain_torch"
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "model.py", "net.prototxt", "weights.pt"]
    # The weights are a state_dict: loadable without executing pickled code, keys after the Caffe layers.
    state = torch.load(folder / "weights.pt", weights_only=True)
    assert set(state) == {"conv1.weight", "conv1_bn.weight", "conv1_bn.bias", "conv1_bn.running_mean",
                          "conv1_bn.running_var", "conv1_bn.num_batches_tracked", "conv2.weight", "conv2.bias",
                          "conv2_bn.running_mean", "conv2_bn.running_var", "conv2_bn.num_batches_tracked",
                          "conv2_scale.weight", "conv2_scale.bias"}
    net = caffe2torch.load(folder)
    reference = read_reference(units_dir / "unit_inplace_chain.ref.h5")
    with torch.no_grad():
        out = net(torch.from_numpy(reference.inputs["data"]))
        blobs = caffe2torch.blobs(net, torch.from_numpy(reference.inputs["data"]))
    final = reference.layers[-1].values[0].data
    np.testing.assert_allclose(out.numpy(), final, rtol=1e-5, atol=1e-6)
    # In-place blobs hold the value after the last layer that writes them.
    relu_record = next(layer for layer in reference.layers if layer.name == "conv1_relu")
    np.testing.assert_allclose(blobs["conv1"].numpy(), relu_record.values[0].data, rtol=1e-5, atol=1e-6)
    source = (folder / "model.py").read_text()
    assert "self.conv1 = nn.Conv2d(3, 4, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1)" in source
    assert "conv1 = self.conv1_relu(conv1)  # 'conv1_relu' (ReLU)" in source


def test_generated_source_runs_like_the_net(units_dir, tmp_path):
    folder = tmp_path / "out"
    result = run("convert", units_dir / "unit_eltwise_concat.caffemodel", "--input-shape", "a=1,3,7,9;b=1,3,7,9", "-o", folder)
    assert result.exit_code == 0, result.output
    namespace: dict = {"__file__": str(folder / "model.py")}
    exec(compile((folder / "model.py").read_text(), "model.py", "exec"), namespace)
    net = namespace["load"]()
    plain = caffe2torch.load(folder)
    a, b = torch.randn(1, 3, 7, 9), torch.randn(1, 3, 7, 9)
    for ours, theirs in zip(net(a, b), plain(a, b)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_verify_exit_codes(units_dir, tmp_path):
    # The reference names its prototxt, which lies beside it.
    ok = run("verify", units_dir / "unit_conv_basic.caffemodel", "--reference", units_dir / "unit_conv_basic.ref.h5",
             "--tolerance", "1e-5")
    assert ok.exit_code == 0, ok.output
    assert ok.output.strip().splitlines()[-1].startswith("7/7 layers within tolerance")
    broken = tmp_path / "unit_conv_basic.caffemodel.h5"
    shutil.copy(units_dir / "unit_conv_basic.caffemodel.h5", broken)
    with h5py.File(broken, "r+") as file:
        file["data/conv_k3_s2/0"][0, 0, 0, 0] += 0.5
    bad = run("verify", broken, "--prototxt", units_dir / "unit_conv_basic.prototxt",
              "--reference", units_dir / "unit_conv_basic.ref.h5")
    assert bad.exit_code == 1, bad.output
    assert "conv_k3_s2" in bad.output and "MISMATCH" in bad.output
    missing = run("verify", units_dir / "unit_conv_basic.caffemodel", "--reference", tmp_path / "none.h5")
    assert missing.exit_code == 2
    _assert_one_line_error(missing)


def test_isolated_on_a_samples_only_reference_is_refused_up_front(units_dir, tmp_path):
    """A reference that stores samples of every top but full tensors of none (as the 1025x2049 ICNet ones) cannot
    feed any layer after the first Caffe's bottoms: one line, exit 2, instead of every layer "unchecked"."""
    reference = tmp_path / "unit_inplace_chain.ref.h5"
    shutil.copy(units_dir / "unit_inplace_chain.ref.h5", reference)
    shutil.copy(units_dir / "unit_inplace_chain.prototxt", tmp_path / "unit_inplace_chain.prototxt")
    with h5py.File(reference, "r+") as file:
        for layer in file["layers"].values():
            for top in layer.values():
                del top["data"]
    isolated = run("verify", units_dir / "unit_inplace_chain.caffemodel", "--reference", reference, "--isolated")
    assert isolated.exit_code == 2, isolated.output
    _assert_one_line_error(isolated)
    assert ("--isolated feeds each layer Caffe's full tensors of its bottoms, but this reference stores them for 0 of "
            "its 9 layers (samples of the rest), so 7 layers could not be checked (the first: 'conv1_relu'); verify "
            "without --isolated checks every layer free-running") in isolated.output
    free = run("verify", units_dir / "unit_inplace_chain.caffemodel", "--reference", reference, "--tolerance", "1e-5")
    assert free.exit_code == 0 and "9/9 layers within tolerance" in free.output, free.output


def test_convert_labels_what_it_prints_and_inspect_reads_the_folder(units_dir, tmp_path):
    result = run("convert", units_dir / "unit_fork_bn.caffemodel", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert f"weights: {units_dir / 'unit_fork_bn.caffemodel'}, md5 3e89e478c05235534fdd60b110c57edc\n" in result.stdout
    assert f"definition: {units_dir / 'unit_fork_bn.prototxt'}\n" in result.stdout
    from_model = json.loads(run("inspect", units_dir / "unit_fork_bn.caffemodel", "--json").stdout)
    folder = run("inspect", tmp_path / "out", "--json")
    assert folder.exit_code == 0, folder.output
    from_folder = json.loads(folder.stdout)
    assert from_folder["layers"] == from_model["layers"] and from_folder["md5"] == from_model["md5"]
    assert from_folder["notes"][0] == "a folder converted from unit_fork_bn.caffemodel"
    assert "1 of 3 BatchNorm layers are frozen in this folder" in from_folder["notes"][1]
    table = run("inspect", tmp_path / "out")
    assert table.stdout.strip().splitlines()[-1] == "weights md5 3e89e478c05235534fdd60b110c57edc"
    _assert_one_line_error(run("inspect", tmp_path / "out", "--input-shape", "1,4,5,7"))


def test_inspect_json(units_dir, tmp_path):
    result = run("inspect", units_dir / "unit_conv_basic.caffemodel", "--input-shape", "1,3,13,17", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)  # notes go to stderr, so the JSON stays parseable
    assert "note: using the net definition" in result.stderr and info["notes"]
    # unit_conv_basic.prototxt lies beside the caffemodel: that definition is used.
    assert info["prototxt"].endswith("unit_conv_basic.prototxt")
    first = info["layers"][0]
    assert first["name"] == "conv_k3_p1" and first["top_shapes"] == [[1, 5, 13, 17]]
    assert first["parameters"] == 5 * 3 * 3 * 3 + 5
    assert info["parameters"] == sum(layer["parameters"] for layer in info["layers"])
    assert len(info["md5"]) == 32
    # Alone, the caffemodel gives its stored net, with the Split layers Caffe inserted itself.
    alone = tmp_path / "unit_conv_basic.caffemodel"
    shutil.copy(units_dir / "unit_conv_basic.caffemodel", alone)
    info = json.loads(run("inspect", alone, "--input-shape", "1,3,13,17", "--json").stdout)
    assert info["prototxt"] is None and info["layers"][0]["name"] == "data_input_0_split"


@pytest.mark.parametrize("content", [b"", b"\x0a\x05garbage-bytes-not-a-net", b"\x00" * 64])
def test_bad_caffemodel_leaves_nothing_behind(tmp_path, content):
    model = tmp_path / "broken.caffemodel"
    model.write_bytes(content)
    result = run("convert", model)
    _assert_one_line_error(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.caffemodel"]


def test_unknown_layer_type_and_bad_shape(units_dir, tmp_path):
    text = (units_dir / "unit_conv_basic.prototxt").read_text().replace('type: "ReLU"', 'type: "Swish42"')
    prototxt = tmp_path / "net.prototxt"
    prototxt.write_text(text)
    result = run("convert", units_dir / "unit_conv_basic.caffemodel", "--prototxt", prototxt, "-o", tmp_path / "o")
    _assert_one_line_error(result)
    assert "Swish42" in result.output and "register_converter('Swish42')" in result.output
    text = (units_dir / "unit_conv_basic.prototxt").read_text().replace("num_output: 5", "num_output: 6", 1)
    prototxt.write_text(text)
    result = run("convert", units_dir / "unit_conv_basic.caffemodel", "--prototxt", prototxt, "-o", tmp_path / "o")
    _assert_one_line_error(result)
    assert "conv_k3_p1" in result.output
    assert not (tmp_path / "o").exists()


def test_release_name_with_wrong_md5_is_refused(reference_dir, tmp_path):
    fake = tmp_path / "icnet_cityscapes_train_30k.caffemodel"
    shutil.copy(reference_dir / "icnet_merged_1025x2049.caffemodel", fake)
    result = run("convert", fake, "-o", tmp_path / "out")
    _assert_one_line_error(result)
    assert "md5" in result.output and "--no-verify" in result.output
    assert not (tmp_path / "out").exists()


def test_input_shape_override(units_dir, tmp_path):
    result = run("inspect", units_dir / "unit_conv_basic.caffemodel", "--input-shape", "2,3,9,9", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["inputs"] == {"data": [2, 3, 9, 9]}
    bad = run("inspect", units_dir / "unit_conv_basic.caffemodel", "--input-shape", "a,b")
    _assert_one_line_error(bad)


def test_exp_warning_names_the_layer_once(units_dir, tmp_path):
    result = run("convert", units_dir / "unit_power_exp_log.caffemodel", "--prototxt", units_dir / "unit_power_exp_log.prototxt",
                 "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("caffe2torch: warning")]
    assert any("layer 'exp_e_shift' (Exp): base -1 (e)" in line for line in warnings), warnings
    assert all(line.count("layer '") == 1 for line in warnings), warnings


def test_existing_user_folder_is_never_replaced(units_dir, tmp_path):
    convert = ("convert", units_dir / "unit_conv_basic.caffemodel", "--prototxt", units_dir / "unit_conv_basic.prototxt", "-o")
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.txt").write_text("precious")
    for extra in ((), ("--force",)):
        result = run(*convert, folder, *extra)
        _assert_one_line_error(result)
        assert "not a caffe2torch output" in result.output
        assert sorted(p.name for p in folder.iterdir()) == ["thesis.txt"]
    # Our own earlier output is replaced only with --force, atomically.
    out = tmp_path / "out"
    assert run(*convert, out).exit_code == 0
    again = run(*convert, out)
    _assert_one_line_error(again)
    assert "--force" in again.output
    assert run(*convert, out, "--force").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out"]
    # A file added to our output makes it the user's folder: never replaced.
    (out / "notes.txt").write_text("mine now")
    result = run(*convert, out, "--force")
    _assert_one_line_error(result)
    assert "notes.txt" in result.output and (out / "notes.txt").exists()


def test_output_path_errors_are_one_line(units_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run("convert", units_dir / "unit_conv_basic.caffemodel", "--prototxt", units_dir / "unit_conv_basic.prototxt",
                 "-o", blocker / "sub")
    _assert_one_line_error(result)
    assert result.exit_code == 2


def test_net_outputs_in_caffes_order():
    from caffe2torch.graph import build_graph, output_blobs
    from caffe2torch.read import parse_prototxt

    net = parse_prototxt('''
        input: "x" input_shape { dim: 1 dim: 2 }
        layer { name: "a" type: "ReLU" bottom: "x" top: "zeta" }
        layer { name: "b" type: "TanH" bottom: "x" top: "alpha" }
    ''')
    # Caffe collects outputs in a std::set<string>: by name, not by position.
    assert output_blobs(build_graph(net)) == ["alpha", "zeta"]


def test_text_prototxt_given_as_model_says_so(units_dir, tmp_path):
    result = run("convert", units_dir / "unit_conv_basic.prototxt", "-o", tmp_path / "o")
    _assert_one_line_error(result)
    assert "this is a text prototxt: pass it with --prototxt (or use inspect)" in result.output
    renamed = tmp_path / "net.caffemodel"  # a text file under a weights name: found by its content
    renamed.write_text((units_dir / "unit_conv_basic.prototxt").read_text())
    result = run("convert", renamed, "-o", tmp_path / "o")
    _assert_one_line_error(result)
    assert "this is a text prototxt" in result.output and not (tmp_path / "o").exists()


def test_convert_says_which_definition_it_uses(units_dir, tmp_path):
    result = run("convert", units_dir / "unit_conv_basic.caffemodel", "-o", tmp_path / "beside")
    assert result.exit_code == 0, result.output
    assert "note: using the net definition" in result.output and "unit_conv_basic.prototxt found beside" in result.output
    alone = tmp_path / "unit_conv_basic.caffemodel"
    shutil.copy(units_dir / "unit_conv_basic.caffemodel", alone)
    result = run("convert", alone, "--input-shape", "1,3,13,17", "-o", tmp_path / "stored")
    assert result.exit_code == 0, result.output
    assert "note: using the net definition stored in unit_conv_basic.caffemodel" in result.output
    (tmp_path / "deploy.prototxt").write_text((units_dir / "unit_conv_basic.prototxt").read_text())
    result = run("convert", alone, "-o", tmp_path / "deploy")
    assert result.exit_code == 0 and "deploy.prototxt found beside" in result.output


def test_verify_a_converted_folder_and_the_device_option(units_dir, tmp_path):
    folder = tmp_path / "out"
    assert run("convert", units_dir / "unit_inplace_chain.caffemodel", "-o", folder).exit_code == 0
    ok = run("verify", folder, "--reference", units_dir / "unit_inplace_chain.ref.h5", "--tolerance", "1e-5", "--device", "cpu")
    assert ok.exit_code == 0, ok.output
    assert ok.output.strip().splitlines()[-1].startswith("9/9 layers within tolerance")
    fast = run("verify", folder, "--reference", units_dir / "unit_inplace_chain.ref.h5", "--fast", "--tolerance", "1e-5")
    assert fast.exit_code == 0 and "4/4 layers within tolerance (free-running, fast path" in fast.output
    if not torch.cuda.is_available():
        missing = run("verify", folder, "--reference", units_dir / "unit_inplace_chain.ref.h5", "--device", "cuda")
        _assert_one_line_error(missing)
        assert "CUDA is not available" in missing.output
    bogus = run("verify", folder, "--reference", units_dir / "unit_inplace_chain.ref.h5", "--device", "gpu7")
    _assert_one_line_error(bogus)


def test_verify_cannot_pass_on_nothing(units_dir, tmp_path):
    empty = tmp_path / "empty.ref.h5"
    with h5py.File(empty, "w") as file:
        file.create_group("layers")
        file.create_group("input").create_dataset("data", data=np.zeros((1, 3, 13, 17), np.float32))
    result = run("verify", units_dir / "unit_conv_basic.caffemodel", "--reference", empty)
    _assert_one_line_error(result)
    assert "nothing to compare" in result.output


@pytest.mark.parametrize("body, culprit", [
    ('input: "data" input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }\n'
     'layer { name: "wide" type: "Convolution" bottom: "data" top: "c" convolution_param { num_output: 2000000000 kernel_size: 3 } }',
     "layer 'wide' (Convolution): the parameters up to here needs"),
    ('input: "data" input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }\n'
     'layer { name: "zoom" type: "Interp" bottom: "data" top: "z" interp_param { height: 4000000 width: 4000000 } }',
     "layer 'zoom' (Interp) (top 1x3x4000000x4000000) needs"),
    ('input: "data" input_shape { dim: 1 dim: 3 dim: 100000000 dim: 100000000 }\n'
     'layer { name: "r" type: "ReLU" bottom: "data" top: "data" }',
     "input 'data' of shape 1x3x100000000x100000000 needs"),
])
def test_nets_too_large_for_the_machine_are_refused_before_allocating(tmp_path, body, culprit):
    prototxt = tmp_path / "huge.prototxt"
    prototxt.write_text(body)
    result = run("inspect", prototxt)
    _assert_one_line_error(result)
    assert culprit in result.output and "more than the memory limit" in result.output


def test_max_memory_option(units_dir, tmp_path, monkeypatch):
    from caffe2torch.limits import ENVIRONMENT

    monkeypatch.setenv(ENVIRONMENT, "100G")  # recorded, so the option's setting is undone after the test
    small = run("inspect", units_dir / "unit_conv_basic.caffemodel", "--max-memory", "2K")
    _assert_one_line_error(small)
    assert "more than the memory limit of 2.0 KiB" in small.output
    assert run("inspect", units_dir / "unit_conv_basic.caffemodel", "--max-memory", "1G").exit_code == 0
    bad = run("inspect", units_dir / "unit_conv_basic.caffemodel", "--max-memory", "lots")
    assert bad.exit_code == 2 and "memory size 'lots'" in bad.output


def test_converters_check_the_budget_before_building_tables(tmp_path):
    """Interp builds index tables of its output size: the size is checked first (2e9 x 2e9 from a 2 x 2 input)."""
    prototxt = tmp_path / "huge.prototxt"
    prototxt.write_text('input: "data" input_shape { dim: 1 dim: 1 dim: 2 dim: 2 }\n'
                        'layer { name: "zoom" type: "Interp" bottom: "data" top: "z" interp_param { zoom_factor: 2000000000 } }')
    result = run("inspect", prototxt, "--max-memory", "10G")
    _assert_one_line_error(result)
    assert "layer 'zoom' (Interp) (top 1x1x2000000001x2000000001) needs" in result.output


def test_outputs_never_replace_what_the_run_reads(units_dir, tmp_path):
    """fold-bn's folder holds a caffemodel and prototxt; converting them into that same folder with --force would
    delete the model being read: refused, as is a definition found beside the weights."""
    folded = tmp_path / "folded"
    assert run("fold-bn", units_dir / "unit_batchnorm_scale_bias.caffemodel", "--prototxt",
               units_dir / "unit_batchnorm_scale_bias.prototxt", "-o", folded).exit_code == 0
    model = folded / "unit_batchnorm_scale_bias_folded.caffemodel"
    before = {p.name: p.read_bytes() for p in folded.iterdir()}
    for command in ("convert", "fold-bn"):
        result = run(command, model, "-o", folded, "--force")
        _assert_one_line_error(result)
        assert "which this run reads" in result.output and "choose another -o" in result.output
        assert {p.name: p.read_bytes() for p in folded.iterdir()} == before


def _convert_inside_read_only_parent(units_dir, tmp_path):
    parent = tmp_path / "ro"
    out = parent / "out"
    out.mkdir(parents=True)
    parent.chmod(0o555)
    try:
        convert = ("convert", units_dir / "unit_conv_basic.caffemodel", "--prototxt", units_dir / "unit_conv_basic.prototxt",
                   "-o", out)
        for extra in ((), ("--force",)):  # into the empty folder, then over our own output
            result = run(*convert, *extra)
            assert result.exit_code == 0, result.output
            assert sorted(p.name for p in out.iterdir()) == ["meta.json", "model.py", "net.prototxt", "weights.pt"]
            assert sorted(p.name for p in parent.iterdir()) == ["out"]
        from caffe2torch.folder import load
        assert load(out) is not None
    finally:
        parent.chmod(0o755)


def test_convert_writes_inside_the_target_when_the_parent_refuses(units_dir, tmp_path, monkeypatch):
    """`convert -o ro/out`: a writable folder in a read-only parent gets the files written inside it (no staging folder
    beside it). Root (CI) writes through read-only modes, so the parent's refusal is made where the code meets it."""
    import caffe2torch.folder as folder_module

    real_access = os.access
    parent = (tmp_path / "ro").resolve()
    monkeypatch.setattr(folder_module.os, "access",
                        lambda path, mode, **kw: False if Path(path).resolve() == parent else real_access(path, mode))
    real_mkdtemp = folder_module.tempfile.mkdtemp

    def mkdtemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve() == parent:
            raise PermissionError(13, "Permission denied", str(dir))
        return real_mkdtemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(folder_module.tempfile, "mkdtemp", mkdtemp)
    _convert_inside_read_only_parent(units_dir, tmp_path)
