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
from icnet_eval.cityscapes import (AVERAGE_INSTANCE_SIZE, CATEGORY_NAMES, CLASS_CATEGORY, CLASS_NAMES,
                                   INSTANCE_CATEGORIES, LABEL_ID_TO_TRAIN_ID, NUM_CLASSES, TRAIN_ID_TO_LABEL_ID)
from icnet_eval.imresize import matlab_imresize

__all__ = [
    "MATLAB_EPS",
    "ConfusionCounts",
    "cityscapes_class_iou",
    "cityscapes_confusion",
    "error_pixels",
    "image_confusion",
    "image_counts",
    "image_instance_terms",
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


def _prediction_at_label_size(pred: np.ndarray, label: np.ndarray) -> np.ndarray:
    """`pred + 1` (saturating) resized to the label with 'nearest' when the sizes differ, as eval_acc.m."""
    pred_plus = _plus_one_saturating(pred)
    if pred_plus.shape != label.shape:
        pred_plus = matlab_imresize(pred_plus.astype(np.uint8), label.shape, method="nearest").astype(np.int32)
    return pred_plus


def image_counts(pred: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """One image of `eval_acc.m`: (intersection, area_pred, area_label) per class (19 each), correct, labelled.

    `pred` and `label` are uint8 trainId images (255 = ignore in the label); `pred` may have another size.
    """
    pred = _check_image(pred, "prediction")
    label = _check_image(label, "label")
    anno = _plus_one_saturating(label)
    anno[anno == 255] = 0
    pred_plus = _prediction_at_label_size(pred, label)
    labelled = anno > 0
    matches = pred_plus == anno
    pred_masked = pred_plus * labelled
    intersection = _hist_bins(pred_masked * (pred_masked == anno))
    area_pred = _hist_bins(pred_masked)
    area_label = _hist_bins(anno)
    # Bin 0 holds unlabelled pixels and is dropped, as intersectionAndUnion does.
    return (intersection[1:], area_pred[1:], area_label[1:],
            int(np.count_nonzero(matches & labelled)), int(np.count_nonzero(labelled)))


def error_pixels(pred: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where eval_acc.m counts the prediction wrong, and where it ignores the label (255, and 254 through its
    uint8 + 1): two bool masks at the label's size (a prediction of another size is resized as eval_acc.m does)."""
    pred = _check_image(pred, "prediction")
    label = _check_image(label, "label")
    anno = _plus_one_saturating(label)
    ignored = anno == 255
    wrong = (_prediction_at_label_size(pred, label) != anno) & ~ignored
    return wrong, ignored


def _predicted_class(pred: np.ndarray, label: np.ndarray) -> np.ndarray:
    """The class eval_acc.m's `hist` counts each prediction pixel in: values above 18 in the last one."""
    return np.minimum(_prediction_at_label_size(pred, label) - 1, NUM_CLASSES - 1)


def image_confusion(pred: np.ndarray, label: np.ndarray) -> np.ndarray:
    """19 x 19 counts of one image, rows ground-truth trainId, columns predicted trainId, over eval_acc.m's
    labelled pixels (its column sums are eval_acc.m's prediction areas)."""
    labelled = (_plus_one_saturating(label) != 255).ravel()
    gt = label.ravel()[labelled].astype(np.int64)
    predicted = _predicted_class(pred, label).ravel()[labelled]
    return np.bincount(gt * NUM_CLASSES + predicted, minlength=NUM_CLASSES ** 2).reshape(NUM_CLASSES, NUM_CLASSES)


def image_instance_terms(pred: np.ndarray, label: np.ndarray, instances: np.ndarray) -> np.ndarray:
    """cityscapesScripts' instance terms of one image (evaluatePair): per evaluated instance, pixels of its
    class (and of its category) predicted as such and the rest, weighted by the class's average instance
    size over the instance's size; as one vector: class tp, class fn (per trainId), category tp, category fn."""
    if instances.shape != label.shape:
        raise CaffeError(f"instanceIds image is {instances.shape[0]}x{instances.shape[1]}, the label "
                         f"{label.shape[0]}x{label.shape[1]}")
    n, c = NUM_CLASSES, len(CATEGORY_NAMES)
    predicted = _predicted_class(pred, label).ravel()
    ids = instances.ravel().astype(np.int64)
    chosen = ids > 1000  # instance ids are labelId * 1000 + index; below: no instance
    unique, inverse = np.unique(ids[chosen], return_inverse=True)
    train = LABEL_ID_TO_TRAIN_ID[np.minimum(unique // 1000, 255)].astype(np.int64)
    sizes = np.bincount(inverse, minlength=unique.size).astype(np.float64)
    pixel_train, pixel_pred = train[inverse], predicted[chosen]
    hits = np.bincount(inverse, weights=pixel_pred == pixel_train, minlength=unique.size)
    same_category = CLASS_CATEGORY[pixel_pred] == CLASS_CATEGORY[np.minimum(pixel_train, n - 1)]
    category_hits = np.bincount(inverse, weights=same_category, minlength=unique.size)
    terms = np.zeros(2 * n + 2 * c)
    for index, train_id in enumerate(train):
        if int(train_id) not in AVERAGE_INSTANCE_SIZE:
            continue  # not an evaluated class with instances (caravan, trailer, ...)
        weight = AVERAGE_INSTANCE_SIZE[int(train_id)] / sizes[index]
        category = int(CLASS_CATEGORY[train_id])
        terms[train_id] += hits[index] * weight
        terms[n + train_id] += (sizes[index] - hits[index]) * weight
        terms[2 * n + category] += category_hits[index] * weight
        terms[2 * n + c + category] += (sizes[index] - category_hits[index]) * weight
    return terms


class ConfusionCounts:
    """Running totals of `eval_acc.m` over a set of images, with the confusion matrix and cityscapesScripts'
    instance terms; mergeable across processes (`to_array` / `from_array`)."""

    def __init__(self) -> None:
        n = NUM_CLASSES
        self.intersection = np.zeros(n, dtype=np.int64)
        self.area_pred = np.zeros(n, dtype=np.int64)
        self.area_label = np.zeros(n, dtype=np.int64)
        self.pixel_correct = 0
        self.pixel_labeled = 0
        self.images = 0
        self.confusion = np.zeros((n, n), dtype=np.int64)
        self.instance_images = 0  # images that came with an instanceIds file
        self.instance_terms = np.zeros(2 * n + 2 * len(CATEGORY_NAMES))

    def add(self, pred: np.ndarray, label: np.ndarray, instances: np.ndarray | None = None) -> tuple[float, float]:
        """Count one prediction / label pair (uint8 trainId images; `instances`: cityscapes instanceIds).

        Returns the image's own mIoU and pixel accuracy (percent), as eval_acc.m would give for it alone.
        """
        terms = image_instance_terms(pred, label, instances) if instances is not None else None
        return self._count(*image_counts(pred, label), image_confusion(pred, label), terms)

    def add_confusion(self, confusion: np.ndarray, instance_terms: np.ndarray | None = None) -> tuple[float, float]:
        """`add` for a prediction of trainIds 0..18 given by its 19 x 19 confusion matrix over the labelled
        pixels (`predict.label_confusion`, computed where the prediction is): eval_acc.m's intersection is
        the diagonal, its prediction and label areas the column and row sums. Same return value as `add`."""
        confusion = np.asarray(confusion, dtype=np.int64)
        if confusion.shape != (NUM_CLASSES, NUM_CLASSES):
            raise CaffeError(f"ConfusionCounts: expected a {NUM_CLASSES}x{NUM_CLASSES} matrix, got {confusion.shape}")
        intersection = np.diagonal(confusion).copy()
        correct = int(intersection.sum())
        return self._count(intersection, confusion.sum(axis=0), confusion.sum(axis=1), correct,
                           int(confusion.sum()), confusion, instance_terms)

    def _count(self, intersection: np.ndarray, area_pred: np.ndarray, area_label: np.ndarray, correct: int,
               labelled: int, confusion: np.ndarray, instance_terms: np.ndarray | None) -> tuple[float, float]:
        self.intersection += intersection
        self.area_pred += area_pred
        self.area_label += area_label
        self.pixel_correct += correct
        self.pixel_labeled += labelled
        self.images += 1
        self.confusion += confusion
        if instance_terms is not None:
            self.instance_terms += instance_terms
            self.instance_images += 1
        union = area_pred + area_label - intersection
        return (100.0 * float(np.mean(intersection / (union + MATLAB_EPS))),
                100.0 * correct / labelled if labelled else 0.0)

    def merge(self, other: ConfusionCounts) -> ConfusionCounts:
        """Add another accumulator's totals into this one; returns self."""
        self._load(self.to_array() + other.to_array())
        return self

    @property
    def union(self) -> np.ndarray:
        return self.area_pred + self.area_label - self.intersection

    def to_array(self) -> np.ndarray:
        """All totals as one float64 vector (for torch.distributed.all_reduce with SUM; counts stay exact)."""
        return np.concatenate([
            self.intersection, self.area_pred, self.area_label,
            [self.pixel_correct, self.pixel_labeled, self.images, self.instance_images],
            self.confusion.ravel(), self.instance_terms,
        ]).astype(np.float64)

    @classmethod
    def from_array(cls, totals: np.ndarray) -> ConfusionCounts:
        """Inverse of `to_array`; accepts any whole-valued vector (a float64 one from a reduction too)."""
        counts = cls()
        counts._load(totals)
        return counts

    def _load(self, totals: np.ndarray) -> None:
        n = NUM_CLASSES
        counted = 3 * n + 4 + n * n
        totals = np.asarray(totals, dtype=np.float64)
        if totals.shape != (counted + self.instance_terms.size,):
            raise CaffeError(f"ConfusionCounts: expected a vector of {counted + self.instance_terms.size} totals, "
                             f"got shape {totals.shape}")
        as_int = np.rint(totals[:counted]).astype(np.int64)
        if not np.array_equal(as_int, totals[:counted]) or (as_int < 0).any():
            raise CaffeError("ConfusionCounts: totals must be non-negative whole numbers")
        self.intersection = as_int[:n].copy()
        self.area_pred = as_int[n:2 * n].copy()
        self.area_label = as_int[2 * n:3 * n].copy()
        self.pixel_correct, self.pixel_labeled, self.images, self.instance_images = (
            int(v) for v in as_int[3 * n:3 * n + 4])
        self.confusion = as_int[3 * n + 4:].reshape(n, n).copy()
        self.instance_terms = totals[counted:].copy()

    def class_iou(self) -> np.ndarray:
        """IoU per class (fractions), sum(I) ./ sum(eps + U): eps counted once per image, exactly."""
        with np.errstate(invalid="ignore"):  # no images: 0 / 0 = NaN, as in MATLAB
            return self.intersection / (self.union + self.images * MATLAB_EPS)

    def class_accuracy(self) -> np.ndarray:
        """Per class: correct pixels / labelled pixels of that class (0 for a class never labelled)."""
        with np.errstate(invalid="ignore"):
            return self.intersection / (self.area_label + self.images * MATLAB_EPS)

    def category_iou(self) -> np.ndarray:
        """cityscapesScripts' getIouScoreForCategory on this confusion matrix (NaN where 0 / 0)."""
        scores = np.full(len(CATEGORY_NAMES), np.nan)
        for category in range(len(CATEGORY_NAMES)):
            members = CLASS_CATEGORY == category
            tp = self.confusion[np.ix_(members, members)].sum()
            fn = self.confusion[members].sum() - tp
            fp = self.confusion[np.ix_(~members, members)].sum()
            if tp + fp + fn:
                scores[category] = tp / (tp + fp + fn)
        return scores

    def instance_iou(self) -> tuple[np.ndarray, np.ndarray]:
        """cityscapesScripts' iIoU per class and per category: instance-weighted tp and fn, plain fp from the
        confusion matrix (NaN for classes and categories without instances, and for 0 / 0)."""
        n, c = NUM_CLASSES, len(CATEGORY_NAMES)
        class_tp, class_fn = self.instance_terms[:n], self.instance_terms[n:2 * n]
        category_tp, category_fn = self.instance_terms[2 * n:2 * n + c], self.instance_terms[2 * n + c:]
        classes = np.full(n, np.nan)
        for train_id in AVERAGE_INSTANCE_SIZE:
            fp = self.confusion[:, train_id].sum() - self.confusion[train_id, train_id]
            denominator = class_tp[train_id] + fp + class_fn[train_id]
            if denominator:
                classes[train_id] = class_tp[train_id] / denominator
        categories = np.full(c, np.nan)
        for category in INSTANCE_CATEGORIES:
            members = CLASS_CATEGORY == category
            fp = self.confusion[np.ix_(~members, members)].sum()
            denominator = category_tp[category] + fp + category_fn[category]
            if denominator:
                categories[category] = category_tp[category] / denominator
        return classes, categories

    def summary(self) -> dict:
        """Scores in percent (trainId and category order), the 19 x 19 confusion matrix in pixels (rows ground
        truth), and instance-level scores when every image came with an instanceIds file."""
        class_iou = self.class_iou()
        category_iou = self.category_iou()
        pixel_accuracy = self.pixel_correct / self.pixel_labeled if self.pixel_labeled else 0.0
        report = {
            "miou": 100.0 * float(np.mean(class_iou)),
            "pixel_accuracy": 100.0 * pixel_accuracy,
            "class_iou": [100.0 * float(v) for v in class_iou],
            "class_accuracy": [100.0 * float(v) for v in self.class_accuracy()],
            "classes": list(CLASS_NAMES),
            "category_iou": [100.0 * float(v) for v in category_iou],
            "category_miou": _nan_mean_percent(category_iou),
            "categories": list(CATEGORY_NAMES),
            "confusion_matrix": self.confusion.tolist(),
            "images": self.images,
        }
        if self.images and self.instance_images == self.images:
            classes, categories = self.instance_iou()
            report.update(class_iiou=[100.0 * float(v) for v in classes], class_miiou=_nan_mean_percent(classes),
                          category_iiou=[100.0 * float(v) for v in categories],
                          category_miiou=_nan_mean_percent(categories))
        return report


def _nan_mean_percent(values: np.ndarray) -> float | None:
    """cityscapesScripts' getScoreAverage: the mean over the defined scores, in percent."""
    defined = values[np.isfinite(values)]
    return 100.0 * float(defined.mean()) if defined.size else None


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
