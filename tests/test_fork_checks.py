"""The forks' CHECKs as one-line CaffeErrors, written so NaN fails them as it fails the C++ comparison;
infinities and data the forks would misread (an ROI's batch index -1) refused; tables sized by a file's
numbers checked against the memory limit before they are built."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from caffe2torch.errors import CaffeError
from caffe2torch.layers import convert_layer
from tests.conftest import layer_from_text

F = np.float32
ROOT = Path(__file__).resolve().parents[1]


def _refused(layer_text: str, shapes, match: str) -> None:
    layer = layer_from_text(layer_text)
    with pytest.raises(CaffeError, match=match) as caught:
        convert_layer(layer, shapes, [])
    assert "\n" not in str(caught.value) and f"'{layer.name}' ({layer.type})" in str(caught.value)


# ---------------------------------------------------------------- SSD


@pytest.mark.parametrize("param, message", [
    ("min_size: nan", "min_size nan must be positive"),
    ("min_size: -4", "min_size -4 must be positive"),
    ("min_size: inf", "min_size inf must be positive"),
    ("min_size: 3e9", "min_size 3e[+]09 must be positive"),
    ("min_size: 30 max_size: nan", "max_size nan must be greater than min_size 30"),
    ("min_size: 30 max_size: inf", "min_size 30 x max_size inf overflows"),
    ("min_size: 60000 max_size: 60000.5", "overflows the fork's int product"),
    ("min_size: 30 aspect_ratio: nan", "aspect_ratio nan must be a positive number"),
    ("min_size: 30 aspect_ratio: inf", "aspect_ratio inf must be a positive number"),
    ("min_size: 30 aspect_ratio: 0", "aspect_ratio 0 must be a positive number"),
    ("min_size: 30 step: nan", "step should be larger than 0, got nan"),
    ("min_size: 30 step: -8", "step should be larger than 0, got -8"),
    ("min_size: 30 step: inf", "step should be larger than 0, got inf"),
    ("min_size: 30 step_h: 8 step_w: nan", "step_w should be larger than 0, got nan"),
    ("min_size: 30 img_h: 0 img_w: 30", "img_h should be larger than 0, got 0"),
    ("min_size: 30 img_size: 4294967295", "img_size 4294967295 is negative as the fork's int"),
    ("min_size: 30 variance: nan", "variance nan must be a positive number"),
    ("min_size: 30 variance: 0.1 variance: 0.1 variance: inf variance: 0.2", "variance inf must be a positive"),
    ("min_size: 30 variance: 0", "variance 0 must be a positive number"),
    ("min_size: 30 offset: nan", "offset nan must be a finite number"),
])
def test_prior_box_checks_fail_for_nan_and_infinity(param, message):
    _refused(f'name: "pb" type: "PriorBox" prior_box_param {{ {param} }}', [(1, 8, 4, 4), (1, 3, 32, 32)], message)


def test_prior_box_limits_keep_valid_sizes():
    # The largest sizes the fork computes without overflowing its ints still convert.
    layer = layer_from_text('name: "pb" type: "PriorBox" prior_box_param { min_size: 40000 max_size: 50000 step: 8 }')
    converted = convert_layer(layer, [(1, 8, 2, 2), (1, 3, 16, 16)], [])
    assert converted.top_shapes == [(1, 2, 2 * 2 * 2 * 4)]


@pytest.mark.parametrize("param, message", [
    ("num_classes: 2 nms_param { nms_threshold: nan }", "nms_threshold must be non negative, got nan"),
    ("num_classes: 2 nms_param { nms_threshold: -0.1 }", "nms_threshold must be non negative, got -0.1"),
    ("num_classes: 2 nms_param { eta: nan }", r"eta nan must be in \(0, 1\]"),
    ("num_classes: 2 nms_param { eta: 1.5 }", r"eta 1.5 must be in \(0, 1\]"),
])
def test_detection_output_checks_fail_for_nan(param, message):
    _refused(f'name: "det" type: "DetectionOutput" detection_output_param {{ {param} }}',
             [(1, 16), (1, 8), (1, 2, 16)], message)


PRIOR_BOX_3000 = """input: "data" input_shape { dim: 1 dim: 1 dim: 3000 dim: 3000 }
layer { name: "prior" type: "PriorBox" bottom: "data" top: "prior"
  prior_box_param { min_size: 30 max_size: 60 aspect_ratio: 2 aspect_ratio: 3 flip: true img_size: 300 } }
"""

# The child's own peak: VmHWM starts anew with exec (ru_maxrss would keep the forking test process's).
PEAK = """import sys
from caffe2torch.conversion import convert
from caffe2torch.errors import CaffeError
try:
    convert(None, sys.argv[1], memory_limit=sys.argv[2] if len(sys.argv) > 2 else None)
    print("converted")
except CaffeError as error:
    print(error)
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak memory from /proc")
def test_a_prior_box_table_beyond_the_limit_is_refused_before_it_is_built(tmp_path):
    """3000 x 3000 cells x 6 priors: a 1.7 GB table (the fork's top), refused under a 1 GB limit while the
    process stays far below it; the limit given to convert() counts, not only the environment's."""
    path = tmp_path / "prior.prototxt"
    path.write_text(PRIOR_BOX_3000)
    assert len(PRIOR_BOX_3000) < 250
    env = dict(os.environ, PYTHONPATH=str(ROOT), CAFFE2TORCH_MAX_MEMORY="100G")
    result = subprocess.run([sys.executable, "-c", PEAK, str(path), "1G"], capture_output=True, text=True, env=env,
                            timeout=120)
    message, peak_kib = result.stdout.strip().splitlines()
    assert message.startswith("layer 'prior' (PriorBox) (top 1x2x216000000) needs 1.6 GiB, more than the memory "
                              "limit of 1.0 GiB"), result.stdout + result.stderr
    assert int(peak_kib) < 700 * 1024  # torch and the reader take ~400 MB; the table alone would add 1.7 GB


# ---------------------------------------------------------------- R-CNN


def _roi_layers():
    return [layer_from_text('name: "roi_pool5" type: "ROIPooling" roi_pooling_param { pooled_h: 2 pooled_w: 2 '
                            'spatial_scale: 0.5 }'),
            layer_from_text('name: "psroi" type: "PSROIPooling" psroi_pooling_param { spatial_scale: 0.5 output_dim: 2 '
                            'group_size: 2 }')]


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("roi, message", [
    ([-1, 0, 0, 4, 4], "region 1 has batch index -1; it must be in \\[0, 2\\)"),  # not image N - 1
    ([2, 0, 0, 4, 4], "region 1 has batch index 2; it must be in \\[0, 2\\)"),
    ([np.nan, 0, 0, 4, 4], "region 1 has batch index nan"),
    ([1e20, 0, 0, 4, 4], "region 1 has batch index 1e[+]20"),
    ([0, 0, np.nan, 4, 4], "region 1's corners scaled to .* must be finite and within"),
    ([0, 0, 0, np.inf, 4], "region 1's corners scaled to .* must be finite and within"),
    ([0, 0, 0, 4e12, 4], "region 1's corners scaled to .* must be finite and within"),
])
def test_roi_poolings_refuse_regions_the_forks_misread(index, roi, message):
    layer = _roi_layers()[index]
    features = np.ones((2, 8, 6, 6), F)
    rois = np.array([[1, 0, 0, 4, 4], roi], F)
    module = convert_layer(layer, [features.shape, rois.shape], []).module
    import torch

    with pytest.raises(CaffeError, match=f"layer '{layer.name}' \\({layer.type}\\): {message}"):
        module(torch.from_numpy(features), torch.from_numpy(rois))
    # A batch index is truncated as C's (int) does: -0.5 and 1.9 are images 0 and 1.
    rois = np.array([[-0.5, 0, 0, 4, 4], [1.9, 0, 0, 4, 4]], F)
    features[1] = 5
    out = module(torch.from_numpy(features), torch.from_numpy(rois))
    assert out[0].max() == 1 and out[1].min() == 5


@pytest.mark.parametrize("text", ['name: "r" type: "ROIPooling" roi_pooling_param { pooled_h: 2 pooled_w: 2 '
                                  'spatial_scale: nan }',
                                  'name: "r" type: "PSROIPooling" psroi_pooling_param { spatial_scale: inf '
                                  'output_dim: 2 group_size: 2 }'])
def test_roi_poolings_refuse_a_scale_that_is_no_number(text):
    _refused(text, [(1, 8, 6, 6), (3, 5)], "spatial_scale (nan|inf) must be a finite number")


def test_a_standalone_model_py_raises_its_own_caffe_error(tmp_path):
    """model.py embeds CaffeError for the modules that raise it on data."""
    import torch

    from caffe2torch.folder import save_net
    from tests.conftest import load_standalone, random_net

    net = random_net(tmp_path, 'input: "data" input_shape { dim: 1 dim: 2 dim: 6 dim: 6 }\n'
                               'input: "rois" input_shape { dim: 3 dim: 5 }\n'
                               'layer { name: "pool" type: "ROIPooling" bottom: "data" bottom: "rois" top: "pool" '
                               'roi_pooling_param { pooled_h: 2 pooled_w: 2 spatial_scale: 1 } }\n', std=1.0)
    save_net(net, tmp_path / "out")
    standalone = load_standalone(tmp_path / "out")
    rois = torch.tensor([[0.0, 0, 0, 3, 3], [-1, 0, 0, 3, 3], [0, 1, 1, 2, 2]])
    for model in (net, standalone):
        with pytest.raises(Exception, match=r"layer 'pool' \(ROIPooling\): region 1 has batch index -1") as caught:
            model(torch.zeros(1, 2, 6, 6), rois)
        assert type(caught.value).__name__ == "CaffeError"


def _proposal(param_str: str, top: int = 1, shapes=((1, 18, 4, 5), (1, 36, 4, 5), (1, 3))):
    from proto import caffe_pb2

    layer = caffe_pb2.LayerParameter(name="proposal", type="Python", top=["rois", "scores"][:top])
    layer.python_param.module, layer.python_param.layer = "rpn.proposal_layer", "ProposalLayer"
    layer.python_param.param_str = param_str
    return layer, [tuple(shape) for shape in shapes]


@pytest.mark.parametrize("param_str, message", [
    ("'feat_stride': 'sixteen'", "param_str's 'feat_stride' must be a number, got 'sixteen'"),
    ("'feat_stride': [16]", "param_str's 'feat_stride' must be a number, got \\[16\\]"),
    ("'feat_stride': True", "param_str's 'feat_stride' must be a number, got True"),
    ("'feat_stride': None", "param_str's 'feat_stride' must be a number, got None"),
    ("'feat_stride': 0", "param_str's 'feat_stride' must be a positive finite number, got 0"),
    ("'feat_stride': -16", "param_str's 'feat_stride' must be a positive finite number, got -16"),
    ("'feat_stride': 1e999", "param_str's 'feat_stride' must be a positive finite number, got inf"),
    ("{'feat_stride': 16, 'scales': 8}", "param_str's 'scales' must be a non-empty list of numbers, got 8"),
    ("{'feat_stride': 16, 'scales': ['8', 16]}", "param_str's 'scales' must be a number, got '8'"),
    ("{'feat_stride': 16, 'ratios': []}", "param_str's 'ratios' must be a non-empty list of numbers, got \\[\\]"),
    ("{'feat_stride': 16, 'ratios': [0.5, -1]}", "param_str's 'ratios' must be a positive finite number, got -1"),
])
def test_proposal_param_str_values_that_are_no_numbers_are_one_line(param_str, message):
    layer, shapes = _proposal(param_str)
    with pytest.raises(CaffeError, match=r"layer 'proposal' \(Python\): " + message) as caught:
        convert_layer(layer, shapes, [])
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("shapes, message", [
    (((2, 18, 4, 5), (2, 36, 4, 5), (2, 3)), "bottom 0 has a batch of 2: the layer takes single-image batches"),
    (((1, 18, 4, 5), (1, 36, 4, 5), (1, 2)), r"bottom 2 \(im_info\) has shape \(1, 2\): expected \[1, 3\]"),
])
def test_proposal_checks_its_bottoms(shapes, message):
    layer, shapes = _proposal("'feat_stride': 16", shapes=shapes)
    with pytest.raises(CaffeError, match=message):
        convert_layer(layer, shapes, [])


@pytest.mark.parametrize("info", [[np.nan, 80, 1], [64, -80, 1], [64, 80, 0], [64, 80, np.inf]])
def test_proposal_refuses_an_im_info_that_is_no_image_size(info):
    import torch

    layer, shapes = _proposal("'feat_stride': 16")
    module = convert_layer(layer, shapes, []).module
    with pytest.raises(CaffeError, match=r"layer 'proposal' \(Python\): im_info \(height, width, scale\) must be "
                                         r"positive finite numbers"):
        module(torch.rand(1, 18, 4, 5), torch.zeros(1, 36, 4, 5), torch.tensor([info], dtype=torch.float32))
    with pytest.raises(CaffeError, match="takes single-image batches, got 2 images"):
        module(torch.rand(2, 18, 4, 5), torch.zeros(2, 36, 4, 5), torch.tensor([[64.0, 80, 1]] * 2))



# ---------------------------------------------------------------- activations, SegNet's Upsample, YOLO


@pytest.mark.parametrize("text", ['name: "r" type: "ReLU6" relu6_param { negative_slope: nan }',
                                  'name: "r" type: "ReLU6" relu_param { negative_slope: inf }',
                                  'name: "r" type: "ReLU" relu_param { negative_slope: nan }',
                                  'name: "r" type: "ReLU" relu_param { negative_slope: -inf relu6: true }'])
def test_a_relu_slope_that_is_no_number_is_refused(text):
    # Caffe's max(x, 0) + slope * min(x, 0) is NaN for every x >= 0 then; torch's leaky ReLU would pass x.
    _refused(text, [(1, 2, 3, 3)], "negative_slope -?(nan|inf) must be a finite number")


def test_synopsys_relu_ignores_a_nan_minimum_as_std_max_does():
    import torch

    layer = layer_from_text('name: "r" type: "ReLU" relu_param { relu6: true minimum: nan }')
    x = torch.tensor([-3.0, 0.5, 4.0, 9.0, float("nan")])
    out = convert_layer(layer, [tuple(x.shape)], []).module(x)
    assert out.tolist() == [0.0, 0.5, 4.0, 6.0, 0.0]  # std::max(y, NaN) is y; the fork makes a NaN output 0


def test_upsample_refuses_a_mask_index_past_its_output_as_the_fork_stops(tmp_path):
    import torch

    from caffe2torch.conversion import convert

    net_text = ('input: "data" input_shape { dim: 1 dim: 1 dim: 8 dim: 8 }\n'
                'layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" top: "mask" '
                'pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n'
                'layer { name: "up" type: "Upsample" bottom: "pool" bottom: "mask" top: "up" '
                'upsample_param { upsample_h: 4 upsample_w: 4 } }\n')
    path = tmp_path / "upsample.prototxt"
    path.write_text(net_text)
    net = convert(None, path).net  # shapes agree: the fork sets up too, and stops at the first forward
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 7, 7] = 1.0  # its window's maximum sits at index 63 of the 8 x 8 input, past the 4 x 4 output
    with pytest.raises(CaffeError, match=r"layer 'up' \(Upsample\): mask index 63 is outside the 4 x 4 output"):
        net(x)


def test_yolov3_refuses_a_zero_anchors_scale():
    _refused('name: "y" type: "Yolov3DetectionOutput" yolov3_detection_output_param { num_classes: 1 num_box: 1 '
             'mask_group_num: 1 mask: 0 biases: 10 biases: 14 anchors_scale: 0 }', [(1, 6, 4, 4)],
             r"anchors_scale \[0\] must be at least 1")


# ---------------------------------------------------------------- sizes from the file's numbers


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_a_kernel_past_the_input_pools_what_caffe_pools_without_padding_to_it(method):
    """Caffe takes a kernel longer than the input when the stride is longer still (one window, cut at the
    input): the whole map here, where padding out to 99999 x 99999 would need 300 GB."""
    import torch

    layer = layer_from_text(f'name: "p" type: "Pooling" pooling_param {{ pool: {method} kernel_size: 99999 '
                            f'stride: 2147483647 }}')
    x = np.random.default_rng(3).normal(0, 1, (1, 2, 8, 8)).astype(F)
    converted = convert_layer(layer, [x.shape], [])
    assert converted.top_shapes == [(1, 2, 1, 1)]
    out = converted.module(torch.from_numpy(x)).numpy()
    # pooling_layer.cpp: the window [0, min(99999, 8)) on both axes; AVE divides by that window's size
    expected = x.max((2, 3)) if method == "MAX" else x.astype(np.float64).sum((2, 3)).astype(F) / F(64)
    np.testing.assert_allclose(out[:, :, 0, 0], expected, rtol=0, atol=1e-6 if method == "AVE" else 0)


@pytest.mark.parametrize("field", ["stride: 4294967295", "kernel_size: 2147483648", "pad: 4294967295 kernel_size: 3",
                                   "stride_h: 1 stride_w: 3000000000 kernel_size: 3"])
def test_pooling_values_past_caffes_int_are_refused(field):
    text = f'name: "p" type: "Pooling" pooling_param {{ pool: MAX {field} }}'
    if "kernel_size" not in field:
        text = text.replace("MAX", "MAX kernel_size: 3")
    _refused(text, [(1, 2, 8, 8)], "does not fit the 32-bit int Caffe keeps it in")


@pytest.mark.parametrize("kind, field, param, shape", [
    ("YoloDetectionOutput", "yolo_detection_output_param", "num_classes: 1 num_box: 2 confidence_threshold: 0.1 "
     "biases: 1 biases: 2 biases: 3 biases: 4", (1, 12, 4, 4)),
    ("Yolov3DetectionOutput", "yolov3_detection_output_param", "num_classes: 1 num_box: 1 mask_group_num: 1 mask: 0 "
     "anchors_scale: 8 confidence_threshold: 0.1 biases: 10 biases: 14", (1, 6, 4, 4))])
def test_yolo_outputs_never_read_an_odd_last_bias(kind, field, param, shape):
    import torch

    x = torch.from_numpy(np.random.default_rng(4).normal(0, 2, shape).astype(F))
    outputs = []
    for extra in ("", " biases: 7"):  # the fork reads biases[2m] and biases[2m + 1] only
        layer = layer_from_text(f'name: "y" type: "{kind}" {field} {{ {param}{extra} }}')
        outputs.append(convert_layer(layer, [shape], []).module(x))
    assert outputs[0].shape[2] > 1 and torch.equal(outputs[0], outputs[1])
