"""Scoring prediction folders (`icnet-eval score`, with its --out folder), the report's tables, and report.json
written atomically."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Callable

from caffe2torch.errors import CaffeError
from caffe2torch.progress import Progress
from caffe2torch.protect import ReadFiles
from caffe2torch.write import write_atomic
from icnet_eval.cityscapes import LABEL_ID_TO_TRAIN_ID, NUM_CLASSES
from icnet_eval.data import (ListEntry, parse_list, read_gray_png, read_image_bgr, read_instance_ids,
                             read_label_train_ids)
from icnet_eval.metrics import ConfusionCounts
from icnet_eval.outputs import REPORT_FILE, RUN_FILE, OutputFolder, server_name, write_png
from icnet_eval.page import PageImage, report_file_paths, write_report_files
from icnet_eval.visuals import error_map


def json_bytes(data: dict) -> bytes:
    """`data` as indented JSON; NaN (a 0 / 0 score) becomes null."""

    def clean(value):  # NaN is not JSON: a score that is 0 / 0 is written as null
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return (json.dumps(clean(data), indent=2) + "\n").encode()


def write_json(path: Path, data: dict) -> None:
    """`data` as indented JSON (`json_bytes`), written through a rename."""
    try:
        write_atomic(path, json_bytes(data))
    except OSError as error:
        raise CaffeError(f"{path}: cannot write ({error.strerror or error})") from None


def format_report(report: dict) -> str:
    """The scores as tables, eval_acc.m's first (class IoU), then cityscapesScripts' categories and iIoU; all in
    percent."""
    if report.get("miou") is None:
        return f"{report['images']} images predicted; the list has no labels, so nothing was scored"

    def percent(value) -> str:
        return "   n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:6.2f}"

    instances = "class_iiou" in report
    lines = ["==== Summary IoU (%) ====" + ("   iIoU (%)" if instances else "")]
    for index, name in enumerate(report["classes"]):  # numbered by trainId, 0..18
        extra = f"   {percent(report['class_iiou'][index])}" if instances else ""
        lines.append(f"{index:3d} {name:>16s}: {percent(report['class_iou'][index])}{extra}")
    lines.append(f"Mean IoU over {len(report['classes'])} classes: {report['miou']:.2f}%"
                 + (f"   (class iIoU mean {percent(report['class_miiou']).strip()}%)" if instances else ""))
    lines.append(f"Pixel-wise Accuracy: {report['pixel_accuracy']:.2f}%")
    if "category_iou" in report:
        lines.append("==== Categories, IoU (%) as cityscapesScripts ====" + ("   iIoU (%)" if instances else ""))
        for index, name in enumerate(report["categories"]):
            extra = f"   {percent(report['category_iiou'][index])}" if instances else ""
            lines.append(f"    {name:>16s}: {percent(report['category_iou'][index])}{extra}")
        lines.append(f"Mean category IoU: {percent(report['category_miou']).strip()}%")
    lines.append(f"({report['images']} images scored)")
    return "\n".join(lines)


PREDICTION_FORMATS = ("auto", "trainids", "labelids")


def _prediction_source(pred_dir: Path, pred_format: str, echo: Callable[[str], None]) -> tuple[Path, str]:
    """The folder of prediction PNGs and their format; an --out folder says both in its run file."""
    if pred_format not in PREDICTION_FORMATS:
        raise CaffeError(f"--format {pred_format}: expected one of {', '.join(PREDICTION_FORMATS)}")
    if not pred_dir.is_dir():
        raise CaffeError(f"--pred-dir {pred_dir}: no such folder")
    recorded = None
    if (pred_dir / RUN_FILE).is_file():
        try:
            recorded = json.loads((pred_dir / RUN_FILE).read_text(encoding="utf-8")).get("format")
        except (OSError, ValueError, AttributeError):
            raise CaffeError(f"--pred-dir {pred_dir}: its {RUN_FILE} cannot be read") from None
        if pred_format != "auto" and recorded not in (None, pred_format):
            raise CaffeError(f"--pred-dir {pred_dir}: holds {recorded} predictions (see {RUN_FILE}), not {pred_format}")
        pred_format = recorded or pred_format
    folder = {"labelids": "labelids"}.get(pred_format, "gray")
    if (pred_dir / folder).is_dir():
        pred_dir = pred_dir / folder
        echo(f"note: reading the {'labelIds' if folder == 'labelids' else 'trainIds'} predictions in {pred_dir}")
    return pred_dir, pred_format


SCORE_FILES = "icnet-eval-score.json"


def _score_folder(out: Path, read: ReadFiles, entries: list[ListEntry], error_maps: bool):
    """score's --out, checked before any work: the report files and errors/ maps may replace only what an earlier
    score wrote there (listed in icnet-eval-score.json), never a file of the user's or one this run reads."""
    if out.exists() and not out.is_dir():
        raise CaffeError(f"--out {out}: is a file, expected a folder for the report")
    folder = OutputFolder(out, read, SCORE_FILES, tool="icnet-eval score")
    targets = [out / REPORT_FILE] + report_file_paths(out)
    if error_maps:
        targets += [out / "errors" / f"{entry.output_stem}.png" for entry in entries]
    folder.check(targets, "--out")
    try:
        (out / "errors" if error_maps else out).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CaffeError(f"--out {out}: cannot create the folder ({error.strerror or error})") from None
    return folder


def score_predictions(list_path: Path, data_root: Path, pred_dir: Path,
                      echo: Callable[[str], None] | None = None, pred_format: str = "auto", per_image: bool = False,
                      out: Path | None = None, error_maps: bool = False, progress: bool = True) -> dict:
    """eval_acc.m alone: score prediction PNGs against the list's labels.

    trainId predictions are named like the authors' (label name, gtFine_labelTrainIds ->
    leftImg8bit); labelId ones (`--format labelids` runs) as the benchmark server's files and are
    mapped with the official table. `auto` takes the format an --out folder recorded and refuses
    trainId predictions with values no trainId has (labelIds scored as trainIds give a wrong mIoU);
    an explicit `trainids` scores any values as eval_acc.m does (above 19: the last bin).

    `per_image` adds each image's mIoU and pixel accuracy. With `out`, the report is also written
    there as an evaluation writes it (report.json, report.html, the charts; errors/ with
    `error_maps`), replacing only files an earlier score wrote.
    """
    echo = echo or (lambda message: print(message, file=sys.stderr))
    entries = parse_list(list_path, data_root, need_images=False, need_labels=True)
    if any(entry.label_is_label_ids for entry in entries):
        echo("note: labelIds labels (*_labelIds.png, named so or standing in for a missing *_labelTrainIds.png) "
             "are mapped to trainIds with the official Cityscapes table")
    if error_maps and out is None:
        raise CaffeError("--error-maps needs --out (the folder the error maps go to)")
    read = ReadFiles([(list_path, "the list"), (pred_dir, "the prediction folder")])
    for entry in entries:
        read.add(entry.label, f"the label of {entry.where}")
        read.add(entry.instances, f"the instanceIds of {entry.where}")
        read.add(entry.image, f"the image of {entry.where}")  # error maps and thumbnails read it
    folder = _score_folder(Path(out), read, entries, error_maps) if out is not None else None
    pred_dir, resolved = _prediction_source(Path(pred_dir), pred_format, echo)
    counts = ConfusionCounts()
    images: list[PageImage] = []
    with Progress(len(entries), "icnet-eval score", "image", enabled=progress) as shown:
        for entry in entries:
            images.append(_score_one(entry, pred_dir, resolved, counts, folder, error_maps))
            shown.update()
    report = counts.summary()
    if per_image:
        report["per_image"] = [{"image": str(image.entry.image), "miou": image.miou,
                                "pixel_accuracy": image.pixel_accuracy} for image in images]
    report["options"] = {"list": str(list_path), "data_root": str(data_root), "pred_dir": str(pred_dir),
                         "format": resolved}
    if folder is not None:
        def write(path: Path, data: bytes) -> None:
            write_atomic(path, data)
            folder.record(path, data)

        try:
            write(Path(out) / REPORT_FILE, json_bytes(report))
            write_report_files(Path(out), report, images, Path(data_root), write)
        finally:
            folder.save()
    return report


def _score_one(entry: ListEntry, pred_dir: Path, resolved: str, counts: ConfusionCounts,
               folder: OutputFolder | None, error_maps: bool) -> PageImage:
    """Score one prediction into `counts` (and draw its error map into the folder); returns it for the page."""
    path = pred_dir / (server_name(entry) if resolved == "labelids" else entry.label_prediction_name)
    if not path.is_file():
        raise CaffeError(f"{entry.where}: prediction {path} does not exist")
    prediction = read_gray_png(path, "prediction", entry)
    if prediction is None:
        raise CaffeError(f"{entry.where}: prediction {path} is not a readable PNG file")
    if resolved == "labelids":
        prediction = LABEL_ID_TO_TRAIN_ID[prediction]
    elif resolved == "auto":
        outside = prediction[(prediction >= NUM_CLASSES) & (prediction != 255)]
        if outside.size:
            raise CaffeError(f"{entry.where}: prediction {path} holds values no trainId has (e.g. "
                             f"{int(outside[0])}): labelIds? Score them with --format labelids "
                             f"(or --format trainids to count them as eval_acc.m would)")
    label = read_label_train_ids(entry)
    miou, pixel_accuracy = counts.add(prediction, label, read_instance_ids(entry, label.shape))
    if error_maps:
        try:
            image = read_image_bgr(entry)
        except CaffeError:  # scoring needs no image: the map is drawn over grey
            image = None
        target = folder.folder / "errors" / f"{entry.output_stem}.png"
        folder.record(target, write_png(target, error_map(image, prediction, label)))
    return PageImage(entry, path, resolved == "labelids", miou, pixel_accuracy)
