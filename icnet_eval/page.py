"""report.html and its charts: the evaluation as a page people open in a browser, beside report.json.

One self-contained file: the charts and thumbnails are embedded as data: URIs, the CSS is inline,
there is no script, and a Content-Security-Policy forbids the page anything from the network. Every
text from the run (paths, class names, options) is HTML-escaped. The thumbnails (image, ground truth,
prediction, error map) are made at the end for the few worst and best images only, from the files
on disk, so the run holds no image for the page; a 500-image list makes a page of about 1 MB.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from caffe2torch.errors import CaffeError
from caffe2torch.write import write_atomic
from icnet_eval.cityscapes import CATEGORY_NAMES, CLASS_CATEGORY, LABEL_ID_TO_TRAIN_ID, PALETTE
from icnet_eval.data import ListEntry, read_gray_png, read_image_bgr, read_label_train_ids
from icnet_eval.outputs import CLASS_IOU_CHART, CONFUSION_CHART, REPORT_PAGE
from icnet_eval.visuals import colour_thumbnail, encode, error_map, thumbnail

# Thumbnails for this many worst and as many best images (all of them when the list has at most twice as many).
SAMPLES = 5
THUMBNAIL_WIDTH = 320


@dataclass(frozen=True)
class PageImage:
    """One listed image as the page shows it: its entry, its prediction PNG and its own scores (None unscored)."""

    entry: ListEntry
    prediction: Path
    label_ids: bool = False  # the prediction PNG holds labelIds (--format labelids), mapped with the official table
    miou: float | None = None
    pixel_accuracy: float | None = None


def report_file_paths(out: Path) -> list[Path]:
    """The files `write_report_files` may write into `out` (report.json is the caller's)."""
    return [out / REPORT_PAGE, out / CONFUSION_CHART, out / CLASS_IOU_CHART]


def _write(path: Path, data: bytes) -> None:
    try:
        write_atomic(path, data)
    except OSError as error:
        raise CaffeError(f"{path}: cannot write ({error.strerror or error})") from None


def write_report_files(out: Path, report: dict, images: list[PageImage], data_root: Path | None = None,
                       write: Callable[[Path, bytes], None] = _write) -> list[Path]:
    """The charts (for a scored run) and report.html into `out`, each through `write` (atomic by default). Without
    matplotlib (a machine set up with --no-deps, as the GPU machines are) the page has its tables and no charts."""
    charts: dict[str, bytes] = {}
    if report.get("miou") is not None:
        try:
            from icnet_eval.charts import class_iou_png, confusion_matrix_png
        except ImportError:
            pass
        else:
            charts = {CLASS_IOU_CHART: class_iou_png(report), CONFUSION_CHART: confusion_matrix_png(report)}
    written = []
    for name, data in charts.items():
        write(out / name, data)
        written.append(out / name)
    write(out / REPORT_PAGE, render_page(report, images, charts, data_root).encode("utf-8"))
    return written + [out / REPORT_PAGE]


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _uri(data: bytes, kind: str) -> str:
    return f"data:image/{kind};base64,{base64.b64encode(data).decode('ascii')}"


def _percent(value: object) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.2f}"


def _shown_path(path: Path, data_root: Path | None) -> str:
    if data_root is not None:
        try:
            return path.relative_to(data_root).as_posix()
        except ValueError:
            pass
    return str(path)


def _read_prediction(image: PageImage) -> np.ndarray:
    prediction = read_gray_png(image.prediction, "prediction", image.entry)
    if prediction is None:
        raise CaffeError(f"{image.entry.where}: prediction {image.prediction} is not a readable PNG file")
    return LABEL_ID_TO_TRAIN_ID[prediction] if image.label_ids else prediction


def thumbnails(image: PageImage) -> list[tuple[str, bytes, str]]:
    """(caption, bytes, "jpeg" or "png") of the image, its ground truth, prediction and error map; what cannot be
    read is left out (`icnet-eval score` needs no image files)."""
    entry = image.entry
    try:
        photo = read_image_bgr(entry)
    except CaffeError:
        photo = None
    prediction = _read_prediction(image)
    label = read_label_train_ids(entry) if entry.label is not None else None
    shown: list[tuple[str, bytes, str]] = []
    if photo is not None:
        shown.append(("image", encode(thumbnail(photo, THUMBNAIL_WIDTH), "jpeg"), "jpeg"))
    if label is not None:
        shown.append(("ground truth", encode(colour_thumbnail(label, THUMBNAIL_WIDTH), "png"), "png"))
    shown.append(("prediction", encode(colour_thumbnail(prediction, THUMBNAIL_WIDTH), "png"), "png"))
    if label is not None:
        errors = error_map(photo, prediction, label)
        shown.append(("errors", encode(thumbnail(errors, THUMBNAIL_WIDTH), "jpeg"), "jpeg"))
    return shown


def _samples(images: list[PageImage]) -> list[tuple[str, PageImage]]:
    """(heading, image) of the images shown with thumbnails: the worst and the best by mIoU (ties in list order);
    without scores, the first ones."""
    scored = [image for image in images if image.miou is not None]
    if not scored:
        return [(f"image {i + 1}", image) for i, image in enumerate(images[:SAMPLES])]
    ranked = sorted(scored, key=lambda image: image.miou)  # stable: list order among equals
    if len(ranked) <= 2 * SAMPLES:
        return [(f"rank {i + 1} of {len(ranked)}", image) for i, image in enumerate(ranked)]
    worst = [(f"worst {i + 1}", image) for i, image in enumerate(ranked[:SAMPLES])]
    best = [(f"best {i + 1}", image) for i, image in enumerate(reversed(ranked[-SAMPLES:]))]
    return worst + best


_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1380px;
 padding:0 16px;color:#1d1d1f;background:#fff}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:32px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:14px;margin:18px 0 6px}
.headline{font-size:16px;margin:4px 0 12px}.headline b{font-size:20px}
nav a{margin-right:14px}
table{border-collapse:collapse;margin:6px 0}th,td{padding:3px 10px;text-align:left;vertical-align:top}
th{background:#f2f2f4;font-weight:600}tr:nth-child(even) td{background:#fafafa}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.swatch{display:inline-block;width:12px;height:12px;border:1px solid #555;margin-right:6px;vertical-align:-1px}
.bar{display:inline-block;height:9px;background:#4a78b5;vertical-align:0;margin-left:8px}
.wrap{overflow-wrap:anywhere;max-width:760px}
figure{display:inline-block;margin:0 10px 10px 0;vertical-align:top}
figure img{display:block;border:1px solid #ccc;max-width:100%}figcaption{font-size:12px;color:#555}
.charts img{max-width:100%;height:auto}
.note{color:#555}
"""


def _class_table(report: dict) -> str:
    instances = "class_iiou" in report
    rows = []
    for train_id, name in enumerate(report["classes"]):
        iou = report["class_iou"][train_id]
        colour = ",".join(str(int(v)) for v in PALETTE[train_id])
        bar = f'<span class="bar" style="width:{max(0.0, min(100.0, iou or 0.0)):.0f}px"></span>' \
            if iou is not None and math.isfinite(iou) else ""
        extra = f'<td class="num">{_percent(report["class_iiou"][train_id])}</td>' if instances else ""
        rows.append(f'<tr><td class="num">{train_id}</td><td><span class="swatch" style="background:rgb({colour})">'
                    f'</span>{_e(name)}</td><td>{_e(CATEGORY_NAMES[int(CLASS_CATEGORY[train_id])])}</td>'
                    f'<td class="num">{_percent(iou)}{bar}</td>'
                    f'<td class="num">{_percent(report["class_accuracy"][train_id])}</td>{extra}</tr>')
    head = ("<tr><th>trainId</th><th>class</th><th>category</th><th>IoU %</th><th>accuracy %</th>"
            + ("<th>iIoU %</th>" if instances else "") + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _category_table(report: dict) -> str:
    instances = "category_iiou" in report
    rows = "".join(
        f'<tr><td>{_e(name)}</td><td class="num">{_percent(report["category_iou"][index])}</td>'
        + (f'<td class="num">{_percent(report["category_iiou"][index])}</td>' if instances else "") + "</tr>"
        for index, name in enumerate(report["categories"]))
    head = "<tr><th>category</th><th>IoU %</th>" + ("<th>iIoU %</th>" if instances else "") + "</tr>"
    return f"<table>{head}{rows}</table>"


def _key_values(values: dict, prefix: str = "") -> list[tuple[str, str]]:
    pairs = []
    for key, value in values.items():
        if isinstance(value, dict):
            pairs.extend(_key_values(value, f"{prefix}{key}."))
        else:
            pairs.append((f"{prefix}{key}", value if isinstance(value, str) else json.dumps(value)))
    return pairs


def _table_of(values: dict) -> str:
    rows = "".join(f'<tr><th>{_e(key)}</th><td class="wrap">{_e(value)}</td></tr>'
                   for key, value in _key_values(values))
    return f"<table>{rows}</table>"


def _sample_html(heading: str, image: PageImage, data_root: Path | None) -> str:
    scores = "" if image.miou is None else \
        f" &mdash; mIoU {_percent(image.miou)}%, pixel accuracy {_percent(image.pixel_accuracy)}%"
    title = f'<h3>{_e(heading)}: <span class="wrap">{_e(_shown_path(image.entry.image, data_root))}</span>{scores}</h3>'
    try:
        shown = thumbnails(image)
    except CaffeError as error:  # a file changed or vanished since it was scored: say so, keep the page
        return f'{title}<p class="note">{_e(error)}</p>'
    figures = "".join(f'<figure><img src="{_uri(data, kind)}" alt="{_e(caption)}"><figcaption>{_e(caption)}'
                      f'</figcaption></figure>' for caption, data, kind in shown)
    return f"{title}<div>{figures}</div>"


def _per_image_table(images: list[PageImage], data_root: Path | None) -> str:
    ranked = sorted((image for image in images if image.miou is not None), key=lambda image: image.miou)
    rows = "".join(f'<tr><td class="num">{rank}</td><td class="wrap">{_e(_shown_path(image.entry.image, data_root))}'
                   f'</td><td class="num">{_percent(image.miou)}</td><td class="num">{_percent(image.pixel_accuracy)}'
                   f'</td></tr>' for rank, image in enumerate(ranked, start=1))
    return ('<table><tr><th>rank</th><th>image</th><th>mIoU %</th><th>pixel accuracy %</th></tr>'
            f"{rows}</table>")


def render_page(report: dict, images: list[PageImage], charts: dict[str, bytes], data_root: Path | None = None) -> str:
    """The whole page as text (see the module's doc)."""
    scored = report.get("miou") is not None
    options = report.get("options") or {}
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             # nothing from the network, ever: images only from data: URIs, styles only inline, no scripts
             "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
             "style-src 'unsafe-inline'\">",
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>ICNet evaluation{': mIoU ' + _percent(report['miou']) + '%' if scored else ''}</title>",
             f"<style>{_STYLE}</style></head><body>", "<h1>ICNet evaluation</h1>"]
    if scored:
        extras = [f"category mIoU {_percent(report.get('category_miou'))}%"]
        if "class_miiou" in report:
            extras.append(f"class iIoU {_percent(report['class_miiou'])}%")
        parts.append(f'<p class="headline">mIoU <b>{_percent(report["miou"])}%</b> &middot; pixel accuracy '
                     f'<b>{_percent(report["pixel_accuracy"])}%</b> &middot; {" &middot; ".join(extras)} &middot; '
                     f'{_e(report["images"])} images</p>')
    else:
        parts.append(f'<p class="headline">{_e(report.get("images"))} images predicted; the list has no labels, so '
                     f"nothing was scored.</p>")
    source = f'weights {_e(options["weights"])}' if options.get("weights") else \
        f'predictions {_e(options.get("pred_dir", ""))}'
    parts.append(f'<p class="note wrap">list {_e(options.get("list", ""))} &middot; {source}</p>')
    sections = [("classes", "Classes"), ("charts", "Charts")] if scored else []
    sections += [("samples", "Worst and best images" if scored else "Images")]
    sections += [("per-image", "Every image")] if scored else []
    sections += [("run", "Run")]
    parts.append("<nav>" + "".join(f'<a href="#{anchor}">{title}</a>' for anchor, title in sections) + "</nav>")
    if scored:
        parts += ['<h2 id="classes">Classes (eval_acc.m)</h2>', _class_table(report)]
        if "category_iou" in report:
            parts += ["<h3>Categories (cityscapesScripts)</h3>", _category_table(report)]
        parts.append('<h2 id="charts">Charts</h2><div class="charts">')
        parts += [f'<figure><img src="{_uri(data, "png")}" alt="{_e(name)}"><figcaption>{_e(name)}</figcaption>'
                  f"</figure>" for name, data in charts.items()]
        parts.append("</div>")
    samples = _samples(images)
    parts.append(f'<h2 id="samples">{"Worst and best images, by their own mIoU" if scored else "Images"}</h2>')
    if scored:
        parts.append('<p class="legend note">Error maps: <span class="swatch" style="background:rgb(255,0,0)"></span>'
                     'wrong pixels, <span class="swatch" style="background:rgb(160,160,160)"></span>not scored '
                     "(ignored in the label), the image dimmed where right.</p>")
    parts += [_sample_html(heading, image, data_root) for heading, image in samples]
    if scored:
        parts += ['<h2 id="per-image">Every image, worst first</h2>', _per_image_table(images, data_root)]
    parts.append('<h2 id="run">Run</h2><h3>Options</h3>' + _table_of(options))
    if report.get("timing"):
        parts.append("<h3>Timing</h3>" + _table_of(report["timing"]))
    parts.append("</body></html>\n")
    return "\n".join(parts)
