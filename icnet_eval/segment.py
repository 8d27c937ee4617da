"""Segment images, folders and videos without labels: colour maps and overlays people can look at."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import cv2
import numpy as np
import torch

from caffe2torch.errors import CaffeError, term
from caffe2torch.protect import ReadFiles
from icnet_eval.cityscapes import color_bgr
from icnet_eval.data import BYTES_PER_PIXEL, check_pixels, decode_checked, preprocess
from icnet_eval.model import LoadedModel, load_model
from icnet_eval.outputs import OutputFolder, write_png
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
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        raise CaffeError(f"{path}: cannot read ({error.strerror or error})") from None
    image = decode_checked(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION, str(path), BYTES_PER_PIXEL)
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


def _segment_images(plan: list[tuple[Path, dict[str, Path]]], segmenter: Segmenter, folder: OutputFolder,
                    progress: Progress) -> list[Path]:
    written = []
    targets = dict(plan)
    for path, image, train_ids in segmenter.stream((path, _read_image(path)) for path, _ in plan):
        for kind, array in (("color", color_bgr(train_ids)), ("overlay", overlay(image, train_ids))):
            folder.record(targets[path][kind], write_png(targets[path][kind], array))
            written.append(targets[path][kind])
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


def _segment_video(path: Path, target: Path, segmenter: Segmenter, folder: OutputFolder,
                   echo: Callable[[str], None]) -> list[Path]:
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise CaffeError(f"{path}: OpenCV cannot open this video")
    try:
        size = (int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)), int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)))
        check_pixels(size, f"{path}: a frame", BYTES_PER_PIXEL)  # before the first frame is decoded
        fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
        frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or 0
        handle, name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".partial.mp4", dir=target.parent)
        os.close(handle)
    except BaseException:
        capture.release()
        raise
    partial = Path(name)
    writer = None
    progress = Progress(frames, enabled=True)
    count = 0
    try:
        for _, frame, train_ids in segmenter.stream(_frames(capture)):
            if frame.shape[:2] != size:
                check_pixels(frame.shape[:2], f"{path}: a frame", BYTES_PER_PIXEL)
            if writer is None:
                writer = cv2.VideoWriter(str(partial), cv2.VideoWriter_fourcc(*"mp4v"), fps,
                                         (frame.shape[1], frame.shape[0]))
                if not writer.isOpened():
                    raise CaffeError(f"{target}: OpenCV cannot write an mp4 video here")
            writer.write(overlay(frame, train_ids))
            count += 1
            progress.update(1)
        if writer is not None:
            writer.release()
            writer = None
        if count == 0:
            raise CaffeError(f"{path}: the video holds no frame OpenCV can decode")
        os.replace(partial, target)
        folder.record(target)
    finally:
        progress.close()
        capture.release()
        if writer is not None:
            writer.release()
        partial.unlink(missing_ok=True)
    echo(f"{count} frames at {fps:g} fps")
    return [target]


def plan_outputs(sources: list[Path], out: Path, video: bool = False) -> list[tuple[Path, dict[str, Path]]]:
    """The files each source gives: <stem>_color.png and <stem>_overlay.png (a video: <stem>_overlay.mp4). Sources
    that share a stem (a.png and a.jpg) are told apart by their whole name (a.png_color.png, a.jpg_color.png)."""
    stems: dict[str, int] = {}
    for path in sources:
        stems[path.stem] = stems.get(path.stem, 0) + 1
    plan, seen = [], {}
    for path in sources:
        base = path.stem if stems[path.stem] == 1 else path.name
        kinds = {"overlay": out / f"{base}_overlay.mp4"} if video else \
            {kind: out / f"{base}_{kind}.png" for kind in ("color", "overlay")}
        for target in kinds.values():
            if target.name in seen:
                raise CaffeError(f"{path} and {seen[target.name]} would both be written to {target}; rename one")
            seen[target.name] = path
        plan.append((path, kinds))
    return plan


def segment_input(source: str | os.PathLike, weights: str | os.PathLike, out: str | os.PathLike,
                  device: str | None = None, fast_resize: bool = False, prototxt=None, input_size=None,
                  echo: Callable[[str], None] | None = None, fast: bool = False,
                  fast_dtype: str | None = None) -> list[Path]:
    """Segment an image, every image of a folder, or a video; returns the files written into `out`.

    Images give <stem>_color.png and <stem>_overlay.png, a video <stem>_overlay.mp4 (the frames with
    the colour map blended over them, at the video's frame rate). The modes are icnet-eval's. Files
    already in `out` are replaced only where an earlier segment run wrote them (`OutputFolder`); a
    file it reads (an image, the weights, the definition) is never written.
    """
    from icnet_eval.pipeline import resolve_device

    echo = echo or (lambda _: None)
    source, out = Path(source), Path(out)
    target = resolve_device(device)
    mode = resolve_mode(fast, fast_resize, fast_dtype, target)
    if not source.exists():
        raise CaffeError(f"{source}: no such file or folder")
    if out.exists() and not out.is_dir():
        raise CaffeError(f"{term('-o', 'out')} {out}: is a file, expected a folder")
    read = ReadFiles([(weights, "the weights"), (prototxt, "the net definition")])
    video = source.is_file() and source.suffix.lower() in VIDEO_SUFFIXES
    if source.is_dir():
        if out.resolve() == source.resolve():
            raise CaffeError(f"{term('-o', 'out')} {out}: is the folder of the images being segmented; choose another folder (the "
                             f"outputs would be taken for images by the next run)")
        sources = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not sources:
            raise CaffeError(f"{source}: holds no images ({', '.join(IMAGE_SUFFIXES)})")
    else:
        sources = [source]
    for path in sources:
        read.add(path, "an image being segmented" if not video else "the video being segmented")
    plan = plan_outputs(sources, out, video)
    folder = OutputFolder(out, read)
    folder.check([path for _, kinds in plan for path in kinds.values()])  # before any work
    model = load_model(weights, prototxt, input_size, on_warning=lambda message: echo(f"warning: {message}"))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CaffeError(f"{term('-o', 'out')} {out}: cannot create the folder ({error.strerror or error})") from None
    segmenter = Segmenter(model, target, mode)
    try:
        if video:
            return _segment_video(source, plan[0][1]["overlay"], segmenter, folder, echo)
        progress = Progress(len(plan), enabled=len(plan) > 1)
        try:
            return _segment_images(plan, segmenter, folder, progress)
        finally:
            progress.close()
    finally:
        folder.save()
