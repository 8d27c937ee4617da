"""Parity with real Caffe: every reference net passes verify, free-running and isolated."""

from __future__ import annotations

import pytest
import torch

from caffe2torch.conversion import convert
from caffe2torch.model import layer_calls
from caffe2torch.verify import read_reference, verify_free_running, verify_isolated
from tests.conftest import UNITS


def _assert_passes(report, expected_records: int) -> None:
    failures = [c for c in report.comparisons if not c.ok]
    assert not failures, [(c.layer, c.top, c.rel_l2, c.note) for c in failures]
    assert not report.unchecked
    assert len(report.comparisons) == expected_records
    assert report.argmax_ok


@pytest.mark.parametrize("unit", UNITS)
@pytest.mark.parametrize("weights_suffix", [".caffemodel", ".caffemodel.h5"])
def test_unit_nets_free_running(units_dir, unit, weights_suffix):
    reference = read_reference(units_dir / f"{unit}.ref.h5")
    conversion = convert(units_dir / f"{unit}{weights_suffix}", units_dir / f"{unit}.prototxt", on_warning=lambda _: None)
    report = verify_free_running(conversion.net, reference, tolerance=1e-5)
    _assert_passes(report, sum(len(layer.tops) for layer in reference.layers))


def test_unit_caffemodel_alone_carries_the_architecture(units_dir):
    reference = read_reference(units_dir / "unit_conv_basic.ref.h5")
    # Caffe stores the input names in the caffemodel but not their shapes.
    conversion = convert(units_dir / "unit_conv_basic.caffemodel", input_shape={"data": (1, 3, 13, 17)}, find_prototxt=False)
    report = verify_free_running(conversion.net, reference, tolerance=1e-5)
    _assert_passes(report, len(reference.layers))


def test_icnet_257x513_isolated(reference_dir):
    reference = read_reference(reference_dir / "icnet_merged_257x513.ref.h5")
    conversion = convert(reference_dir / "icnet_merged_1025x2049.caffemodel",
                         reference_dir / "icnet_merged_257x513.prototxt")
    report = verify_isolated(conversion.net, reference, tolerance=1e-5)
    _assert_passes(report, len(reference.layers))
    # Every layer with parameters is checked against a stored full tensor or the samples, never skipped.
    checked = {c.layer for c in report.comparisons}
    assert {call.layer for _, call in layer_calls(conversion.net)} <= checked


@pytest.mark.parametrize("converted_at", [None, (2, 3, 260, 516)])
def test_icnet_257x513_free_running(reference_dir, converted_at):
    """At its own size, and converted at another size Caffe accepts for this definition (its pyramid pooling fixes
    the conv5_3 map, so 257..260 rows): one converted net runs at the reference's size as real Caffe there."""
    reference = read_reference(reference_dir / "icnet_merged_257x513.ref.h5")
    conversion = convert(reference_dir / "icnet_merged_1025x2049.caffemodel",
                         reference_dir / "icnet_merged_257x513.prototxt", converted_at)
    report = verify_free_running(conversion.net, reference)
    _assert_passes(report, len(reference.layers))
    assert report.argmax_agreement >= 0.9995


@pytest.mark.parametrize("name,prototxt,converted_at", [
    ("icnet_merged_1025x2049", "icnet_cityscapes.prototxt", None),
    ("icnet_bnnomerge_1025x2049", "icnet_cityscapes_bnnomerge.prototxt", (2, 3, 1028, 2052)),
])
def test_icnet_full_resolution_free_running(reference_dir, name, prototxt, converted_at):
    reference = read_reference(reference_dir / f"{name}.ref.h5")
    conversion = convert(reference_dir / f"{name}.caffemodel", reference_dir / prototxt, converted_at)
    report = verify_free_running(conversion.net, reference)
    _assert_passes(report, len(reference.layers))
    assert report.argmax_agreement >= 0.9995


def test_icnet_at_a_size_its_definition_cannot_take_names_the_layer(reference_dir):
    """The official 1025x2049 definition fixes its pyramid's Interp outputs at 33x65, so at 257x513 Caffe's Eltwise
    CHECK fails; the converted net says which layer, in one line."""
    from caffe2torch.errors import InputSizeError

    conversion = convert(reference_dir / "icnet_merged_1025x2049.caffemodel", reference_dir / "icnet_cityscapes.prototxt")
    with pytest.raises(InputSizeError, match=r"^layer 'conv5_3_sum' \(Eltwise\) cannot take bottoms .*"
                                             r"converted for 1x1024x33x65, 1x1024x33x65"):
        conversion.net(torch.zeros(1, 3, 257, 513))
