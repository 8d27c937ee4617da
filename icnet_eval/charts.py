"""The report's two charts as PNG bytes: the row-normalised confusion matrix and the IoU bars per class and category.

Drawn with matplotlib's object API on an Agg canvas: no pyplot, so no global figure state, no GUI backend
chosen for the caller, and nothing left open between runs.
"""

from __future__ import annotations

import io
import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from icnet_eval.cityscapes import CATEGORY_NAMES, CLASS_CATEGORY, PALETTE

DPI = 100
# The same file bytes for the same report: no software/date metadata in the PNG.
_PNG_METADATA = {"Software": None}


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata=_PNG_METADATA)
    return buffer.getvalue()


def _pixels(count: int) -> str:
    """A pixel count in few characters: 950, 12.3k, 4.56M, 1.23G."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= limit:
            return f"{count / limit:.3g}{suffix}"
    return str(count)


def _cell_text(percent: float) -> str:
    if percent == 0:
        return ""
    if percent < 0.05:
        return "<.1"
    return f"{percent:.1f}" if percent < 10 else f"{percent:.0f}"


def confusion_matrix_png(report: dict) -> bytes:
    """Rows ground truth, columns prediction, each row in percent of its pixels; every non-zero cell printed, each
    row's pixel count beside its class name (eval_acc.m's labelled pixels)."""
    matrix = np.asarray(report["confusion_matrix"], dtype=np.int64)
    names = report["classes"]
    totals = matrix.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        rows = np.where(totals[:, None] > 0, 100.0 * matrix / np.maximum(totals[:, None], 1), 0.0)
    n = len(names)
    figure = Figure(figsize=(11.5, 10))
    axes = figure.add_subplot()
    image = axes.imshow(rows, cmap="Blues", vmin=0, vmax=100, interpolation="nearest")
    for row in range(n):
        for column in range(n):
            text = _cell_text(rows[row, column])
            if text:
                axes.text(column, row, text, ha="center", va="center", fontsize=6.5,
                          color="white" if rows[row, column] > 55 else "black")
    axes.set_xticks(range(n), [f"{i} {name}" for i, name in enumerate(names)], rotation=60, ha="right",
                    rotation_mode="anchor", fontsize=8)
    axes.set_yticks(range(n), [f"{i} {name} ({_pixels(int(total))} px)" for i, (name, total)
                               in enumerate(zip(names, totals))], fontsize=8)
    axes.set_xlabel("prediction (trainId)")
    axes.set_ylabel("ground truth (trainId; labelled pixels)")
    axes.set_title(f"Confusion matrix, % of each ground-truth row ({report['images']} images, "
                   f"pixel accuracy {report['pixel_accuracy']:.2f}%)", fontsize=10)
    colorbar = figure.colorbar(image, ax=axes, fraction=0.04, pad=0.02)
    colorbar.set_label("% of the row's pixels")
    figure.tight_layout()
    return _png(figure)


def _defined(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _bars(axes, names: list[str], iou: list, iiou: list | None, colours: np.ndarray, title: str) -> None:
    """Horizontal IoU bars (and thinner hatched iIoU bars where defined), values printed at their ends."""
    positions = np.arange(len(names))
    height = 0.38 if iiou is not None else 0.75
    values = [v if _defined(v) else 0.0 for v in iou]
    axes.barh(positions - (height / 2 if iiou is not None else 0), values, height=height, color=colours,
              edgecolor="black", linewidth=0.5)
    for position, value in zip(positions, iou):
        axes.text((value if _defined(value) else 0) + 1, position - (height / 2 if iiou is not None else 0),
                  f"{value:.1f}" if _defined(value) else "n/a", va="center", fontsize=7)
    if iiou is not None:
        shown = [(p, v, c) for p, v, c in zip(positions, iiou, colours) if _defined(v)]
        if shown:
            axes.barh([p + height / 2 for p, _, _ in shown], [v for _, v, _ in shown], height=height,
                      color=[c for _, _, c in shown], alpha=0.45, hatch="///", edgecolor="black", linewidth=0.5)
            for position, value, _ in shown:
                axes.text(value + 1, position + height / 2, f"{value:.1f}", va="center", fontsize=7)
        # neutral swatches: the bars themselves wear their classes' colours
        axes.legend(handles=[Patch(facecolor="0.6", edgecolor="black", label="IoU"),
                             Patch(facecolor="0.85", edgecolor="black", hatch="///",
                                   label="iIoU (instance-weighted)")], loc="lower right", fontsize=8)
    axes.set_yticks(positions, names, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlim(0, 110)
    axes.set_xlabel("%")
    axes.set_title(title, fontsize=10)
    axes.grid(axis="x", alpha=0.3)


def class_iou_png(report: dict) -> bytes:
    """IoU per class (eval_acc.m) and per category (cityscapesScripts), with iIoU where the run had instances."""
    instances = "class_iiou" in report
    figure = Figure(figsize=(11, 7.5))
    grid = figure.add_gridspec(1, 2, width_ratios=(3, 2))
    class_colours = PALETTE / 255.0
    _bars(figure.add_subplot(grid[0]), [f"{i} {name}" for i, name in enumerate(report["classes"])],
          report["class_iou"], report.get("class_iiou") if instances else None, class_colours,
          f"Class IoU (eval_acc.m), mIoU {report['miou']:.2f}%")
    if "category_iou" in report:
        # each category in the colour of its first class (flat: road's purple, vehicle: car's blue)
        first = [int(np.flatnonzero(CLASS_CATEGORY == c)[0]) for c in range(len(CATEGORY_NAMES))]
        miou = report.get("category_miou")
        _bars(figure.add_subplot(grid[1]), report["categories"], report["category_iou"],
              report.get("category_iiou") if instances else None, class_colours[first],
              "Category IoU (cityscapesScripts)" + (f", mean {miou:.2f}%" if _defined(miou) else ""))
    figure.tight_layout()
    return _png(figure)
