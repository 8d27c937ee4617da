"""Scores as the authors' `eval_acc.m` computes them, plus cityscapesScripts-style IoU for cross-checks.

`eval_acc.m` (hszhao/ICNet) with the ADE20K toolkit's `intersectionAndUnion` / `pixelAccuracy`, per image:
`anno = uint8 label + 1` saturates (254 and 255 both become 255, then 0 = ignored), `pred = pred + 1`
likewise, a mis-sized prediction is resized to the label with `imresize(..., 'nearest')`, the prediction
is zeroed where the label is ignored, and intersection / prediction / label areas are `hist(x, 0:19)`:
bins centred on 0..19, so any value above 19 lands in the last bin (class 19 = trainId 18, bicycle).
Over the set: IoU = sum(intersection) ./ sum(eps + union) (eps once per image and class), mIoU is the
mean over all 19 classes (a class never labelled nor predicted scores 0), pixel accuracy = correct /
labelled pixels.
"""
from __future__ import annotations

import numpy as np

from caffe2torch.errors import CaffeError
from icnet_eval.cityscapes import CLASS_NAMES, LABEL_ID_TO_TRAIN_ID, NUM_CLASSES, TRAIN_ID_TO_LABEL_ID
from icnet_eval.imresize import matlab_imresize

__all__ = [
    "MATLAB_EPS",
    "ConfusionCounts",
    "cityscapes_class_iou",
    "cityscapes_confusion",
    "image_counts",
]

MATLAB_EPS = float(np.finfo(np.float64).eps)  # MATLAB's `eps`, 2.2204e-16

# Largest labelId in cityscapesScripts' labels table; its confusion matrix is (33 + 1) square.
_MAX_LABEL_ID = 33


def _plus_one_saturating(image: np.ndarray) -> np.ndarray:
    """MATLAB's uint8 `x + 1`: 255 stays 255."""
    return np.minimum(image.astype(np.int32) + 1, 255)


def _hist_bins(values: np.ndarray) -> np.ndarray:
    """MATLAB `hist(values, 0:19)` on non-negative integers: counts for bins 0..19, values > 19 in bin 19."""
    return np.bincount(np.minimum(values.ravel(), NUM_CLASSES), minlength=NUM_CLASSES + 1).astype(np.int64)


def _check_image(image: np.ndarray, what: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 2:
        raise CaffeError(f"{what} must be a single-channel H x W image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise CaffeError(f"{what} must be uint8 (as read from an 8-bit PNG), got {image.dtype}")
    return image


def image_counts(pred: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """One image of `eval_acc.m`: (intersection, area_pred, area_label) per class (19 each), correct, labelled.

    `pred` and `label` are uint8 trainId images (255 = ignore in the label); `pred` may have another size.
    """
    pred = _check_image(pred, "prediction")
    label = _check_image(label, "label")
    anno = _plus_one_saturating(label)
    anno[anno == 255] = 0
    pred_plus = _plus_one_saturating(pred)
    if pred_plus.shape != anno.shape:
        pred_plus = matlab_imresize(pred_plus.astype(np.uint8), anno.shape, method="nearest").astype(np.int32)
    labelled = anno > 0
    matches = pred_plus == anno
    pred_masked = pred_plus * labelled
    intersection = _hist_bins(pred_masked * (pred_masked == anno))
    area_pred = _hist_bins(pred_masked)
    area_label = _hist_bins(anno)
    # Bin 0 holds unlabelled pixels and is dropped, as intersectionAndUnion does.
    return (intersection[1:], area_pred[1:], area_label[1:],
            int(np.count_nonzero(matches & labelled)), int(np.count_nonzero(labelled)))


class ConfusionCounts:
    """Running totals of `eval_acc.m` over a set of images; mergeable across processes."""

    _FIELDS = 3 * NUM_CLASSES + 3  # intersection, area_pred, area_label, correct, labelled, images

    def __init__(self) -> None:
        self.intersection = np.zeros(NUM_CLASSES, dtype=np.int64)
        self.area_pred = np.zeros(NUM_CLASSES, dtype=np.int64)
        self.area_label = np.zeros(NUM_CLASSES, dtype=np.int64)
        self.pixel_correct = 0
        self.pixel_labeled = 0
        self.images = 0

    def add(self, pred: np.ndarray, label: np.ndarray) -> None:
        """Count one prediction / label pair (uint8 trainId images)."""
        intersection, area_pred, area_label, correct, labelled = image_counts(pred, label)
        self.intersection += intersection
        self.area_pred += area_pred
        self.area_label += area_label
        self.pixel_correct += correct
        self.pixel_labeled += labelled
        self.images += 1

    def merge(self, other: ConfusionCounts) -> ConfusionCounts:
        """Add another accumulator's totals into this one; returns self."""
        merged = self.to_array() + other.to_array()
        self._load(merged)
        return self

    @property
    def union(self) -> np.ndarray:
        return self.area_pred + self.area_label - self.intersection

    def to_array(self) -> np.ndarray:
        """All totals as one int64 vector (e.g. for torch.distributed.all_reduce with SUM)."""
        return np.concatenate([
            self.intersection, self.area_pred, self.area_label,
            np.array([self.pixel_correct, self.pixel_labeled, self.images], dtype=np.int64),
        ])

    @classmethod
    def from_array(cls, totals: np.ndarray) -> ConfusionCounts:
        """Inverse of `to_array`; accepts any integer-valued vector (a float64 one from a reduction too)."""
        counts = cls()
        counts._load(totals)
        return counts

    def _load(self, totals: np.ndarray) -> None:
        totals = np.asarray(totals)
        if totals.shape != (self._FIELDS,):
            raise CaffeError(f"ConfusionCounts: expected a vector of {self._FIELDS} totals, got shape {totals.shape}")
        as_int = np.rint(totals).astype(np.int64)
        if not np.array_equal(as_int, totals) or (as_int < 0).any():
            raise CaffeError("ConfusionCounts: totals must be non-negative whole numbers")
        n = NUM_CLASSES
        self.intersection = as_int[:n].copy()
        self.area_pred = as_int[n:2 * n].copy()
        self.area_label = as_int[2 * n:3 * n].copy()
        self.pixel_correct, self.pixel_labeled, self.images = (int(v) for v in as_int[3 * n:])

    def class_iou(self) -> np.ndarray:
        """IoU per class (fractions), sum(I) ./ sum(eps + U): eps counted once per image, exactly."""
        with np.errstate(invalid="ignore"):  # no images: 0 / 0 = NaN, as in MATLAB
            return self.intersection / (self.union + self.images * MATLAB_EPS)

    def class_accuracy(self) -> np.ndarray:
        """Per class: correct pixels / labelled pixels of that class (0 for a class never labelled)."""
        with np.errstate(invalid="ignore"):
            return self.intersection / (self.area_label + self.images * MATLAB_EPS)

    def summary(self) -> dict:
        """Scores in percent: miou, pixel_accuracy, class_iou and class_accuracy (trainId order)."""
        class_iou = self.class_iou()
        pixel_accuracy = self.pixel_correct / self.pixel_labeled if self.pixel_labeled else 0.0
        return {
            "miou": 100.0 * float(np.mean(class_iou)),
            "pixel_accuracy": 100.0 * pixel_accuracy,
            "class_iou": [100.0 * float(v) for v in class_iou],
            "class_accuracy": [100.0 * float(v) for v in self.class_accuracy()],
            "classes": list(CLASS_NAMES),
            "images": self.images,
        }


def cityscapes_confusion(pred_label_ids: np.ndarray, gt_label_ids: np.ndarray) -> np.ndarray:
    """cityscapesScripts' confusion matrix (rows: ground-truth labelId, columns: predicted labelId), 34 x 34."""
    pred = np.asarray(pred_label_ids)
    gt = np.asarray(gt_label_ids)
    if pred.shape != gt.shape or pred.ndim != 2:
        raise CaffeError(f"cityscapes_confusion: prediction {pred.shape} and ground truth {gt.shape} "
                         "must be H x W images of the same size")
    for image, what in ((pred, "prediction"), (gt, "ground truth")):
        if image.size and (image.min() < 0 or image.max() > _MAX_LABEL_ID):
            raise CaffeError(f"cityscapes_confusion: {what} holds values outside labelIds 0..{_MAX_LABEL_ID}")
    size = _MAX_LABEL_ID + 1
    pairs = gt.astype(np.int64).ravel() * size + pred.astype(np.int64).ravel()
    return np.bincount(pairs, minlength=size * size).reshape(size, size)


def cityscapes_class_iou(confusion: np.ndarray) -> np.ndarray:
    """Per trainId class, IoU = TP / (TP + FP + FN) as `evalPixelLevelSemanticLabeling`; NaN when 0 / 0.

    FN is every other prediction on the class's pixels (void predictions included); FP only counts
    pixels whose ground truth is an evaluated class. Average with np.nanmean as cityscapesScripts does.
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    evaluated = np.flatnonzero(LABEL_ID_TO_TRAIN_ID[: _MAX_LABEL_ID + 1] != 255)
    scores = np.full(NUM_CLASSES, np.nan)
    for train_id, label_id in enumerate(TRAIN_ID_TO_LABEL_ID):
        tp = confusion[label_id, label_id]
        fn = confusion[label_id].sum() - tp
        fp = confusion[evaluated, label_id].sum() - tp
        if tp + fp + fn:
            scores[train_id] = tp / (tp + fp + fn)
    return scores
