"""`icnet-eval demo`: a tiny synthetic Cityscapes-style set and untrained weights, run through the whole pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from caffe2torch.manifest import load_manifest
from icnet_eval.cityscapes import CLASS_NAMES
from caffe2torch.write import write_atomic
from icnet_eval.model import write_untrained_caffemodel

DEMO_IMAGE_SIZE = (256, 512)
DEMO_INPUT_SIZE = (257, 513)  # the official 1025x2049 scaled by 1/4: the net keeps its 2:1 geometry
DEMO_IMAGES = 3
DEMO_SEED = 0
WEIGHTS_NAME = "icnet_untrained_demo.caffemodel"
LIST_NAME = "demo_val.txt"

_ID = {name: index for index, name in enumerate(CLASS_NAMES)}
# Typical Cityscapes colours of the real objects (RGB), not the palette: the image should look like a photo.
_LOOKS = {"sky": (135, 170, 210), "building": (110, 100, 95), "vegetation": (70, 105, 45), "road": (95, 90, 95),
          "sidewalk": (150, 140, 140), "car": (40, 50, 90), "pole": (80, 80, 80), "traffic sign": (200, 180, 40),
          "person": (150, 60, 60), "terrain": (120, 140, 80)}


def _paint(image: np.ndarray, label: np.ndarray, mask: np.ndarray, name: str, rng: np.random.Generator) -> None:
    shade = np.array(_LOOKS[name], dtype=np.float64) * rng.uniform(0.85, 1.15)
    image[mask] = shade
    label[mask] = _ID[name]


def street_scene(seed: int, size: tuple[int, int] = DEMO_IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """An RGB uint8 street-like picture and its trainId label (255 on the ego-vehicle strip, as in Cityscapes)."""
    rng = np.random.default_rng(seed)
    height, width = size
    unit = height / 256  # the layout is drawn for 256 rows and scaled to the requested size
    rows, cols = np.mgrid[0:height, 0:width]
    image = np.zeros((height, width, 3), dtype=np.float64)
    label = np.zeros((height, width), dtype=np.uint8)
    horizon = int(height * rng.uniform(0.38, 0.48))
    _paint(image, label, rows < horizon, "sky", rng)
    image[rows < horizon] *= (0.8 + 0.4 * rows[rows < horizon] / horizon)[:, None]
    left = 0
    while left < width:  # a row of buildings of varying height along the horizon
        right = min(width, left + int(rng.uniform(40, 120) * unit) + 1)
        top = int(horizon * rng.uniform(0.1, 0.7))
        _paint(image, label, (cols >= left) & (cols < right) & (rows >= top) & (rows < horizon + 10 * unit),
              "building", rng)
        left = right
    for _ in range(int(rng.integers(2, 5))):  # trees
        cy, cx, radius = horizon * rng.uniform(0.5, 1.0), rng.uniform(0, width), rng.uniform(15, 45) * unit
        _paint(image, label, (rows - cy) ** 2 + (cols - cx) ** 2 < radius**2, "vegetation", rng)
    # road: a trapezoid towards the vanishing point, sidewalks and a grass verge beside it
    centre = width * rng.uniform(0.4, 0.6)
    spread = (rows - horizon).clip(min=0) / max(1, height - horizon)
    ground = rows >= horizon + 5 * unit
    road_half = 10 * unit + spread * width * 0.45
    _paint(image, label, ground, "terrain", rng)
    _paint(image, label, ground & (np.abs(cols - centre) < road_half * 1.35), "sidewalk", rng)
    _paint(image, label, ground & (np.abs(cols - centre) < road_half), "road", rng)
    for _ in range(int(rng.integers(1, 4))):  # cars on the road
        base = rng.uniform(horizon + 20 * unit, height - 40 * unit)
        scale = (base - horizon) / (height - horizon)
        car_w, car_h = (40 + 120 * scale) * unit, (20 + 60 * scale) * unit
        x0 = centre + rng.uniform(-0.6, 0.3) * (10 * unit + scale * width * 0.45)
        _paint(image, label, (rows >= base - car_h) & (rows < base) & (cols >= x0) & (cols < x0 + car_w), "car", rng)
    for _ in range(2):  # poles with a sign, and a pedestrian on the sidewalk
        x0 = rng.uniform(0.05, 0.95) * width
        _paint(image, label, (cols >= x0) & (cols < x0 + 4 * unit) & (rows >= horizon - 60 * unit)
               & (rows < horizon + 40 * unit), "pole", rng)
        _paint(image, label, (np.abs(cols - x0 - 2 * unit) < 9 * unit) & (rows >= horizon - 62 * unit)
               & (rows < horizon - 46 * unit), "traffic sign", rng)
    px, py = rng.uniform(0.1, 0.9) * width, horizon + rng.uniform(20, 50) * unit
    _paint(image, label, ((cols - px) / (7 * unit)) ** 2 + ((rows - py) / (22 * unit)) ** 2 < 1, "person", rng)
    ego = rows >= height - 12 * unit
    label[ego] = 255  # ego vehicle: ignored by the evaluation
    image[ego] = (30, 30, 35)
    image += 6.0 * np.sin(cols / 3.0 + rows / 5.0)[..., None] + rng.normal(0.0, 4.0, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


def _write_png(path: Path, array: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".png", array)
    assert ok, path
    write_atomic(path, encoded.tobytes())


def make_demo_set(root: Path, images: int = DEMO_IMAGES) -> tuple[Path, Path]:
    """Write the sample in Cityscapes layout under `root`; returns (list file, untrained weights)."""
    lines = []
    for index in range(images):
        stem = f"demo_{index:06d}_000019"
        image_rel = f"leftImg8bit/val/demo/{stem}_leftImg8bit.png"
        label_rel = f"gtFine/val/demo/{stem}_gtFine_labelTrainIds.png"
        rgb, label = street_scene(DEMO_SEED + index)
        _write_png(root / image_rel, np.ascontiguousarray(rgb[..., ::-1]))
        _write_png(root / label_rel, label)
        lines.append(f"{image_rel} {label_rel}")
    list_path = root / "list" / LIST_NAME
    write_atomic(list_path, ("\n".join(lines) + "\n").encode())
    weights = write_untrained_caffemodel(root / "model" / WEIGHTS_NAME, bn=False, seed=DEMO_SEED)
    return list_path, weights


def released_weights_note(echo: Callable[[str], None]) -> None:
    """Say plainly what the demo weights are and where the real ones are."""
    echo("NOTE: the demo weights are UNTRAINED (deterministic random numbers); the scores above only show")
    echo("that the pipeline runs end to end. The ICNet weights released by the authors (hszhao/ICNet):")
    for release in load_manifest().releases:
        reported = (f"reported mIoU {release.reported.miou} on {release.reported.split}"
                    if release.reported else "no published score")
        echo(f"  {release.name}  md5 {release.md5}  ({release.training_set}, {release.iterations} iterations, "
             f"{reported})")
        if release.download:
            echo(f"      {release.download[0]}")
    echo("Evaluate one with: icnet-eval --list LIST --data-root CITYSCAPES --weights icnet_cityscapes_train_30k.caffemodel")
