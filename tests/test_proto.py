"""Tests of the Caffe protobuf schema and bindings against the real fork's files."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pool, text_format

from proto import caffe_pb2, generate

REPO_ROOT = Path(__file__).resolve().parents[1]


def _unknown_field_numbers(message) -> list[int]:
    try:
        from google.protobuf.unknown_fields import UnknownFieldSet
    except ImportError:  # protobuf < 4.24
        return [field.field_number for field in message.UnknownFields()]
    return [field.field_number for field in UnknownFieldSet(message)]


def _unknown_field_paths(message, path: str = "") -> list[str]:
    """Paths of sub-messages carrying fields the schema does not know (a wrong field number shows up here)."""
    numbers = _unknown_field_numbers(message)
    found = [f"{path or '<root>'}: {numbers}"] if numbers else []
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        # FieldDescriptor.label is deprecated in new runtimes, is_repeated absent in old ones.
        is_repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        values = value if is_repeated else [value]
        for index, item in enumerate(values):
            found += _unknown_field_paths(item, f"{path}.{field.name}[{index}]")
    return found


def _files(folder: Path, suffix: str) -> list[Path]:
    files = sorted(folder.glob(f"*{suffix}"))
    assert files, f"no *{suffix} files in {folder}"
    return files


def _parse_prototxt(path: Path) -> caffe_pb2.NetParameter:
    return text_format.Parse(path.read_text(), caffe_pb2.NetParameter())


@pytest.fixture(scope="module")
def merged_icnet(reference_dir: Path) -> caffe_pb2.NetParameter:
    return caffe_pb2.NetParameter.FromString((reference_dir / "icnet_merged_1025x2049.caffemodel").read_bytes())


def test_generated_module_matches_schema() -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools is needed to compile caffe.proto")
    expected = generate.render_module(generate.compile_descriptor())
    assert generate.MODULE_PATH.read_text() == expected, "proto/caffe_pb2.py is stale: run python -m proto.generate"


def test_check_flag_reports_stale_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools is needed to compile caffe.proto")
    stale = tmp_path / "caffe_pb2.py"
    stale.write_text(generate.MODULE_PATH.read_text() + "# edited by hand\n")
    monkeypatch.setattr(generate, "MODULE_PATH", stale)
    assert generate.main(["--check"]) == 1
    assert generate.main([]) == 0
    assert generate.main(["--check"]) == 0
    assert stale.read_text() == (REPO_ROOT / "proto" / "caffe_pb2.py").read_text()


def test_imports_from_repo_root_in_fresh_interpreter() -> None:
    code = "from proto import caffe_pb2; print(caffe_pb2.NetParameter.DESCRIPTOR.full_name)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "caffe.NetParameter"


def test_enums_are_reachable_as_in_protoc_gencode() -> None:
    assert (caffe_pb2.TRAIN, caffe_pb2.TEST) == (0, 1)
    assert caffe_pb2.Phase.Name(caffe_pb2.TEST) == "TEST"
    assert (caffe_pb2.PoolingParameter.MAX, caffe_pb2.PoolingParameter.AVE) == (0, 1)
    assert caffe_pb2.PoolingParameter.PoolMethod.Value("STOCHASTIC") == 2
    assert caffe_pb2.EltwiseParameter.SUM == 1
    assert caffe_pb2.V1LayerParameter.CONVOLUTION == 4
    assert caffe_pb2.V1LayerParameter.LayerType.Name(14) == "INNER_PRODUCT"


def test_field_numbers_follow_the_fork() -> None:
    layer_fields = caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name
    assert layer_fields["bn_param"].number == 152
    assert layer_fields["interp_param"].number == 143
    assert layer_fields["seg_accuracy_param"].number == 144
    assert layer_fields["batch_norm_param"].number == 139
    assert layer_fields["scale_param"].number == 142
    numbers = [field.number for field in caffe_pb2.LayerParameter.DESCRIPTOR.fields]
    assert len(numbers) == len(set(numbers))
    assert layer_fields["input_param"].number not in range(1, 1000)
    net_fields = caffe_pb2.NetParameter.DESCRIPTOR.fields_by_name
    assert (net_fields["layer"].number, net_fields["layers"].number, net_fields["input_dim"].number) == (100, 2, 4)
    blob_fields = caffe_pb2.BlobProto.DESCRIPTOR.fields_by_name
    blob_names = ("num", "channels", "height", "width", "data", "shape", "double_data")
    assert [blob_fields[name].number for name in blob_names] == [1, 2, 3, 4, 5, 7, 8]


def test_defaults_match_caffe() -> None:
    bn = caffe_pb2.BNParameter()
    assert (bn.momentum, bn.frozen, bn.engine) == (pytest.approx(0.9), False, caffe_pb2.BNParameter.DEFAULT)
    assert bn.eps == pytest.approx(1e-5, rel=1e-6)
    interp = caffe_pb2.InterpParameter()
    interp_values = (interp.height, interp.width, interp.zoom_factor, interp.shrink_factor, interp.pad_beg, interp.pad_end)
    assert interp_values == (0, 0, 1, 1, 0, 0)
    conv = caffe_pb2.ConvolutionParameter()
    assert (conv.bias_term, conv.group, conv.axis) == (True, 1, 1)
    assert caffe_pb2.PoolingParameter().stride == 1
    assert caffe_pb2.NetState().phase == caffe_pb2.TEST
    assert caffe_pb2.BatchNormParameter().eps == pytest.approx(1e-5, rel=1e-6)
    assert caffe_pb2.ConcatParameter().axis == 1


def test_private_descriptor_pool() -> None:
    assert caffe_pb2.DESCRIPTOR.pool is not descriptor_pool.Default()
    assert caffe_pb2.LayerParameter.__module__ == "proto.caffe_pb2"


def test_wire_and_text_round_trip() -> None:
    net = caffe_pb2.NetParameter(name="rt", input=["data"], input_dim=[1, 3, 5, 7])
    layer = net.layer.add(name="bn", type="BN", bottom=["data"], top=["bn"], phase=caffe_pb2.TEST)
    layer.bn_param.eps = 1e-3
    layer.bn_param.frozen = True
    layer.include.add(phase=caffe_pb2.TEST, stage=["deploy"])
    blob = layer.blobs.add(data=[0.5, -1.25, 3.0], double_data=[math.pi])
    blob.shape.dim.extend([1, 3, 1, 1])
    interp = net.layer.add(name="up", type="Interp", bottom=["bn"], top=["up"])
    interp.interp_param.zoom_factor = 4
    net.layer.add(name="crop", type="Crop").crop_param.offset.extend([2, 3])
    legacy = net.layers.add(name="conv", type=caffe_pb2.V1LayerParameter.CONVOLUTION)
    legacy.blobs.add(num=2, channels=3, height=1, width=1, data=[1.0] * 6)
    legacy.convolution_param.kernel_size.append(1)

    wire = net.SerializeToString()
    parsed = caffe_pb2.NetParameter.FromString(wire)
    assert parsed == net
    assert parsed.SerializeToString() == wire
    assert list(parsed.layer[0].blobs[0].data) == [0.5, -1.25, 3.0]
    assert parsed.layer[0].blobs[0].double_data[0] == math.pi
    assert text_format.Parse(text_format.MessageToString(net), caffe_pb2.NetParameter()) == net


def test_every_reference_prototxt_parses(units_dir: Path) -> None:
    official = REPO_ROOT / "weights"  # the authors' two deploy prototxts (md5 in the manifest)
    for path in _files(units_dir, ".prototxt") + _files(official, ".prototxt"):
        net = _parse_prototxt(path)
        assert len(net.layer) + len(net.layers) > 0, path.name

    bnnomerge = _parse_prototxt(official / "icnet_cityscapes_bnnomerge.prototxt")
    bn_layers = [layer for layer in bnnomerge.layer if layer.type == "BN"]
    assert len(bn_layers) == 63
    assert all(layer.HasField("bn_param") for layer in bn_layers)
    merged = _parse_prototxt(official / "icnet_cityscapes.prototxt")
    assert (len(merged.layer), list(merged.input), list(merged.input_dim)) == (156, ["data"], [1, 3, 1025, 2049])
    interp = {layer.name: layer.interp_param for layer in merged.layer if layer.type == "Interp"}
    assert interp["data_sub2"].shrink_factor == 2
    assert interp["conv6_interp"].zoom_factor == 4

    fork_bn = _parse_prototxt(units_dir / "unit_fork_bn.prototxt")
    params = {layer.name: layer.bn_param for layer in fork_bn.layer if layer.type == "BN"}
    assert params["bn_eps"].eps == pytest.approx(1e-3)
    assert params["bn_frozen"].frozen and not params["bn"].frozen


def _decodes_exactly(paths: list[Path]) -> None:
    for path in paths:
        wire = path.read_bytes()
        net = caffe_pb2.NetParameter.FromString(wire)
        assert len(net.layer) + len(net.layers) > 0, path.name
        assert _unknown_field_paths(net) == [], path.name
        assert net.SerializeToString() == wire, path.name


def test_every_unit_caffemodel_decodes_exactly(units_dir: Path) -> None:
    _decodes_exactly(_files(units_dir, ".caffemodel"))


def test_every_icnet_reference_caffemodel_decodes_exactly(reference_dir: Path) -> None:
    _decodes_exactly(_files(reference_dir, ".caffemodel"))


def test_merged_icnet_caffemodel_blobs(merged_icnet: caffe_pb2.NetParameter) -> None:
    layers = {layer.name: layer for layer in merged_icnet.layer}
    # 156 prototxt layers plus the Split layers Caffe inserted before saving.
    assert len(merged_icnet.layer) == 175
    assert sum(layer.type == "Split" for layer in merged_icnet.layer) == 19
    cls = layers["conv6_cls"]
    assert (cls.type, cls.phase) == ("Convolution", caffe_pb2.TEST)
    assert [list(blob.shape.dim) for blob in cls.blobs] == [[19, 128, 1, 1], [19]]
    assert [len(blob.data) for blob in cls.blobs] == [19 * 128, 19]
    assert [list(blob.shape.dim) for blob in layers["conv1_1_3x3_s2"].blobs] == [[32, 3, 3, 3], [32]]
    assert [list(blob.shape.dim) for blob in layers["data_sub1"].blobs] == [[3]]
    assert layers["conv6_interp"].interp_param.zoom_factor == 4


def test_bnnomerge_caffemodel_has_fork_bn_blobs(reference_dir: Path) -> None:
    net = caffe_pb2.NetParameter.FromString((reference_dir / "icnet_bnnomerge_1025x2049.caffemodel").read_bytes())
    bn_layers = [layer for layer in net.layer if layer.type == "BN"]
    assert len(bn_layers) == 63
    first = bn_layers[0]
    assert first.name == "conv1_1_3x3_s2/bn"
    assert [list(blob.shape.dim) for blob in first.blobs] == [[1, 32, 1, 1]] * 4
    assert first.bn_param.frozen and first.bn_param.momentum == pytest.approx(0.95)


def test_legacy_v1_caffemodel_uses_layers_with_4d_dims(units_dir: Path) -> None:
    net = caffe_pb2.NetParameter.FromString((units_dir / "unit_legacy_v1.caffemodel").read_bytes())
    assert len(net.layer) == 0
    V1 = caffe_pb2.V1LayerParameter
    assert [(layer.name, layer.type) for layer in net.layers] == [
        ("conv1", V1.CONVOLUTION), ("relu1", V1.RELU), ("pool1", V1.POOLING), ("conv2", V1.CONVOLUTION),
        ("tanh2", V1.TANH), ("pool2", V1.POOLING), ("drop2", V1.DROPOUT), ("fc3", V1.INNER_PRODUCT),
        ("prob", V1.SOFTMAX),
    ]
    layers = {layer.name: layer for layer in net.layers}

    def legacy_dims(layer_name: str) -> list[tuple[int, int, int, int]]:
        blobs = layers[layer_name].blobs
        assert all(not blob.HasField("shape") for blob in blobs)
        assert all(len(blob.data) == blob.num * blob.channels * blob.height * blob.width for blob in blobs)
        return [(blob.num, blob.channels, blob.height, blob.width) for blob in blobs]

    assert legacy_dims("conv1") == [(4, 3, 3, 3), (1, 1, 1, 4)]
    assert legacy_dims("conv2") == [(6, 2, 3, 3), (1, 1, 1, 6)]
    assert legacy_dims("fc3") == [(1, 1, 5, 24), (1, 1, 1, 5)]
    assert layers["conv2"].convolution_param.group == 2
    assert layers["pool2"].pooling_param.pool == caffe_pb2.PoolingParameter.AVE
