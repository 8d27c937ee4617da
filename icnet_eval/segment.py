"""Segment images, folders and videos without labels: colour maps and overlays people can look at."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import cv2
import numpy as np
import torch

from caffe2torch.errors import CaffeError
from icnet_eval.cityscapes import color_bgr
from icnet_eval.data import preprocess
from icnet_eval.model import LoadedModel, load_model
from icnet_eval.outputs import write_png
from icnet_eval.predict import Mode, Predictor, numerics, resolve_mode
from icnet_eval.progress import Progress

Key = TypeVar("Key")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".mpg", ".mpeg", ".m4v")
# The authors' demo video blends the colour map over the frame half and half.
OVERLAY_ALPHA = 0.5


def overlay(image_bgr: np.ndarray, train_ids: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The image with the colour map blended over it (alpha of the colours), rounded to uint8."""
    return cv2.addWeighted(color_bgr(train_ids), alpha, image_bgr, 1.0 - alpha, 0.0)


def _read_image(path: Path) -> np.ndarray:
    image = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION) \
        if path.stat().st_size else None
    if image is None:
        raise CaffeError(f"{path}: not a readable image file")
    return image


class Segmenter:
    """The net icnet-eval runs in a mode on a device, fed one image at a time; on a GPU the next image is queued
    before the previous one's colour maps are made (and its MATLAB resize runs there too)."""

    def __init__(self, model: LoadedModel, device: torch.device, mode: Mode) -> None:
        self.model, self.device, self.mode = model, device, mode
        self.predictor = Predictor(model, device, mode)

    def _item(self, image_bgr: np.ndarray) -> dict:
        if self.device.type == "cpu":
            network_input = preprocess(image_bgr, self.model.input_size, self.mode.torch_input_resize)
        else:  # uint8: resized where the net runs
            network_input = torch.from_numpy(np.ascontiguousarray(image_bgr.transpose(2, 0, 1)))
        return {"input": network_input, "image_size": image_bgr.shape[:2], "label": None}

    def stream(self, images: Iterable[tuple[Key, np.ndarray]]) -> Iterator[tuple[Key, np.ndarray, np.ndarray]]:
        """(key, image) in, (key, image, trainIds) out, in the same order."""
        pending = None
        with numerics(self.device, exact=self.mode.exact):
            self.predictor.capture()
            for key, image in images:
                launched = self.predictor.launch([self._item(image)])
                if pending is not None:
                    yield self._finish(*pending)
                pending = (key, image, launched)
            if pending is not None:
                yield self._finish(*pending)

    @staticmethod
    def _finish(key, image, launched):
        launched.wait()
        return key, image, launched.items[0]["prediction"]


def _segment_images(paths: list[Path], segmenter: Segmenter, out: Path, progress: Progress) -> list[Path]:
    written = []
    for path, image, train_ids in segmenter.stream((path, _read_image(path)) for path in paths):
        for suffix, array in (("color", color_bgr(train_ids)), ("overlay", overlay(image, train_ids))):
            target = out / f"{path.stem}_{suffix}.png"
            write_png(target, array)
            written.append(target)
        progress.update(1)
    return written


def _frames(capture: cv2.VideoCapture) -> Iterator[tuple[int, np.ndarray]]:
    index = 0
    while True:
        ok, frame = capture.read()
        if not ok:
            return
        yield index, frame
        index += 1


def _segment_video(path: Path, segmenter: Segmenter, out: Path, echo: Callable[[str], None]) -> list[Path]:
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
        for _, frame, train_ids in segmenter.stream(_frames(capture)):
            if writer is None:
                writer = cv2.VideoWriter(str(partial), cv2.VideoWriter_fourcc(*"mp4v"), fps,
                                         (frame.shape[1], frame.shape[0]))
                if not writer.isOpened():
                    raise CaffeError(f"{target}: OpenCV cannot write an mp4 video here")
            writer.write(overlay(frame, train_ids))
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
                  device: str | None = None, fast_resize: bool = False, prototxt=None, input_size=None,
                  echo: Callable[[str], None] | None = None, fast: bool = False,
                  fast_dtype: str | None = None) -> list[Path]:
    """Segment an image, every image of a folder, or a video; returns the files written into `out`.

    Images give <stem>_color.png and <stem>_overlay.png, a video <stem>_overlay.mp4 (the frames with
    the colour map blended over them, at the video's frame rate). The modes are icnet-eval's.
    """
    from icnet_eval.pipeline import resolve_device

    echo = echo or (lambda _: None)
    source, out = Path(source), Path(out)
    target = resolve_device(device)
    mode = resolve_mode(fast, fast_resize, fast_dtype, target)
    if not source.exists():
        raise CaffeError(f"{source}: no such file or folder")
    if out.exists() and not out.is_dir():
        raise CaffeError(f"-o {out}: is a file, expected a folder")
    model = load_model(weights, prototxt, input_size, on_warning=lambda message: echo(f"warning: {message}"))
    out.mkdir(parents=True, exist_ok=True)
    segmenter = Segmenter(model, target, mode)
    if source.is_dir():
        images = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images:
            raise CaffeError(f"{source}: holds no images ({', '.join(IMAGE_SUFFIXES)})")
        progress = Progress(len(images), enabled=True)
        try:
            return _segment_images(images, segmenter, out, progress)
        finally:
            progress.close()
    if source.suffix.lower() in VIDEO_SUFFIXES:
        return _segment_video(source, segmenter, out, echo)
    return _segment_images([source], segmenter, out, Progress(1, enabled=False))
