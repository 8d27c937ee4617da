"""Scoring prediction folders (`icnet-eval score`), the report's tables, and report.json written atomically."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Callable

from caffe2torch.errors import CaffeError
from caffe2torch.write import write_atomic
from icnet_eval.data import parse_list
from icnet_eval.metrics import ConfusionCounts


def write_json(path: Path, data: dict) -> None:
    """`data` as indented JSON, written through a rename; NaN (a 0 / 0 score) becomes null."""

    def clean(value):  # NaN is not JSON: a score that is 0 / 0 is written as null
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    try:
        write_atomic(path, (json.dumps(clean(data), indent=2) + "\n").encode())
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
    from icnet_eval.outputs import RUN_FILE

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


def score_predictions(list_path: Path, data_root: Path, pred_dir: Path,
                      echo: Callable[[str], None] | None = None, pred_format: str = "auto") -> dict:
    """eval_acc.m alone: score prediction PNGs against the list's labels.

    trainId predictions are named like the authors' (label name, gtFine_labelTrainIds ->
    leftImg8bit); labelId ones (`--format labelids` runs) as the benchmark server's files and are
    mapped with the official table. `auto` takes the format an --out folder recorded and refuses
    trainId predictions with values no trainId has (labelIds scored as trainIds give a wrong mIoU);
    an explicit `trainids` scores any values as eval_acc.m does (above 19: the last bin).
    """
    from icnet_eval.cityscapes import LABEL_ID_TO_TRAIN_ID, NUM_CLASSES
    from icnet_eval.data import read_gray_png, read_instance_ids, read_label_train_ids
    from icnet_eval.outputs import server_name

    echo = echo or (lambda message: print(message, file=sys.stderr))
    entries = parse_list(list_path, data_root, need_images=False, need_labels=True)
    if any(entry.label_is_label_ids for entry in entries):
        echo("note: labelIds labels (*_labelIds.png, named so or standing in for a missing *_labelTrainIds.png) "
             "are mapped to trainIds with the official Cityscapes table")
    pred_dir, resolved = _prediction_source(Path(pred_dir), pred_format, echo)
    counts = ConfusionCounts()
    for entry in entries:
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
        counts.add(prediction, label, read_instance_ids(entry, label.shape))
    report = counts.summary()
    report["options"] = {"list": str(list_path), "data_root": str(data_root), "pred_dir": str(pred_dir),
                         "format": resolved}
    return report
