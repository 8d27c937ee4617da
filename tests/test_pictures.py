"""Pictures for the converter: verify --plot (error per layer in Caffe's order) and inspect --graph (the layer graph)."""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET

import h5py
from click.testing import CliRunner

from caffe2torch.cli import main
from caffe2torch.graphsvg import layout, render_dot, render_svg
from caffe2torch.inspect import describe
from caffe2torch.plot import error_figure
from caffe2torch.verify import Comparison, Report

SVG = "{http://www.w3.org/2000/svg}"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("caffe2torch: error")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_verify_plot_draws_errors_tolerance_and_names_failures(units_dir, tmp_path):
    broken = tmp_path / "unit_conv_basic.caffemodel.h5"
    shutil.copy(units_dir / "unit_conv_basic.caffemodel.h5", broken)
    with h5py.File(broken, "r+") as file:
        file["data/conv_k3_s2/0"][0, 0, 0, 0] += 0.5
    result = run("verify", broken, "--prototxt", units_dir / "unit_conv_basic.prototxt", "--reference",
                 units_dir / "unit_conv_basic.ref.h5", "--plot", tmp_path / "errors.png")
    assert result.exit_code == 1 and f"wrote {tmp_path / 'errors.png'}" in result.output, result.output
    assert (tmp_path / "errors.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = run("verify", units_dir / "unit_conv_basic.caffemodel", "--reference", units_dir / "unit_conv_basic.ref.h5",
              "--plot", tmp_path / "errors.svg")
    assert svg.exit_code == 0 and ET.parse(tmp_path / "errors.svg").getroot().tag == f"{SVG}svg"


def test_the_figure_is_log_scaled_in_caffe_order_with_the_failures_named():
    comparisons = [Comparison("a", "Convolution", "a", 0.0, 0.0, 10, True, True),
                   Comparison("b", "ReLU", "a", 1e-7, 2e-7, 10, True, True),
                   Comparison("c", "Interp", "c", 0.5, 0.3, 10, True, False),
                   Comparison("d", "Eltwise", "d", float("inf"), float("inf"), 0, True, False, "shape")]
    figure = error_figure(Report(comparisons), 1e-5, "title")
    axes = figure.axes[0]
    assert axes.get_yscale() == "log"
    assert [t.get_text() for t in axes.get_xticklabels()] == ["a", "b", "c", "d"]
    assert [t.get_text() for t in axes.texts] == ["c (Interp)", "d (Eltwise)"]  # only the failures, named
    assert any(list(line.get_ydata()) == [1e-5, 1e-5] for line in axes.get_lines())  # the tolerance line
    low, high = axes.get_ylim()
    assert low < 2e-7 / 10 and high > 0.3 * 10  # the exact match below every error, the infinite one above


def test_plot_and_graph_file_names_are_checked_before_the_work(units_dir, tmp_path):
    line = _one_line_error(run("verify", units_dir / "unit_conv_basic.caffemodel", "--reference",
                               units_dir / "unit_conv_basic.ref.h5", "--plot", tmp_path / "errors.jpg"))
    assert "--plot" in line and ".png, .svg, .pdf" in line
    reference = tmp_path / "reference.svg"  # any name: its content says what it is
    shutil.copy(units_dir / "unit_conv_basic.ref.h5", reference)
    line = _one_line_error(run("verify", units_dir / "unit_conv_basic.caffemodel", "--prototxt",
                               units_dir / "unit_conv_basic.prototxt", "--reference", reference, "--plot", reference))
    assert "which this run reads, so --plot may not write it" in line
    line = _one_line_error(run("inspect", units_dir / "unit_conv_basic.caffemodel", "--graph", tmp_path / "g.png"))
    assert "--graph" in line and ".svg" in line and ".dot" in line


def test_inspect_graph_draws_every_layer_with_its_shape(units_dir, tmp_path):
    result = run("inspect", units_dir / "unit_inplace_chain.caffemodel", "--graph", tmp_path / "net.svg")
    assert result.exit_code == 0, result.output
    root = ET.parse(tmp_path / "net.svg").getroot()
    boxes = [g for g in root.iter(f"{SVG}g") if g.find(f"{SVG}title") is not None]
    texts = [[t.text for t in box.iter(f"{SVG}text")] for box in boxes]
    info = describe(units_dir / "unit_inplace_chain.caffemodel")
    titles = "\n".join(box.find(f"{SVG}title").text for box in boxes)
    assert all(layer["name"] in titles for layer in info["layers"])  # every layer, in-place ones in their box
    assert texts[0] == ["data", "Input", "x".join(map(str, info["inputs"]["data"]))]
    conv1 = next(t for t in texts if t[0] == "conv1")
    assert conv1[1] == "Convolution → BN → ReLU" and conv1[2] == "x".join(map(str, info["layers"][0]["top_shapes"][0]))
    dot = run("inspect", units_dir / "unit_inplace_chain.caffemodel", "--graph", tmp_path / "net.dot")
    assert dot.exit_code == 0 and (tmp_path / "net.dot").read_text().startswith('digraph "unit_inplace_chain" {')


def _residual_net(blocks: int) -> dict:
    """describe()'s form of a deep residual net: conv -> BN -> ReLU twice and a sum per block (5 layers each)."""
    layers, last = [], "data"
    for i in range(blocks):
        a, b = f"b{i}_a", f"b{i}_b"
        layers += [{"name": a, "type": "Convolution", "bottoms": [last], "tops": [a], "top_shapes": [[1, 8, 9, 9]]},
                   {"name": f"{a}/bn", "type": "BN", "bottoms": [a], "tops": [a], "top_shapes": [[1, 8, 9, 9]]},
                   {"name": f"{a}/relu", "type": "ReLU", "bottoms": [a], "tops": [a], "top_shapes": [[1, 8, 9, 9]]},
                   {"name": b, "type": "Convolution", "bottoms": [a], "tops": [b], "top_shapes": [[1, 8, 9, 9]]},
                   {"name": f"b{i}", "type": "Eltwise", "bottoms": [last, b], "tops": [f"b{i}"],
                    "top_shapes": [[1, 8, 9, 9]]}]
        last = f"b{i}"
    return {"name": "deep", "inputs": {"data": [1, 8, 9, 9]}, "layers": layers, "parameters": 0}


def test_a_200_layer_net_stays_one_readable_column():
    info = _residual_net(40)
    boxes = layout(info)
    assert len(info["layers"]) == 200 and len(boxes) == 1 + 3 * 40  # BN and ReLU drawn in their conv's box
    assert {box.column for box in boxes} == {0.0}  # the main path straight down, shortcuts behind it
    assert max(box.row for box in boxes) == 3 * 40
    root = ET.fromstring(render_svg(info))
    assert int(root.get("width")) < 400 and int(root.get("height")) < 121 * 100
    assert render_dot(info).count("->") == 40 * 4


def test_icnets_graph_is_100_boxes_in_85_rows_at_most_4_wide():
    from pathlib import Path

    weights = Path(__file__).resolve().parents[1] / "weights"
    for name, layers in (("icnet_cityscapes.prototxt", 156), ("icnet_cityscapes_bnnomerge.prototxt", 219)):
        info = describe(weights / name)
        boxes = layout(info)
        rows: dict[int, int] = {}
        for box in boxes:
            rows[box.row] = rows.get(box.row, 0) + 1
        assert (len(info["layers"]), len(boxes), len(rows), max(rows.values())) == (layers, 100, 85, 4)
