"""Which BatchNorms learn: freeze_batchnorm (statistics, and weight and bias by choice), unfreeze_batchnorm, the
note convert gives for a definition that freezes, and the record a saved folder keeps."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import caffe2torch
from caffe2torch.cli import main
from caffe2torch.errors import CaffeError
from caffe2torch.export import check_inputs
from caffe2torch.model import layer_module
from caffe2torch.modules import FrozenBatchNorm2d
from tests.conftest import UNITS_DIR, convert_reference, load_standalone

NORMS = ("bn", "bn_eps", "bn_frozen")  # unit_fork_bn: the fork's BN, bn_frozen with `frozen: true`


def _state(net) -> dict[str, tuple[str, bool]]:
    """Each norm: its class and whether its weight and bias learn."""
    return {name: (type(layer_module(net, name)).__name__, layer_module(net, name).weight.requires_grad)
            for name in NORMS}


def test_the_definitions_freezing_is_converted_and_said():
    net = convert_reference("unit_fork_bn")
    assert _state(net) == {"bn": ("BatchNorm2d", True), "bn_eps": ("BatchNorm2d", True),
                           "bn_frozen": ("FrozenBatchNorm2d", False)}
    result = CliRunner().invoke(main, ["inspect", str(UNITS_DIR / "unit_fork_bn.caffemodel")])
    assert result.exit_code == 0, result.output
    assert ("note: 1 of 3 BatchNorm layers are frozen by the definition (`frozen: true` or `use_global_stats: true`, "
            "e.g. 'bn_frozen'): in training they keep their stored statistics, 1 of them their weight and bias too; "
            "caffe2torch.freeze_batchnorm(net, affine=False) lets weight and bias learn, "
            "caffe2torch.unfreeze_batchnorm(net) lets them train entirely") in result.output


def test_freeze_keeps_statistics_and_affine_by_choice():
    net = convert_reference("unit_fork_bn")
    x = check_inputs(net)[0]
    with torch.no_grad():
        evaluated = net(x)
    assert caffe2torch.freeze_batchnorm(net, affine=False) is net
    assert _state(net) == {name: ("FrozenBatchNorm2d", True) for name in NORMS}
    net.train()
    assert not any(layer_module(net, name).training for name in NORMS)
    stats = {name: layer_module(net, name).running_mean.clone() for name in NORMS}
    trained = net(x)
    torch.testing.assert_close(trained[0], evaluated[0])  # the stored statistics, not the batch's
    sum(output.sum() for output in trained).backward()
    assert all(layer_module(net, name).weight.grad is not None for name in NORMS)  # gamma and beta learn
    assert all(torch.equal(layer_module(net, name).running_mean, stats[name]) for name in NORMS)
    caffe2torch.freeze_batchnorm(net)  # the default also fixes weight and bias, as the fork's frozen: true
    assert _state(net) == {name: ("FrozenBatchNorm2d", False) for name in NORMS}


def test_unfreeze_trains_what_the_definition_froze():
    net = caffe2torch.unfreeze_batchnorm(convert_reference("unit_fork_bn")).train()
    assert _state(net) == {name: ("BatchNorm2d", True) for name in NORMS}
    frozen = layer_module(net, "bn_frozen")
    before = frozen.running_mean.clone()
    net(check_inputs(net)[0])
    assert frozen.training and not torch.equal(frozen.running_mean, before)  # batch statistics, running averages


@pytest.mark.parametrize("change,expected", [
    (lambda net: caffe2torch.freeze_batchnorm(net, affine=False), {n: ("FrozenBatchNorm2d", True) for n in NORMS}),
    (lambda net: caffe2torch.freeze_batchnorm(net), {n: ("FrozenBatchNorm2d", False) for n in NORMS}),
    (caffe2torch.unfreeze_batchnorm, {n: ("BatchNorm2d", True) for n in NORMS}),
])
def test_save_and_load_keep_the_freezing(tmp_path, change, expected):
    net = change(convert_reference("unit_fork_bn"))
    folder = caffe2torch.save(net, tmp_path / "out")
    record = json.loads((folder / "meta.json").read_text())["batchnorm"]
    assert record == {"frozen": [n for n in NORMS if expected[n][0] == "FrozenBatchNorm2d"],
                      "fixed_affine": [n for n in NORMS if not expected[n][1]]}
    assert _state(caffe2torch.load(folder)) == expected
    standalone = load_standalone(folder)  # model.py builds the same modules
    assert {n: (type(getattr(standalone, n)).__name__, getattr(standalone, n).weight.requires_grad)
            for n in NORMS} == expected


def test_a_folder_without_the_record_keeps_the_definitions_freezing(tmp_path):
    folder = caffe2torch.save(caffe2torch.freeze_batchnorm(convert_reference("unit_fork_bn")), tmp_path / "out")
    meta = json.loads((folder / "meta.json").read_text())
    del meta["batchnorm"]  # as folders written before the record
    (folder / "meta.json").write_text(json.dumps(meta))
    assert _state(caffe2torch.load(folder))["bn"] == ("BatchNorm2d", True)


@pytest.mark.parametrize("record,message", [
    ({"frozen": ["conv"], "fixed_affine": []}, "'batchnorm' names 'conv', which is not a BatchNorm layer of the net"),
    ({"frozen": "bn"}, "'batchnorm' must map 'frozen' and 'fixed_affine' to lists of layer names"),
])
def test_a_damaged_record_is_one_error(tmp_path, record, message):
    folder = caffe2torch.save(convert_reference("unit_fork_bn"), tmp_path / "out")
    meta = json.loads((folder / "meta.json").read_text())
    meta["batchnorm"] = record
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CaffeError, match=f"meta.json: {message}"):
        caffe2torch.load(folder)


def test_batchnorm_without_running_statistics_is_left_alone():
    from caffe2torch.model import from_net_parameter
    from caffe2torch.read import parse_prototxt

    text = ('input: "data" input_shape { dim: 2 dim: 3 dim: 4 dim: 4 }\n'
            'layer { name: "bn" type: "BatchNorm" bottom: "data" top: "bn" batch_norm_param { use_global_stats: false } }')
    net = from_net_parameter(parse_prototxt(text), {}, fill_missing=True, on_warning=lambda _: None)
    caffe2torch.freeze_batchnorm(net)
    module = layer_module(net, "bn")
    assert type(module) is nn.BatchNorm2d and not module.track_running_stats
    assert not isinstance(module, FrozenBatchNorm2d)
