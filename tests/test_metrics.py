"""eval_acc.m scoring: against a literal per-image transcription, its quirks, and cityscapesScripts."""
import math

import cv2
import numpy as np
import pytest
from PIL import Image

from caffe2torch.errors import CaffeError
from icnet_eval.cityscapes import (
    CLASS_NAMES,
    LABEL_ID_TO_TRAIN_ID,
    PALETTE,
    TRAIN_ID_TO_LABEL_ID,
    colorize,
    label_ids_to_train_ids,
    train_ids_to_label_ids,
)
from icnet_eval.metrics import MATLAB_EPS, ConfusionCounts, cityscapes_class_iou, cityscapes_confusion

BICYCLE = 18
VOID_LABEL_IDS = [0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30]


def _matlab_nearest_index(n_in: int, n_out: int) -> list[int]:
    """0-based source of each output pixel for imresize 'nearest': box kernel [-0.5, 0.5) at u = x/s + (1 - 1/s)/2."""
    scale = n_out / n_in
    sources = []
    for x in range(1, n_out + 1):
        u = x / scale + 0.5 * (1 - 1 / scale)
        source = math.floor(u + 0.5)  # the one integer i with -0.5 <= u - i < 0.5
        sources.append(min(max(source, 1), n_in) - 1)  # out-of-range taps mirror onto the edge
    return sources


def _eval_acc_loop(pairs):
    """eval_acc.m + intersectionAndUnion.m + pixelAccuracy.m, one pixel and one image at a time."""
    intersections, unions, correct, labelled = [], [], 0, 0
    for pred, label in pairs:
        anno = [[min(int(v) + 1, 255) for v in row] for row in label]
        anno = [[0 if v == 255 else v for v in row] for row in anno]
        guess = [[min(int(v) + 1, 255) for v in row] for row in pred]
        if len(guess) != len(anno) or len(guess[0]) != len(anno[0]):
            rows = _matlab_nearest_index(len(guess), len(anno))
            cols = _matlab_nearest_index(len(guess[0]), len(anno[0]))
            guess = [[guess[r][c] for c in cols] for r in rows]
        area_i, area_p, area_l = [0] * 20, [0] * 20, [0] * 20
        for guess_row, anno_row in zip(guess, anno):
            for p, a in zip(guess_row, anno_row):
                masked = p if a > 0 else 0
                area_i[min(masked if masked == a else 0, 19)] += 1  # hist(x, 0:19): above 19 -> last bin
                area_p[min(masked, 19)] += 1
                area_l[min(a, 19)] += 1
                correct += p == a and a > 0
                labelled += a > 0
        intersections.append(area_i[1:])
        unions.append([area_p[c] + area_l[c] - area_i[c] for c in range(1, 20)])
    iou = []
    for c in range(19):
        denominator = 0.0
        for union in unions:
            denominator += MATLAB_EPS + union[c]
        iou.append(sum(inter[c] for inter in intersections) / denominator)
    return iou, correct / labelled


def _random_pair(rng, shape, pred_shape=None):
    label = rng.integers(0, 19, shape).astype(np.uint8)
    label[rng.random(shape) < 0.1] = 255
    label[rng.random(shape) < 0.05] = 254
    pred = rng.integers(0, 19, pred_shape or shape).astype(np.uint8)
    # Predictions equal to the label often, so the intersections are not all tiny.
    if pred_shape is None:
        agree = rng.random(shape) < 0.5
        pred[agree] = np.minimum(label[agree], 18)
    pred[rng.random(pred.shape) < 0.03] = rng.choice([19, 20, 200, 254, 255])
    return pred, label


def _score(pairs) -> ConfusionCounts:
    counts = ConfusionCounts()
    for pred, label in pairs:
        counts.add(pred, label)
    return counts


def test_matches_literal_eval_acc_loop():
    rng = np.random.default_rng(0)
    pairs = [_random_pair(rng, (13, 17)), _random_pair(rng, (20, 9)), _random_pair(rng, (8, 12), (5, 7)),
             _random_pair(rng, (6, 10), (11, 23))]
    expected_iou, expected_accuracy = _eval_acc_loop(pairs)
    summary = _score(pairs).summary()
    assert summary["images"] == 4
    np.testing.assert_allclose(summary["class_iou"], np.array(expected_iou) * 100, rtol=1e-12, atol=0)
    assert summary["miou"] == pytest.approx(100 * np.mean(expected_iou), rel=1e-12)
    assert summary["pixel_accuracy"] == pytest.approx(100 * expected_accuracy, rel=1e-12)
    assert summary["classes"] == list(CLASS_NAMES)


def test_label_254_is_ignored_like_255():
    rng = np.random.default_rng(1)
    pred, label = _random_pair(rng, (16, 16))
    label[:4] = 254
    with_254 = _score([(pred, label)]).to_array()
    label_255 = label.copy()
    label_255[:4] = 255
    other_pred = pred.copy()
    other_pred[:4] = 3
    np.testing.assert_array_equal(_score([(other_pred, label_255)]).to_array(), with_254)


def test_predictions_above_18_count_as_bicycle():
    label = np.full((4, 10), BICYCLE, dtype=np.uint8)
    label[2:] = 0  # road
    pred = label.copy()
    pred[2, :5] = [19, 20, 100, 254, 255]  # five road pixels predicted out of range
    counts = _score([(pred, label)])
    assert counts.area_pred[BICYCLE] == 20 + 5
    assert counts.intersection[BICYCLE] == 20
    summary = counts.summary()
    assert summary["class_iou"][BICYCLE] == pytest.approx(100 * 20 / 25)
    assert summary["class_iou"][0] == pytest.approx(100 * 15 / 20)
    assert summary["pixel_accuracy"] == pytest.approx(100 * 35 / 40)
    assert summary["class_accuracy"][BICYCLE] == pytest.approx(100.0)
    assert summary["class_accuracy"][0] == pytest.approx(100 * 15 / 20)


def test_predicted_bicycle_as_19_is_not_an_intersection():
    # pred 19 + 1 = 20 != label 18 + 1 = 19: both land in hist bin 19 but the values differ.
    label = np.full((2, 2), BICYCLE, dtype=np.uint8)
    counts = _score([(np.full((2, 2), 19, dtype=np.uint8), label)])
    assert counts.intersection[BICYCLE] == 0 and counts.union[BICYCLE] == 8
    assert counts.summary()["pixel_accuracy"] == 0.0


def test_missized_prediction_is_resized_with_matlab_nearest():
    label = np.arange(24, dtype=np.uint8).reshape(4, 6) % 19
    small = np.array([[0, 1, 2], [3, 4, 5]], dtype=np.uint8)
    upsampled = np.repeat(np.repeat(small, 2, axis=0), 2, axis=1)  # 2x: every source pixel twice
    np.testing.assert_array_equal(_score([(small, label)]).to_array(), _score([(upsampled, label)]).to_array())
    big = np.arange(64, dtype=np.uint8).reshape(8, 8) % 19
    half_label = np.zeros((4, 4), dtype=np.uint8)
    picked = big[1::2, 1::2]  # MATLAB 'nearest' halving takes pixels 2, 4, ... (1-based)
    np.testing.assert_array_equal(_score([(big, half_label)]).to_array(), _score([(picked, half_label)]).to_array())


def test_absent_classes_score_zero_in_miou():
    label = np.zeros((4, 4), dtype=np.uint8)
    label[:, 2:] = 1
    summary = _score([(label.copy(), label)]).summary()
    assert summary["class_iou"][:2] == pytest.approx([100.0, 100.0])
    assert summary["class_iou"][2:] == [0.0] * 17
    assert summary["miou"] == pytest.approx(200 / 19)
    assert summary["class_accuracy"][2:] == [0.0] * 17


def test_eps_is_added_once_per_image_and_class():
    label = np.array([[0, 255]], dtype=np.uint8)
    counts = _score([(label.copy(), label), (label.copy(), label), (np.array([[0, 3]], np.uint8), label)])
    # road: intersection 3, union 3, three images -> 3 / (3 + 3 eps), as sum(eps + union) gives.
    assert counts.class_iou()[0] == 3 / (3 + 3 * MATLAB_EPS)
    assert counts.class_iou()[0] < 1.0
    assert counts.class_iou()[3] == 0.0  # predicted only on an ignored pixel: 0 / (3 eps)


def test_to_array_from_array_and_merge():
    rng = np.random.default_rng(2)
    pairs = [_random_pair(rng, (9, 11)) for _ in range(5)]
    everything = _score(pairs)
    first, second = _score(pairs[:2]), _score(pairs[2:])
    merged = ConfusionCounts.from_array(first.to_array()).merge(second)
    np.testing.assert_array_equal(merged.to_array(), everything.to_array())
    assert merged.summary() == everything.summary()
    vector = everything.to_array()
    # 3 x 19 eval_acc.m areas, correct, labelled, images, instance images, 19 x 19 confusion, 2 x (19 + 7) instance terms
    assert vector.dtype == np.float64 and vector.shape == (57 + 4 + 361 + 52,) and vector[59] == 5
    reduced = ConfusionCounts.from_array(first.to_array() + second.to_array())
    assert reduced.summary() == everything.summary()
    with pytest.raises(CaffeError):
        ConfusionCounts.from_array(np.zeros(473))
    with pytest.raises(CaffeError):
        ConfusionCounts.from_array(np.full(474, 0.5))


@pytest.mark.parametrize("pred,label", [
    (np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2), np.uint8)),
    (np.zeros((2, 2), np.int32), np.zeros((2, 2), np.uint8)),
])
def test_bad_images_raise_caffe_error(pred, label):
    with pytest.raises(CaffeError):
        ConfusionCounts().add(pred, label)


def _agreeing_label_id_pairs(rng, count=3, shape=(24, 40)):
    """Every evaluated class present in the ground truth, void labelIds too, predictions only real classes."""
    pairs = []
    for _ in range(count):
        gt = rng.choice(TRAIN_ID_TO_LABEL_ID + tuple(VOID_LABEL_IDS), size=shape).astype(np.uint8)
        gt.ravel()[:19] = TRAIN_ID_TO_LABEL_ID
        pred = gt.copy()
        wrong = rng.random(shape) < 0.4
        pred[wrong] = rng.choice(TRAIN_ID_TO_LABEL_ID, size=int(wrong.sum()))
        void = np.isin(pred, VOID_LABEL_IDS)
        pred[void] = rng.choice(TRAIN_ID_TO_LABEL_ID, size=int(void.sum()))
        pairs.append((pred, gt))
    return pairs


def _official_class_iou(tmp_path, pairs):
    evaluation = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    predictions, ground_truths = [], []
    for i, (pred, gt) in enumerate(pairs):
        predictions.append(str(tmp_path / f"pred_{i}.png"))
        ground_truths.append(str(tmp_path / f"gt_{i}_gtFine_labelIds.png"))
        Image.fromarray(pred).save(predictions[-1])
        Image.fromarray(gt).save(ground_truths[-1])
    args = evaluation.args
    args.evalInstLevelScore, args.JSONOutput, args.quiet, args.evalPixelAccuracy = False, False, True, False
    scores = evaluation.evaluateImgLists(predictions, ground_truths, args)["classScores"]
    return np.array([scores[name] for name in CLASS_NAMES])


def test_agrees_with_official_cityscapes_scripts(tmp_path):
    """Where both conventions coincide, cityscapesScripts and eval_acc.m give the same class IoU.

    They coincide when every class occurs in the ground truth and no prediction is void. They differ:
    - a class with TP + FP + FN = 0 is NaN and left out of cityscapesScripts' mean; eval_acc.m scores it 0;
    - a void prediction on a valid pixel is only a FN for cityscapesScripts; eval_acc.m reads its
      trainId 255 as a prediction of class 19 (bicycle): a FP for bicycle and a miss for pixel accuracy;
    - eval_acc.m adds eps per image to each union and resizes mis-sized predictions; cityscapesScripts
      rejects them.
    """
    pairs = _agreeing_label_id_pairs(np.random.default_rng(3))
    official = _official_class_iou(tmp_path, pairs)
    assert not np.isnan(official).any()
    ours_cityscapes = cityscapes_class_iou(sum(cityscapes_confusion(pred, gt) for pred, gt in pairs))
    np.testing.assert_allclose(ours_cityscapes, official, rtol=1e-12, atol=0)
    eval_acc = _score([(LABEL_ID_TO_TRAIN_ID[pred], LABEL_ID_TO_TRAIN_ID[gt]) for pred, gt in pairs])
    np.testing.assert_allclose(eval_acc.class_iou(), official, rtol=1e-12, atol=0)


def test_conventions_differ_on_void_predictions_and_absent_classes(tmp_path):
    gt = np.full((4, 8), TRAIN_ID_TO_LABEL_ID[0], dtype=np.uint8)  # road everywhere
    gt[:, 4:] = TRAIN_ID_TO_LABEL_ID[BICYCLE]
    pred = gt.copy()
    pred[0, :2] = 0  # two road pixels predicted void ('unlabeled')
    official = _official_class_iou(tmp_path, [(pred, gt)])
    ours_cityscapes = cityscapes_class_iou(cityscapes_confusion(pred, gt))
    np.testing.assert_allclose(ours_cityscapes, official, rtol=1e-12, atol=0)
    assert official[0] == pytest.approx(14 / 16) and official[BICYCLE] == 1.0
    assert np.isnan(official[1:BICYCLE]).all()
    summary = _score([(LABEL_ID_TO_TRAIN_ID[pred], LABEL_ID_TO_TRAIN_ID[gt])]).summary()
    assert summary["class_iou"][0] == pytest.approx(100 * 14 / 16)
    assert summary["class_iou"][BICYCLE] == pytest.approx(100 * 16 / 18)  # void read as bicycle
    assert summary["miou"] == pytest.approx((100 * 14 / 16 + 100 * 16 / 18) / 19)


def test_train_id_round_trip_for_cityscapes_confusion():
    train_ids = np.arange(19, dtype=np.uint8).reshape(1, 19)
    confusion = cityscapes_confusion(train_ids_to_label_ids(train_ids), train_ids_to_label_ids(train_ids))
    np.testing.assert_array_equal(cityscapes_class_iou(confusion), np.ones(19))
    with pytest.raises(CaffeError):
        cityscapes_confusion(np.full((2, 2), 34, np.uint8), np.zeros((2, 2), np.uint8))


def test_label_tables_match_cityscapes_scripts():
    labels = pytest.importorskip("cityscapesscripts.helpers.labels")
    for train_id, name in enumerate(CLASS_NAMES):
        official = labels.trainId2label[train_id]
        assert (official.name, official.id) == (name, TRAIN_ID_TO_LABEL_ID[train_id])
        assert tuple(official.color) == tuple(int(v) for v in PALETTE[train_id])
    for label in labels.labels:
        if label.id >= 0:
            expected = label.trainId if 0 <= label.trainId < 19 else 255
            assert LABEL_ID_TO_TRAIN_ID[label.id] == expected, label.name
    assert LABEL_ID_TO_TRAIN_ID[34:].tolist() == [255] * 222
    np.testing.assert_array_equal(train_ids_to_label_ids(np.array([[0, 18, 19, 255]], np.uint8)), [[7, 33, 0, 0]])
    np.testing.assert_array_equal(label_ids_to_train_ids(np.array([[7, 33, 0, 255]], np.uint8)), [[0, 18, 255, 255]])
    np.testing.assert_array_equal(colorize(np.array([[0, 255]], np.uint8)), [[[128, 64, 128], [0, 0, 0]]])


def _cityscapes_set(root, rng, images=3, size=(40, 64)):
    """Labels (labelIds), instanceIds and trainId predictions in Cityscapes' layout, with instances of
    evaluated classes (person, rider, car, bus) and of an ignored one (caravan)."""
    from icnet_eval.cityscapes import LABEL_ID_TO_TRAIN_ID, TRAIN_ID_TO_LABEL_ID

    pairs = []
    for index in range(images):
        stem = f"city_{index:06d}_000019"
        folder = root / "gtFine" / "val" / "city"
        folder.mkdir(parents=True, exist_ok=True)
        label_ids = rng.choice([0, 4, 7, 8, 11, 17, 21, 23, 24, 26], size=size).astype(np.uint8)
        instances = label_ids.astype(np.uint16).copy()
        for number, (label_id, top, left, height, width) in enumerate(
                [(24, 2, 3, 9, 7), (24, 15, 30, 12, 5), (25, 5, 20, 6, 6), (26, 20, 2, 14, 20), (28, 1, 45, 10, 15),
                 (29, 28, 40, 8, 12)]):
            block = (slice(top, top + height), slice(left, left + width))
            label_ids[block] = label_id
            instances[block] = label_id * 1000 + number
        train_ids = LABEL_ID_TO_TRAIN_ID[label_ids]
        prediction = np.where(rng.random(size) < 0.7, np.minimum(train_ids, 18), rng.integers(0, 19, size)).astype(np.uint8)
        cv2.imwrite(str(folder / f"{stem}_gtFine_labelIds.png"), label_ids)
        cv2.imwrite(str(folder / f"{stem}_gtFine_instanceIds.png"), instances)
        cv2.imwrite(str(root / f"{stem}_pred_labelIds.png"), np.array(TRAIN_ID_TO_LABEL_ID, np.uint8)[prediction])
        pairs.append((stem, prediction, train_ids, instances))
    return pairs


def test_category_iou_iiou_and_confusion_equal_cityscapes_scripts(tmp_path, monkeypatch):
    """cityscapesScripts' evalPixelLevelSemanticLabeling on the same images: class IoU (up to eval_acc.m's eps),
    category IoU, class and category iIoU and the confusion matrix."""
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cityscapes

    monkeypatch.setattr(np, "in1d", np.isin, raising=False)  # cityscapesscripts 2.3 calls what numpy 2.4 removed
    from icnet_eval.cityscapes import CATEGORY_NAMES, CLASS_NAMES, TRAIN_ID_TO_LABEL_ID

    pairs = _cityscapes_set(tmp_path, np.random.default_rng(11))
    counts = ConfusionCounts()
    for _, prediction, train_ids, instances in pairs:
        counts.add(prediction, train_ids, instances)
    report = counts.summary()
    args = cityscapes.args
    args.quiet, args.JSONOutput, args.evalInstLevelScore, args.evalPixelAccuracy = True, False, True, False
    result = cityscapes.evaluateImgLists(
        [str(tmp_path / f"{stem}_pred_labelIds.png") for stem, *_ in pairs],
        [str(tmp_path / "gtFine" / "val" / "city" / f"{stem}_gtFine_labelIds.png") for stem, *_ in pairs], args)
    theirs = np.array([result["classScores"][name] for name in CLASS_NAMES]) * 100
    np.testing.assert_allclose(report["class_iou"], np.nan_to_num(theirs), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(report["category_iou"], [100 * result["categoryScores"][c] for c in CATEGORY_NAMES],
                               rtol=1e-12)
    assert report["category_miou"] == pytest.approx(100 * result["averageScoreCategories"], rel=1e-12)
    instance_theirs = [100 * result["classInstScores"][name] for name in CLASS_NAMES]
    np.testing.assert_allclose(report["class_iiou"], instance_theirs, rtol=1e-12, equal_nan=True)
    assert report["class_miiou"] == pytest.approx(100 * result["averageScoreInstClasses"], rel=1e-12)
    np.testing.assert_allclose(report["category_iiou"], [100 * result["categoryInstScores"][c] for c in CATEGORY_NAMES],
                               rtol=1e-12, equal_nan=True)
    matrix = np.array(result["confMatrix"])
    evaluated = list(TRAIN_ID_TO_LABEL_ID)
    np.testing.assert_array_equal(report["confusion_matrix"], matrix[np.ix_(evaluated, evaluated)])
    assert np.isnan(report["class_iiou"][0]) and not np.isnan(report["class_iiou"][11])  # road has no instances


def test_per_image_scores_and_deterministic_instance_sums():
    rng = np.random.default_rng(4)
    counts = ConfusionCounts()
    single = []
    for _ in range(3):
        prediction, label = _random_pair(rng, (9, 11))
        alone = ConfusionCounts()
        alone.add(prediction, label)
        single.append((alone.summary()["miou"], alone.summary()["pixel_accuracy"]))
        assert counts.add(prediction, label) == pytest.approx(single[-1], rel=1e-12)
    assert "class_iiou" not in counts.summary()  # no instanceIds: no instance-level scores
