"""caffe2torch: read Caffe models and rebuild them as native PyTorch models with Caffe's exact numerics."""

from caffe2torch.errors import CaffeError, InputSizeError

__all__ = ["CaffeError", "Converted", "InputSizeError", "blobs", "convert", "dynamic_shapes", "freeze_batchnorm", "load",
           "net_info", "register_converter", "save", "unfreeze_batchnorm", "with_outputs"]


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


def with_outputs(net, blobs):
    """A net over the same modules (and parameters) returning the named blobs as a tuple, e.g. ICNet's cascade
    outputs for its auxiliary losses (see caffe2torch.outputs)."""
    from caffe2torch.outputs import with_outputs as _with_outputs

    return _with_outputs(net, blobs)


def net_info(net):
    """The Caffe facts of a converted net: input and output blob names, blob shapes, definition."""
    from caffe2torch.model import net_info as _net_info

    return _net_info(net)


def freeze_batchnorm(net, affine: bool = True):
    """Keep every BatchNorm of `net` on its stored statistics, also after `net.train()` (fine-tuning with small
    batches); `affine=True` also fixes its weight and bias (gamma, beta), `affine=False` lets them learn. In place;
    returns `net`. `save` records it, `load` restores it (see caffe2torch.freeze)."""
    from caffe2torch.freeze import freeze_batchnorm as _freeze

    return _freeze(net, affine)


def unfreeze_batchnorm(net):
    """Let every BatchNorm of `net` train fully (batch statistics, weight and bias), also those the definition
    froze (`frozen: true`, `use_global_stats: true`). In place; returns `net`."""
    from caffe2torch.freeze import unfreeze_batchnorm as _unfreeze

    return _unfreeze(net)


def dynamic_shapes(net, batch: bool = True, spatial: bool = True):
    """torch.export Dims for the input sizes a converted net takes (see caffe2torch.dynamic), for
    `torch.export.export(net, inputs, dynamic_shapes=...)` with example inputs of batch 2 or more."""
    from caffe2torch.dynamic import dynamic_shapes as _dynamic_shapes

    return _dynamic_shapes(net, batch, spatial)


def register_converter(type_name: str, *, replace: bool = False):
    """Decorator: the converter of a Caffe type the built-ins lack (see caffe2torch.layers.registry)."""
    from caffe2torch.layers.registry import register_converter as _register

    return _register(type_name, replace=replace)


def __getattr__(name: str):
    if name == "Converted":  # what a converter returns, for plugins
        from caffe2torch.layers.registry import Converted

        return Converted
    raise AttributeError(f"module 'caffe2torch' has no attribute {name!r}")
