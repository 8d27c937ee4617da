"""Which BatchNorms learn: freezing their statistics (and weight and bias) for fine-tuning, undoing it, and the
record of it that a converted folder keeps.

A frozen norm is a `FrozenBatchNorm*d` (its `train()` leaves it in eval mode: the stored running statistics
normalise, and they are never updated); "fixed affine" means its weight and bias (Caffe's slope and bias, the
usual gamma and beta) have `requires_grad=False`. The fork's `BN { frozen: true }` converts frozen with a fixed
affine, BVLC's `BatchNorm { use_global_stats: true }` frozen (it has no affine: a Scale layer follows, which this
module leaves alone).
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from caffe2torch.errors import CaffeError
from caffe2torch.model import layer_modules
from caffe2torch.modules import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d

_FROZEN = {nn.BatchNorm1d: FrozenBatchNorm1d, nn.BatchNorm2d: FrozenBatchNorm2d, nn.BatchNorm3d: FrozenBatchNorm3d}
_PLAIN = {frozen: plain for plain, frozen in _FROZEN.items()}
# meta.json's record (folder format 3 without it: the definition's own freezing stands).
META_FIELD = "batchnorm"


def _is_norm(module: nn.Module) -> bool:
    """A norm freezing applies to: one with running statistics (`use_global_stats: false` has none to keep)."""
    return (type(module) in _FROZEN or type(module) in _PLAIN) and module.track_running_stats


def _norms(net: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [module for module in net.modules() if _is_norm(module)]


def _set(module: nn.modules.batchnorm._BatchNorm, frozen: bool, fixed_affine: bool) -> None:
    module.__class__ = _FROZEN.get(type(module), type(module)) if frozen else _PLAIN.get(type(module), type(module))
    if frozen:
        module.eval()
    if module.affine:
        module.requires_grad_(not fixed_affine)


def freeze_batchnorm(net: nn.Module, affine: bool = True) -> nn.Module:
    """Keep every BatchNorm of `net` on its stored statistics, also after `net.train()`; returns `net`.

    For fine-tuning with small batches, whose own statistics would be too noisy. `affine=True` also fixes each
    norm's weight and bias (gamma and beta: `requires_grad=False`, as the fork's `frozen: true`); `affine=False`
    lets them learn while the statistics stay. Norms without running statistics are left alone, and so is the
    Scale layer that follows a Caffe `BatchNorm`. `caffe2torch.save` records the result and `load` restores it.
    """
    for module in _norms(net):
        _set(module, frozen=True, fixed_affine=affine)
    return net


def unfreeze_batchnorm(net: nn.Module) -> nn.Module:
    """Let every BatchNorm of `net` train as torch's does (batch statistics in `train()` mode, running averages
    updated, weight and bias learning), whatever the definition said (`frozen: true`, `use_global_stats: true`);
    returns `net`. `caffe2torch.save` records the result and `load` restores it."""
    for module in _norms(net):
        _set(module, frozen=False, fixed_affine=False)
    return net


def batchnorm_record(net: fx.GraphModule) -> dict[str, list[str]]:
    """meta.json's record of the net's norms by Caffe layer name: which are frozen, which have a fixed affine."""
    record: dict[str, list[str]] = {"frozen": [], "fixed_affine": []}
    for layer, module_name in layer_modules(net):
        module = net.get_submodule(module_name)
        if not _is_norm(module):
            continue
        if type(module) in _PLAIN:
            record["frozen"].append(layer)
        if module.affine and not any(p.requires_grad for p in module.parameters()):
            record["fixed_affine"].append(layer)
    return record


def apply_batchnorm_record(net: fx.GraphModule, meta: dict[str, Any], where: str) -> None:
    """Put the norms of a net rebuilt from its definition back as `batchnorm_record` found them when it was saved."""
    record = meta.get(META_FIELD)
    if record is None:
        return  # written before the record existed: the definition's freezing stands
    if not (isinstance(record, dict) and set(record) == {"frozen", "fixed_affine"} and all(
            isinstance(names, list) and all(isinstance(n, str) for n in names) for names in record.values())):
        raise CaffeError(f"{where}: '{META_FIELD}' must map 'frozen' and 'fixed_affine' to lists of layer names")
    modules = {layer: net.get_submodule(name) for layer, name in layer_modules(net)}
    norms = {layer: module for layer, module in modules.items() if _is_norm(module)}
    unknown = sorted((set(record["frozen"]) | set(record["fixed_affine"])) - set(norms))
    if unknown:
        raise CaffeError(f"{where}: '{META_FIELD}' names {unknown[0]!r}, which is not a BatchNorm layer of the net")
    for layer, module in norms.items():
        _set(module, frozen=layer in record["frozen"], fixed_affine=layer in record["fixed_affine"])


# Why norms are frozen, for the note (an open parenthesis the note closes after an example layer).
BY_DEFINITION = "by the definition (`frozen: true` or `use_global_stats: true`"


def frozen_note(net: fx.GraphModule, by: str = BY_DEFINITION) -> str | None:
    """What `convert` (and `inspect`) say of frozen norms, and how to let them train."""
    record = batchnorm_record(net)
    if not record["frozen"]:
        return None
    total = len(_norms(net))
    fixed = len(record["fixed_affine"])
    what = "their stored statistics" + (f", {fixed} of them their weight and bias too" if fixed else "")
    affine = "caffe2torch.freeze_batchnorm(net, affine=False) lets weight and bias learn, " if fixed else ""
    return (f"{len(record['frozen'])} of {total} BatchNorm layers are frozen {by}, e.g. {record['frozen'][0]!r}): "
            f"in training they keep {what}; {affine}"
            f"caffe2torch.unfreeze_batchnorm(net) lets them train entirely")
