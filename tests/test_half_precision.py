"""Half precision keeps the README's promise on the CPU: every shared unit net, every public-architecture net of the
tests (AlexNet and GoogLeNet with LRN, ResNet, SqueezeNet, MobileNet, FCN) and every fork layer's net runs in
bfloat16 and float16, with the dtype in and out, and stays near the float32 result."""
import copy

import numpy as np
import pytest
import torch

from tests import public_nets
from tests.conftest import UNITS, convert_reference
from tests.fork_nets import FORK_NETS, fork_net

# Outputs read from the data (boxes that survive an NMS, anchors chosen by score): compared by shape only.
DATA_DEPENDENT = {"fork_DetectionOutput", "fork_YoloDetectionOutput", "fork_Yolov3DetectionOutput", "fork_Proposal"}
DTYPES = {torch.bfloat16: 0.1, torch.float16: 0.02}  # relative L2 bounds, 8 and 11 bits of mantissa
VENDOR = """name: "vendors"
input: "data" input_shape { dim: 1 dim: 2 dim: 6 dim: 6 }
layer { name: "c" type: "Convolution" bottom: "data" top: "c" convolution_param { num_output: 2 kernel_size: 1
  relu: true } }
layer { name: "s" type: "Convolution" bottom: "data" bottom: "c" top: "s" convolution_param { num_output: 2
  kernel_size: 1 fusion_type: SUM_FUSION } }
layer { name: "bn" type: "BatchNorm" bottom: "s" top: "bn" batch_norm_param { scale_bias: true } }
layer { name: "e" type: "ELU" bottom: "bn" top: "e" elu_param { lambda: 2 } }
layer { name: "ave" type: "Unpooling" bottom: "e" top: "ave" unpooling_param { unpool: AVE kernel_size: 3 stride: 2 unpool_size: 13 } }
layer { name: "max" type: "Unpooling" bottom: "e" top: "max" unpooling_param { unpool: MAX kernel_size: 2 stride: 2 unpool_size: 13 } }
layer { name: "r" type: "ReLU" bottom: "max" top: "r" top: "mask" }
layer { name: "cat" type: "Concat" bottom: "ave" bottom: "e" top: "cat" concat_param { per_fla_fuse: true } }
layer { name: "within" type: "LRN" bottom: "e" top: "within" lrn_param { local_size: 3 norm_region: WITHIN_CHANNEL } }
"""
PUBLIC = {"alexnet": lambda: public_nets.alexnet(size=67), "googlenet": lambda: public_nets.googlenet(size=224),
          "resnet": lambda: public_nets.resnet(size=64), "squeezenet": lambda: public_nets.squeezenet(size=67),
          "mobilenet": lambda: public_nets.mobilenet(size=64), "fcn32s": lambda: public_nets.fcn32s(size=64, div=16),
          "vendor": lambda: VENDOR}


def _from_text(tmp_path, name: str, text: str):
    from caffe2torch.conversion import convert

    path = tmp_path / f"{name}.prototxt"
    path.write_text(text)
    net = convert(None, path, on_warning=lambda _: None).net
    torch.manual_seed(0)
    with torch.no_grad():  # He-scaled weights and unit variances: activations of order 1 all the way through
        for name, parameter in net.named_parameters():
            if parameter.dim() > 1:
                parameter.normal_(0, (2.0 / parameter[0].numel()) ** 0.5)
            else:
                parameter.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
        for name, buffer in net.named_buffers():
            if name.endswith("running_var"):
                buffer.fill_(1.0)
    return net


def _inputs(net) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs = []
    for name, shape in net.meta["caffe"].inputs.items():
        if name == "rois":
            inputs.append(torch.tensor([[0, 0, 0, 3, 3], [0, 1, 1, 4, 5], [0, 2, 0, 5, 5]], dtype=torch.float32))
        elif name == "im_info":
            inputs.append(torch.tensor([[64.0, 80.0, 1.0]]))
        else:
            inputs.append(torch.randn(shape, generator=generator))
    return inputs


def _check(name: str, net) -> None:
    inputs = _inputs(net)
    with torch.no_grad():
        reference = net(*inputs)
    reference = reference if isinstance(reference, tuple) else (reference,)
    for dtype, bound in DTYPES.items():
        half = copy.deepcopy(net).to(dtype)
        with torch.no_grad():
            outputs = half(*[x.to(dtype) for x in inputs])
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        assert len(outputs) == len(reference), (name, dtype)
        for ours, theirs in zip(outputs, reference):
            assert ours.shape == theirs.shape or name in DATA_DEPENDENT, (name, dtype)
            if name in DATA_DEPENDENT:
                continue
            assert ours.dtype == dtype, (name, dtype, ours.dtype)
            finite = torch.isfinite(theirs)
            assert torch.equal(torch.isfinite(ours), finite), (name, dtype)  # NaN and infinities where float32 has
            # Compared where the dtype can hold the value (an empty MAX window's -FLT_MAX is float16's lowest), in
            # float64 (the squares of such values pass float32's range).
            held = finite & (theirs.abs() <= torch.finfo(dtype).max)
            wanted = theirs[held].double()
            error = float((ours[held].double() - wanted).norm() / (wanted.norm() + 1e-6))
            assert error < bound, (name, dtype, error)


@pytest.mark.parametrize("unit", UNITS)
def test_shared_unit_nets_run_in_half_precision(unit, one_thread):
    _check(unit, convert_reference(unit))


@pytest.mark.parametrize("name", list(PUBLIC))
def test_public_style_nets_run_in_half_precision(tmp_path, name, one_thread):
    _check(name, _from_text(tmp_path, name, PUBLIC[name]()))


@pytest.mark.parametrize("kind", list(FORK_NETS))
def test_fork_layer_nets_run_in_half_precision(tmp_path, kind, one_thread):
    _check(f"fork_{kind}", _from_text(tmp_path, kind, fork_net(kind, np.random.default_rng(0), fuzz=False)))


def test_lrn_across_channels_computes_in_float32_under_float16():
    from caffe2torch.modules import LRNAcrossChannels

    lrn = LRNAcrossChannels(5, alpha=1e-4, beta=0.75, k=1.0)
    x = torch.full((1, 6, 2, 2), 300.0)  # 300^2 overflows float16
    out = lrn(x.half())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), lrn(x), rtol=1e-3, atol=0)


def test_a_kernel_missing_for_a_dtype_is_not_reported_as_a_size_error(tmp_path):
    from caffe2torch.errors import InputSizeError

    net = _from_text(tmp_path, "alexnet", public_nets.alexnet(size=67))
    x = torch.zeros(2, 3, 67, 67, dtype=torch.int64)  # any batch, the converted size: a dtype torch cannot convolve
    with pytest.raises(RuntimeError) as failure:
        net(x)
    assert not isinstance(failure.value, InputSizeError)


def test_blobs_are_detached_plain_data(tmp_path):
    import caffe2torch

    net = _from_text(tmp_path, "squeezenet", public_nets.squeezenet(size=67))
    x = torch.randn(1, 3, 67, 67, requires_grad=True)
    values = caffe2torch.blobs(net, x)  # outside torch.no_grad(), with an input that requires grad
    assert all(not value.requires_grad for value in values.values())
    assert values["data"].numpy().shape == (1, 3, 67, 67)
    with torch.no_grad():
        np.testing.assert_array_equal(values[net.meta["caffe"].outputs[0]].numpy(), net(x).numpy())
