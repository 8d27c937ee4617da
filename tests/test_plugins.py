"""The plugin contract (README 'Plugins'): what register_converter accepts, and what a converter must return.

A non-callable (or a misused decorator) is refused at registration; a result that is not a
Converted with an nn.Module and one positive-int shape per top, or an exception other than
CaffeError from a plugin, is one CaffeError line naming the layer, its type and the contract.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import caffe2torch
from caffe2torch.errors import CaffeError
from caffe2torch.layers import registry
from caffe2torch.layers.registry import CONVERTERS

NET = '''input: "data" input_shape { dim: 1 dim: 2 dim: 3 dim: 3 }
layer { name: "odd" type: "Oddity" bottom: "data" top: "odd" }
'''


@pytest.fixture()
def prototxt(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(NET)
    yield path
    CONVERTERS.pop("Oddity", None)


def _error(prototxt, converter) -> CaffeError:
    caffe2torch.register_converter("Oddity", replace=True)(converter)
    with pytest.raises(CaffeError) as caught:
        caffe2torch.convert(prototxt=prototxt)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("layer 'odd' (Oddity): its converter "), message
    return caught.value


def test_registration_refuses_what_cannot_be_a_converter(prototxt):
    with pytest.raises(TypeError, match=r"^register_converter\('Oddity'\): the converter must be a function "
                                        r"fn\(layer, inputs, blobs\) -> caffe2torch.Converted, got int$"):
        caffe2torch.register_converter("Oddity")(42)
    with pytest.raises(TypeError, match="got str"):
        caffe2torch.register_converter("Oddity")("not a function")
    assert "Oddity" not in CONVERTERS

    with pytest.raises(TypeError, match=r"takes the Caffe type name, got function: use "
                                        r"@caffe2torch.register_converter\(\"Type\"\)"):
        @caffe2torch.register_converter  # the name forgotten: would otherwise register nothing, silently
        def oddity(layer, inputs, blobs):
            return caffe2torch.Converted(nn.Identity(), [tuple(inputs[0])])
    with pytest.raises(ValueError, match="the Caffe type name is empty"):
        caffe2torch.register_converter(" ")
    assert "Oddity" not in CONVERTERS


@pytest.mark.parametrize("result, what", [
    (None, "returned NoneType"),
    ((nn.Identity(), [(1, 2, 3, 3)]), "returned tuple"),
    ("Identity", "returned str"),
])
def test_a_result_that_is_not_converted_names_the_contract(prototxt, result, what):
    error = _error(prototxt, lambda layer, inputs, blobs: result)
    assert what in str(error)
    assert str(error).endswith("a converter must return caffe2torch.Converted(module, top_shapes): an nn.Module and "
                               "one shape (a sequence of positive ints) per top (README 'Plugins')")


@pytest.mark.parametrize("module, shapes, what", [
    (torch.relu, [(1, 2, 3, 3)], "returned a module that is a builtin_function_or_method, not an nn.Module"),
    (None, [(1, 2, 3, 3)], "returned a module that is a NoneType"),
    (nn.Identity(), [(1, 0, 3, 3)], "returned top_shapes [(1, 0, 3, 3)]"),
    (nn.Identity(), [(1, -2, 3, 3)], "returned top_shapes [(1, -2, 3, 3)]"),
    (nn.Identity(), [(1, 2.0, 3, 3)], "returned top_shapes [(1, 2.0, 3, 3)]"),
    (nn.Identity(), [(True, 2, 3, 3)], "returned top_shapes [(True, 2, 3, 3)]"),
    (nn.Identity(), (1, 2, 3, 3), "returned top_shapes (1, 2, 3, 3)"),  # one shape, not a list of shapes
    (nn.Identity(), None, "returned top_shapes None"),
    (nn.Identity(), [(1, 2, 3, 3), (1, 2, 3, 3)], "made 2 top shapes, the net names 1 tops"),
    (nn.Identity(), [], "made 0 top shapes, the net names 1 tops"),
])
def test_a_broken_converted_names_layer_type_and_contract(prototxt, module, shapes, what):
    error = _error(prototxt, lambda layer, inputs, blobs: caffe2torch.Converted(module, shapes))
    assert what in str(error) and "README 'Plugins'" in str(error), str(error)


def test_shapes_as_lists_and_numpy_ints_are_accepted(prototxt):
    import numpy as np

    caffe2torch.register_converter("Oddity", replace=True)(
        lambda layer, inputs, blobs: caffe2torch.Converted(nn.Identity(), [[np.int64(d) for d in inputs[0]]]))
    net = caffe2torch.convert(prototxt=prototxt)
    assert caffe2torch.net_info(net).blob_shapes["odd"] == (1, 2, 3, 3)
    assert all(type(d) is int for d in caffe2torch.net_info(net).blob_shapes["odd"])


def test_a_plugin_that_raises_is_one_line_with_the_cause_kept(prototxt):
    def exploding(layer, inputs, blobs):
        raise ValueError("cannot handle\nthis many lines")

    error = _error(prototxt, exploding)
    assert str(error) == ("layer 'odd' (Oddity): its converter tests.test_plugins.test_a_plugin_that_raises_is_one_line_"
                          "with_the_cause_kept.<locals>.exploding failed: ValueError: cannot handle")
    assert isinstance(error.__cause__, ValueError)  # the API keeps the plugin's traceback for its author

    def refusing(layer, inputs, blobs):  # a CaffeError is the plugin's own one-line message: passed on as it is
        raise CaffeError(f"layer {layer.name!r} (Oddity): needs one bottom")

    caffe2torch.register_converter("Oddity", replace=True)(refusing)
    with pytest.raises(CaffeError, match=r"^layer 'odd' \(Oddity\): needs one bottom$"):
        caffe2torch.convert(prototxt=prototxt)


def test_a_built_in_converter_that_raises_keeps_its_traceback(prototxt, monkeypatch):
    """Another exception from caffe2torch's own converters is our bug: it is not dressed up as the user's error."""
    def buggy(layer, inputs, blobs):
        raise ZeroDivisionError("a bug of ours")

    monkeypatch.setitem(CONVERTERS, "Oddity", buggy)
    monkeypatch.setattr(registry, "_BUILT_IN", registry._BUILT_IN | {buggy})
    with pytest.raises(ZeroDivisionError):
        caffe2torch.convert(prototxt=prototxt)
