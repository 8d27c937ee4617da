"""A folder whose tensors were saved in another dtype loads as the net's float32, or is refused in one line.

float16 and bfloat16 widen exactly, float64 rounds to nearest (as Caffe reads double_data);
tensors of another kind (integers, bool) where the net has floats, and changed integer buffers,
are refused naming the tensor. The commands that take a folder (caffe2torch verify, icnet-eval
--weights and segment) run on the result.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import caffe2torch
from caffe2torch.cli import main as caffe2torch_main
from caffe2torch.errors import CaffeError
from caffe2torch.export import check_inputs
from caffe2torch.folder import save_net
from icnet_eval.netdef import icnet_prototxt
from tests.conftest import convert_reference
from tests.test_icnet_eval import SMALL_INPUT, dataset, eval_args, load_report, run_cli, weights  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _floats(net) -> list[torch.dtype]:
    return sorted({str(t.dtype) for t in [*net.parameters(), *net.buffers()] if t.is_floating_point()})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_floating_folders_load_as_float32(tmp_path, dtype):
    net = convert_reference("unit_batchnorm_scale_bias")
    inputs = check_inputs(net)
    stored = net.to(dtype)  # in place: `net` now holds the values the folder stores
    folder = save_net(stored, tmp_path / "out")
    loaded = caffe2torch.load(folder)
    assert _floats(loaded) == ["torch.float32"]
    for (name, ours), theirs in zip(loaded.state_dict().items(), stored.state_dict().values(), strict=True):
        assert ours.dtype == (torch.float32 if theirs.is_floating_point() else theirs.dtype), name
        assert torch.equal(ours, theirs.to(ours.dtype)), name  # exact widening (float64: saved from float32)
    with torch.no_grad():
        for ours, theirs in zip(loaded(*inputs), net.float()(*inputs), strict=True):
            assert torch.equal(ours, theirs)
    # Each tensor is the net's own: changing one changes nothing else.
    assert len({t.data_ptr() for t in loaded.state_dict().values()}) == len(loaded.state_dict())


def test_foreign_kinds_and_float64_beyond_float32_are_refused(tmp_path):
    folder = save_net(convert_reference("unit_batchnorm_scale_bias"), tmp_path / "out")
    good = torch.load(folder / "weights.pt", weights_only=True)
    weight = "scale.weight"
    counter = "bn_std.num_batches_tracked"  # an integer buffer of BatchNorm

    def refused(name: str, value: torch.Tensor) -> str:
        torch.save(dict(good, **{name: value}), folder / "weights.pt")
        with pytest.raises(CaffeError) as caught:
            caffe2torch.load(folder)
        assert "\n" not in str(caught.value)
        return str(caught.value)

    shape = good[weight].shape
    assert refused(weight, torch.ones(shape, dtype=torch.int64)).endswith(f"weights.pt: {weight} is int64, the net "
                                                                          f"needs float32")
    assert f"{weight} is bool" in refused(weight, torch.ones(shape, dtype=torch.bool))
    assert f"{weight} is complex64" in refused(weight, torch.ones(shape, dtype=torch.complex64))
    assert f"{weight} holds values beyond the range of float32" in refused(weight, torch.full(shape, 1e300,
                                                                                              dtype=torch.float64))
    assert f"{counter} is float32, the net needs int64" in refused(counter, torch.zeros((), dtype=torch.float32))
    assert f"{counter} is int32, the net needs int64" in refused(counter, torch.zeros((), dtype=torch.int32))
    assert f"{weight} is not a plain tensor" in refused(weight, torch.ones(shape).to_sparse())
    # float64 infinities that were infinities are kept, not refused.
    infinite = good[weight].double().clone()
    infinite.view(-1)[0] = float("inf")
    torch.save(dict(good, **{weight: infinite}), folder / "weights.pt")
    assert torch.isinf(caffe2torch.load(folder).state_dict()[weight]).sum() == 1


def test_verify_runs_a_half_precision_folder(units_dir, tmp_path):
    net = convert_reference("unit_conv_basic")
    for dtype, tolerance, code in ((torch.float64, [], 0), (torch.float16, ["--tolerance", "0.01"], 0)):
        folder = save_net(net.to(dtype), tmp_path / str(dtype))
        result = CliRunner().invoke(caffe2torch_main, ["verify", str(folder), "--reference",
                                                       str(units_dir / "unit_conv_basic.ref.h5"), *tolerance])
        assert result.exit_code == code, result.output
        assert "7/7 layers within tolerance" in result.output
        net = net.float()
    torch.save({k: v.long() for k, v in torch.load(folder / "weights.pt", weights_only=True).items()},
               folder / "weights.pt")
    result = CliRunner().invoke(caffe2torch_main, ["verify", str(folder), "--reference",
                                                   str(units_dir / "unit_conv_basic.ref.h5")])
    assert result.exit_code == 2 and "is int64, the net needs float32" in result.output
    assert "Traceback" not in result.output


def test_icnet_eval_and_segment_take_a_half_precision_folder(tmp_path, dataset, weights):  # noqa: F811
    prototxt = tmp_path / "icnet_small.prototxt"
    prototxt.write_text(icnet_prototxt(int(SMALL_INPUT[0]), int(SMALL_INPUT[1]), False))
    net = caffe2torch.convert(weights, prototxt)
    half = save_net(net.half(), tmp_path / "half")
    out = tmp_path / "out"
    args = eval_args(dataset, weights, out)
    args[args.index("--weights") + 1] = str(half)
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    report = load_report(out)
    assert 0 <= report["miou"] <= 100 and report["options"]["dtype"] == "float32"
    image = next((dataset / "leftImg8bit").rglob("*.png"))
    result = run_cli(["segment", str(image), "--weights", str(half), "--device", "cpu", "-o", str(tmp_path / "seg")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "seg" / f"{image.stem}_color.png").is_file()
    assert np.isfinite(report["pixel_accuracy"])


def test_tensors_sharing_storage_in_the_file_become_separate_parameters(tmp_path):
    """A weights.pt may store several tensors as views of one storage (torch.save keeps views): each layer
    still gets its own parameter, so training one does not change another."""
    folder = save_net(convert_reference("unit_batchnorm_scale_bias"), tmp_path / "out")
    state = torch.load(folder / "weights.pt", weights_only=True)
    base = torch.arange(4, dtype=torch.float32) + 1
    state["scale.weight"], state["scale_nobias.weight"] = base[:], base.view(4)
    state["scale.bias"] = torch.zeros(1).expand(4)  # stride 0: every element one value
    torch.save(state, folder / "weights.pt")
    net = caffe2torch.load(folder)
    params = net.state_dict()
    assert torch.equal(params["scale.weight"], base) and torch.equal(params["scale_nobias.weight"], base)
    with torch.no_grad():
        net.get_submodule("scale").weight.add_(1)
        net.get_submodule("scale").bias[0] = 5
    assert torch.equal(net.state_dict()["scale_nobias.weight"], base)
    assert net.state_dict()["scale.bias"].tolist() == [5.0, 0.0, 0.0, 0.0]
