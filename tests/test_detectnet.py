"""DIGITS' DetectNet clustering (NVCaffe's python/caffe/layers/detectnet/clustering.py) against a transcription of
that file with OpenCV's groupRectangles written out as its C++ does it (cascadedetect.cpp, operations.hpp's
partition, the Python binding's saturate_cast of the float boxes)."""
import math

import numpy as np
import pytest
import torch

from caffe2torch.errors import CaffeError
from tests.conftest import layer_from_text, run_layer


def _cv_round(value: float) -> int:
    return int(np.rint(value))  # cvRound: to nearest, ties to even


def _partition(rects, eps):
    """operations.hpp's partition with SimilarRects: union-find by rank, labels by first occurrence."""
    def similar(a, b):
        delta = eps * (min(a[2], b[2]) + min(a[3], b[3])) * 0.5
        return (abs(a[0] - b[0]) <= delta and abs(a[1] - b[1]) <= delta and
                abs(a[0] + a[2] - b[0] - b[2]) <= delta and abs(a[1] + a[3] - b[1] - b[3]) <= delta)

    n = len(rects)
    parent, rank = [-1] * n, [0] * n
    for i in range(n):
        root = i
        while parent[root] >= 0:
            root = parent[root]
        for j in range(n):
            if i == j or not similar(rects[i], rects[j]):
                continue
            root2 = j
            while parent[root2] >= 0:
                root2 = parent[root2]
            if root2 != root:
                if rank[root] > rank[root2]:
                    parent[root2] = root
                else:
                    parent[root] = root2
                    rank[root2] += rank[root] == rank[root2]
                    root = root2
                for k in (j, i):  # path compression
                    while parent[k] >= 0:
                        following = parent[k]
                        parent[k] = root
                        k = following
    labels, classes = [0] * n, {}
    for i in range(n):
        root = i
        while parent[root] >= 0:
            root = parent[root]
        labels[i] = classes.setdefault(root, len(classes))
    return labels, len(classes)


def group_rectangles(rects, threshold, eps):
    if threshold <= 0 or not rects:
        return rects, [1] * len(rects)
    labels, classes = _partition(rects, eps)
    sums, weights = [[0, 0, 0, 0] for _ in range(classes)], [0] * classes
    for rect, label in zip(rects, labels):
        sums[label] = [s + v for s, v in zip(sums[label], rect)]
        weights[label] += 1
    average = []
    for total, n in zip(sums, weights):
        s = np.float32(1.0) / np.float32(n)
        average.append([_cv_round(float(np.float32(v) * s)) for v in total])
    out, out_weights = [], []
    for i in range(classes):
        r1, n1 = average[i], weights[i]
        if n1 <= threshold:
            continue
        for j in range(classes):
            n2 = weights[j]
            if j == i or n2 <= threshold:
                continue
            r2 = average[j]
            dx, dy = _cv_round(r2[2] * eps), _cv_round(r2[3] * eps)
            if (r1[0] >= r2[0] - dx and r1[1] >= r2[1] - dy and r1[0] + r1[2] <= r2[0] + r2[2] + dx and
                    r1[1] + r1[3] <= r2[1] + r2[3] + dy and (n2 > max(3, n1) or n1 < 3)):
                break
        else:
            out.append(r1)
            out_weights.append(n1)
    return out, out_weights


def cluster_reference(cvg, boxes, size_x, size_y, stride, threshold, rect_threshold, eps, min_height):
    """clustering.py's cluster(), gridbox_to_boxes() and vote_boxes() for one class."""
    result = np.zeros([cvg.shape[0], 50, 5])
    grid_x, grid_y = int(size_x / stride), int(size_y / stride)
    cell_width, cell_height = size_x / grid_x, size_y / grid_y
    for i in range(cvg.shape[0]):
        cvg_val = cvg[i, 0, 0:grid_y, 0:grid_x]
        y, x = np.where(cvg_val >= threshold)
        mx, my = x * cell_width, y * cell_height
        propose = np.transpose(np.vstack([boxes[i][0][y, x] + mx, boxes[i][1][y, x] + my,
                                          boxes[i][2][y, x] + mx, boxes[i][3][y, x] + my]))
        detections = []
        if propose.any():
            rects = [[_cv_round(e[0]), _cv_round(e[1]), _cv_round(e[2] - e[0]), _cv_round(e[3] - e[1])]
                     for e in propose.tolist()]
            for rect, weight in zip(*group_rectangles(rects, rect_threshold, eps)):
                if rect[3] >= min_height:
                    detections.append([rect[0], rect[1], rect[0] + rect[2], rect[1] + rect[3], math.log(weight)])
        detections = np.asarray(detections, dtype=np.float16)
        if detections.shape[0]:
            result[i, 0:detections.shape[0], 0:detections.shape[1]] = detections
    return result.astype(np.float32)


def _maps(seed: int, size=(2, 24, 78), objects=6):
    """Coverage with a few blobs, and boxes that vote for nearby rectangles around them (as a trained net does)."""
    rng = np.random.default_rng(seed)
    n, h, w = size
    cvg = (rng.random((n, 1, h, w)) * 0.3).astype(np.float32)
    boxes = np.zeros((n, 4, h, w), np.float32)
    for i in range(n):
        for _ in range(objects):
            cy, cx = rng.integers(1, h - 3), rng.integers(1, w - 3)
            cvg[i, 0, cy:cy + 3, cx:cx + 3] = rng.uniform(0.5, 1.0, (3, 3))
            for dy in range(3):
                for dx in range(3):
                    jitter = rng.normal(0, 0.3, 4)
                    boxes[i, :, cy + dy, cx + dx] = np.array([-16 * dx - 8, -16 * dy - 10, 40 - 16 * dx,
                                                              30 - 16 * dy]) + jitter
        boxes[i] += rng.normal(0, 30, (4, h, w)).astype(np.float32) * (cvg[i] < 0.5)
    return cvg, boxes


@pytest.mark.parametrize("param, seed", [("1248, 384, 16, 0.6, 3, 0.02, 22", 0), ("1248,384,16,0.25,1,0.1,10", 1),
                                         ("1248, 384, 16, 0.9, 0, 0.05, 5", 2), ("1250, 390, 16, 0.5, 2, 0.2, 1", 3)])
def test_cluster_detections_match_the_fork_with_opencvs_grouping(param, seed):
    cvg, boxes = _maps(seed)
    layer = layer_from_text(f'name: "cluster" type: "Python" top: "bbox-list" python_param {{ '
                            f'module: "caffe.layers.detectnet.clustering" layer: "ClusterDetections" '
                            f'param_str: "{param}" }}')
    converted, got = run_layer(layer, [cvg.shape, boxes.shape], [], cvg, boxes)
    values = [float(v) for v in param.split(",")]
    want = cluster_reference(cvg, boxes, int(values[0]), int(values[1]), int(values[2]), values[3], int(values[4]),
                             values[5], int(values[6]))
    assert converted.top_shapes == [(2, 50, 5)]
    assert np.count_nonzero(want.any(axis=2)) > 0  # some boxes found
    np.testing.assert_array_equal(got, want)


def test_cluster_detections_refuse_what_the_fork_refuses():
    cvg, boxes = _maps(4, objects=1)
    text = ('name: "cluster" type: "Python" top: "a" top: "b" python_param { module: '
            '"caffe.layers.detectnet.clustering" layer: "ClusterDetections" param_str: "{param}" }')
    with pytest.raises(CaffeError, match="2 classes: the coverage"):
        run_layer(layer_from_text(text.replace("{param}", "1248,384,16,0.5,1,0.1,1,2")),
                  [cvg.shape, boxes.shape], [], cvg, boxes)
    with pytest.raises(CaffeError, match="param_str 'x': expected"):
        run_layer(layer_from_text(text.replace("{param}", "x").replace(' top: "b"', '')),
                  [cvg.shape, boxes.shape], [], cvg, boxes)
    # More than 50 groups in one image: NumPy cannot place them in the fork.
    many = np.ones((1, 1, 24, 78), np.float32)
    spread = np.zeros((1, 4, 24, 78), np.float32)
    spread[0, 2:] = 12
    layer = layer_from_text(text.replace("{param}", "1248,384,16,0.5,0,0.1,1").replace(' top: "b"', ''))
    converted, _ = run_layer(layer, [many.shape, spread.shape], [], cvg[:1], boxes[:1])
    with pytest.raises(CaffeError, match="boxes in one image, more than the layer's 50 rows"):
        converted.module(torch.from_numpy(many), torch.from_numpy(spread))
