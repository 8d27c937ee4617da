"""Readers and graph building: formats, phases, inputs, weight matching and the errors users see."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from caffe2torch.errors import CaffeError
from caffe2torch.graph import build_graph, output_blobs
from caffe2torch.read import (blob_to_array, parse_caffemodel, parse_prototxt, read_caffemodel,
                              read_caffemodel_h5, read_prototxt, trained_blobs)
from proto import caffe_pb2
from tests.conftest import wire_field


def test_prototxt_syntax_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "bad.prototxt"
    path.write_text('name: "x"\nlayer {\n  name: "a"\n  type: "ReLU"\n  bogus_field: 3\n}\n')
    with pytest.raises(CaffeError, match=r"bad\.prototxt:5:\d+: .*bogus_field"):
        read_prototxt(path)


def test_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(CaffeError, match="no such file"):
        read_prototxt(tmp_path / "absent.prototxt")
    with pytest.raises(CaffeError, match="no such file"):
        read_caffemodel(tmp_path / "absent.caffemodel")


def test_blob_shape_forms():
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend([2, 3])
    blob.data.extend(range(6))
    assert blob_to_array(blob).shape == (2, 3)
    legacy = caffe_pb2.BlobProto(num=1, channels=2, height=1, width=3)
    legacy.data.extend(range(6))
    assert blob_to_array(legacy).shape == (1, 2, 1, 3)
    # A scalar written with no shape at all (e.g. a shared PReLU slope): the size comes from the data.
    scalar = caffe_pb2.BlobProto()
    scalar.data.append(0.25)
    np.testing.assert_array_equal(blob_to_array(scalar), np.array([0.25], dtype=np.float32))
    doubles = caffe_pb2.BlobProto()
    doubles.double_data.extend([1.5, 2.5])
    assert blob_to_array(doubles).dtype == np.float32
    wrong = caffe_pb2.BlobProto()
    wrong.shape.dim.extend([4])
    wrong.data.extend([1, 2])
    with pytest.raises(CaffeError, match=r"shape \(4,\) needs 4 values, the file holds 2"):
        blob_to_array(wrong, "layer 'x' blob 0")


def test_phase_filtering_and_declared_inputs(units_dir):
    graph = build_graph(read_prototxt(units_dir / "unit_phase_filter.prototxt"))
    assert [layer.name for layer in graph.layers] == ["conv1", "relu_test_only", "power_not_train", "conv2"]
    assert graph.inputs == {"data": (1, 3, 9, 11)}
    official = Path(__file__).resolve().parents[1] / "weights" / "icnet_cityscapes.prototxt"
    legacy = build_graph(read_prototxt(official), input_shapes=(1, 3, 257, 513))
    assert legacy.inputs == {"data": (1, 3, 257, 513)}


def test_input_layer_and_rules():
    net = parse_prototxt('''
        layer { name: "in" type: "Input" top: "a" top: "b" input_param { shape { dim: 1 dim: 2 } shape { dim: 3 } } }
        layer { name: "train" type: "ReLU" bottom: "a" top: "a" include { phase: TRAIN } }
        layer { name: "staged" type: "ReLU" bottom: "a" top: "c" include { stage: "deploy" } }
        layer { name: "leveled" type: "ReLU" bottom: "a" top: "d" exclude { max_level: -1 } }
    ''')
    graph = build_graph(net)
    assert graph.inputs == {"a": (1, 2), "b": (3,)}
    assert [layer.name for layer in graph.layers] == ["leveled"]
    assert output_blobs(graph) == ["d"]


def test_in_place_output_and_unknown_bottom():
    net = parse_prototxt('''
        input: "x" input_shape { dim: 1 dim: 2 }
        layer { name: "r" type: "ReLU" bottom: "x" top: "x" }
    ''')
    assert output_blobs(build_graph(net)) == ["x"]
    broken = parse_prototxt('''
        input: "x" input_shape { dim: 1 dim: 2 }
        layer { name: "r" type: "ReLU" bottom: "y" top: "z" }
    ''')
    with pytest.raises(CaffeError, match="layer 'r' \\(ReLU\\): bottom 'y' is not produced"):
        build_graph(broken)


def test_a_bottom_made_only_by_a_left_out_layer_says_which_and_how_to_pick_a_stage():
    """LRCN-style nets: data layers only for TEST stages (the solver's test_state picks one), or only for TRAIN."""
    staged = """
        layer { name: "train_in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 } } include { phase: TRAIN } }
        layer { name: "val_in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 } }
                include { phase: TEST stage: "test-on-val" } }
        layer { name: "r" type: "ReLU" bottom: "x" top: "y" }
    """
    with pytest.raises(CaffeError) as failure:
        build_graph(parse_prototxt(staged))
    assert str(failure.value) == (
        "layer 'r' (ReLU): bottom 'x' is not produced by any earlier layer or input (layer 'val_in' (Input) makes it, "
        "but the TEST phase leaves it out: include { phase: TEST stage: 'test-on-val' }); to build the net of that "
        "stage, give stages=['test-on-val'] (or add `state { stage: \"test-on-val\" }` to the definition; Caffe's "
        "test nets get theirs from the solver)")
    graph = build_graph(parse_prototxt('state { stage: "test-on-val" }' + staged))  # as the message says
    assert [layer.name for layer in graph.layers] == ["r"] and graph.inputs == {"x": (1, 2)}
    # a rule needing two stages names both; one of another phase names none
    two = staged.replace('include { phase: TEST stage: "test-on-val" }', 'include { stage: "a" stage: "b" }')
    with pytest.raises(CaffeError, match=r"give stages=\['b'\] \(or add `state \{ stage: \"b\" \}`"):
        build_graph(parse_prototxt('state { stage: "a" }' + two))
    with pytest.raises(CaffeError, match=r"give stages=\['a', 'b'\]"):
        build_graph(parse_prototxt(two))
    with pytest.raises(CaffeError, match=r"include \{ phase: TRAIN \}\); Caffe refuses this net in the TEST phase too"):
        build_graph(parse_prototxt(staged.replace('include { phase: TEST stage: "test-on-val" }',
                                                  'include { phase: TRAIN stage: "t" }')))


def test_stage_option_builds_the_staged_net_and_the_folder_keeps_it(tmp_path):
    """--stage joins the definition's state as a solver's test_state does; the converted folder keeps it."""
    from click.testing import CliRunner

    import json

    import torch

    from caffe2torch.cli import main
    from caffe2torch.conversion import convert
    from caffe2torch.folder import load, save_net

    path = tmp_path / "staged.prototxt"
    path.write_text("""
        layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 } } include { stage: "val" } }
        layer { name: "in2" type: "Input" top: "x" input_param { shape { dim: 1 dim: 3 } } include { stage: "train" } }
        layer { name: "double" type: "Power" bottom: "x" top: "y" power_param { scale: 2 } }
        layer { name: "half" type: "Power" bottom: "y" top: "z" power_param { scale: 0.5 } exclude { stage: "val" } }
    """)
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 2 and "give --stage val (or add `state { stage: \"val\" }`" in result.output
    result = CliRunner().invoke(main, ["inspect", str(path), "--stage", "val", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["inputs"] == {"x": [1, 2]}
    save_net(convert(None, path, stages=["val"]).net, tmp_path / "out")
    net = load(tmp_path / "out")
    assert net.meta["caffe"].inputs == {"x": (1, 2)} and list(net.meta["caffe"].definition.state.stage) == ["val"]
    assert torch.equal(net(torch.tensor([[1.0, -3.0]])), torch.tensor([[2.0, -6.0]]))  # "half" left out at val
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "out"), "--stage", "val"])
    assert result.exit_code == 2 and "leave out --prototxt, --input-shape and --stage" in result.output


def test_legacy_v1_caffemodel_upgrades_to_the_same_blobs_as_its_h5(units_dir):
    net = read_caffemodel(units_dir / "unit_legacy_v1.caffemodel")
    assert [layer.type for layer in net.layer][:3] == ["Convolution", "ReLU", "Pooling"]
    from_binary = trained_blobs(net, "v1")
    from_h5 = read_caffemodel_h5(units_dir / "unit_legacy_v1.caffemodel.h5")
    assert set(from_binary) == {name for name, blobs in from_h5.items() if blobs}
    for name, blobs in from_binary.items():
        for ours, theirs in zip(blobs, from_h5[name]):
            assert ours.shape == theirs.shape, name
            np.testing.assert_array_equal(ours, theirs)


def test_garbage_and_empty_caffemodels(tmp_path):
    with pytest.raises(CaffeError, match="not a valid caffemodel"):
        parse_caffemodel(b"\xff\xff\xff\xff garbage", "g.caffemodel")
    with pytest.raises(CaffeError, match="holds no layers"):
        parse_caffemodel(b"", "empty.caffemodel")
    path = tmp_path / "weights.caffemodel.h5"
    path.write_bytes(b"not hdf5 at all")
    with pytest.raises(CaffeError, match="not a readable HDF5 file"):
        read_caffemodel_h5(path)


@pytest.fixture(scope="module")
def unit_caffemodel_bytes() -> bytes:
    from tests.conftest import UNITS_DIR

    return (UNITS_DIR / "unit_inplace_chain.caffemodel").read_bytes()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_caffemodels_only_raise_our_error(unit_caffemodel_bytes, data):
    """Truncations and byte flips of a real caffemodel either read (and convert) or raise CaffeError."""
    from caffe2torch.model import from_net_parameter

    raw = bytearray(unit_caffemodel_bytes)
    cut = data.draw(st.integers(0, len(raw)))
    raw = raw[:cut]
    for _ in range(data.draw(st.integers(0, 4))):
        if raw:
            position = data.draw(st.integers(0, len(raw) - 1))
            raw[position] = data.draw(st.integers(0, 255))
    try:
        net = parse_caffemodel(bytes(raw), "fuzz.caffemodel")
        from_net_parameter(net, trained_blobs(net, "fuzz"), "fuzz", on_warning=lambda _: None)
    except CaffeError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_fuzzed_prototxt_only_raises_our_error(text):
    try:
        parse_prototxt(text, "fuzz.prototxt")
    except CaffeError:
        pass


def test_a_top_produced_twice_is_refused_as_caffe_does():
    head = 'input: "data" input_shape { dim: 1 dim: 2 dim: 3 dim: 3 }\n'
    twice = head + ('layer { name: "a" type: "ReLU" bottom: "data" top: "x" }\n'
                    'layer { name: "b" type: "TanH" bottom: "data" top: "x" }\n')
    with pytest.raises(CaffeError, match=r"layer 'b' \(TanH\): top 'x' is produced by multiple sources"):
        build_graph(parse_prototxt(twice))
    over_input = head + ('layer { name: "a" type: "ReLU" bottom: "data" top: "y" }\n'
                         'layer { name: "b" type: "TanH" bottom: "y" top: "data" }\n')  # writes over the input
    with pytest.raises(CaffeError, match="produced by multiple sources"):
        build_graph(parse_prototxt(over_input))
    # In place means the bottom at the same index: Caffe accepts these.
    in_place = head + ('layer { name: "a" type: "ReLU" bottom: "data" top: "data" }\n'
                       'layer { name: "s" type: "Slice" bottom: "data" top: "p" top: "q" slice_param { axis: 1 } }\n'
                       'layer { name: "e" type: "Eltwise" bottom: "p" bottom: "q" top: "p" }\n')
    assert [layer.name for layer in build_graph(parse_prototxt(in_place)).layers] == ["a", "s", "e"]
    wrong_index = head + ('layer { name: "s" type: "Slice" bottom: "data" top: "p" top: "q" slice_param { axis: 1 } }\n'
                          'layer { name: "e" type: "Eltwise" bottom: "p" bottom: "q" top: "q" }\n')
    with pytest.raises(CaffeError, match="layer 'e'.*'q' is produced by multiple sources"):
        build_graph(parse_prototxt(wrong_index))


def test_hdf5_weights_with_a_gap_in_blob_indices_are_refused(tmp_path):
    import h5py

    path = tmp_path / "gap.caffemodel.h5"
    with h5py.File(path, "w") as file:
        layer = file.create_group("data").create_group("conv")
        layer.create_dataset("0", data=np.zeros((2, 1, 1, 1), np.float32))
        layer.create_dataset("2", data=np.zeros(2, np.float32))
    with pytest.raises(CaffeError, match=r"layer 'conv' has blobs \['0', '2'\], expected 0 to 1"):
        read_caffemodel_h5(path)


def test_blob_dims_whose_product_overflows_int64_are_one_error():
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend([2**40, 2**40, 2**4])  # 2**84 wraps to 0 in int64
    with pytest.raises(CaffeError, match="needs 19342813113834066795298816 values, the file holds 0"):
        blob_to_array(blob, "w")


TRAIN_VAL = """name: "tiny_train_val"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
        transform_param { crop_size: 12 } data_param { source: "train_lmdb" batch_size: 64 } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
        transform_param { crop_size: 12 } data_param { source: "val_lmdb" batch_size: 50 } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "accuracy" type: "Accuracy" bottom: "fc" bottom: "label" top: "accuracy" include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""


def test_a_train_val_net_converts_as_a_deploy_net_with_notes():
    from caffe2torch.model import from_net_parameter, net_info

    notes: list[str] = []
    net = from_net_parameter(parse_prototxt(TRAIN_VAL), {}, fill_missing=True, on_warning=lambda _: None,
                             on_note=notes.append)
    info = net_info(net)
    assert info.inputs == {"data": (50, 3, 12, 12)} and info.outputs == ["fc"]  # the TEST phase's batch_size
    assert notes == ["layer 'data' (Data) reads a dataset: its tops 'data', 'label' are taken as the net's inputs",
                     "layer 'accuracy' (Accuracy) only scores training or testing: left out",
                     "layer 'loss' (SoftmaxWithLoss) only scores training or testing: left out",
                     "input 'label' feeds only layers left out: dropped"]
    # A data layer that does not say its size needs input_shape (--input-shape), and says so.
    with pytest.raises(CaffeError, match=r"input 'data' has no shape \(data layer 'data' \(Data\) does not say its size\); give one with input_shape="):
        build_graph(parse_prototxt(TRAIN_VAL.replace("transform_param { crop_size: 12 } ", "")))
    # A fork's *Data type (HED's ImageLabelmapData) reads a dataset too; a fork's *Accuracy only scores.
    forked = TRAIN_VAL.replace('type: "Data"', 'type: "ImageLabelmapData"').replace('"Accuracy"', '"MultiLabelAccuracy"')
    graph = build_graph(parse_prototxt(forked))
    assert graph.inputs == {"data": (1, 3, 12, 12)} and [layer.name for layer in graph.layers] == ["conv", "relu", "fc"]


def test_duplicate_layer_names_are_accepted_as_caffe_does():
    """HED names five parameter-free Crop layers `crop`; weights of a name go to its last layer only."""
    from caffe2torch.model import from_net_parameter, layer_calls

    text = ('input: "data" input_shape { dim: 1 dim: 2 dim: 3 dim: 3 }\n'
            'layer { name: "act" type: "ReLU" bottom: "data" top: "a" }\n'
            'layer { name: "act" type: "TanH" bottom: "data" top: "b" }\n')
    graph = build_graph(parse_prototxt(text))
    assert graph.notes == ["layer names used more than once: 'act'; each gets a module of its own"]
    net = from_net_parameter(parse_prototxt(text), {})
    assert [(node.target, call.layer) for node, call in layer_calls(net)] == [("act", "act"), ("act_2", "act")]
    weighted = text.replace('type: "ReLU" bottom: "data" top: "a" }',
                            'type: "Convolution" bottom: "data" top: "a" convolution_param { num_output: 1 kernel_size: 1 } }')
    weighted = weighted.replace('type: "TanH" bottom: "data" top: "b" }',
                                'type: "Convolution" bottom: "data" top: "b" convolution_param { num_output: 1 kernel_size: 1 } }')
    blobs = {"act": [np.ones((1, 2, 1, 1), np.float32), np.zeros(1, np.float32)]}
    with pytest.raises(CaffeError, match="the last layer of that name only"):
        from_net_parameter(parse_prototxt(weighted), blobs)


# ---------------------------------------------------------------- fields our schema lacks (a fork's)

FORK_FIELDS = """name: "forky"
speed_hint: 3
input: "data" input_shape { dim: 1 dim: 3 dim: 9 dim: 9 }
layer { name: "pool" type: "Pooling" bottom: "data" top: "pool"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 odd_option { a: 1 b: [1, 2] } } }
layer { type: "ReLU" bottom: "pool" top: "pool" relu_param { fancy: true } name: "relu" }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "pool" bottom: "label" top: "loss" loss_param { magic: 1 }
  include { phase: TRAIN } }
"""


def test_unknown_text_fields_are_listed_with_line_layer_and_path():
    from caffe2torch.read import parse_prototxt

    found = []
    net = parse_prototxt(FORK_FIELDS, "forky.prototxt", found)
    assert [(u.line, u.layer, u.field) for u in found] == [
        (2, None, "speed_hint"), (5, "pool", "pooling_param.odd_option"), (6, "relu", "relu_param.fancy"),
        (7, "loss", "loss_param.magic")]
    assert net.layer[0].pooling_param.kernel_size == 2 and net.layer[1].name == "relu"
    assert found[1].describe() == ("forky.prototxt:5: layer 'pool' (Pooling): field 'pooling_param.odd_option' is "
                                   "unknown to our Caffe schema (a fork's?), ignored")
    # Without a list to put them in (our own files), they stay errors.
    with pytest.raises(CaffeError, match=r'forky.prototxt:2:1: .*has no field named "speed_hint"'):
        parse_prototxt(FORK_FIELDS, "forky.prototxt")
    # Syntax errors stay errors either way.
    with pytest.raises(CaffeError, match=r"forky.prototxt:5:"):
        parse_prototxt(FORK_FIELDS.replace("b: [1, 2] }", "b: [1, 2 }"), "forky.prototxt", [])


def test_unknown_fields_count_only_for_layers_the_net_keeps(tmp_path):
    from caffe2torch.conversion import convert
    from caffe2torch.errors import UnknownFieldError

    path = tmp_path / "forky.prototxt"
    path.write_text(FORK_FIELDS)
    with pytest.raises(UnknownFieldError) as failure:
        convert(None, path)
    # The first one stops it; the others were warned before it; the loss layer's (left out) is not looked at.
    assert str(failure.value).startswith(f"{path}:2: the net: field 'speed_hint' is unknown to our Caffe schema and "
                                         f"may change what the layer computes, so the converted net could differ "
                                         f"from Caffe's (2 more such fields above): convert anyway with "
                                         f"allow_unknown_fields=True")
    assert [w.split(": ", 2)[1] for w in failure.value.warnings] == ["layer 'pool' (Pooling)", "layer 'relu' (ReLU)"]
    conversion = convert(None, path, allow_unknown_fields=True)
    assert [w.split(": ", 2)[1] for w in conversion.warnings] == ["the net", "layer 'pool' (Pooling)",
                                                                  "layer 'relu' (ReLU)"]
    assert all("may change what the layer computes; skipped" in w for w in conversion.warnings)


def test_unknown_binary_fields_are_listed_by_number():
    from caffe2torch.read import unknown_binary_fields

    pooling = caffe_pb2.PoolingParameter(kernel_size=2).SerializeToString() + wire_field(40, 1)
    layer = caffe_pb2.LayerParameter(name="p", type="Pooling").SerializeToString() + wire_field(300, 5) + \
        wire_field(121, pooling)
    net = parse_caffemodel(wire_field(100, layer) + wire_field(77, 1), "x.caffemodel")
    assert net.layer[0].pooling_param.kernel_size == 2
    assert [(u.layer, u.field) for u in unknown_binary_fields(net, "x.caffemodel")] == [
        (None, "#77"), ("p", "#300"), ("p", "pooling_param.#40")]


def test_pooling_field_13_in_a_binary_is_flagged_as_ambiguous():
    from caffe2torch.read import ambiguous_binary_fields

    layer = caffe_pb2.LayerParameter(name="pool1", type="Pooling")
    layer.pooling_param.round_mode = caffe_pb2.PoolingParameter.CEIL  # a ceil_mode fork's `ceil_mode: false`
    net = parse_caffemodel(caffe_pb2.NetParameter(layer=[layer]).SerializeToString(), "m.caffemodel")
    [message] = ambiguous_binary_fields(net, "m.caffemodel")
    assert message.startswith("m.caffemodel: layer 'pool1': Pooling field 13 is read as BVLC's round_mode (CEIL)")
    # Convolution field 19: synopsys-caffe's pad_type here, DeepLab v1's hole_w there.
    conv = caffe_pb2.LayerParameter(name="conv1", type="Convolution")
    conv.convolution_param.pad_type = 1
    net = parse_caffemodel(caffe_pb2.NetParameter(layer=[conv]).SerializeToString(), "m.caffemodel")
    assert ambiguous_binary_fields(net, "m.caffemodel") == [
        "m.caffemodel: layer 'conv1': Convolution field 19 is read as synopsys-caffe's pad_type (1); DeepLab v1 "
        "stores hole_w there: give the deploy prototxt if the model comes from DeepLab v1"]
    # InnerProduct field 8: Intel Caffe's fused relu here, happynear's normalize there.
    product = caffe_pb2.LayerParameter(name="fc5", type="InnerProduct")
    product.inner_product_param.relu = True
    net = parse_caffemodel(caffe_pb2.NetParameter(layer=[product]).SerializeToString(), "m.caffemodel")
    assert ambiguous_binary_fields(net, "m.caffemodel") == [
        "m.caffemodel: layer 'fc5': InnerProduct field 8 is read as Intel Caffe's relu (true); happynear's forks "
        "(NormFace, AM-Softmax) store normalize there: give the deploy prototxt if the model comes from one"]
