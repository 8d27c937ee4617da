"""A converted net that returns other blobs than its outputs: intermediate blobs for auxiliary losses, features.

`with_outputs` builds a new GraphModule over the same modules (the same parameters, so training it trains the
net it was made from) whose forward returns the chosen blobs and computes nothing that none of them needs. It is
an ordinary fx graph: it trains, traces and compiles like the net. `caffe2torch.blobs` gives every blob too, but
by replaying the graph in an fx Interpreter, once per call: for looking, not for training loops.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from torch import fx

from caffe2torch.errors import CaffeError
from caffe2torch.model import META_KEY, CaffeNet, net_info

# Marks a net made by with_outputs: save() refuses it (its file would claim outputs the definition does not make).
VIEW_KEY = "caffe2torch_outputs_of"


def with_outputs(net: fx.GraphModule, blobs: Sequence[str]) -> fx.GraphModule:
    """A net returning the named blobs of `net`, as a tuple in the order given (for an in-place blob, its value
    after the last layer that writes it, as `caffe2torch.blobs` gives it).

    The modules are `net`'s own: save `net` after training the new one.
    """
    info = net_info(net)
    if isinstance(blobs, str) or not all(isinstance(name, str) for name in blobs) or not blobs:
        raise CaffeError(f"with_outputs(): blobs must be a list of blob names, got {blobs!r}")
    last: dict[str, fx.Node] = {}
    for node in net.graph.nodes:
        if "caffe_blob" in node.meta:
            last[node.meta["caffe_blob"]] = node
    missing = [name for name in blobs if name not in last]
    if missing:
        known = ", ".join(list(last)[-5:])
        raise CaffeError(f"with_outputs(): the net has no blob {missing[0]!r} (its blobs are named as in the "
                         f"definition, e.g. {known}; caffe2torch.net_info(net).blob_shapes lists them all)")
    graph = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    graph.graph_copy(net.graph, copies)
    graph.output(tuple(copies[last[name]] for name in blobs))
    view = CaffeNet(net, graph, class_name="CaffeNet")
    view.graph.eliminate_dead_code()  # layers no chosen blob needs (e.g. ICNet's final upsampling) are not run
    view.delete_all_unused_submodules()
    view.recompile()
    view.meta[META_KEY] = dataclasses.replace(info, outputs=list(blobs))
    view.meta[VIEW_KEY] = True
    return view.train(net.training)
