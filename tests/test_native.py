"""A converted net is a PyTorch model: standard modules, training, half precision, tracing, compiling, the fast graph."""

from __future__ import annotations

import copy
import importlib
import subprocess
import sys
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from torch import fx, nn

import caffe2torch
from caffe2torch.errors import CaffeError
from caffe2torch.export import check_inputs
from caffe2torch.fast import cuda_graph, optimize
from caffe2torch.graph import build_graph
from caffe2torch.model import layer_calls, layer_module, net_info
from caffe2torch.modules import FrozenBatchNorm2d
from caffe2torch.read import parse_prototxt
from caffe2torch.verify import read_reference, verify_free_running
from tests.conftest import REFERENCE_NETS, convert_reference

CUDA = torch.cuda.is_available()


def _outputs(value) -> tuple[torch.Tensor, ...]:
    return value if isinstance(value, tuple) else (value,)


def _same(a, b) -> None:
    for x, y in zip(_outputs(a), _outputs(b), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_icnet_is_a_graph_of_standard_modules(reference_dir):
    net = convert_reference("icnet_257x513")
    assert isinstance(net, fx.GraphModule)
    calls = list(layer_calls(net))
    # One call per Caffe layer, in Caffe's order, named after it.
    definition = parse_prototxt((reference_dir / "icnet_merged_257x513.prototxt").read_text())
    assert [call.layer for _, call in calls] == [layer.name for layer in build_graph(definition).layers]
    assert [node.name for node, _ in calls] == [node.target for node, _ in calls]
    assert calls[3][0].target == "conv1_1_3x3_s2_relu" and calls[3][1].layer == "conv1_1_3x3_s2/relu"
    kinds = Counter(type(module).__name__ for module in net.children())
    assert kinds == {"Conv2d": 64, "ReLU": 57, "Eltwise": 19, "Interp": 10, "Pool2d": 5, "Scale": 1}
    text = repr(net)
    assert "(conv1_1_3x3_s2): Conv2d(3, 32, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1))" in text
    assert "(conv5_3_pool2): Pool2d(method='AVE', kernel=(5, 9), stride=(4, 8), pad=(0, 0), ceil=True)" in text
    assert "conv1_1_3x3_s2 = self.conv1_1_3x3_s2(" in net.code
    assert net_info(net).outputs == ["conv6_interp"]
    # Caffe's weights are parameters under the usual names.
    assert dict(net.named_parameters())["conv6_cls.weight"].shape == (19, 128, 1, 1)


def test_batch_norms_hold_caffes_statistics_under_torch_names():
    net = convert_reference("unit_fork_bn")
    bn, frozen = layer_module(net, "bn"), layer_module(net, "bn_frozen")
    assert type(bn) is nn.BatchNorm2d and bn.momentum == pytest.approx(0.1)  # 1 - the fork's default momentum 0.9
    assert set(bn.state_dict()) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    assert isinstance(frozen, FrozenBatchNorm2d) and not frozen.weight.requires_grad  # fork: frozen, lr_mult 0
    x = check_inputs(net)[0]
    before = bn.running_mean.clone()
    net.train()
    assert bn.training and not frozen.training
    out = net(x)
    # Train mode is nn.BatchNorm2d: batch statistics, running averages moved by the momentum.
    mean = x.mean(dim=(0, 2, 3))
    torch.testing.assert_close(bn.running_mean, 0.9 * before + 0.1 * mean)
    expected = nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
    torch.testing.assert_close(nn.functional.relu(expected), out[0])  # relu is in place on bn's top
    # Caffe's BatchNorm: moving_average_fraction 0.999 becomes momentum 0.001.
    text = ('input: "data" input_shape { dim: 2 dim: 3 dim: 4 dim: 4 }\n'
            'layer { name: "bn" type: "BatchNorm" bottom: "data" top: "bn" }')
    batch_norm = layer_module(_from_text(text), "bn")
    assert type(batch_norm) is nn.BatchNorm2d and not batch_norm.affine
    assert batch_norm.momentum == pytest.approx(0.001, rel=1e-4)


def _from_text(text: str):
    from caffe2torch.model import from_net_parameter

    return from_net_parameter(parse_prototxt(text), {}, fill_missing=True, on_warning=lambda _: None)


def test_freeze_batchnorm_for_fine_tuning():
    net = convert_reference("unit_inplace_chain")
    x = check_inputs(net)[0]
    with torch.no_grad():
        evaluated = net(x)
    caffe2torch.freeze_batchnorm(net).train()
    layer_module(net, "conv2_drop").eval()  # dropout would make the two forwards differ
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(not m.training and not any(p.requires_grad for p in m.parameters()) for m in norms)
    stats = [m.running_mean.clone() for m in norms]
    trained = net(x)
    torch.testing.assert_close(trained, evaluated)  # the stored statistics, not the batch's
    assert all(torch.equal(m.running_mean, s) for m, s in zip(norms, stats))
    trained.sum().backward()
    assert layer_module(net, "conv1").weight.grad is not None


@pytest.mark.parametrize("name", REFERENCE_NETS)
def test_training_reaches_every_learnable_parameter(name):
    net = convert_reference(name).train()
    learnable = {n: p for n, p in net.named_parameters() if p.requires_grad}
    outputs = [o for o in _outputs(net(*check_inputs(net))) if o.requires_grad]
    if not learnable:
        assert not outputs
        return
    loss = sum(o.nan_to_num(0.0, 0.0, 0.0).square().mean() for o in outputs)
    loss.backward()
    for parameter_name, parameter in learnable.items():
        assert parameter.grad is not None, parameter_name
        assert torch.isfinite(parameter.grad).all(), parameter_name
        assert parameter.grad.abs().sum() > 0, parameter_name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", REFERENCE_NETS)
def test_half_precision_runs_finite(name, dtype):
    net = convert_reference(name)
    inputs = check_inputs(net)
    with torch.no_grad():
        exact = _outputs(net(*inputs))
        half = _outputs(net.to(dtype)(*(x.to(dtype) for x in inputs)))
    for want, got in zip(exact, half, strict=True):
        assert got.dtype == dtype and got.shape == want.shape
        assert torch.isfinite(got[torch.isfinite(want)]).all()


@pytest.mark.parametrize("name", ["unit_interp", "unit_pool_empty_window", "unit_argmax", "unit_shape_softmax",
                                  "unit_innerproduct", "unit_batchnorm_scale_bias", "icnet_257x513"])
def test_traces_and_exports_with_torch(name):
    net = convert_reference(name)
    inputs = check_inputs(net)
    with torch.no_grad():
        want = net(*inputs)
        _same(fx.symbolic_trace(net)(*inputs), want)
        _same(torch.export.export(net, inputs).module()(*inputs), want)
        with warnings.catch_warnings():  # a trace keeps the sizes of its example: the tracer may say so
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(net, inputs, check_trace=False)
        _same(traced(*inputs), want)


@pytest.mark.parametrize("name", ["unit_pool_ave", "unit_inplace_chain"])
def test_torch_compile(name):
    net = convert_reference(name)
    inputs = check_inputs(net)
    with torch.no_grad():
        _same(torch.compile(net)(*inputs), net(*inputs))


def test_other_sizes_run_and_sizes_fixed_by_weights_name_the_layer(units_dir):
    """A convolution net takes any size (equal to a conversion at that size); an InnerProduct after spatial layers
    refuses another size with one line naming the layer, the size it was converted for and the size it got."""
    from caffe2torch.conversion import convert
    from caffe2torch.errors import InputSizeError
    net = convert_reference("unit_conv_basic")
    x = torch.randn(2, 3, 14, 19, generator=torch.Generator().manual_seed(0))
    there = convert(units_dir / "unit_conv_basic.caffemodel", units_dir / "unit_conv_basic.prototxt", (1, 3, 14, 19),
                    on_warning=lambda _: None).net
    _same(net(x), there(x))
    assert net(torch.zeros(4, 3, 13, 17))[0].shape[0] == 4  # the batch size is free
    fixed = convert_reference("unit_innerproduct")
    shape = net_info(fixed).inputs["data"]
    with pytest.raises(InputSizeError) as raised:
        fixed(torch.zeros(shape[0], shape[1], shape[2] + 1, *shape[3:]))
    message = str(raised.value)
    assert "\n" not in message and "layer 'ip" in message and "(InnerProduct)" in message
    assert "converted for " + "x".join(map(str, shape)) in message
def test_convert_is_callable_again_and_again(units_dir):
    nets = [caffe2torch.convert(units_dir / "unit_conv_basic.caffemodel") for _ in range(2)]
    assert all(isinstance(net, fx.GraphModule) for net in nets)
    importlib.import_module("caffe2torch.conversion")  # importing the submodule must not shadow the function
    assert callable(caffe2torch.convert) and isinstance(caffe2torch.convert(units_dir / "unit_fork_bn.caffemodel"), fx.GraphModule)


def test_python_dash_m_runs_the_command_line():
    done = subprocess.run([sys.executable, "-m", "caffe2torch", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "convert" in done.stdout and "export" in done.stdout


# ---------------------------------------------------------------- the fast graph on any device and dtype

def test_fast_graph_in_bfloat16():
    net = convert_reference("icnet_257x513")
    x = check_inputs(net)[0]
    with torch.no_grad():
        exact = net(x)
        fast = optimize(net.to(torch.bfloat16))(x.to(torch.bfloat16))
    assert fast.dtype == torch.bfloat16
    agreement = (fast.float().argmax(1) == exact.argmax(1)).double().mean()
    assert agreement > 0.7  # bf16 keeps 8 bits; the calibrated logits are nearly tied almost everywhere


def test_fast_graph_matches_caffe_and_leaves_the_net_alone(reference_dir):
    net = convert_reference("icnet_257x513")
    state = copy.deepcopy(net.state_dict())
    fast = optimize(net)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert not any(p.requires_grad for p in fast.parameters())
    report = verify_free_running(fast, read_reference(reference_dir / "icnet_merged_257x513.ref.h5"))
    assert report.ok and report.argmax_agreement >= 0.9995


def test_cuda_graph_needs_cuda():
    net = convert_reference("unit_conv_basic")
    if CUDA:
        pytest.skip("this machine has CUDA; test_cuda_paths covers it")
    with pytest.raises(CaffeError, match="CUDA"):
        cuda_graph(net, check_inputs(net))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_paths(reference_dir):
    net = convert_reference("icnet_257x513").cuda()
    reference = read_reference(reference_dir / "icnet_merged_257x513.ref.h5")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    assert verify_free_running(net, reference, device="cuda").ok
    fast = optimize(net)
    assert verify_free_running(fast, reference, device="cuda").ok
    x = torch.from_numpy(reference.inputs["data"]).cuda()
    graphed = cuda_graph(fast, [x])
    with torch.no_grad():
        torch.testing.assert_close(graphed(x).clone(), fast(x), rtol=1e-5, atol=1e-5)
        other = torch.randn(2, 3, 260, 516, device="cuda")  # another size and batch: a second graph, kept
        torch.testing.assert_close(graphed(other).clone(), fast(other), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(graphed(x).clone(), fast(x), rtol=1e-5, atol=1e-5)
    assert len(graphed.captures) == 2
    for dtype in (torch.float16, torch.bfloat16):
        half = optimize(copy.deepcopy(net).to(dtype))
        with torch.no_grad():
            assert torch.isfinite(half(x.to(dtype))).all()
    np.testing.assert_array_equal(net(x).argmax(1).cpu().numpy().shape, (1, 257, 513))


def test_caffe_order_norms_give_caffes_bits(units_dir):
    """icnet-eval's exact mode evaluates BN in Caffe's order: bit for bit on the unit nets' norm layers."""
    from caffe2torch.passes import caffe_order_norms
    from caffe2torch.verify import verify_isolated

    for unit, norms in (("unit_fork_bn", {"bn", "bn_eps", "bn_frozen"}),
                        ("unit_batchnorm_scale_bias", {"bn_std", "bn_std_eps"})):
        net = convert_reference(unit)
        exact = caffe_order_norms(net)
        reference = read_reference(units_dir / f"{unit}.ref.h5")
        plain = {c.layer: c.max_abs for c in verify_isolated(net, reference).comparisons}
        ours = {c.layer: c.max_abs for c in verify_isolated(exact, reference).comparisons}
        assert all(ours[name] == 0.0 for name in norms), ours
        assert any(plain[name] > 0.0 for name in norms)  # torch's BatchNorm is an ulp or two away
        assert isinstance(layer_module(net, sorted(norms)[0]), nn.modules.batchnorm._BatchNorm)  # the net is untouched


def test_fast_max_pooling_keeps_caffes_special_values():
    net = convert_reference("unit_pool_max")
    x = check_inputs(net)[0].clone()
    x[0, 0, :3, :3] = float("nan")
    x[0, 1, :3, :3] = -float("inf")
    with torch.no_grad():
        for exact, fast in zip(net(x), optimize(net)(x), strict=True):
            torch.testing.assert_close(fast.contiguous(), exact, rtol=0, atol=0, equal_nan=True)
