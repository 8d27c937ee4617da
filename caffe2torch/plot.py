"""`verify --plot`: each recorded top's relative L2 error against Caffe, in Caffe's layer order, on a log scale.

One look shows where error enters and whether it grows through the net: a flat band of float32 rounding
(~1e-7) well under the tolerance line, or a step at the layer that computes differently. Drawn with
matplotlib's object API on the Agg canvas (no pyplot: no global figure state, no display needed).
"""

from __future__ import annotations

import importlib.util
import io
import math
from pathlib import Path

from caffe2torch.errors import CaffeError
from caffe2torch.verify import Report

FORMATS = ("png", "svg", "pdf")
MAX_NAMED = 12  # failing layers named on the plot; the report lists them all


def plot_format(path: Path) -> str:
    """The image format a --plot file's extension asks for; one line for an unknown one."""
    kind = path.suffix.lower().lstrip(".")
    if kind not in FORMATS:
        raise CaffeError(f"--plot {path}: give a file ending in {', '.join('.' + f for f in FORMATS)}")
    if importlib.util.find_spec("matplotlib") is None:  # a machine set up with --no-deps
        raise CaffeError(f"--plot {path}: needs matplotlib (pip install matplotlib)")
    return kind


def error_figure(report: Report, tolerance: float, title: str):
    """A matplotlib Figure of the report: rel L2 per top (exact matches on a floor below the smallest error,
    failures red and named), the tolerance as a line."""
    from matplotlib.figure import Figure

    comparisons = report.comparisons
    if not comparisons:
        raise CaffeError("nothing was compared, so there is nothing to plot")
    figure = Figure(figsize=(max(8.0, min(24.0, 0.09 * len(comparisons) + 4)), 4.8), layout="constrained")
    axes = figure.add_subplot()
    errors = [c.rel_l2 if math.isfinite(c.rel_l2) else math.nan for c in comparisons]
    positive = [e for e in errors if e > 0]
    floor = min(positive + [tolerance]) / 10  # where exact matches sit: below every measured error
    top = max(positive + [tolerance]) * 10  # where failures without a finite error (shape, NaN placement) sit
    shown = [top if math.isnan(e) else max(e, floor) for e in errors]
    groups = (("within tolerance", "tab:blue", "o", 12, [i for i, c in enumerate(comparisons) if c.ok and errors[i] > 0]),
              ("exact (error 0)", "tab:green", "s", 12, [i for i, c in enumerate(comparisons) if c.ok and errors[i] == 0]),
              ("MISMATCH", "tab:red", "x", 30, [i for i, c in enumerate(comparisons) if not c.ok]))
    axes.set_yscale("log")
    axes.plot(range(len(comparisons)), shown, color="0.8", linewidth=0.8, zorder=1)
    for label, color, marker, size, indices in groups:
        if indices:
            axes.scatter(indices, [shown[i] for i in indices], s=size, color=color, marker=marker, zorder=2,
                         label=label)
    failed = groups[2][4]
    for i in failed[:MAX_NAMED]:
        axes.annotate(f"{comparisons[i].layer} ({comparisons[i].type})", (i, shown[i]), xytext=(5, -3),
                      textcoords="offset points", fontsize=7, color="tab:red")
    axes.axhline(tolerance, color="tab:red", linestyle="--", linewidth=1, label=f"tolerance {tolerance:g}")
    axes.set_ylim(floor / 3, top * 3)
    axes.set_xlim(-1, len(comparisons) + max(1, len(comparisons) // 8) * bool(failed))  # room for the last name
    axes.set_xlabel(f"recorded layer top, in Caffe's order ({len(comparisons)} tops, {len(failed)} failing)")
    axes.set_ylabel("relative L2 error vs Caffe")
    step = max(1, len(comparisons) // 40)  # about 40 names along the axis, whatever the net's size
    ticks = list(range(0, len(comparisons), step))
    axes.set_xticks(ticks, [comparisons[i].layer for i in ticks], rotation=90, fontsize=6)
    axes.grid(True, which="major", axis="y", color="0.9")
    axes.legend(loc="upper left", fontsize=8)
    axes.set_title(title, fontsize=10)
    return figure


def figure_bytes(figure, kind: str) -> bytes:
    """The figure rendered by Agg (PNG) or matplotlib's vector backends (SVG, PDF), as the file's bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format=kind, dpi=150, metadata={"Software": None} if kind == "png" else None)
    return buffer.getvalue()


def write_plot(path: Path, report: Report, tolerance: float, title: str) -> Path:
    """The figure of `report` written to `path` (its extension says the format), under a temporary name first."""
    from caffe2torch.write import write_atomic

    return write_atomic(path, figure_bytes(error_figure(report, tolerance, title), plot_format(path)))
