"""caffe2torch: read Caffe models and rebuild them in PyTorch with Caffe's exact numerics."""

from caffe2torch.errors import CaffeError

__all__ = ["CaffeError", "convert", "load"]


def convert(weights, prototxt=None, input_shape=None, verify_md5: bool = True):
    """Convert a .caffemodel / .caffemodel.h5 (and optional deploy prototxt) into a CaffeNet."""
    from caffe2torch.convert import convert as _convert

    return _convert(weights, prototxt, input_shape, verify_md5).net


def load(folder, map_location="cpu"):
    """Load a folder written by `caffe2torch convert`."""
    from caffe2torch.export import load as _load

    return _load(folder, map_location)
