"""caffe2torch: read Caffe models and rebuild them as native PyTorch models with Caffe's exact numerics."""

from caffe2torch.errors import CaffeError

__all__ = ["CaffeError", "Converted", "blobs", "convert", "freeze_batchnorm", "load", "net_info", "register_converter",
           "save"]


def convert(weights=None, prototxt=None, input_shape=None, verify_md5: bool = True,
            allow_unknown_fields: bool = False):
    """Convert a .caffemodel / .caffemodel.h5 (and optional deploy prototxt) into a torch.fx.GraphModule.

    A field the schema does not know that may change a kept layer's forward is a CaffeError, unless
    `allow_unknown_fields`; what is skipped is reported through Python's `warnings`, and a CaffeError carries the
    warnings gathered before it in its `warnings` attribute.
    """
    import warnings

    from caffe2torch.conversion import convert as _convert

    return _convert(weights, prototxt, input_shape, verify_md5, on_warning=lambda message: warnings.warn(
        message, stacklevel=3), allow_unknown_fields=allow_unknown_fields).net


def load(folder, map_location="cpu"):
    """Load a folder written by `caffe2torch convert` (or `save`)."""
    from caffe2torch.folder import load as _load

    return _load(folder, map_location)


def save(net, folder, force: bool = False):
    """Write a converted (possibly fine-tuned) net as a folder: definition, state_dict, standalone model.py."""
    from caffe2torch.folder import save_net

    return save_net(net, folder, force=force)


def blobs(net, *inputs, **named_inputs):
    """Every blob of a converted net by its Caffe name, after one forward on the inputs."""
    from caffe2torch.model import blobs as _blobs

    return _blobs(net, *inputs, **named_inputs)


def net_info(net):
    """The Caffe facts of a converted net: input and output blob names, blob shapes, definition."""
    from caffe2torch.model import net_info as _net_info

    return _net_info(net)


def freeze_batchnorm(net):
    """Keep every BatchNorm of `net` on its stored statistics, also after `net.train()` (for fine-tuning)."""
    from caffe2torch.passes import freeze_batchnorm as _freeze

    return _freeze(net)


def register_converter(type_name: str, *, replace: bool = False):
    """Decorator: the converter of a Caffe type the built-ins lack (see caffe2torch.layers.registry)."""
    from caffe2torch.layers.registry import register_converter as _register

    return _register(type_name, replace=replace)


def __getattr__(name: str):
    if name == "Converted":  # what a converter returns, for plugins
        from caffe2torch.layers.registry import Converted

        return Converted
    raise AttributeError(f"module 'caffe2torch' has no attribute {name!r}")
