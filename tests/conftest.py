"""Shared pytest fixtures: location of the read-only Caffe reference data, and converted reference nets."""
import os
from pathlib import Path

import pytest

# ../shared/reference beside the repo; CAFFE2TORCH_REFERENCE names another copy (e.g. the files a GPU run carries).
REFERENCE_DIR = Path(os.environ.get("CAFFE2TORCH_REFERENCE") or
                     Path(__file__).resolve().parents[1].parent / "shared" / "reference")

# The unit nets of ../shared/reference/units (README: "Unit nets").
UNITS = [
    "unit_activations", "unit_argmax", "unit_batchnorm_scale_bias", "unit_conv_basic",
    "unit_conv_group_dilation", "unit_eltwise_concat", "unit_fork_bn", "unit_innerproduct",
    "unit_inplace_chain", "unit_interp", "unit_legacy_v1", "unit_phase_filter", "unit_pool_ave",
    "unit_pool_clip_a", "unit_pool_empty_window", "unit_pool_max", "unit_power_exp_log", "unit_shape_softmax",
]
# Every reference net a test may convert: the unit nets and ICNet at 257x513 (its calibrated weights).
REFERENCE_NETS = UNITS + ["icnet_257x513"]


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
    """The Caffe reference data folder beside the repo; skips the test when it is absent."""
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"Caffe reference data not found at {REFERENCE_DIR}")
    return REFERENCE_DIR


def convert_reference(reference_dir: Path, name: str):
    """A fresh conversion of one reference net (tests may train or change it)."""
    from caffe2torch.conversion import convert

    if name == "icnet_257x513":
        return convert(reference_dir / "icnet_merged_1025x2049.caffemodel", reference_dir / "icnet_merged_257x513.prototxt",
                       on_warning=lambda _: None).net
    units = reference_dir / "units"
    return convert(units / f"{name}.caffemodel", units / f"{name}.prototxt", on_warning=lambda _: None).net


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
