"""Passes over a converted graph: fold norm layers into convolutions, fuse or rewrite calls.

A pass keeps Caffe's bookkeeping: a call that takes over another layer's work says which layer's
output it now makes (`LayerCall.layer`) and which layers' outputs no longer exist (`absorbed`), so
`verify` still compares every record that is made and lists the rest apart.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Callable

import torch
from torch import fx, nn

from caffe2torch.fold import Affine, bn_affine, fold_into_conv, scale_affine
from caffe2torch.model import META_KEY, LayerCall, net_info
from caffe2torch.modules import CaffeOrderNorm, Scale

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_DECONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def call_of(node: fx.Node) -> LayerCall | None:
    call = node.meta.get(META_KEY)
    return call if node.op == "call_module" and isinstance(call, LayerCall) else None


def module_of(net: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return net.get_submodule(node.target) if node.op == "call_module" else None


def only_user(node: fx.Node) -> fx.Node | None:
    """The single node that reads `node`'s value, if exactly one does (the output node counts)."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def _cpu64(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().to("cpu", torch.float64)


def norm_affine(net: fx.GraphModule, node: fx.Node) -> Affine | None:
    """The per-channel affine map a norm call applies in eval mode, or None if it is not one."""
    module = module_of(net, node)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.training or module.running_mean is None:
            return None  # batch statistics: nothing fixed to fold
        channels = module.num_features
        weight = _cpu64(module.weight) if module.affine else torch.ones(channels, dtype=torch.float64)
        bias = _cpu64(module.bias) if module.affine else torch.zeros(channels, dtype=torch.float64)
        return bn_affine(weight.numpy(), bias.numpy(), _cpu64(module.running_mean).numpy(),
                         _cpu64(module.running_var).numpy(), module.eps)
    if isinstance(module, Scale) and module.weight is not None and len(node.args) == 1:
        call = call_of(node)
        rank = len(net_info(net).blob_shapes[call.tops[0]])
        channel_wise = module.weight.dim() == 1 and module.trailing == rank - 2
        bias_ok = module.bias is None or (module.bias.dim() == 1 and module.bias_trailing == rank - 2)
        if channel_wise and bias_ok:
            return scale_affine(_cpu64(module.weight).numpy(), None if module.bias is None else _cpu64(module.bias).numpy())
    return None


def _folded_conv(conv: nn.Module, stages: list[Affine]) -> nn.Module:
    """A copy of `conv` whose weight and bias include the norm stages (float64 arithmetic, then conv's dtype)."""
    kind = "Deconvolution" if isinstance(conv, _DECONVS) else "Convolution"
    weight, bias = fold_into_conv(kind, conv.groups, _cpu64(conv.weight).numpy(),
                                  None if conv.bias is None else _cpu64(conv.bias).numpy(), stages)
    folded = copy.deepcopy(conv)
    like = conv.weight
    folded.weight = nn.Parameter(torch.from_numpy(weight).to(like.device, like.dtype), like.requires_grad)
    folded.bias = nn.Parameter(torch.from_numpy(bias).to(like.device, like.dtype), like.requires_grad)
    return folded


def merge_into(node: fx.Node, members: list[fx.Node], graph: fx.Graph) -> None:
    """Let `node` stand for the last of `members` (a chain that only reads the one before): uses move to
    `node`, the members go, and the bookkeeping says whose output `node` now makes."""
    first, last = call_of(node), call_of(members[-1])
    absorbed = first.absorbed + (first.layer,) + tuple(
        name for member in members[:-1] for name in call_of(member).absorbed + (call_of(member).layer,))
    node.meta[META_KEY] = LayerCall(last.layer, last.type, first.bottoms, last.tops, absorbed + last.absorbed)
    members[-1].replace_all_uses_with(node)
    for member in reversed(members):
        graph.erase_node(member)


def fold_norms(net: fx.GraphModule) -> list[tuple[str, list[str]]]:
    """Fold every BN / BatchNorm (+ a following channel-wise Scale) into the convolution that alone feeds it.

    In place on `net`; returns (convolution layer, [folded layers]) for each fold.
    """
    folds = []
    erased: set[fx.Node] = set()
    calls_per_module: dict[str, int] = {}
    for node in net.graph.nodes:
        if node.op == "call_module":
            calls_per_module[node.target] = calls_per_module.get(node.target, 0) + 1
    for node in list(net.graph.nodes):
        if node in erased or not isinstance(module_of(net, node), _CONVS + _DECONVS):
            continue
        if calls_per_module[node.target] != 1:
            continue  # weights shared by several bottoms: folding one call's norm would change the others
        conv = module_of(net, node)
        members, stages, current = [], [], node
        while True:
            user = only_user(current)
            affine = norm_affine(net, user) if user is not None and call_of(user) and user.args == (current,) else None
            if affine is None or affine.scale.size != conv.out_channels:
                break
            is_norm = isinstance(module_of(net, user), nn.modules.batchnorm._BatchNorm)
            if members and is_norm or not members and not is_norm:
                break  # one norm, then at most one Scale: the chains Caffe nets have
            members.append(user)
            stages.append(affine)
            current = user
            if not is_norm:
                break
        if not members:
            continue
        net.add_submodule(node.target, _folded_conv(conv, stages))
        folds.append((call_of(node).layer, [call_of(m).layer for m in members]))
        removed = [m.target for m in members]
        erased.update(members)
        merge_into(node, members, net.graph)
        for target in removed:
            net.delete_submodule(target)
    net.recompile()
    return folds


def replace_calls(net: fx.GraphModule, rewrite: Callable[[fx.Node, nn.Module], nn.Module | None]) -> int:
    """Swap the module of every layer call for `rewrite(node, module)` when that gives one; returns the count."""
    count = 0
    for node in net.graph.nodes:
        if call_of(node) is None:
            continue
        new = rewrite(node, module_of(net, node))
        if new is not None:
            net.add_submodule(node.target, new)
            count += 1
    net.recompile()
    return count


def caffe_order_norms(net: fx.GraphModule) -> fx.GraphModule:
    """A copy of `net` whose BatchNorms (eval, stored statistics) compute in Caffe's order of operations.

    For bit-for-bit continuity with results computed that way (icnet-eval's exact mode); the
    converted net itself keeps torch's BatchNorm, a few ulp away.
    """
    exact = copy.deepcopy(net)

    def rewrite(node: fx.Node, module: nn.Module) -> nn.Module | None:
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            return CaffeOrderNorm(module)
        return None

    replace_calls(exact, rewrite)
    return exact.eval()


def retag(node: fx.Node, **changes) -> None:
    """Change fields of a call's bookkeeping."""
    node.meta[META_KEY] = replace(call_of(node), **changes)
