"""Distinct Caffe layer names never share a module or weights, on every path a net's weights travel.

Caffe matches weights by exact layer name. Python needs identifiers, so some names change; these
tests give layers whose names sanitise alike ("_" and "", "a.b", "a_b" and "a-b", "x/bn" ...)
weights that tell them apart, and check every output channel against a NumPy forward.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import caffe2torch
from caffe2torch.conversion import convert
from caffe2torch.errors import CaffeError
from caffe2torch.fast import optimize
from caffe2torch.fold import fold_files
from caffe2torch.folder import LEGACY_FORMAT, load, save_net
from caffe2torch.model import layer_calls, legacy_python_names, python_names
from tests.conftest import load_standalone
from tests.public_nets import write_caffemodel, write_caffemodel_h5

CONVS = ["_", "", "a.b", "a_b", "a-b"]
EPS = 1e-5


def _net_text(convs: list[str]) -> str:
    """One 1x1 convolution per name on the same input, each followed by a BatchNorm named "<name>/bn", concatenated."""
    text = 'name: "names"\ninput: "data" input_shape { dim: 1 dim: 1 dim: 2 dim: 3 }\n'
    for index, name in enumerate(convs):
        text += (f'layer {{ name: "{name}" type: "Convolution" bottom: "data" top: "c{index}" '
                 f'convolution_param {{ num_output: 1 kernel_size: 1 }} }}\n'
                 f'layer {{ name: "{name}/bn" type: "BatchNorm" bottom: "c{index}" top: "c{index}" '
                 f'batch_norm_param {{ eps: {EPS} }} }}\n')
    bottoms = "".join(f' bottom: "c{i}"' for i in range(len(convs)))
    return text + f'layer {{ name: "cat" type: "Concat"{bottoms} top: "out" }}\n'


def _weights(convs: list[str]) -> dict[str, list[np.ndarray]]:
    """Weights that depend on the name itself, so that a layer with another's weights shows."""
    weights = {}
    for name in convs:
        key = sum(map(ord, name)) + 3 * len(name) + 1  # "" 1, "_" 99, "a.b" 251, "a_b" 300, "a-b" 252
        weights[name] = [np.full((1, 1, 1, 1), key / 100, np.float32), np.array([key / 7], np.float32)]
        weights[f"{name}/bn"] = [np.array([key / 50], np.float32), np.array([1 + key / 300], np.float32),
                                 np.array([1.0], np.float32)]
    return weights


def _expected(convs: list[str], x: np.ndarray) -> np.ndarray:
    weights, x = _weights(convs), x.astype(np.float64)
    channels = []
    for name in convs:
        (w, b), (mean, var, _) = weights[name], weights[f"{name}/bn"]
        channels.append(((w.item() * x + b.item()) - mean.item()) / np.sqrt(var.item() + EPS))
    return np.concatenate(channels, axis=1)


@pytest.fixture()
def files(tmp_path):
    text = _net_text(CONVS)
    (tmp_path / "net.prototxt").write_text(text)
    write_caffemodel(text, _weights(CONVS), tmp_path / "net.caffemodel")
    return tmp_path


X = np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3) - 2.5


def _check(net, x=X) -> None:
    with torch.no_grad():
        got = net(torch.from_numpy(x)).double().numpy()
    np.testing.assert_allclose(got, _expected(CONVS, x), rtol=1e-5, atol=1e-5)


def test_each_layer_runs_its_own_weights_on_every_path(files, tmp_path):
    net = convert(files / "net.caffemodel", files / "net.prototxt").net
    _check(net)
    for layer in CONVS:  # the converted modules hold exactly the Caffe layer's blobs
        module = net.get_submodule(next(node.target for node, call in layer_calls(net) if call.layer == layer))
        assert module.weight.item() == _weights(CONVS)[layer][0].item()
    _check(convert(files / "net.caffemodel", input_shape=(1, 1, 2, 3), find_prototxt=False).net)  # stored net
    folder = save_net(net, tmp_path / "out")
    _check(load(folder))
    _check(load_standalone(folder))
    _check(optimize(net))
    fold_files(files / "net.caffemodel", files / "net.prototxt", tmp_path / "folded")
    _check(load(tmp_path / "folded"))


def test_hdf5_weights_match_by_exact_name(tmp_path):
    convs = [name for name in CONVS if name]  # HDF5 has no group named ""
    text = _net_text(convs)
    (tmp_path / "net.prototxt").write_text(text)
    write_caffemodel_h5(text, _weights(convs), tmp_path / "net.caffemodel.h5")
    net = convert(tmp_path / "net.caffemodel.h5", tmp_path / "net.prototxt").net
    with torch.no_grad():
        got = net(torch.from_numpy(X)).double().numpy()
    np.testing.assert_allclose(got, _expected(convs, X), rtol=1e-5, atol=1e-5)


def test_a_name_that_is_an_identifier_is_its_own_key_in_any_order(files, tmp_path):
    forward = convert(files / "net.caffemodel", files / "net.prototxt").net
    backward_text = _net_text(CONVS[::-1])
    (tmp_path / "backward.prototxt").write_text(backward_text)
    backward = convert(files / "net.caffemodel", tmp_path / "backward.prototxt").net
    modules = {call.layer: node.target for node, call in layer_calls(forward)}
    assert modules == {call.layer: node.target for node, call in layer_calls(backward)}
    # Names that must change take their sanitised form in the order of the names ("-" < "." < "/" < "_").
    assert modules == {"_": "layer_2", "": "layer", "a.b": "a_b_3", "a_b": "a_b", "a-b": "a_b_2",
                       "_/bn": "bn_2", "/bn": "bn", "a.b/bn": "a_b_bn_2", "a_b/bn": "a_b_bn_3", "a-b/bn": "a_b_bn",
                       "cat": "cat"}
    # The state_dict entry named after a layer holds that layer's weights.
    assert forward.state_dict()["a_b.weight"].item() == _weights(CONVS)["a_b"][0].item()
    assert python_names(["x", "x", "x_2"]) == ["x", "x_3", "x_2"]  # a name used twice: the later copy moves


def test_folders_of_format_2_load_with_their_first_come_names(files, tmp_path):
    """Folder format 2 gave "a.b" the key a_b when it came first: such a folder still loads each layer's own weights."""
    net = convert(files / "net.caffemodel", files / "net.prototxt").net
    folder = save_net(net, tmp_path / "out")
    pairs = [(call.layer, node.target) for node, call in layer_calls(net)]
    legacy = dict(zip((target for _, target in pairs), legacy_python_names([layer for layer, _ in pairs])))
    assert legacy["a_b_3"] == "a_b" and legacy["a_b"] == "a_b_2"  # keys move between the formats
    state = torch.load(folder / "weights.pt", weights_only=True)
    torch.save({".".join([legacy[key.split(".")[0]], *key.split(".")[1:]]): value for key, value in state.items()},
               folder / "weights.pt")
    meta = json.loads((folder / "meta.json").read_text())
    del meta["modules"]
    (folder / "meta.json").write_text(json.dumps(dict(meta, format=LEGACY_FORMAT)))
    _check(load(folder))


def test_a_folder_whose_modules_do_not_match_its_definition_is_refused(files, tmp_path):
    folder = save_net(convert(files / "net.caffemodel", files / "net.prototxt").net, tmp_path / "out")
    meta = json.loads((folder / "meta.json").read_text())
    swapped = [[layer, {"a_b": "a_b_3", "a_b_3": "a_b"}.get(module, module)] for layer, module in meta["modules"]]
    (folder / "meta.json").write_text(json.dumps(dict(meta, modules=swapped)))
    with pytest.raises(CaffeError, match=r"meta.json: weights.pt holds layer 'a.b' as module 'a_b', net.prototxt "
                                         r"builds layer 'a.b' as 'a_b_3' there"):
        load(folder)
    (folder / "meta.json").write_text(json.dumps(dict(meta, modules="all")))
    with pytest.raises(CaffeError, match="'modules' must list"):
        caffe2torch.load(folder)
