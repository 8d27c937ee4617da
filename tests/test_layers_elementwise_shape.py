"""Activation, Eltwise and data-movement converters against real Caffe's unit-net outputs and hand-derived cases."""

from __future__ import annotations


import h5py
import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffe2torch.errors import CaffeError
from caffe2torch.layers import convert_layer
from proto import caffe_pb2
from tests.conftest import UNITS_DIR


ACTIVATION_TYPES = {
    "ReLU", "PReLU", "Sigmoid", "TanH", "ELU", "AbsVal", "Power", "Exp", "Log", "BNLL",
    "Threshold", "Dropout", "Softmax", "Eltwise",
}
# Data movement and ArgMax must reproduce Caffe bit for bit.
EXACT_TYPES = {"Concat", "Slice", "Split", "Flatten", "Reshape", "Crop", "ArgMax"}
# V1 nets name their layer parameters the same way; copying these covers every type above.
V1_PARAM_FIELDS = (
    "relu_param", "dropout_param", "softmax_param", "power_param", "exp_param", "threshold_param",
    "eltwise_param", "concat_param", "slice_param", "argmax_param",
)


def _recorded_layers() -> list[tuple[str, str]]:
    """(net, record group) for every recorded layer of a type this family converts."""
    found = []
    for ref_path in sorted(UNITS_DIR.glob("unit_*.ref.h5")):
        with h5py.File(ref_path, "r") as ref:
            for key in sorted(ref["layers"]):
                if ref["layers"][key].attrs["type"] in ACTIVATION_TYPES | EXACT_TYPES:
                    found.append((ref_path.name.removesuffix(".ref.h5"), key))
    return found


RECORDED = _recorded_layers()


def _layer_parameter(net_name: str, layer_name: str, recorded_type: str) -> caffe_pb2.LayerParameter:
    net = caffe_pb2.NetParameter()
    text_format.Merge((UNITS_DIR / f"{net_name}.prototxt").read_text(), net)
    for layer in net.layer:
        if layer.name == layer_name:
            return layer
    for old in net.layers:
        if old.name == layer_name:
            layer = caffe_pb2.LayerParameter(name=old.name, type=recorded_type, bottom=old.bottom, top=old.top)
            for field in V1_PARAM_FIELDS:
                if old.HasField(field):
                    getattr(layer, field).CopyFrom(getattr(old, field))
            return layer
    raise AssertionError(f"layer {layer_name} not in {net_name}.prototxt")


def _blobs(net_name: str, layer_name: str) -> list[np.ndarray]:
    with h5py.File(UNITS_DIR / f"{net_name}.caffemodel.h5", "r") as weights:
        group = weights["data"].get(layer_name)
        if group is None:
            return []
        return [np.asarray(group[key], dtype=np.float32) for key in sorted(group, key=int)]


def _bottom_tensors(ref: h5py.File, record_key: str, bottoms: list[str]) -> list[np.ndarray]:
    """Each bottom as Caffe saw it: the latest earlier record of that blob, else the net input."""
    tensors = []
    for bottom in bottoms:
        value = None
        for key in sorted(ref["layers"]):
            if key >= record_key:
                break
            record = ref["layers"][key]
            for index, top in enumerate(record.attrs["tops"]):
                if top == bottom:
                    value = record[str(index)]["data"][...]
        if value is None:
            value = ref["input"][bottom][...]
        tensors.append(value)
    return tensors


def _relative_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    finite = ~np.isnan(expected)
    error = np.linalg.norm((actual[finite] - expected[finite]).astype(np.float64))
    scale = np.linalg.norm(expected[finite].astype(np.float64))
    return error / scale if scale > 0 else error


@pytest.mark.parametrize("net_name, record_key", RECORDED, ids=[f"{n}-{k}" for n, k in RECORDED])
def test_layer_matches_caffe_reference(net_name: str, record_key: str) -> None:
    with h5py.File(UNITS_DIR / f"{net_name}.ref.h5", "r") as ref:
        record = ref["layers"][record_key]
        layer_name, layer_type = record.attrs["name"], record.attrs["type"]
        layer = _layer_parameter(net_name, layer_name, layer_type)
        bottoms = _bottom_tensors(ref, record_key, list(layer.bottom))
        expected = [record[str(i)]["data"][...] for i in range(len(record.attrs["tops"]))]

    converted = convert_layer(layer, [b.shape for b in bottoms], _blobs(net_name, layer_name))
    with torch.no_grad():
        output = converted.module(*[torch.from_numpy(b) for b in bottoms])
    outputs = list(output) if isinstance(output, tuple) else [output]

    assert [tuple(s) for s in converted.top_shapes] == [e.shape for e in expected]
    assert len(outputs) == len(expected)
    for actual_tensor, wanted in zip(outputs, expected):
        actual = actual_tensor.numpy()
        assert actual.dtype == np.float32 and actual.shape == wanted.shape
        np.testing.assert_array_equal(np.isnan(actual), np.isnan(wanted))
        if layer_type in EXACT_TYPES:
            np.testing.assert_array_equal(actual, wanted)
        else:
            assert _relative_l2(actual, wanted) <= 1e-6, f"{layer_name}: rel L2 {_relative_l2(actual, wanted):.3g}"


def _layer(text: str) -> caffe_pb2.LayerParameter:
    return text_format.Parse(text, caffe_pb2.LayerParameter())


def _run(text: str, *arrays: np.ndarray, blobs: list[np.ndarray] | None = None):
    converted = convert_layer(_layer(text), [a.shape for a in arrays], blobs or [])
    with torch.no_grad():
        output = converted.module(*[torch.from_numpy(np.ascontiguousarray(a)) for a in arrays])
    return converted, output


def test_exp_default_base_with_shift_gives_caffes_zeros_and_warns() -> None:
    x = np.linspace(-2, 2, 12, dtype=np.float32).reshape(1, 3, 2, 2)
    converted, y = _run('name: "e" type: "Exp" exp_param { scale: 0.5 shift: 0.1 }', x)
    assert torch.equal(y, torch.zeros(1, 3, 2, 2))
    # The net builder prefixes the layer's name and type; the converter's text says what happens.
    assert len(converted.warnings) == 1 and "pow(-1, shift)" in converted.warnings[0] and "zeros" in converted.warnings[0]


def test_exp_default_base_with_integral_shift_uses_pow_of_minus_one() -> None:
    x = np.array([[-1.0, 0.0, 0.5, 2.0]], dtype=np.float32)
    converted, y = _run('name: "e" type: "Exp" exp_param { shift: 1 }', x)
    np.testing.assert_allclose(y.numpy(), -np.exp(x), rtol=1e-7)
    assert converted.warnings
    converted, y = _run('name: "e" type: "Exp" exp_param { shift: 0 scale: 2 }', x)
    np.testing.assert_allclose(y.numpy(), np.exp(2 * x), rtol=1e-6)
    assert not converted.warnings


def test_power_with_zero_power_or_scale_fills_a_constant() -> None:
    x = np.array([[np.nan, -3.0, 0.0, 5.0]], dtype=np.float32)
    _, y = _run('name: "p" type: "Power" power_param { power: 0 shift: 2 }', x)
    np.testing.assert_array_equal(y.numpy(), np.ones_like(x))
    _, y = _run('name: "p" type: "Power" power_param { power: 3 scale: 0 shift: 2 }', x)
    np.testing.assert_array_equal(y.numpy(), np.full_like(x, 8.0))


def test_relu_is_torchs_relu() -> None:
    """nn.ReLU / nn.LeakyReLU; the one documented difference: Caffe's ReLU(-inf) is NaN (0 * -inf), torch's 0."""
    x = np.array([[-np.inf, -1.0, 0.0, 2.0, np.inf]], dtype=np.float32)
    converted, y = _run('name: "r" type: "ReLU"', x)
    assert type(converted.module) is torch.nn.ReLU
    np.testing.assert_array_equal(y.numpy(), np.array([[0.0, 0.0, 0.0, 2.0, np.inf]], dtype=np.float32))
    _, y = _run('name: "r" type: "ReLU" relu_param { negative_slope: 0.5 }', x[:, 1:4])
    np.testing.assert_array_equal(y.numpy(), np.array([[-0.5, 0.0, 2.0]], dtype=np.float32))


def test_prelu_state_dict_carries_the_slopes() -> None:
    x = -np.ones((1, 3, 1, 2), dtype=np.float32)
    converted, y = _run('name: "p" type: "PReLU"', x, blobs=[np.array([0.1, 0.2, 0.3], dtype=np.float32)])
    np.testing.assert_allclose(y.numpy()[0, :, 0, 0], [-0.1, -0.2, -0.3], rtol=1e-7)
    assert isinstance(converted.module, torch.nn.PReLU)
    assert torch.equal(converted.module.state_dict()["weight"], torch.tensor([0.1, 0.2, 0.3]))


def test_eltwise_max_follows_caffes_comparisons() -> None:
    a = np.array([[np.nan, 1.0, 2.0]], dtype=np.float32)
    b = np.array([[1.0, np.nan, 0.0]], dtype=np.float32)
    c = np.array([[5.0, 5.0, 5.0]], dtype=np.float32)
    # a > b ? a : b, then replace only where the next bottom is strictly greater.
    _, y = _run('name: "m" type: "Eltwise" eltwise_param { operation: MAX }', a, b, c)
    np.testing.assert_array_equal(y.numpy(), np.array([[5.0, np.nan, 5.0]], dtype=np.float32))


def test_argmax_ties_go_to_the_larger_index() -> None:
    x = np.array([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0]], dtype=np.float32)
    _, y = _run('name: "a" type: "ArgMax"', x)
    assert y.shape == (1, 1, 1) and y.item() == 4.0
    _, y = _run('name: "a" type: "ArgMax" argmax_param { top_k: 4 out_max_val: true }', x)
    np.testing.assert_array_equal(y.numpy(), [[[4.0, 2.0, 1.0, 3.0], [3.0, 3.0, 3.0, 2.0]]])
    # Along an axis: channel ties at every pixel, in both the k = 1 and the sorted path.
    planes = np.stack([np.zeros((2, 2)), np.ones((2, 2)), np.ones((2, 2)), np.zeros((2, 2))])[None].astype(np.float32)
    _, y = _run('name: "a" type: "ArgMax" argmax_param { axis: 1 }', planes)
    np.testing.assert_array_equal(y.numpy(), np.full((1, 1, 2, 2), 2.0, dtype=np.float32))
    _, y = _run('name: "a" type: "ArgMax" argmax_param { axis: -3 top_k: 3 }', planes)
    np.testing.assert_array_equal(y.numpy()[0, :, 0, 0], [2.0, 1.0, 3.0])


def test_reference_tie_is_resolved_like_caffe() -> None:
    with h5py.File(UNITS_DIR / "unit_argmax.ref.h5", "r") as ref:
        data = ref["input"]["data"][...]
        key = next(k for k in ref["layers"] if ref["layers"][k].attrs["name"] == "argmax_axis1")
        expected = ref["layers"][key]["0"]["data"][...]
    first_index = np.argmax(data, axis=1)[:, None].astype(np.float32)
    assert (first_index != expected).sum() >= 1  # the tie this net was built to contain
    _, y = _run('name: "a" type: "ArgMax" argmax_param { axis: 1 }', data)
    np.testing.assert_array_equal(y.numpy(), expected)


def test_crop_matches_upstream_slicing() -> None:
    x = np.arange(2 * 3 * 7 * 9, dtype=np.float32).reshape(2, 3, 7, 9)
    reference = np.zeros((2, 3, 4, 5), dtype=np.float32)
    cases = [
        ("", x[:, :, 0:4, 0:5]),
        ("crop_param { offset: 2 }", x[:, :, 2:6, 2:7]),
        ("crop_param { offset: 1 offset: 3 }", x[:, :, 1:5, 3:8]),
        ("crop_param { axis: 3 offset: 4 }", x[:, :, :, 4:9]),
    ]
    for params, wanted in cases:
        converted, y = _run(f'name: "c" type: "Crop" {params}', x, reference)
        np.testing.assert_array_equal(y.numpy(), wanted)
        assert converted.top_shapes == [wanted.shape]
    small = np.zeros((1, 2, 4, 5), dtype=np.float32)
    for axis in ("1", "-3"):
        _, y = _run(f'name: "c" type: "Crop" crop_param {{ axis: {axis} offset: 1 offset: 2 offset: 3 }}', x, small)
        np.testing.assert_array_equal(y.numpy(), x[:, 1:3, 2:6, 3:8])
    _, y = _run('name: "c" type: "Crop" crop_param { axis: 0 }', x, small)
    np.testing.assert_array_equal(y.numpy(), x[0:1, 0:2, 0:4, 0:5])


def test_slice_split_flatten_reshape_concat_move_data_like_caffe() -> None:
    x = np.arange(2 * 5 * 3 * 4, dtype=np.float32).reshape(2, 5, 3, 4)
    converted, tops = _run('name: "s" type: "Slice" top: "a" top: "b" top: "c" slice_param { slice_point: 1 slice_point: 3 }', x)
    for top, wanted in zip(tops, (x[:, 0:1], x[:, 1:3], x[:, 3:5])):
        np.testing.assert_array_equal(top.numpy(), wanted)
    assert converted.top_shapes == [(2, 1, 3, 4), (2, 2, 3, 4), (2, 2, 3, 4)]
    _, tops = _run('name: "s" type: "Slice" top: "a" top: "b" slice_param { slice_dim: 3 }', x)
    np.testing.assert_array_equal(tops[1].numpy(), x[..., 2:4])
    _, tops = _run('name: "s" type: "Split" top: "a" top: "b" top: "c"', x)
    assert len(tops) == 3 and all(torch.equal(t, torch.from_numpy(x)) for t in tops)
    converted, y = _run('name: "f" type: "Flatten" flatten_param { axis: 1 end_axis: 2 }', x)
    assert converted.top_shapes == [(2, 15, 4)] and np.array_equal(y.numpy(), x.reshape(2, 15, 4))
    converted, y = _run('name: "r" type: "Reshape" reshape_param { shape { dim: -1 } axis: 1 num_axes: 2 }', x)
    assert converted.top_shapes == [(2, 15, 4)] and np.array_equal(y.numpy(), x.reshape(2, 15, 4))
    converted, y = _run('name: "r" type: "Reshape" reshape_param { shape { dim: 1 } axis: -1 num_axes: 0 }', x)
    assert converted.top_shapes == [(2, 5, 3, 4, 1)] and y.shape == (2, 5, 3, 4, 1)
    converted, y = _run('name: "r" type: "Reshape" reshape_param { shape { dim: 0 dim: 0 dim: -1 } }', x)
    assert converted.top_shapes == [(2, 5, 12)]
    converted, y = _run('name: "c" type: "Concat" concat_param { concat_dim: 0 }', x, x[:1])
    assert converted.top_shapes == [(3, 5, 3, 4)] and np.array_equal(y.numpy(), np.concatenate([x, x[:1]]))


@pytest.mark.parametrize(
    "text, shapes, blob_count",
    [
        ('type: "Eltwise" eltwise_param { coeff: 1 coeff: 2 coeff: 3 }', [(1, 2), (1, 2)], 0),
        ('type: "Eltwise" eltwise_param { operation: PROD coeff: 1 coeff: 2 }', [(1, 2), (1, 2)], 0),
        ('type: "Eltwise"', [(1, 2), (1, 3)], 0),
        ('type: "Concat" concat_param { axis: 1 }', [(1, 2, 3), (1, 2, 4)], 0),
        ('type: "Concat" concat_param { axis: 1 concat_dim: 1 }', [(1, 2), (1, 2)], 0),
        ('type: "Slice" top: "a" top: "b" slice_param { slice_point: 3 slice_point: 4 }', [(1, 6)], 0),
        ('type: "Slice" top: "a" top: "b"', [(1, 5)], 0),
        ('type: "Slice" top: "a" top: "b" slice_param { slice_point: 9 }', [(1, 6)], 0),
        ('type: "Reshape" reshape_param { shape { dim: -1 dim: -1 } }', [(2, 6)], 0),
        ('type: "Reshape" reshape_param { shape { dim: 5 dim: -1 } }', [(2, 6)], 0),
        ('type: "Softmax" softmax_param { axis: 4 }', [(2, 3, 4, 5)], 0),
        ('type: "PReLU"', [(1, 3, 2, 2)], 1),
        ('type: "Log" log_param { base: -2 }', [(1, 2)], 0),
        ('type: "Exp" exp_param { base: 0 }', [(1, 2)], 0),
        ('type: "Crop" crop_param { axis: 1 offset: 1 offset: 2 }', [(1, 3, 5, 5), (1, 2, 2, 2)], 0),
        ('type: "Crop" crop_param { offset: 4 }', [(1, 3, 5, 5), (1, 3, 2, 2)], 0),
        ('type: "Crop" crop_param { axis: 4 }', [(1, 3, 5, 5), (1, 3, 2, 2)], 0),
        ('type: "ArgMax" argmax_param { top_k: 7 }', [(1, 2, 3)], 0),
        ('type: "ArgMax" argmax_param { axis: 1 top_k: 3 }', [(1, 2, 3)], 0),
    ],
)
def test_bad_parameters_raise_caffe_error_naming_the_layer(text: str, shapes: list, blob_count: int) -> None:
    blobs = [np.ones(2, dtype=np.float32)] * blob_count
    with pytest.raises(CaffeError, match="'bad_layer'"):
        convert_layer(_layer(f'name: "bad_layer" {text}'), shapes, blobs)
