"""Files with names that are not UTF-8 and sizes past int64 or Caffe's int: one line naming the file or layer.

Every case must end in a CaffeError of one line (exit 2 from the command line), never a
traceback, and never in a net that converts and then fails or computes something else.
"""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from caffe2torch.cli import main
from caffe2torch.conversion import convert
from caffe2torch.errors import CaffeError
from caffe2torch.limits import MAX_LIMIT, memory_limit
from caffe2torch.read import parse_caffemodel, read_caffemodel_h5
from caffe2torch.reference import read_reference
from tests.public_nets import write_caffemodel_h5

BIG = 2**63 - 1
INPUT = 'input: "data" input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }\n'


def _layer(kind: str, body: str = "", bottom: str = "data") -> str:
    return f'layer {{ name: "x" type: "{kind}" bottom: "{bottom}" top: "x" {body} }}\n'


def _one_line(error: CaffeError) -> str:
    assert str(error) and "\n" not in str(error)
    return str(error)


# ---------------------------------------------------------------- names that are not UTF-8

def test_an_hdf5_layer_name_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "bad.caffemodel.h5"
    with h5py.File(path, "w") as file:
        file.create_group("data").create_group(b"conv\xff1").create_dataset("0", data=np.ones((2, 3, 1, 1), "f4"))
    result = CliRunner().invoke(main, ["convert", str(path), "--prototxt", str(tmp_path / "none.prototxt")])
    assert result.exit_code == 2
    assert result.output == (f"caffe2torch: error: {path}: the layer name in /data b'conv\\xff1' is not UTF-8 text "
                             f"(a damaged file?)\n")
    with h5py.File(path, "w") as file:  # nested under a layer ('/' in a Caffe name makes HDF5 groups)
        file.create_group("data/conv").create_group(b"b\xc3n")
    with pytest.raises(CaffeError, match=r"a name inside layer 'conv' b'b\\xc3n' is not UTF-8 text"):
        read_caffemodel_h5(path)


def test_reference_names_that_are_not_utf8_are_one_line(units_dir, tmp_path):
    source = units_dir / "unit_conv_basic.ref.h5"
    for change, message in (
            (lambda f: f["layers/0000"].attrs.__setitem__("name", np.bytes_(b"conv\xff")),
             r"attribute 'name' of /layers/0000 b'conv\\xff' is not UTF-8 text"),
            (lambda f: f["layers/0001"].attrs.__setitem__("tops", np.array([b"t\xfe"], dtype="S2")),
             r"a top name of /layers/0001 b't\\xfe' is not UTF-8 text"),
            (lambda f: f["input"].move("data", b"d\xffta"), r"the input name b'd\\xffta' is not UTF-8 text"),
            (lambda f: f.attrs.__setitem__("prototxt", np.bytes_(b"net\x80.prototxt")),
             r"attribute 'prototxt' of / b'net\\x80.prototxt' is not UTF-8 text")):
        path = tmp_path / "damaged.ref.h5"
        shutil.copy(source, path)
        with h5py.File(path, "r+") as file:
            change(file)
        with pytest.raises(CaffeError, match=message) as caught:
            read_reference(path)
        assert _one_line(caught.value).startswith(str(path))


def test_a_binary_caffemodel_string_that_is_not_utf8_names_the_field_and_bytes(units_dir):
    data = (units_dir / "unit_conv_basic.caffemodel").read_bytes()
    with pytest.raises(CaffeError) as caught:
        parse_caffemodel(data.replace(b"conv_k3_s2", b"conv_k3_\xff2", 1), "x.caffemodel")
    assert _one_line(caught.value) == ("x.caffemodel: not a valid caffemodel (layer[2].name holds bytes that are not "
                                       "UTF-8, b'conv_k3_\\xff2': a damaged file)")


# ---------------------------------------------------------------- sizes past int64 or Caffe's int

SIZES = {
    "input dim 2^63-1": ('input: "data" input_shape { dim: 1 dim: 3 dim: 9223372036854775807 dim: 8 }\n'
                         + _layer("ReLU"), "net.prototxt: input 'data' of shape 1x3x9223372036854775807x8 needs"),
    "Input layer dim 2^63-1": ('layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 1 dim: '
                               '9223372036854775807 } } }\n' + _layer("ReLU"), "input 'data' of shape"),
    "two dims of 2^62": ('input: "data" input_shape { dim: 4611686018427387904 dim: 4611686018427387904 }\n'
                         + _layer("ReLU"), "input 'data' of shape"),
    "Reshape dim 2^63-1": (INPUT + _layer("Reshape", "reshape_param { shape { dim: 9223372036854775807 dim: -1 } }"),
                           "layer 'x' (Reshape)"),
    "DummyData dim 2^63-1": ('layer { name: "d" type: "DummyData" top: "data" dummy_data_param { shape { dim: 1 '
                             'dim: 9223372036854775807 } } }\n' + _layer("ReLU"), "input 'data' of shape"),
    "Parameter dim 2^63-1": ('layer { name: "x" type: "Parameter" top: "x" parameter_param { shape { dim: 2 '
                             'dim: 9223372036854775807 } } }\n', "layer 'x' (Parameter)"),
    "Parameter dim -1": ('layer { name: "x" type: "Parameter" top: "x" parameter_param { shape { dim: 2 dim: -1 } } }\n',
                         "layer 'x' (Parameter): its parameter blob would have shape (2, -1)"),
    "num_output 2^32-1": (INPUT + _layer("Convolution", "convolution_param { num_output: 4294967295 kernel_size: 1 }"),
                          "layer 'x' (Convolution): the parameters up to here needs"),
    "kernel 2^31": (INPUT + _layer("Convolution", "convolution_param { num_output: 1 kernel_size: 2147483648 }"),
                    "layer 'x' (Convolution): the parameters up to here needs"),
    "pool stride 2^31": (INPUT + _layer("Pooling", "pooling_param { pool: MAX kernel_size: 2 stride: 2147483648 }"),
                         "layer 'x' (Pooling): stride 2147483648 does not fit"),
    "pool stride_w 2^32-1": (INPUT + _layer("Pooling", "pooling_param { kernel_h: 2 kernel_w: 2 stride_h: 1 "
                                                      "stride_w: 4294967295 }"), "stride_h/stride_w 4294967295"),
    "LRN local_size 2^31-1": (INPUT + _layer("LRN", "lrn_param { local_size: 2147483647 }"),
                              "layer 'x' (LRN) (padded copy 1x2147483649x8x8) needs"),
    "LRN within 2^31-1": (INPUT + _layer("LRN", "lrn_param { local_size: 2147483647 norm_region: WITHIN_CHANNEL }"),
                          "layer 'x' (LRN) (padded copy 1x3x2147483654x2147483654) needs"),
    "LRN local_size 2^32-1": (INPUT + _layer("LRN", "lrn_param { local_size: 4294967295 }"), "local_size 4294967295"),
    "Interp height 2^31-1": (INPUT + _layer("Interp", "interp_param { height: 2147483647 width: 2147483647 }"),
                             "layer 'x' (Interp)"),
    "Tile tiles 2^31-1": (INPUT + _layer("Tile", "tile_param { axis: 1 tiles: 2147483647 }"), "layer 'x' (Tile)"),
    "Tile tiles 2^32-1": (INPUT + _layer("Tile", "tile_param { axis: 1 tiles: 4294967295 }"),
                          "net.prototxt:2:84: 'layer {"),  # an int32 field: the parser refuses it
    "Embed input_dim 2^32-1": ('input: "data" input_shape { dim: 2 dim: 3 }\n'
                               + _layer("Embed", "embed_param { input_dim: 4294967295 num_output: 4294967295 }"),
                               "layer 'x' (Embed)"),
    "InnerProduct 2^32-1": (INPUT + _layer("InnerProduct", "inner_product_param { num_output: 4294967295 }"),
                            "layer 'x' (InnerProduct)"),
}


# Cases refused before anything is allocated, whatever the memory limit: also run with a limit far above any
# machine (it stops at 2^60 bytes, inside int64). The others would try to allocate below that; they run at 1G.
NO_ALLOCATION = {"input dim 2^63-1", "Input layer dim 2^63-1", "two dims of 2^62", "Reshape dim 2^63-1",
                 "DummyData dim 2^63-1", "Parameter dim 2^63-1", "Parameter dim -1", "pool stride 2^31",
                 "pool stride_w 2^32-1", "LRN local_size 2^32-1", "Tile tiles 2^32-1"}


@pytest.mark.parametrize("case", sorted(SIZES))
def test_sizes_past_what_torch_or_caffe_holds_are_one_line(tmp_path, monkeypatch, case):
    text, message = SIZES[case]
    monkeypatch.setenv("CAFFE2TORCH_MAX_MEMORY", "1G")  # --max-memory sets it: restored after the test
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    for limit in ("1G", "9999999999999T") if case in NO_ALLOCATION else ("1G",):
        with pytest.raises(CaffeError) as caught:
            convert(None, path, on_warning=lambda _: None, memory_limit=limit)
        assert message in _one_line(caught.value)
        result = CliRunner().invoke(main, ["inspect", str(path), "--max-memory", limit])
        assert result.exit_code == 2 and result.output.count("\n") == 1 and message in result.output, result.output


def test_the_memory_limit_stops_at_2_to_the_60_bytes(monkeypatch):
    assert memory_limit("9999999999999T") == MAX_LIMIT == 1 << 60
    assert memory_limit(10**30) == MAX_LIMIT and memory_limit("2G") == 2 << 30
    monkeypatch.setenv("CAFFE2TORCH_MAX_MEMORY", "99999999999T")
    assert memory_limit() == MAX_LIMIT


@pytest.mark.parametrize("kind", ["Convolution", "InnerProduct", "BatchNorm", "BN", "PReLU", "Deconvolution"])
def test_parameters_of_a_layer_on_a_scalar_blob_are_one_line(tmp_path, kind):
    """A Reduction over axis 0 makes a 0-axis blob; the blobs of a layer reading it cannot have Caffe's shapes."""
    body = {"Convolution": "convolution_param { num_output: 2 kernel_size: 1 }",
            "Deconvolution": "convolution_param { num_output: 2 kernel_size: 1 }",
            "InnerProduct": "inner_product_param { num_output: 2 }"}.get(kind, "")
    path = tmp_path / "net.prototxt"
    path.write_text('input: "data" input_shape { dim: 2 dim: 3 }\nlayer { name: "r" type: "Reduction" bottom: "data" '
                    'top: "s" reduction_param { axis: 0 } }\n' + _layer(kind, body, bottom="s"))
    with pytest.raises(CaffeError, match=rf"^layer 'x' \({kind}\): axis 1 out of range for a 0-axis blob$"):
        convert(None, path)


def test_a_convolution_on_axis_0_convolves_the_whole_blob_as_one_sample(tmp_path):
    """Caffe's axis 0: no batch axis; the channels are axis 0 and three spatial axes follow (here a 1x1x1 kernel)."""
    from tests.public_nets import write_caffemodel

    text = ('input: "data" input_shape { dim: 3 dim: 2 dim: 4 dim: 5 }\n'
            + _layer("Convolution", "convolution_param { num_output: 2 kernel_size: 1 axis: 0 }"))
    rng = np.random.default_rng(5)
    weight, bias = rng.standard_normal((2, 3, 1, 1, 1)).astype(np.float32), rng.standard_normal(2).astype(np.float32)
    (tmp_path / "net.prototxt").write_text(text)
    write_caffemodel(text, {"x": [weight, bias]}, tmp_path / "net.caffemodel")
    net = convert(tmp_path / "net.caffemodel", tmp_path / "net.prototxt").net
    x = rng.standard_normal((3, 2, 4, 5)).astype(np.float32)
    expected = np.einsum("oc,cdhw->odhw", weight.reshape(2, 3).astype(np.float64), x) + bias[:, None, None, None]
    with torch.no_grad():
        np.testing.assert_allclose(net(torch.from_numpy(x)).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_hdf5_weights_of_a_size_past_int64_are_one_line(tmp_path):
    """An HDF5 dataset claims its shape in its header: a claimed size past any file is refused before reading."""
    path = tmp_path / "big.caffemodel.h5"
    text = INPUT + _layer("Convolution", "convolution_param { num_output: 1 kernel_size: 1 }")
    write_caffemodel_h5(text, {"x": [np.ones((1, 3, 1, 1), "f4"), np.ones(1, "f4")]}, path)
    with h5py.File(path, "r+") as file:
        del file["data/x/0"]
        file["data/x"].create_dataset("0", shape=(2**40, 2**40), dtype="f4")  # no storage allocated: a header only
    with pytest.raises(CaffeError, match=r"layer 'x' blob 0 is not a float array of a sane size"):
        read_caffemodel_h5(path)


# ---------------------------------------------------------------- the definition a reference names

@pytest.mark.parametrize("name, used", [
    ("ABSOLUTE", False),  # replaced by the absolute path of the trap
    ("../elsewhere/trap.prototxt", False),
    ("link.prototxt", False),  # a symbolic link in the reference's folder to the trap outside it
    ("sub/trap.prototxt", True),  # a plain relative name inside the folder: read
])
def test_verify_reads_only_a_definition_inside_the_references_folder(units_dir, tmp_path, name, used):
    """A `.ref.h5` names its prototxt relative to itself; anything else is ignored with a note, and verify goes
    on with the net stored in the caffemodel. The trap is not a valid prototxt: reading it would be an error."""
    folder, elsewhere = tmp_path / "ref", tmp_path / "elsewhere"
    (folder / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    trap = elsewhere / "trap.prototxt"
    for path in (trap, folder / "sub" / "trap.prototxt"):
        path.write_text("layer {")
    (folder / "link.prototxt").symlink_to(trap)
    shutil.copy(units_dir / "unit_conv_basic.caffemodel", folder / "model.caffemodel")
    reference = folder / "model.ref.h5"
    shutil.copy(units_dir / "unit_conv_basic.ref.h5", reference)
    with h5py.File(reference, "r+") as file:
        file.attrs["prototxt"] = str(trap) if name == "ABSOLUTE" else name
    result = CliRunner().invoke(main, ["verify", str(folder / "model.caffemodel"), "--reference", str(reference)])
    if used:
        assert result.exit_code == 2 and f"{folder / 'sub' / 'trap.prototxt'}:1" in result.output, result.output
        return
    assert result.exit_code == 0, result.output
    assert f"caffe2torch: note: {reference}: its prototxt attribute " in result.output
    assert "is ignored" in result.output and "give --prototxt to choose the definition" in result.output
    assert "7/7 layers within tolerance" in result.output and "trap.prototxt:1" not in result.output


def test_icnet_sizes_past_the_int32_input_dim_are_one_line():
    from icnet_eval.cli import main as icnet_main

    result = CliRunner().invoke(icnet_main, ["prototxt", "--height", str(BIG), "--width", "5"])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "ICNet input height must be a positive integer of at most 2147483647, got 9223372036854775807" in result.output


def test_a_five_axis_input_gets_check_inputs_and_exports(tmp_path):
    """check_inputs (export's, the fuzz tests') draws inputs of any rank; a 3-D convolution's net exports."""
    from caffe2torch.export import check_inputs, export

    path = tmp_path / "net.prototxt"
    path.write_text('input: "data" input_shape { dim: 1 dim: 2 dim: 3 dim: 4 dim: 5 }\n'
                    + _layer("Convolution", "convolution_param { num_output: 2 kernel_size: 1 }"))
    net = convert(None, path).net
    x, = check_inputs(net)
    assert x.shape == (1, 2, 3, 4, 5) and x.dtype == torch.float32 and float(x.abs().max()) > 0
    assert torch.equal(x, check_inputs(net)[0])  # deterministic
    assert export(net, "torchscript", tmp_path / "net.pt").max_rel == 0.0
