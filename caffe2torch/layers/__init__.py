"""Layer converters, one module per family; importing this package registers them all."""

from caffe2torch.layers.registry import (CONVERTERS, Converted, Shape, convert_layer, converter, register_converter,
                                         supported_types)

# Each family module registers its converters on import.
from caffe2torch.layers import (  # noqa: F401,E402
    activation,
    cascade,
    convolution,
    detection,
    elementwise,
    forks,
    interp,
    lookup,
    normalization,
    pooling,
    rcnn,
    recurrent,
    reduction,
    shape,
    vendor,
    text,
    yolo,
)

__all__ = ["CONVERTERS", "Converted", "Shape", "convert_layer", "converter", "register_converter", "supported_types"]
