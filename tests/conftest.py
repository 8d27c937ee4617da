"""Shared pytest fixtures: location of the read-only Caffe reference data, and converted reference nets."""
from pathlib import Path

import pytest

REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference"

# The unit nets of ../shared/reference/units (README: "Unit nets").
UNITS = [
    "unit_activations", "unit_argmax", "unit_batchnorm_scale_bias", "unit_conv_basic",
    "unit_conv_group_dilation", "unit_eltwise_concat", "unit_fork_bn", "unit_innerproduct",
    "unit_inplace_chain", "unit_interp", "unit_legacy_v1", "unit_phase_filter", "unit_pool_ave",
    "unit_pool_clip_a", "unit_pool_empty_window", "unit_pool_max", "unit_power_exp_log", "unit_shape_softmax",
]
# Every reference net a test may convert: the unit nets and ICNet at 257x513 (its calibrated weights).
REFERENCE_NETS = UNITS + ["icnet_257x513"]


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
