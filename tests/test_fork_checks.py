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

PEAK = """import resource, sys
from caffe2torch.conversion import convert
from caffe2torch.errors import CaffeError
try:
    convert(None, sys.argv[1], memory_limit=sys.argv[2] if len(sys.argv) > 2 else None)
    print("converted")
except CaffeError as error:
    print(error)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


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
