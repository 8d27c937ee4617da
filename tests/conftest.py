"""Shared pytest fixtures: the Caffe reference data (vendored unit nets, external ICNet nets) and converted nets."""
import os
from pathlib import Path

import pytest

DATA_DIR = Path(__file__).resolve().parent / "data"
# The unit nets and the small imresize cases are vendored (tests/data/README.md): every checkout runs their tests.
UNITS_DIR = DATA_DIR / "units"
IMRESIZE_DIR = DATA_DIR / "imresize"
# The ICNet references (about 115 MB) are not: CAFFE2TORCH_REFERENCE names their folder, else reference/ in a
# `shared` folder beside the repository (README, "Tests").
REFERENCE_DIR = Path(os.environ.get("CAFFE2TORCH_REFERENCE") or
                     Path(__file__).resolve().parents[1].parent / "shared" / "reference")

UNITS = [
    "unit_activations", "unit_argmax", "unit_batchnorm_scale_bias", "unit_conv_basic",
    "unit_conv_group_dilation", "unit_eltwise_concat", "unit_fork_bn", "unit_innerproduct",
    "unit_inplace_chain", "unit_interp", "unit_legacy_v1", "unit_phase_filter", "unit_pool_ave",
    "unit_pool_clip_a", "unit_pool_empty_window", "unit_pool_max", "unit_power_exp_log", "unit_shape_softmax",
]
# Every reference net a test may convert: the unit nets and ICNet at 257x513 (its calibrated weights).
REFERENCE_NETS = UNITS + ["icnet_257x513"]
# What the ICNet tests read from REFERENCE_DIR.
ICNET_FILES = ("icnet_cityscapes.prototxt", "icnet_cityscapes_bnnomerge.prototxt", "icnet_merged_1025x2049.caffemodel",
               "icnet_merged_1025x2049.ref.h5", "icnet_bnnomerge_1025x2049.caffemodel",
               "icnet_bnnomerge_1025x2049.ref.h5", "icnet_merged_257x513.prototxt", "icnet_merged_257x513.ref.h5")


def external_reference(*names: str) -> Path:
    """REFERENCE_DIR when it holds the named files (default: the ICNet nets); otherwise the test is skipped, saying
    which file is missing where."""
    for name in names or ICNET_FILES:
        if not (REFERENCE_DIR / name).is_file():
            pytest.skip(f"ICNet Caffe reference data not found ({name} is not in {REFERENCE_DIR}; set "
                        f"CAFFE2TORCH_REFERENCE to the folder that holds it)")
    return REFERENCE_DIR


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: on a shared 2-core machine, spinning OpenMP threads make the evaluation
    tests 10x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The external ICNet reference data; skips the test when it is absent."""
    return external_reference()


@pytest.fixture(scope="session")
def units_dir() -> Path:
    """The vendored unit nets: X.prototxt, X.caffemodel, X.caffemodel.h5 and X.ref.h5 for each of UNITS."""
    return UNITS_DIR


def convert_reference(name: str):
    """A fresh conversion of one reference net (tests may train or change it); ICNet's skips the test when the
    external data is absent."""
    from caffe2torch.conversion import convert

    if name == "icnet_257x513":
        reference_dir = external_reference("icnet_merged_1025x2049.caffemodel", "icnet_merged_257x513.prototxt")
        return convert(reference_dir / "icnet_merged_1025x2049.caffemodel", reference_dir / "icnet_merged_257x513.prototxt",
                       on_warning=lambda _: None).net
    return convert(UNITS_DIR / f"{name}.caffemodel", UNITS_DIR / f"{name}.prototxt", on_warning=lambda _: None).net


def random_net(tmp_path: Path, prototxt: str, std: float, seed: int = 0):
    """The net of a prototxt text (no weights), its parameters drawn from N(0, std) with a fixed seed."""
    import torch

    from caffe2torch.conversion import convert

    path = tmp_path / "net.prototxt"
    path.write_text(prototxt)
    net = convert(None, path).net
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.normal_(0, std)
    return net


def load_standalone(folder: Path):
    """A saved folder's net, built by its own model.py (which must need nothing but torch)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"standalone_{folder.name}", folder / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load(folder)


def layer_from_text(text: str):
    """A LayerParameter from its prototxt text."""
    from google.protobuf import text_format

    from proto import caffe_pb2

    return text_format.Parse(text, caffe_pb2.LayerParameter())


def run_layer(layer, shapes, blobs, *inputs):
    """Convert one layer and run it on NumPy inputs: (Converted, output array or tuple of arrays)."""
    import numpy as np
    import torch

    from caffe2torch.layers import convert_layer

    converted = convert_layer(layer, shapes, blobs)
    with torch.no_grad():
        out = converted.module(*[torch.from_numpy(np.ascontiguousarray(x)) for x in inputs])
    return converted, (tuple(o.numpy() for o in out) if isinstance(out, tuple) else out.numpy())


def wire_field(number: int, payload: bytes | int) -> bytes:
    """One protobuf field on the wire: a varint for an int, length-delimited bytes otherwise (for writing the
    fields a schema lacks, or a fork numbers differently, into a binary)."""
    def varint(value: int) -> bytes:
        out = bytearray()
        while True:
            out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
            value >>= 7
            if not value:
                return bytes(out)

    if isinstance(payload, int):
        return varint(number << 3) + varint(payload)
    return varint(number << 3 | 2) + varint(len(payload)) + payload
