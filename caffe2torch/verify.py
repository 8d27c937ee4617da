"""Parity against real Caffe: compare every recorded layer top of a reference HDF5 with the converted net."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import fx

from caffe2torch.errors import CaffeError, term
from caffe2torch.model import LayerCall, layer_calls, net_info, run_layers
from caffe2torch.modules import FLT_MAX
from caffe2torch.reference import LayerRecord, Reference, TopRecord, read_reference

__all__ = ["Reference", "read_reference", "verify_free_running", "verify_isolated", "verify_steps", "format_report",
           "compare"]

FREE_TOLERANCE = 5e-4
ISOLATED_TOLERANCE = 1e-5
ARGMAX_AGREEMENT = 0.9995


@dataclass
class Comparison:
    """The error of one top against the reference, over the stored values."""

    layer: str
    type: str
    top: str
    max_abs: float
    rel_l2: float
    compared: int
    full: bool
    ok: bool
    note: str = ""


def compare(ours: np.ndarray, record: TopRecord, tolerance: float) -> tuple[float, float, int, bool, str]:
    """Max absolute and relative L2 error; NaN and -FLT_MAX must sit where Caffe has them."""
    if tuple(ours.shape) != record.shape:
        return math.inf, math.inf, 0, False, f"shape {tuple(ours.shape)} != Caffe's {record.shape}"
    if record.data is not None:
        theirs, mine = record.data.reshape(-1), ours.reshape(-1)
    else:
        if record.sample_index.shape != record.sample_value.shape:
            return math.inf, math.inf, 0, False, "the reference's sample indices and values differ in count"
        if record.sample_index.size and not (0 <= record.sample_index.min() and record.sample_index.max() < ours.size):
            return math.inf, math.inf, 0, False, "the reference's sample indices lie outside the tensor"
        theirs, mine = record.sample_value, ours.reshape(-1)[record.sample_index]
    if theirs.size == 0 and ours.size:
        return math.inf, math.inf, 0, False, "the reference stores no values of this top"
    mine = mine.astype(np.float64)
    theirs = theirs.astype(np.float64)
    special_theirs = np.isnan(theirs) | (theirs <= -FLT_MAX)
    special_mine = np.isnan(mine) | (mine <= -FLT_MAX)
    same_kind = np.where(np.isnan(theirs), np.isnan(mine), mine <= -FLT_MAX)
    if (special_theirs != special_mine).any() or not same_kind[special_theirs].all():
        count = int((special_theirs != special_mine).sum() + (~same_kind[special_theirs]).sum())
        return math.inf, math.inf, theirs.size, False, f"{count} NaN/-FLT_MAX positions differ from Caffe's"
    regular = ~special_theirs
    difference = mine[regular] - theirs[regular]
    if difference.size == 0:
        return 0.0, 0.0, theirs.size, True, "only special values"
    if not np.isfinite(mine[regular]).all():
        return math.inf, math.inf, theirs.size, False, "non-finite values where Caffe has finite ones"
    max_abs = float(np.abs(difference).max())
    norm = float(np.linalg.norm(theirs[regular]))
    if norm == 0.0:
        # An all-zero reference has no scale: judge it by the absolute error.
        return max_abs, max_abs, theirs.size, max_abs <= tolerance, "all-zero reference: absolute error"
    rel = float(np.linalg.norm(difference)) / norm
    return max_abs, rel, theirs.size, rel <= tolerance, ""


@dataclass
class Report:
    comparisons: list[Comparison] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    argmax_agreement: float | None = None
    argmax_ok: bool = True

    @property
    def passed(self) -> int:
        return sum(c.ok for c in self.comparisons)

    @property
    def total(self) -> int:
        return len(self.comparisons) + len(self.unchecked)

    @property
    def ok(self) -> bool:
        """All compared tops within tolerance, at least one compared, nothing left unchecked."""
        return bool(self.comparisons) and self.passed == len(self.comparisons) and self.argmax_ok and not self.unchecked

    # Optimised graphs only: records whose values the net no longer makes (pre-norm outputs of
    # folded convolutions, pre-ReLU outputs of fused ones); neither passes nor failures.
    folded: list[str] = field(default_factory=list)


def _records_to_check(net: fx.GraphModule, reference: Reference, report: Report) -> dict[str, LayerRecord]:
    """Reference records by layer name, each matched to the calls of that layer in the net.

    A record of a layer a pass merged away (e.g. a convolution's pre-BN output once BN is folded
    into it) is listed in `report.folded` instead; any other record the net lacks is an error.
    """
    tops_of: dict[str, list[str]] = {}
    absorbed: dict[str, str] = {}
    for _, call in layer_calls(net):
        tops_of.setdefault(call.layer, []).extend(call.tops)
        for name in call.absorbed:
            absorbed[name] = call.layer
    records = {}
    for record in reference.layers:
        if record.name not in tops_of and record.name in absorbed:
            report.folded.append(f"{record.name} ({record.type}): merged into the call that makes "
                                 f"{absorbed[record.name]!r}; its own output is not made")
            continue
        if record.name not in tops_of:
            raise CaffeError(f"{reference.path}: recorded layer {record.name!r} is not in the converted net")
        if tops_of[record.name] != record.tops:
            raise CaffeError(f"{reference.path}: layer {record.name!r} writes {tops_of[record.name]}, "
                             f"the reference {record.tops}")
        records[record.name] = record
    if not records:
        raise CaffeError(f"{reference.path}: no recorded layer matches a layer of the net, nothing to compare")
    return records


def _input_tensors(net: fx.GraphModule, reference: Reference, device: torch.device | str = "cpu"
                   ) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, shape in net_info(net).inputs.items():
        if name not in reference.inputs:
            raise CaffeError(f"{reference.path}: no stored input {name!r}")
        value = reference.inputs[name]
        if len(value.shape) != len(shape):  # another size is fine: the net takes its sizes from its inputs
            raise CaffeError(f"{reference.path}: input {name!r} has shape {value.shape}, the net takes "
                             f"{len(shape)}-axis inputs (converted for {tuple(shape)})")
        tensors[name] = torch.from_numpy(value.copy()).to(device)
    return tensors


def _compare_top(record: LayerRecord, top: str, value: torch.Tensor, tolerance: float) -> Comparison:
    stored = record.values[record.tops.index(top)]
    ours = value.detach().float().cpu().numpy()
    max_abs, rel, count, ok, note = compare(ours, stored, tolerance)
    return Comparison(record.name, record.type, top, max_abs, rel, count, stored.data is not None, ok, note)


def verify_steps(net: fx.GraphModule, reference: Reference, isolated: bool) -> int:
    """How many times `on_layer` is called by a verify function: per layer call free-running, per record isolated."""
    return len(reference.layers) if isolated else sum(1 for _ in layer_calls(net))


def verify_free_running(net: fx.GraphModule, reference: Reference, tolerance: float = FREE_TOLERANCE,
                        device: torch.device | str = "cpu", on_layer: Callable[[], None] | None = None) -> Report:
    """Run the net on the stored input, each layer on our own outputs, and compare after every layer.

    Works on any graph a pass made from a converted net too (`caffe2torch.fast`): records of
    layers merged into another call are listed apart, never counted as passes. `on_layer()` is
    called after each layer call (progress).
    """
    report = Report()
    records = _records_to_check(net, reference, report)
    argmax_output: dict[str, torch.Tensor] = {}

    def after_layer(call: LayerCall, tops) -> None:
        record = records.get(call.layer)
        if record is not None:
            # Compare at once: a later in-place layer of an optimised graph may overwrite these values.
            report.comparisons.extend(_compare_top(record, top, value, tolerance) for top, value in zip(call.tops, tops))
        if call.layer == reference.argmax_source:
            argmax_output["argmax"] = tops[0].detach().clone()
        if on_layer is not None:
            on_layer()

    with torch.inference_mode():
        run_layers(net, **_input_tensors(net, reference, device), after_layer=after_layer)
    _check_argmax(report, reference, argmax_output.get("argmax"))
    return report


def _check_argmax(report: Report, reference: Reference, output: torch.Tensor | None) -> None:
    if reference.final_argmax is None:
        return
    if output is None:
        report.argmax_ok = False
        report.argmax_agreement = 0.0
        return
    ours = output[0].float().argmax(dim=0).cpu().numpy()  # first maximum: ties to the lowest class
    if ours.shape != reference.final_argmax.shape:
        report.argmax_ok, report.argmax_agreement = False, 0.0
        return
    report.argmax_agreement = float((ours == reference.final_argmax).mean())
    report.argmax_ok = report.argmax_agreement >= ARGMAX_AGREEMENT


@dataclass
class IsolatedPlan:
    """What an isolated check can feed each recorded layer, worked out from the reference alone."""

    calls: dict[str, list[tuple[fx.Node, LayerCall]]]
    missing: dict[str, list[str]]  # recorded layer -> bottoms with no value to feed it (empty: checkable)
    rebuilt: dict[str, bool]  # recorded layer -> our outputs stand in for tops the reference has no full tensor of

    @property
    def unfed(self) -> list[str]:
        return [name for name, bottoms in self.missing.items() if bottoms]


def isolated_plan(net: fx.GraphModule, reference: Reference, records: dict[str, LayerRecord] | None = None
                  ) -> IsolatedPlan:
    """Which layers `verify_isolated` can check: a bottom has a value when Caffe's full tensor of it is stored,
    or our layer rebuilt it without carrying error forward (no parameters, or only stored bottoms)."""
    records = records if records is not None else _records_to_check(net, reference, Report())
    calls: dict[str, list[tuple[fx.Node, LayerCall]]] = {}
    for node, call in layer_calls(net):
        calls.setdefault(call.layer, []).append((node, call))
    available = set(net_info(net).inputs)
    stored = set(available)  # values that are Caffe's own, not rebuilt by us
    missing: dict[str, list[str]] = {}
    rebuilt: dict[str, bool] = {}
    for record in reference.layers:
        if record.name not in records:
            continue
        bottoms = [b for _, call in calls[record.name] for b in call.bottoms]
        missing[record.name] = [b for b in bottoms if b not in available]
        rebuildable = not missing[record.name] and all(
            not net.get_submodule(node.target).state_dict() or all(b in stored for b in call.bottoms)
            for node, call in calls[record.name])
        rebuilt[record.name] = rebuildable
        for top, value in zip(record.tops, record.values):
            if value.data is not None:
                available.add(top)
                if not missing[record.name]:
                    stored.add(top)
            elif rebuildable:
                available.add(top)
                stored.discard(top)
            else:
                available.discard(top)
                stored.discard(top)
    return IsolatedPlan(calls, missing, rebuilt)


def check_isolated_can_run(net: fx.GraphModule, reference: Reference) -> None:
    """Refuse an isolated check, before it runs, on a reference that cannot feed some layers Caffe's bottoms (one
    that stores samples of most tops, not their full tensors): it could pass none of them."""
    unfed = isolated_plan(net, reference).unfed
    if unfed:
        full = sum(1 for record in reference.layers if all(value.data is not None for value in record.values))
        isolated = term("--isolated", "verify_isolated()")
        raise CaffeError(f"{reference.path}: {isolated} feeds each layer Caffe's full tensors of its bottoms, but this "
                         f"reference stores them for {full} of its {len(reference.layers)} layers (samples of the "
                         f"rest), so {len(unfed)} layers could not be checked (the first: {unfed[0]!r}); verify "
                         f"without {term('--isolated', 'isolation (verify_free_running)')} checks every layer "
                         f"free-running")


def verify_isolated(net: fx.GraphModule, reference: Reference, tolerance: float = ISOLATED_TOLERANCE,
                    device: torch.device | str = "cpu", on_layer: Callable[[], None] | None = None) -> Report:
    """Feed each layer the reference values of its bottoms, so an error shows at the layer that makes it.

    A top whose full tensor is not stored is rebuilt by our layer (and checked at the stored
    samples) when that cannot carry error forward: the layer has no parameters (ReLU, Eltwise,
    Interp, MAX pooling, ...) or it reads stored tensors only (e.g. `data_sub1`, a Scale of the
    input). A layer whose bottoms cannot be had this way is listed as unchecked, never passed
    (`isolated_plan` says which, before anything runs). `on_layer()` is called after each record of the
    reference (progress).
    """
    report = Report()
    records = _records_to_check(net, reference, report)
    if report.folded:
        raise CaffeError(f"{term('--isolated', 'verify_isolated()')} needs the converted net itself, not an optimised "
                         f"graph")
    plan = isolated_plan(net, reference, records)
    available: dict[str, torch.Tensor | None] = dict(_input_tensors(net, reference, device))

    def stored_value(stored: TopRecord) -> torch.Tensor | None:
        return torch.from_numpy(stored.data.copy()).to(device) if stored.data is not None else None

    with torch.inference_mode():
        for record in reference.layers:
            if on_layer is not None:
                on_layer()
            if record.name not in records:
                continue
            if plan.missing[record.name]:
                report.unchecked.append(f"{record.name} ({record.type}): no reference for bottom(s) "
                                        f"{', '.join(plan.missing[record.name])}")
                for top, stored in zip(record.tops, record.values):
                    available[top] = stored_value(stored)
                continue
            results: dict[str, torch.Tensor] = {}
            for node, call in plan.calls[record.name]:
                module = net.get_submodule(node.target)
                result = module(*(available[b] for b in call.bottoms))
                results.update(zip(call.tops, result if isinstance(result, tuple) else (result,)))
            report.comparisons.extend(_compare_top(record, top, results[top], tolerance) for top in record.tops)
            for top, stored in zip(record.tops, record.values):
                if stored.data is not None:
                    available[top] = stored_value(stored)
                else:
                    available[top] = results[top] if plan.rebuilt[record.name] else None
            if reference.argmax_source == record.name:
                _check_argmax(report, reference, results[record.tops[0]])
    if reference.final_argmax is not None and report.argmax_agreement is None:
        _check_argmax(report, reference, None)
    return report


def format_report(report: Report, tolerance: float, mode: str) -> list[str]:
    lines = [f"{'layer':<32} {'type':<13} {'top':<28} {'values':>9} {'max abs':>10} {'rel L2':>10}  result"]
    for c in report.comparisons:
        values = f"{c.compared}{'' if c.full else 's'}"
        status = "ok" if c.ok else "MISMATCH"
        note = f"  ({c.note})" if c.note else ""
        lines.append(f"{c.layer:<32} {c.type:<13} {c.top:<28} {values:>9} {c.max_abs:>10.3g} {c.rel_l2:>10.3g}  {status}{note}")
    for entry in report.unchecked:
        lines.append(f"unchecked: {entry}")
    for entry in report.folded:
        lines.append(f"folded: {entry}")
    if report.argmax_agreement is not None:
        lines.append(f"final argmax: {100 * report.argmax_agreement:.4f}% of positions identical "
                     f"(need {100 * ARGMAX_AGREEMENT:.2f}%) {'ok' if report.argmax_ok else 'MISMATCH'}")
    if report.comparisons:
        worst = max(report.comparisons, key=lambda c: c.rel_l2)
        lines.append(f"worst: {worst.layer} / {worst.top} rel L2 {worst.rel_l2:.3g}, max abs {worst.max_abs:.3g}")
    summary = f"{report.passed}/{report.total} layers within tolerance ({mode}, rel L2 <= {tolerance:g})"
    if report.unchecked:
        summary += f"; {len(report.unchecked)} could not be checked"
    if report.folded:
        summary += f"; {len(report.folded)} pre-BN/pre-ReLU records folded away (not compared)"
    lines.append(summary)
    return lines
