"""AutoCrop (HED / RCF forks): offsets from the net's coordinate maps, as auto_crop_layer.cpp and coords.hpp compute."""

from __future__ import annotations

import pytest
import torch

from caffe2torch.errors import CaffeError
from tests.conftest import random_net

RCF_LIKE = """name: "edges"
input: "data" input_shape { dim: 1 dim: 3 dim: 20 dim: 22 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2" convolution_param { num_output: 4 kernel_size: 3 pad: 2 dilation: 2 } }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2" pooling_param { pool: MAX kernel_size: 2 stride: 1 } }
layer { name: "score2" type: "Convolution" bottom: "conv2" top: "score2" convolution_param { num_output: 1 kernel_size: 1 } }
layer { name: "up2" type: "Deconvolution" bottom: "score2" top: "up2" convolution_param { num_output: 1 kernel_size: 4 stride: 2 } }
layer { name: "crop2" type: "AutoCrop" bottom: "up2" bottom: "data" top: "edge2" }
layer { name: "score3" type: "Convolution" bottom: "pool2" top: "score3" convolution_param { num_output: 1 kernel_size: 1 } }
layer { name: "up3" type: "Deconvolution" bottom: "score3" top: "up3" convolution_param { num_output: 1 kernel_size: 8 stride: 2 } }
layer { name: "crop3" type: "AutoCrop" bottom: "up3" bottom: "edge2" top: "edge3" }
"""


def test_auto_crop_offsets_follow_the_coordinate_maps(tmp_path):
    net = random_net(tmp_path, RCF_LIKE, std=0.5)
    # up2 -> data: deconv FilterMap(4, 2, 0) = (2, 1.5), 1x1 conv and the dilated conv (extent 5, pad 2) the identity,
    # pool1 FilterMap(2, 2, 0).inv() = (1/2, -1/4), conv1 the identity: (1, 1), so crop 1.
    # up3 -> edge2 -> (crop2: (1, -1)) -> up2 ... meet at conv2: up3 adds pool2 (1, -1/2) and kernel 8: (2, 3.5)
    # -> (2, 2.5) on conv2; edge2 is (1, -1) o (2, 1.5) = (2, 0.5) there; crop = 0.5 - 2.5 = -2, so 2.
    assert net.crop2.offsets == (1, 1) and net.crop3.offsets == (2, 2)
    x = torch.randn(1, 3, 20, 22)
    blobs = __import__("caffe2torch").blobs(net, x)
    assert torch.equal(blobs["edge2"], blobs["up2"][:, :, 1:21, 1:23])
    assert torch.equal(blobs["edge3"], blobs["up3"][:, :, 2:22, 2:24])


OTHER_INPUT = 'input: "other" input_shape { dim: 1 dim: 3 dim: 20 dim: 22 }\n'
RESHAPED = ('layer { name: "score2" type: "InnerProduct" bottom: "conv2" top: "score2" inner_product_param { '
            'num_output: 100 } }\nlayer { name: "shape2" type: "Reshape" bottom: "score2" top: "score2r" '
            'reshape_param { shape { dim: 1 dim: 1 dim: 10 dim: 10 } } }\n')


@pytest.mark.parametrize("edits, match", [
    ([('bottom: "up2" bottom: "data"', 'bottom: "up2" bottom: "other"'), ('layer {', OTHER_INPUT + 'layer {', 1)],
     "cannot align apparently disconnected blobs 'up2' and 'other'"),
    ([('kernel_size: 4 stride: 2', 'kernel_size: 4 stride: 4')], "the two bottoms differ in scale along H \\(1/2\\)"),
    ([('layer { name: "score2" type: "Convolution" bottom: "conv2" top: "score2" convolution_param { num_output: 1 '
       'kernel_size: 1 } }\n', RESHAPED), ('bottom: "score2" top: "up2"', 'bottom: "score2r" top: "up2"')],
     "the path to 'data' passes layer 'shape2' \\(Reshape\\), which has no coordinate map in the fork"),
])
def test_auto_crop_says_why_it_cannot_align(tmp_path, edits, match):
    text = RCF_LIKE
    for old, new, *count in edits:
        assert old in text
        text = text.replace(old, new, *count)
    with pytest.raises(CaffeError, match=f"layer 'crop2' \\(AutoCrop\\): {match}"):
        random_net(tmp_path, text, std=0.5)


def test_the_walk_follows_the_forks_maps_for_crop_and_in_place_layers(tmp_path):
    """The fork's Crop maps by its N and C offsets (the identity for an axis-2 crop); in-place layers are never
    crossed (each blob's first producer), but a BatchNorm writing a new blob has no map there."""
    from fractions import Fraction

    from caffe2torch.coords import IDENTITY, coord_map
    from tests.conftest import layer_from_text

    assert coord_map(layer_from_text('name: "c" type: "Crop" crop_param { axis: 2 offset: 3 }'), {}) == IDENTITY
    assert coord_map(layer_from_text('name: "c" type: "Crop" crop_param { axis: 0 offset: 0 offset: 2 offset: 5 '
                                     'offset: 7 }'), {}) == ((1, 0), (1, Fraction(-2)))
    text = RCF_LIKE.replace('layer { name: "relu1"', 'layer { name: "bn1" type: "BatchNorm" bottom: "conv1" '
                            'top: "conv1" }\nlayer { name: "relu1"')
    assert random_net(tmp_path, text, std=0.5).crop2.offsets == (1, 1)  # in place: not on the walk
    text = (text.replace('bottom: "conv1" top: "conv1" }\nlayer { name: "relu1" type: "ReLU" bottom: "conv1" '
                         'top: "conv1"', 'bottom: "conv1" top: "bn1" }\nlayer { name: "relu1" type: "ReLU" '
                         'bottom: "bn1" top: "conv1b"').replace('bottom: "conv1" top: "pool1"', 'bottom: "conv1b" top: "pool1"'))
    with pytest.raises(CaffeError, match="layer 'crop2' \\(AutoCrop\\): the path to 'data' passes layer 'bn1' "
                                         "\\(BatchNorm\\), which has no coordinate map in the fork"):
        random_net(tmp_path, text, std=0.5)
