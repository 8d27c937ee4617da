"""Segment images, folders and videos without labels: colour maps and overlays people can look at."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from caffe2torch.errors import CaffeError
from caffe2torch.write import write_atomic
from icnet_eval.api import segment
from icnet_eval.cityscapes import colorize
from icnet_eval.model import LoadedModel, load_model
from icnet_eval.progress import Progress

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".mpg", ".mpeg", ".m4v")
# The authors' demo video blends the colour map over the frame half and half.
OVERLAY_ALPHA = 0.5


def color_bgr(train_ids: np.ndarray) -> np.ndarray:
    """The Cityscapes colour map of a trainId image, in OpenCV's BGR order."""
    return np.ascontiguousarray(colorize(train_ids)[..., ::-1])


def overlay(image_bgr: np.ndarray, train_ids: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The image with the colour map blended over it (alpha of the colours), rounded to uint8."""
    return cv2.addWeighted(color_bgr(train_ids), alpha, image_bgr, 1.0 - alpha, 0.0)


def _png(path: Path, array: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise CaffeError(f"{path}: PNG encoding failed")
    try:
        write_atomic(path, encoded.tobytes())
    except OSError as error:
        raise CaffeError(f"{path}: cannot write ({error.strerror or error})") from None


def _read_image(path: Path) -> np.ndarray:
    image = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION) \
        if path.stat().st_size else None
    if image is None:
        raise CaffeError(f"{path}: not a readable image file")
    return image


def _segment_images(paths: list[Path], model: LoadedModel, out: Path, device: str | None, fast: bool,
                    progress: Progress) -> list[Path]:
    written = []
    for path in paths:
        image = _read_image(path)
        train_ids = segment(image, model, device, fast)
        for suffix, array in (("color", color_bgr(train_ids)), ("overlay", overlay(image, train_ids))):
            target = out / f"{path.stem}_{suffix}.png"
            _png(target, array)
            written.append(target)
        progress.update(1)
    return written


def _segment_video(path: Path, model: LoadedModel, out: Path, device: str | None, fast: bool,
                   echo: Callable[[str], None]) -> list[Path]:
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise CaffeError(f"{path}: OpenCV cannot open this video")
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or 0
    target = out / f"{path.stem}_overlay.mp4"
    partial = out / f".{path.stem}_overlay.partial.mp4"
    writer = None
    progress = Progress(frames, enabled=True)
    count = 0
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            if writer is None:
                writer = cv2.VideoWriter(str(partial), cv2.VideoWriter_fourcc(*"mp4v"), fps,
                                         (frame.shape[1], frame.shape[0]))
                if not writer.isOpened():
                    raise CaffeError(f"{target}: OpenCV cannot write an mp4 video here")
            writer.write(overlay(frame, segment(frame, model, device, fast)))
            count += 1
            progress.update(1)
    finally:
        progress.close()
        capture.release()
        if writer is not None:
            writer.release()
    if count == 0:
        partial.unlink(missing_ok=True)
        raise CaffeError(f"{path}: the video holds no frame OpenCV can decode")
    os.replace(partial, target)
    echo(f"{count} frames at {fps:g} fps")
    return [target]


def segment_input(source: str | os.PathLike, weights: str | os.PathLike, out: str | os.PathLike,
                  device: str | None = None, fast: bool = False, prototxt=None, input_size=None,
                  echo: Callable[[str], None] | None = None) -> list[Path]:
    """Segment an image, every image of a folder, or a video; returns the files written into `out`.

    Images give <stem>_color.png and <stem>_overlay.png, a video <stem>_overlay.mp4 (the frames with
    the colour map blended over them, at the video's frame rate).
    """
    echo = echo or (lambda _: None)
    source, out = Path(source), Path(out)
    if not source.exists():
        raise CaffeError(f"{source}: no such file or folder")
    if out.exists() and not out.is_dir():
        raise CaffeError(f"-o {out}: is a file, expected a folder")
    model = load_model(weights, prototxt, input_size, on_warning=lambda message: echo(f"warning: {message}"))
    out.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        images = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images:
            raise CaffeError(f"{source}: holds no images ({', '.join(IMAGE_SUFFIXES)})")
        progress = Progress(len(images), enabled=True)
        try:
            return _segment_images(images, model, out, device, fast, progress)
        finally:
            progress.close()
    if source.suffix.lower() in VIDEO_SUFFIXES:
        return _segment_video(source, model, out, device, fast, echo)
    progress = Progress(1, enabled=False)
    return _segment_images([source], model, out, device, fast, progress)
