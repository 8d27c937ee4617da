"""Parity against real Caffe: compare every recorded layer top of a reference HDF5 with the converted net."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from caffe2torch.errors import CaffeError
from caffe2torch.model import CaffeNet, Step

FLT_MAX = float(np.finfo(np.float32).max)
FREE_TOLERANCE = 5e-4
ISOLATED_TOLERANCE = 1e-5
ARGMAX_AGREEMENT = 0.9995


@dataclass
class TopRecord:
    """What the reference stores of one top of one recorded layer."""

    shape: tuple[int, ...]
    sample_index: np.ndarray
    sample_value: np.ndarray
    data: np.ndarray | None


@dataclass
class LayerRecord:
    index: int
    name: str
    type: str
    tops: list[str]
    values: list[TopRecord]


@dataclass
class Reference:
    path: Path
    prototxt: str | None
    caffemodel: str | None
    inputs: dict[str, np.ndarray]
    layers: list[LayerRecord]
    final_argmax: np.ndarray | None
    argmax_source: str | None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_reference(path: str | Path) -> Reference:
    """Read a .ref.h5 file (layout in ../shared/reference/README.md)."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise CaffeError(f"{path}: no such file")
    try:
        with h5py.File(path, "r") as file:
            if "layers" not in file or "input" not in file:
                raise CaffeError(f"{path}: not a reference file (needs /input and /layers)")
            inputs = {name: np.asarray(data[()], dtype=np.float32) for name, data in file["input"].items()}
            layers = []
            for key in sorted(file["layers"].keys()):
                group = file["layers"][key]
                tops = [_text(t) for t in group.attrs["tops"]]
                values = []
                for k in range(len(tops)):
                    top = group[str(k)]
                    values.append(TopRecord(
                        shape=tuple(int(d) for d in top.attrs["shape"]),
                        sample_index=np.asarray(top["sample_index"][()], dtype=np.int64),
                        sample_value=np.asarray(top["sample_value"][()], dtype=np.float32),
                        data=np.asarray(top["data"][()], dtype=np.float32) if "data" in top else None,
                    ))
                layers.append(LayerRecord(int(key), _text(group.attrs["name"]), _text(group.attrs["type"]), tops, values))
            final = file.get("final/argmax")
            argmax = np.asarray(final[()]) if final is not None else None
            # The argmax is over the last recorded layer's output unless the file names another.
            source = None
            if final is not None:
                source = _text(final.attrs["source_layer"]) if "source_layer" in final.attrs else layers[-1].name
            attrs = file.attrs
            return Reference(path, _text(attrs["prototxt"]) if "prototxt" in attrs else None,
                             _text(attrs["caffemodel"]) if "caffemodel" in attrs else None,
                             inputs, layers, argmax, source)
    except CaffeError:
        raise
    except Exception as error:  # noqa: BLE001 - corrupt HDF5 fails in many ways
        raise CaffeError(f"{path}: not a readable reference file ({error})") from None


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
        theirs, mine = record.sample_value, ours.reshape(-1)[record.sample_index]
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
        return self.passed == len(self.comparisons) and self.argmax_ok and not self.unchecked

    # Fast path only: records whose values the optimised net never makes (pre-norm outputs of folded
    # convolutions); neither passes nor failures.
    folded: list[str] = field(default_factory=list)


def _match_records(net: CaffeNet, reference: Reference) -> list[tuple[Step, LayerRecord]]:
    steps = {step.name: step for step in net.steps}
    pairs = []
    for record in reference.layers:
        step = steps.get(record.name)
        if step is None:
            raise CaffeError(f"{reference.path}: recorded layer {record.name!r} is not in the converted net")
        if list(step.tops) != record.tops:
            raise CaffeError(f"{reference.path}: layer {record.name!r} writes {list(step.tops)}, the reference {record.tops}")
        pairs.append((step, record))
    return pairs


def _input_tensors(net: CaffeNet, reference: Reference) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in net.input_names:
        if name not in reference.inputs:
            raise CaffeError(f"{reference.path}: no stored input {name!r}")
        value = reference.inputs[name]
        if tuple(value.shape) != tuple(net.input_shapes[name]):
            raise CaffeError(f"{reference.path}: input {name!r} has shape {value.shape}, the net expects {net.input_shapes[name]}")
        tensors[name] = torch.from_numpy(value.copy())
    return tensors


def _compare_tops(step: Step, record: LayerRecord, tops, tolerance: float) -> Iterator[Comparison]:
    for top, value, stored in zip(record.tops, tops, record.values):
        ours = value.detach().float().cpu().numpy()
        max_abs, rel, count, ok, note = compare(ours, stored, tolerance)
        yield Comparison(record.name, record.type, top, max_abs, rel, count, stored.data is not None, ok, note)


def verify_free_running(net: CaffeNet, reference: Reference, tolerance: float = FREE_TOLERANCE) -> Report:
    """Run the net on the stored input, each layer on our own outputs, and compare after every layer."""
    report = Report()
    by_step = {step.name: [record] for step, record in _match_records(net, reference)}
    _compare_while_running(net, reference, by_step, reference.argmax_source, tolerance, report)
    return report


def _compare_while_running(net, reference: Reference, by_step: dict[str, list[LayerRecord]],
                           argmax_step: str | None, tolerance: float, report: Report) -> None:
    """Run `net` on the stored input, comparing each step's tops with the records mapped to it."""
    last_output: dict[str, torch.Tensor] = {}

    def after_layer(step: Step, tops) -> None:
        for record in by_step.get(step.name, []):
            report.comparisons.extend(_compare_tops(step, record, tops, tolerance))
        if step.name == argmax_step:
            last_output["argmax"] = tops[0]

    with torch.inference_mode():
        net.run(**_input_tensors(net, reference), after_layer=after_layer)
    _check_argmax(report, reference, last_output.get("argmax"))


def _check_argmax(report: Report, reference: Reference, output: torch.Tensor | None) -> None:
    if reference.final_argmax is None:
        return
    if output is None:
        report.argmax_ok = False
        report.argmax_agreement = 0.0
        return
    ours = output[0].argmax(dim=0).cpu().numpy()  # first maximum: ties to the lowest class
    if ours.shape != reference.final_argmax.shape:
        report.argmax_ok, report.argmax_agreement = False, 0.0
        return
    report.argmax_agreement = float((ours == reference.final_argmax).mean())
    report.argmax_ok = report.argmax_agreement >= ARGMAX_AGREEMENT


def verify_isolated(net: CaffeNet, reference: Reference, tolerance: float = ISOLATED_TOLERANCE) -> Report:
    """Feed each layer the reference values of its bottoms, so an error shows at the layer that makes it.

    A top whose full tensor is not stored is rebuilt by our layer (and checked at the stored
    samples) when that cannot carry error forward: the layer has no parameters (ReLU, Eltwise,
    Interp, MAX pooling, ...) or it reads stored tensors only (e.g. `data_sub1`, a Scale of the
    input). A layer whose bottoms cannot be had this way is listed as unchecked, never passed.
    """
    pairs = _match_records(net, reference)
    report = Report()
    available: dict[str, torch.Tensor | None] = dict(_input_tensors(net, reference))
    stored_blobs = set(available)  # values that are Caffe's own, not rebuilt by us
    with torch.inference_mode():
        for step, record in pairs:
            bottoms = [available.get(b) for b in step.bottoms]
            if any(b is None for b in bottoms):
                missing = [b for b, v in zip(step.bottoms, bottoms) if v is None]
                report.unchecked.append(f"{record.name} ({record.type}): no reference for bottom(s) {', '.join(missing)}")
                for top, stored in zip(record.tops, record.values):
                    available[top] = torch.from_numpy(stored.data.copy()) if stored.data is not None else None
                continue
            module = net.layer(step.name)
            result = module(*bottoms)
            tops = result if isinstance(result, tuple) else (result,)
            report.comparisons.extend(_compare_tops(step, record, tops, tolerance))
            rebuildable = not module.state_dict() or all(b in stored_blobs for b in step.bottoms)
            for top, value, stored in zip(record.tops, tops, record.values):
                if stored.data is not None:
                    available[top] = torch.from_numpy(stored.data.copy())
                    stored_blobs.add(top)
                else:
                    available[top] = value if rebuildable else None
                    stored_blobs.discard(top)
            if reference.argmax_source == step.name:
                _check_argmax(report, reference, tops[0])
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


# ---------------------------------------------------------------- fast path (caffe2torch.fast)

def verify_fast(net, reference: Reference, tolerance: float = FREE_TOLERANCE) -> Report:
    """Free-running check of a `caffe2torch.fast.FastNet`.

    A removed norm (or Scale) layer whose output a folded convolution now makes is compared with
    that convolution's output; the records the fast net no longer makes (the convolution's pre-norm
    output, a BatchNorm's output before its folded Scale) are listed in `report.folded`.
    """
    steps = {step.name: step for step in net.steps}
    folded_away = set(net.folded_away)
    fused_relu = getattr(net, "fused_relu", {})
    report = Report()
    by_step: dict[str, list[LayerRecord]] = {}
    for record in reference.layers:
        if record.name in folded_away:
            into = net.folded.get(record.name, record.name)
            what = "pre-norm output" if into == record.name else "output before the folded Scale"
            report.folded.append(f"{record.name} ({record.type}): {what}, not made by the fast path "
                                 f"(convolution {into!r} gives the normalised one)")
            continue
        step = steps.get(net.stands_for.get(record.name, record.name))
        if step is not None and step.name in fused_relu:
            report.folded.append(f"{record.name} ({record.type}): output before the ReLU {fused_relu[step.name]!r} "
                                 f"that the fast path fuses into convolution {step.name!r}")
            continue
        if step is None:
            raise CaffeError(f"{reference.path}: recorded layer {record.name!r} is not in the optimised net")
        if list(step.tops) != record.tops:
            raise CaffeError(f"{reference.path}: layer {record.name!r} writes {record.tops}, the optimised "
                             f"step {step.name!r} {list(step.tops)}")
        by_step.setdefault(step.name, []).append(record)
    argmax_step = net.stands_for.get(reference.argmax_source, reference.argmax_source)
    _compare_while_running(net, reference, by_step, argmax_step, tolerance, report)
    return report
