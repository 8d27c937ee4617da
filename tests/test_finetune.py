"""examples/finetune_icnet.py: the cascade loss falls on the demo set, nothing goes NaN, and icnet-eval reads what it
saves; with_outputs, which it trains through."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

import caffe2torch
from caffe2torch.errors import CaffeError
from caffe2torch.export import check_inputs
from tests.conftest import convert_reference

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune_icnet.py"
SIZE = (193, 385)  # about the smallest ICNet's pyramid pooling takes: a fast test


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("finetune_icnet", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_finetuning_on_the_demo_set_lowers_the_loss(example, tmp_path, one_thread):
    import icnet_eval
    from icnet_eval.data import parse_list
    from icnet_eval.demo import make_demo_set

    list_path, _ = make_demo_set(tmp_path / "demo", images=2)
    entries = parse_list(list_path, tmp_path / "demo", need_labels=True)
    net = example.icnet_with_bn(None, SIZE)
    before = {name: value.clone() for name, value in net.state_dict().items()}
    logged = []
    result = example.finetune(net, entries, SIZE, tmp_path / "tuned", iterations=8, batch_size=2, log_every=4,
                              echo=logged.append)
    assert len(result.losses) == 8 and all(math.isfinite(loss) for loss in result.losses)
    assert result.losses[-1] < 0.8 * result.losses[0], result.losses
    assert logged[0].startswith("iteration     1/8  loss ") and "sub4" in logged[0] and "sub124" in logged[0]
    after = net.state_dict()
    assert not torch.equal(after["conv6_cls.weight"], before["conv6_cls.weight"])
    assert not torch.equal(after["conv1_1_3x3_s2_bn.weight"], before["conv1_1_3x3_s2_bn.weight"])  # gamma learns
    assert torch.equal(after["conv1_1_3x3_s2_bn.running_mean"], before["conv1_1_3x3_s2_bn.running_mean"])
    assert all(torch.isfinite(value).all() for value in after.values() if value.is_floating_point())

    # The saved folder is the deploy net (no auxiliary heads) that icnet-eval evaluates.
    loaded = caffe2torch.load(result.folder)
    assert set(loaded.state_dict()) == set(after)
    report = icnet_eval.evaluate(list_path, tmp_path / "demo", result.folder, tmp_path / "eval", workers=0,
                                 progress=False)
    assert report["options"]["input_size"] == list(SIZE) and 0.0 <= report["miou"] <= 100.0


def test_merged_bn_weights_are_refused(example, tmp_path):
    from icnet_eval.model import write_untrained_caffemodel

    merged = write_untrained_caffemodel(tmp_path / "merged.caffemodel", bn=False)
    with pytest.raises(CaffeError, match="BN is merged into the convolutions; fine-tuning such weights diverges"):
        example.icnet_with_bn(str(merged), SIZE)


def test_with_outputs_returns_blobs_and_shares_the_parameters(tmp_path):
    net = convert_reference("unit_inplace_chain")
    x = check_inputs(net)[0]
    every = caffe2torch.blobs(net, x)
    names = ["conv1", "conv2"]  # conv1 is written in place by its BN and ReLU: the value after them
    view = caffe2torch.with_outputs(net, names)
    values = view(x)
    assert isinstance(values, tuple) and len(values) == 2
    for name, value in zip(names, values):
        torch.testing.assert_close(value, every[name], rtol=0, atol=0)
    assert dict(view.named_parameters())["conv1.weight"] is dict(net.named_parameters())["conv1.weight"]
    assert len(view.graph.nodes) < len(net.graph.nodes)  # what no chosen blob needs is not run
    with pytest.raises(CaffeError, match="save the net it was made from"):
        caffe2torch.save(view, tmp_path / "view")
    with pytest.raises(CaffeError, match="the net has no blob 'nope'"):
        caffe2torch.with_outputs(net, ["nope"])
    with pytest.raises(CaffeError, match="blobs must be a list of blob names"):
        caffe2torch.with_outputs(net, "conv1")
