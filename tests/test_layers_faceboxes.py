"""FaceBoxes' PriorBox (sfzhang15/FaceBoxes' prior_box_layer.cpp): densified anchors for min_size 32 and 64 and
boxes of side min_size - 1, against a loop of its Forward_cpu; told from SSD's by the prediction convolutions."""
import math

import numpy as np
import pytest

from caffe2torch.errors import CaffeError
from caffe2torch.graph import build_graph
from caffe2torch.layers import convert_layer
from caffe2torch.read import parse_prototxt
from tests.conftest import layer_from_text, run_layer

F = np.float32


def faceboxes_reference(layer_hw, image_hw, step, offset, min_sizes, max_sizes, variance, clip):
    """Forward_cpu: float centres (w + offset) * step; per min size 32: 4 x 4 anchors 8 apart, 64: 2 x 2 anchors
    16 apart, else one; coordinates (centre + shift -/+ (side - 1) / 2.) / image in double, stored as float."""
    (height, width), (img_h, img_w) = layer_hw, image_hw
    boxes = []
    for h in range(height):
        for w in range(width):
            cx, cy = F(F(w + F(offset)) * F(step)), F(F(h + F(offset)) * F(step))
            for s, low in enumerate(min_sizes):
                grid = {32: (range(-2, 2), 8), 64: (range(-1, 1), 16)}.get(low)
                anchors = [(i, j, grid[1]) for i in grid[0] for j in grid[0]] if grid else [(0, 0, 0)]
                for i, j, spacing in anchors:
                    x, y, half = float(F(cx + F(j * spacing))), float(F(cy + F(i * spacing))), (low - 1) / 2.0
                    boxes += [F((x - half) / img_w), F((y - half) / img_h), F((x + half) / img_w), F((y + half) / img_h)]
                if max_sizes:
                    side = float(F(math.sqrt(low * max_sizes[s])))
                    x, y = float(cx), float(cy)
                    boxes += [F((x - side / 2.0) / img_w), F((y - side / 2.0) / img_h),
                              F((x + side / 2.0) / img_w), F((y + side / 2.0) / img_h)]
    boxes = np.array(boxes, F)
    if clip:
        boxes = np.clip(boxes, 0, 1)
    return np.stack([boxes, np.tile(np.array(variance, F), len(boxes) // 4)])[None]


@pytest.mark.parametrize("min_sizes, max_sizes, clip", [((32, 64, 128), (), False), ((256,), (), True),
                                                         ((64,), (100,), False)])
def test_faceboxes_priors_match_the_fork_loop(min_sizes, max_sizes, clip):
    sizes = " ".join(f"min_size: {s}" for s in min_sizes) + "".join(f" max_size: {s}" for s in max_sizes)
    layer = layer_from_text(f'name: "p" type: "PriorBox" prior_box_param {{ {sizes} clip: {str(clip).lower()} '
                            f'variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 step: 32 offset: 0.5 '
                            f'faceboxes_anchors: true }}')
    feature, image = np.zeros((1, 8, 3, 5), F), np.zeros((1, 3, 96, 160), F)
    converted, got = run_layer(layer, [feature.shape, image.shape], [], feature, image)
    want = faceboxes_reference((3, 5), (96, 160), 32, 0.5, min_sizes, max_sizes, (0.1, 0.1, 0.2, 0.2), clip)
    assert converted.top_shapes == [want.shape]
    np.testing.assert_array_equal(got, want)


def test_the_forks_21_prior_buffer_is_checked():
    layer = layer_from_text('name: "p" type: "PriorBox" prior_box_param { min_size: 32 min_size: 32 min_size: 64 '
                            'faceboxes_anchors: true img_size: 64 }')
    with pytest.raises(CaffeError, match="allocates 21 priors a cell for 3 min_size values and would write 36"):
        convert_layer(layer, [(1, 4, 2, 2)], [])


NET = """input: "data" input_shape { dim: 1 dim: 3 dim: 64 dim: 96 }
layer { name: "a" type: "Convolution" bottom: "data" top: "a" convolution_param { num_output: 4 kernel_size: 3 stride: 32 pad: 1 } }
layer { name: "a_loc" type: "Convolution" bottom: "a" top: "a_loc" convolution_param { num_output: 84 kernel_size: 1 } }
layer { name: "a_conf" type: "Convolution" bottom: "a" top: "a_conf" convolution_param { num_output: 42 kernel_size: 1 } }
layer { name: "a_prior" type: "PriorBox" bottom: "a" bottom: "data" top: "a_prior"
  prior_box_param { min_size: 32 min_size: 64 min_size: 128 variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2
                    step: 32 offset: 0.5 } }
layer { name: "b" type: "Convolution" bottom: "a" top: "b" convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "b_loc" type: "Convolution" bottom: "b" top: "b_loc" convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "b_conf" type: "Convolution" bottom: "b" top: "b_conf" convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "b_prior" type: "PriorBox" bottom: "b" bottom: "data" top: "b_prior"
  prior_box_param { min_size: 256 variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 step: 32 offset: 0.5 } }
"""


def test_a_faceboxes_net_is_told_from_ssd_by_its_prediction_convolutions():
    graph = build_graph(parse_prototxt(NET + 'layer { name: "out" type: "DetectionOutput" bottom: "a_loc" '
                                             'bottom: "a_conf" bottom: "a_prior" top: "out" detection_output_param '
                                             '{ num_classes: 2 } }\n'))
    flags = {layer.name: layer.param.prior_box_param.faceboxes_anchors for layer in graph.layers
             if layer.type == "PriorBox"}
    assert flags == {"a_prior": True, "b_prior": True}  # every PriorBox of the net: one fork built it
    assert any("FaceBoxes' anchors" in note for note in graph.notes)
    ssd = NET.replace("num_output: 84", "num_output: 12").replace("num_output: 42", "num_output: 6")
    graph = build_graph(parse_prototxt(ssd + 'layer { name: "out" type: "DetectionOutput" bottom: "a_loc" '
                                             'bottom: "a_conf" bottom: "a_prior" top: "out" detection_output_param '
                                             '{ num_classes: 2 } }\n'))
    assert not any(layer.param.prior_box_param.faceboxes_anchors for layer in graph.layers if layer.type == "PriorBox")
