"""Data layers shaped as Caffe's DataLayerSetUp shapes them: a train/test net that states its size needs no
--input-shape, and its labels never become inputs."""
import pytest

from caffe2torch.errors import ShapelessInput
from caffe2torch.graph import build_graph
from caffe2torch.read import parse_prototxt

CONV = ('layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 2 '
        'kernel_size: 3 } }\n'
        'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "conv" bottom: "label" top: "loss" }\n')


def _inputs(data_layer: str) -> dict:
    return build_graph(parse_prototxt(data_layer + CONV)).inputs


@pytest.mark.parametrize("layer, shape", [
    # image_data_layer.cpp: batch_size, is_color, new_height x new_width (the crop wins)
    ('type: "ImageData" top: "data" top: "label" image_data_param { source: "l.txt" batch_size: 8 new_height: 20 '
     'new_width: 30 is_color: false }', (8, 1, 20, 30)),
    ('type: "ImageData" top: "data" top: "label" transform_param { crop_size: 17 } image_data_param { source: "l" '
     'batch_size: 8 new_height: 20 new_width: 30 }', (8, 3, 17, 17)),
    # window_data_layer.cpp: batch_size, crop_size (colour windows)
    ('type: "WindowData" top: "data" top: "label" transform_param { crop_size: 11 } window_data_param { '
     'source: "w" batch_size: 128 }', (128, 3, 11, 11)),
    # memory_data_layer.cpp
    ('type: "MemoryData" top: "data" top: "label" memory_data_param { batch_size: 4 channels: 2 height: 9 '
     'width: 7 }', (4, 2, 9, 7)),
    # data_layer.cpp: the TEST phase's batch_size with its crop
    ('type: "Data" top: "data" top: "label" transform_param { crop_size: 13 } data_param { source: "db" '
     'batch_size: 50 }', (50, 3, 13, 13)),
    # dummy_data_layer.cpp: the shape as given, batch included
    ('type: "DummyData" top: "data" top: "label" dummy_data_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } }',
     (2, 3, 8, 8)),
    # SSD's annotated_data_layer.cpp: its resize_param
    ('type: "AnnotatedData" top: "data" top: "label" transform_param { resize_param { height: 30 width: 40 } } '
     'data_param { source: "db" batch_size: 32 }', (32, 3, 30, 40)),
])
def test_data_layers_take_caffes_shapes(layer, shape):
    inputs = _inputs(f'layer {{ name: "data" {layer} }}\n')
    assert inputs == {"data": shape}  # the label feeds only the loss: dropped, whatever its shape


def test_segmentation_data_labels_and_image_dims():
    # DeepLab / DeconvNet image_seg_data_layer.cpp: label (batch, 1, crop, crop), data_dim (batch, 1, 1, 2).
    text = ('layer { name: "data" type: "ImageSegData" top: "data" top: "label" top: "dim" transform_param { '
            'crop_size: 21 } image_data_param { source: "s" batch_size: 10 } }\n'
            'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 2 '
            'kernel_size: 3 } }\n'
            'layer { name: "sum" type: "Eltwise" bottom: "label" bottom: "label" top: "sum" }\n'
            'layer { name: "flat" type: "Flatten" bottom: "dim" top: "flat" }\n')
    assert build_graph(parse_prototxt(text)).inputs == {"data": (10, 3, 21, 21), "label": (10, 1, 21, 21),
                                                        "dim": (10, 1, 1, 2)}


def test_sizes_only_the_data_knows_still_need_an_input_shape():
    for layer in ('type: "ImageData" top: "data" top: "label" image_data_param { source: "l" batch_size: 8 }',
                  'type: "HDF5Data" top: "data" top: "label" hdf5_data_param { source: "h" batch_size: 8 }',
                  'type: "Data" top: "data" top: "label" data_param { source: "db" batch_size: 8 }'):
        with pytest.raises(ShapelessInput, match=r"input 'data' has no shape .*give one with input_shape="):
            _inputs(f'layer {{ name: "data" {layer} }}\n')


def test_an_assumed_size_keeps_the_batch_of_the_layers_labels():
    """inspect's stand-in size (224x224) for an ImageData layer without one: its batch_size, as its labels have it
    (a layer reading both, e.g. AM-Softmax's margin, must see as many labels as images)."""
    text = ('layer { name: "data" type: "ImageData" top: "data" top: "label" image_data_param { source: "l" '
            'batch_size: 8 } }\n'
            'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 2 } }\n'
            'layer { name: "margin" type: "LabelSpecificAdd" bottom: "fc" bottom: "label" top: "margin" }\n')
    graph = build_graph(parse_prototxt(text), assumed_size=(224, 224))
    assert graph.inputs == {"data": (8, 3, 224, 224), "label": (8,)}


def test_a_v1_image_data_net_states_its_size_through_the_upgraded_crop(tmp_path):
    # V1 nets kept crop_size in image_data_param; Caffe's upgrade moves it to transform_param.
    text = ('name: "v1"\nlayers { name: "data" type: IMAGE_DATA top: "data" top: "label" image_data_param { '
            'source: "l" batch_size: 5 crop_size: 15 } }\n'
            'layers { name: "conv" type: CONVOLUTION bottom: "data" top: "conv" convolution_param { num_output: 2 '
            'kernel_size: 3 } }\n')
    assert build_graph(parse_prototxt(text)).inputs == {"data": (5, 3, 15, 15)}
    from click.testing import CliRunner

    from caffe2torch.cli import main

    path = tmp_path / "train_val.prototxt"
    path.write_text(text)
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "inputs {'data': [5, 3, 15, 15]}" in result.output and "shown for" not in result.output


def test_decouplednet_select_seg_binary_tops():
    # select_seg_binary_layer.cpp: data and its segmentation label at the crop, the class labels (batch, label_dim).
    text = ('layers { name: "data" type: SELECT_SEG_BINARY top: "data" top: "seg" top: "cls" image_data_param { '
            'source: "s" batch_size: 4 new_height: 40 new_width: 40 } transform_param { crop_size: 32 } '
            'window_cls_data_param { label_dim: 20 } }\n'
            'layers { name: "conv" type: CONVOLUTION bottom: "data" top: "conv" convolution_param { num_output: 20 '
            'kernel_size: 32 } }\n'
            'layers { name: "mask" type: ELTWISE bottom: "conv" bottom: "cls" top: "mask" eltwise_param { '
            'operation: PROD } }\n')
    assert build_graph(parse_prototxt(text)).inputs == {"data": (4, 3, 32, 32), "cls": (4, 20, 1, 1)}
