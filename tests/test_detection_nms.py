"""SSD's ApplyNMSFast (bbox_util.cpp) at scale: the same kept rows as the fork's loop, including its eta-adapted
threshold, top_k, float32 JaccardOverlap, std::min / std::max on NaN and the stable order of equal scores, in time
proportional to kept x candidates (SSD512's 24,564 priors well under a second)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from caffe2torch.detection import NMS_BLOCK, _overlaps, box_sizes, jaccard, nms_fast
from tests.conftest import layer_from_text
from tests.test_layers_ssd import _jaccard_reference, _nms_reference

F = np.float32


def _boxes(rng: np.random.Generator, count: int, side: tuple[float, float]) -> np.ndarray:
    centers = rng.uniform(0.1, 0.9, (count, 2))
    sides = rng.uniform(*side, (count, 2))
    return np.concatenate([centers - sides / 2, centers + sides / 2], axis=1).astype(F)


def _sizes_reference(boxes: np.ndarray) -> list:
    """BBoxSize in float32: 0 for a box with xmax < xmin or ymax < ymin."""
    return [F(0) if b[2] < b[0] or b[3] < b[1] else F(F(b[2] - b[0]) * F(b[3] - b[1])) for b in boxes]


@pytest.mark.parametrize("eta, top_k, ties, damaged", [
    (1.0, -1, False, False), (1.0, 150, True, False), (0.9, -1, True, False), (0.7, 300, False, True),
    (1.0, -1, True, True),
])
def test_nms_keeps_the_forks_rows(eta, top_k, ties, damaged):
    """Several blocks of candidates (more than NMS_BLOCK), against the fork's loop on the same float32 values."""
    rng = np.random.default_rng(17)
    for seed in range(3):
        rng = np.random.default_rng(seed)
        boxes = _boxes(rng, 3 * NMS_BLOCK + 37, (0.02, 0.3))
        scores = rng.uniform(0, 1, len(boxes)).astype(F)
        if ties:
            scores = np.round(scores * 8).astype(F) / F(8)  # many equal scores: the stable order decides
        if damaged:  # NaN and infinite coordinates: std::min / std::max and `overlap <= threshold` decide
            boxes[rng.integers(len(boxes), size=25), rng.integers(4, size=25)] = np.nan
            boxes[rng.integers(len(boxes), size=10), rng.integers(4, size=10)] = np.inf
            boxes[rng.integers(len(boxes), size=10), rng.integers(4, size=10)] = -np.inf
        sizes = box_sizes(torch.from_numpy(boxes))
        kept = nms_fast(torch.from_numpy(boxes), sizes, torch.from_numpy(scores), 0.05, 0.6, eta, top_k)
        expected = _nms_reference(list(boxes), _sizes_reference(boxes), list(scores), F(0.05), F(0.6), F(eta), top_k)
        assert kept == expected and len(kept) > 20


def test_jaccard_is_the_forks_overlap_with_nan_and_infinity():
    rng = np.random.default_rng(5)
    boxes = _boxes(rng, 40, (0.05, 0.5))
    boxes[rng.integers(40, size=12), rng.integers(4, size=12)] = np.nan
    boxes[rng.integers(40, size=6), rng.integers(4, size=6)] = np.inf
    sizes = _sizes_reference(boxes)
    overlaps = jaccard(torch.from_numpy(boxes), torch.tensor(sizes), torch.from_numpy(boxes), torch.tensor(sizes))
    expected = [[_jaccard_reference(a, sa, b, sb) for b, sb in zip(boxes, sizes)] for a, sa in zip(boxes, sizes)]
    np.testing.assert_array_equal(overlaps.numpy(), np.array(expected, F))
    # Finite boxes of positive size: the shorter form NMS takes for them gives the same overlaps.
    clean = torch.from_numpy(_boxes(rng, 300, (0.0, 0.5)))
    clean[:20] = torch.from_numpy(_boxes(rng, 20, (0.1, 0.5))) * 1e-20 - 0.5e-20  # tiny: sizes are subnormal
    sizes = box_sizes(clean)
    assert bool((sizes > 0).all())
    shorter = _overlaps(clean.T.contiguous(), sizes, clean.T.contiguous(), sizes, plain=True)
    assert torch.equal(shorter, jaccard(clean, sizes, clean, sizes)) and bool((shorter > 0).sum() > 1000)


# SSD512's PriorBox layers (side, min_size, max_size, aspect ratios): 24,564 priors.
SSD512 = [(64, 20.48, 51.2, [2]), (32, 51.2, 133.12, [2, 3]), (16, 133.12, 215.04, [2, 3]), (8, 215.04, 296.96, [2, 3]),
          (4, 296.96, 378.88, [2, 3]), (2, 378.88, 460.8, [2]), (1, 460.8, 542.72, [2])]


def _ssd512_priors() -> torch.Tensor:
    from caffe2torch.layers import convert_layer

    tables = []
    for side, low, high, ratios in SSD512:
        text = (f"min_size: {low} max_size: {high} " + " ".join(f"aspect_ratio: {r}" for r in ratios) +
                " flip: true variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 img_size: 512")
        layer = layer_from_text(f'name: "p" type: "PriorBox" prior_box_param {{ {text} }}')
        tables.append(convert_layer(layer, [(1, 1, side, side)], []).module(torch.zeros(1, 1, side, side)))
    return torch.cat(tables, 2)


def _greedy_property_holds(boxes: torch.Tensor, scores: torch.Tensor, kept: list[int], threshold: float,
                           prefix: int) -> bool:
    """What the fork's loop keeps at eta 1, characterised: in score order (ties by index), each kept box overlaps
    no earlier kept one by more than the threshold, and each other box overlaps an earlier kept one by more.
    Checked for the first `prefix` candidates in that order (which depend on nothing after them)."""
    order = torch.sort(scores, descending=True, stable=True).indices[:prefix]
    is_kept = torch.zeros(boxes.shape[0], dtype=torch.bool)
    is_kept[torch.tensor(kept)] = True
    first_kept = order[is_kept[order]]
    sizes = box_sizes(boxes)
    overlaps = jaccard(boxes[order], sizes[order], boxes[first_kept], sizes[first_kept])
    kept_position = torch.nonzero(is_kept[order]).flatten()
    earlier = kept_position[None, :] < torch.arange(order.numel())[:, None]
    suppressed = ((overlaps > threshold) & earlier).any(1)
    return bool(torch.equal(suppressed, ~is_kept[order])) and int(is_kept[order].sum()) > 100


def test_nms_over_ssd512s_priors_takes_well_under_a_second(one_thread):
    """One class of SSD512 with every prior a candidate (no confidence threshold, no top_k): the fork's loop
    runs in milliseconds; the quadratic overlap table took about a minute."""
    prior = _ssd512_priors()
    count = prior.shape[2] // 4
    assert count == 24564
    generator = torch.Generator().manual_seed(512)
    loc = torch.randn(1, count * 4, generator=generator)
    foreground = torch.rand(1, count, generator=generator)
    conf = torch.stack([1 - foreground, foreground], 2).reshape(1, -1)
    from caffe2torch.layers import convert_layer

    layer = layer_from_text('name: "det" type: "DetectionOutput" detection_output_param { num_classes: 2 '
                            'code_type: CENTER_SIZE nms_param { nms_threshold: 0.45 } }')
    module = convert_layer(layer, [tuple(loc.shape), tuple(conf.shape), tuple(prior.shape)], []).module
    timings = []
    for _ in range(2):  # the better of two: the machine is shared
        started = time.perf_counter()
        rows = module(loc, conf, prior)[0, 0]
        timings.append(time.perf_counter() - started)
    assert min(timings) < 1.0, timings
    assert 1000 < rows.shape[0] < count and set(rows[:, 1].tolist()) == {1.0}
    # The same boxes as the fork's greedy loop would keep (its defining property, checked block by block).
    from caffe2torch.detection import decode_boxes

    priors = prior.reshape(2, -1, 4)
    decoded = decode_boxes(loc.reshape(count, 4), priors[0], priors[1], "CENTER_SIZE", False)
    kept = nms_fast(decoded, box_sizes(decoded), foreground[0], -3.4e38, 0.45, 1.0, -1)
    assert torch.equal(rows[:, 3:], decoded[torch.tensor(kept)])
    assert _greedy_property_holds(decoded, foreground[0], kept, 0.45, prefix=4000)


def test_an_overlap_equal_to_the_threshold_keeps_the_box_in_any_block():
    """IoU of [0, 0, 1, 1] and [0, 0, 1, 0.5] is exactly 0.5: kept at threshold 0.5 (`<=`), dropped below it,
    whether the two meet in one block or the second comes blocks later."""
    far = [[2.0 + i, 2.0, 2.5 + i, 2.5] for i in range(NMS_BLOCK + 5)]  # overlapping nothing
    for between in (0, NMS_BLOCK + 5):
        boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]] + far[:between] + [[0.0, 0.0, 1.0, 0.5]])
        scores = torch.linspace(1.0, 0.5, boxes.shape[0])
        last = boxes.shape[0] - 1
        assert nms_fast(boxes, box_sizes(boxes), scores, 0.0, 0.5, 1.0, -1)[-1] == last
        assert last not in nms_fast(boxes, box_sizes(boxes), scores, 0.0, 0.4999, 1.0, -1)
