"""The shapes Caffe gives a data layer's tops, from its parameters alone (a train/test net's inputs).

Each follows the layer's DataLayerSetUp (BVLC's data_layer.cpp, image_data_layer.cpp, window_data_layer.cpp,
memory_data_layer.cpp, dummy_data_layer.cpp; DeepLab's image_seg_data_layer.cpp; SSD's annotated_data_layer.cpp):
the batch is the layer's batch_size (DecoupledNet's select_seg_binary_layer.cpp too); the image's size is the crop (transform_param's crop_size, or the crop_height /
crop_width and crop_h / crop_w of forks), else what the layer resizes to (ImageData's new_height / new_width, SSD's
resize_param); labels are (batch,) or, for segmentation data, (batch, 1, H, W). What comes from the data itself (a
database record's or the first image's size, an HDF5 file's shapes, a window file's channels) is unknown here: the
tops get () and the caller asks for --input-shape, except the channels of a colour image database, taken as 3.
"""

from __future__ import annotations

from proto import caffe_pb2

Shape = tuple[int, ...]


def _crop(transform: caffe_pb2.TransformationParameter) -> tuple[int, int]:
    height = transform.crop_height or transform.crop_h or transform.crop_size
    width = transform.crop_width or transform.crop_w or transform.crop_size
    return (int(height), int(width)) if height and width else (0, 0)


def _image(batch: int, channels: int, size: tuple[int, int]) -> Shape:
    return (batch, channels) + size if all(size) else ()


def data_layer_shapes(param: caffe_pb2.LayerParameter) -> list[Shape]:
    """The shapes of the layer's tops as Caffe sets them up, () where the data alone would say."""
    kind, tops = param.type, len(param.top)
    crop = _crop(param.transform_param)
    if kind == "MemoryData":
        memory = param.memory_data_param
        batch = int(memory.batch_size)
        return [(batch, int(memory.channels), int(memory.height), int(memory.width)), (batch,)][:tops]
    if kind == "DummyData":
        dummy = param.dummy_data_param
        if dummy.shape:
            shapes = [tuple(int(d) for d in shape.dim) for shape in dummy.shape]
        else:  # legacy num / channels / height / width, one each per top
            shapes = [tuple(int(d) for d in dims) for dims in zip(dummy.num, dummy.channels, dummy.height,
                                                                    dummy.width)]
        # One shape serves every top (dummy_data_layer.cpp's "shape_size == 1" case).
        return (shapes * tops if len(shapes) == 1 else shapes + [()] * tops)[:tops]
    if kind in ("ImageData", "ImageSegData", "SelectSegBinary"):
        image = param.image_data_param
        batch, channels = int(image.batch_size), 3 if image.is_color else 1
        size = crop if all(crop) else (int(image.new_height), int(image.new_width))
        data = _image(batch, channels, size)
        if kind == "ImageData":
            return [data, (batch,)][:tops]
        label = (batch, 1) + size if all(size) else ()
        # DecoupledNet's select_seg_binary_layer.cpp: its third top holds the image's class labels.
        third = (batch, int(param.window_cls_data_param.label_dim), 1, 1) if kind == "SelectSegBinary" else \
            (batch, 1, 1, 2)
        return [data, label, third][:tops]
    if kind == "AnnotatedData":  # its label top's size depends on the boxes of each batch
        resize = param.transform_param.resize_param
        size = (int(resize.height), int(resize.width)) if resize.height and resize.width else crop
        return [_image(int(param.data_param.batch_size) or 1, 3, size)] + [()] * (tops - 1)
    batches = {"Data": param.data_param.batch_size, "WindowData": param.window_data_param.batch_size}
    if kind in batches:
        batch = int(batches[kind]) or 1
        return [_image(batch, 3, crop), (batch,)][:tops] + [()] * (tops - 2)
    if kind == "HDF5Data":
        return [()] * tops
    return [_image(1, 3, crop)] + [()] * (tops - 1)
