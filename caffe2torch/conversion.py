"""From files to a converted net: pick the net definition, check the release md5, copy weights by layer name."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from torch import fx

from caffe2torch import manifest
from caffe2torch.errors import CaffeError, term
from caffe2torch.freeze import frozen_note
from caffe2torch.model import from_net_parameter, unmatched_weights
from caffe2torch.fields import batch_statistics_layers, check_unknown
from caffe2torch.graph import kept_layers
from caffe2torch.protect import ReadFiles
from caffe2torch.read import (UnknownField, ambiguous_binary_fields, read_prototxt, read_weights,
                              unknown_binary_fields)
from caffe2torch.write import weights_stem
from proto import caffe_pb2


@dataclass
class Conversion:
    """A converted net and what is known of where it came from."""

    net: fx.GraphModule
    definition: caffe_pb2.NetParameter
    weights_path: Path | None
    prototxt_path: Path | None
    md5: str | None
    release: object | None
    trained: dict
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def read_files(self) -> ReadFiles:
        """The files this conversion read (the weights, the definition wherever it was found): no output may touch
        them."""
        return ReadFiles([(self.weights_path, "the model being converted"),
                          (self.prototxt_path, "the net definition being used")])


def prototxt_beside(weights_path: Path) -> Path | None:
    """The deploy definition a user keeps next to the weights: X.prototxt for X.caffemodel, else deploy.prototxt."""
    for candidate in (weights_path.with_name(weights_stem(weights_path) + ".prototxt"),
                      weights_path.with_name("deploy.prototxt")):
        if candidate.is_file():
            return candidate
    return None


def _definition_for(weights_path: Path | None, stored: caffe_pb2.NetParameter | None, prototxt: Path | None,
                    release, find_prototxt: bool, notes: list[str],
                    unknown: list[UnknownField]) -> tuple[caffe_pb2.NetParameter, Path | None]:
    if prototxt is not None:
        return read_prototxt(prototxt, unknown), prototxt
    if release is not None and release.prototxt:
        deploy = manifest.deploy_prototxt_path(release)
        notes.append(f"using the official deploy definition {deploy.name} of release {release.name}")
        return read_prototxt(deploy), deploy
    beside = prototxt_beside(weights_path) if find_prototxt and weights_path is not None else None
    if beside is not None:
        notes.append(f"using the net definition {beside} found beside the weights ({term('give --prototxt', 'pass prototxt=')} "
                     f"to choose another)")
        return read_prototxt(beside, unknown), beside
    if stored is not None:
        definition = stored
        check_complete(definition, weights_path)
        unknown.extend(unknown_binary_fields(definition, str(weights_path)))
        notes.append(f"using the net definition stored in {weights_path.name}")
        return definition, None
    raise CaffeError(f"{weights_path}: HDF5 weights carry no net definition; give one with "
                     f"{term('--prototxt', 'prototxt=')}")


def check_complete(definition: caffe_pb2.NetParameter, source: Path) -> None:
    """Refuse a stored net that was cut short where that shows.

    A caffemodel is a list of layers with no count, so a file cut between two layers still parses.
    But Caffe stores the Split layers it inserted for every blob read by several layers, one top
    per reader: a Split top that no later layer reads means the readers were cut off. (A cut in a
    stretch without branches leaves no such trace; a deploy prototxt beside the file is used
    when there is one.)
    """
    read = {bottom for layer in definition.layer for bottom in layer.bottom}
    for layer in definition.layer:
        if layer.type == "Split" and layer.name.endswith("_split"):
            unread = [top for top in layer.top if top not in read]
            if unread:
                raise CaffeError(f"{source}: the stored net is incomplete: Caffe's split layer {layer.name!r} feeds "
                                 f"{len(layer.top)} readers but {len(unread)} of them are missing (the file was cut "
                                 f"short?); give the deploy definition with {term('--prototxt', 'prototxt=')}")


def _stage_names(stages) -> tuple[str, ...]:
    """One stage name or several (a lone string is one name, not its characters)."""
    return (stages,) if isinstance(stages, str) else tuple(stages)


def _with_stages(definition, stages: Sequence[str]):
    for stage in stages:
        if not isinstance(stage, str) or not stage:
            raise CaffeError(f"stage {stage!r}: expected a non-empty name")
    staged = type(definition)()
    staged.CopyFrom(definition)
    staged.state.stage.extend(stage for stage in dict.fromkeys(stages) if stage not in staged.state.stage)
    return staged


def convert(weights: str | os.PathLike | None, prototxt: str | os.PathLike | None = None,
            input_shape: Sequence[int] | dict | None = None, verify_md5: bool = True,
            on_warning: Callable[[str], None] | None = None, find_prototxt: bool = True,
            memory_limit: int | str | None = None, assumed_size: tuple[int, int] | None = None,
            allow_unknown_fields: bool = False, stages: Sequence[str] = ()) -> Conversion:
    """Build the PyTorch net for `weights` (.caffemodel or .caffemodel.h5), optionally with a deploy prototxt.

    Without `prototxt`, the definition is the manifest's for a known release, else (with
    `find_prototxt`) X.prototxt or deploy.prototxt beside X.caffemodel, else the net stored in
    the caffemodel. With no weights, the prototxt alone gives the structure with zero-filled
    parameter blobs. `memory_limit` (bytes or e.g. '64G'; default: the available memory) refuses
    a net too large to build or run here. `assumed_size` (H, W) stands in, with a note, for the size
    a data layer does not say (`inspect` describes a train/test net that way). `stages` join the definition's
    NetState stages (as a solver's test_state does), picking the layers whose include/exclude rules name them; the
    converted definition keeps them.

    A field the schema does not know, on a layer the net keeps, stops the conversion unless it is known not to
    change the float forward (`caffe2torch.fields`) or `allow_unknown_fields` is given. A CaffeError raised here
    carries in `warnings` every warning gathered before it.
    """
    weights_path = Path(weights) if weights is not None else None
    prototxt_path = Path(prototxt) if prototxt is not None else None
    collected: list[str] = []
    notes: list[str] = []

    def warn(message: str) -> None:
        collected.append(message)
        if on_warning is not None:
            on_warning(message)

    try:
        return _convert(weights_path, prototxt_path, input_shape, verify_md5, find_prototxt, memory_limit,
                        assumed_size, allow_unknown_fields, warn, notes, collected, _stage_names(stages))
    except CaffeError as error:
        # What was skipped or warned about may explain the failure: it travels with it.
        error.warnings = (*collected, *(w for w in error.warnings if w not in collected))
        raise


def _convert(weights_path: Path | None, prototxt_path: Path | None, input_shape, verify_md5: bool,
             find_prototxt: bool, memory_limit, assumed_size, allow_unknown_fields: bool,
             warn: Callable[[str], None], notes: list[str], collected: list[str],
             stages: tuple[str, ...] = ()) -> Conversion:
    md5 = release = None
    trained: dict = {}
    stored = None
    if weights_path is not None:
        if not weights_path.is_file():
            raise CaffeError(f"{weights_path}: no such file" if not weights_path.is_dir() else
                             f"{weights_path}: is a folder, expected a .caffemodel or .caffemodel.h5 file")
        md5 = manifest.md5_file(weights_path)
        release = manifest.check_release(weights_path, md5, verify=verify_md5)
        trained, stored = read_weights(weights_path)
    elif prototxt_path is None:
        raise CaffeError("give a caffemodel, a prototxt, or both")
    unknown: list[UnknownField] = []
    definition, prototxt_path = _definition_for(weights_path, stored, prototxt_path, release, find_prototxt, notes,
                                                unknown)
    source = str(prototxt_path or weights_path)
    if definition is stored and stored is not None:
        for message in ambiguous_binary_fields(definition, str(weights_path)):
            warn(message)
    if stages:  # Solver::InitTestNets merges test_state into the net's state: the stages add to its own
        definition = _with_stages(definition, stages)
    # A fork's field can change what a layer computes: checked for the layers the net keeps (those left out, data
    # and loss, do not matter), before anything is built, so a failure to build comes with them.
    check_unknown(unknown, kept_layers(definition), allow_unknown_fields, warn, batch_statistics_layers(definition))
    unmatched_weights(definition, trained, str(weights_path), source)
    # A prototxt alone shows the structure: layers get zero-filled blobs of Caffe's shapes.
    net = from_net_parameter(definition, trained, source, input_shape, warn, fill_missing=weights_path is None,
                             memory_limit=memory_limit, on_note=notes.append, assumed_size=assumed_size)
    frozen = frozen_note(net)
    if frozen is not None:
        notes.append(frozen)
    return Conversion(net, definition, weights_path, prototxt_path, md5, release, trained, collected, notes)
