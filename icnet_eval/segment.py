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
from caffe2torch.progress import Progress
from caffe2torch.protect import ReadFiles
from icnet_eval.cityscapes import color_bgr, train_ids_to_label_ids
from icnet_eval.data import BYTES_PER_PIXEL, check_pixels, decode_checked, preprocess
from icnet_eval.model import LoadedModel, load_model
from icnet_eval.outputs import OutputFolder, write_png
from icnet_eval.predict import Mode, Predictor, numerics, resolve_mode

Key = TypeVar("Key")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".mpg", ".mpeg", ".m4v")
# The authors' demo video blends the colour map over the frame half and half.
OVERLAY_ALPHA = 0.5
# What segment can write for each input: trainIds and labelIds (gray PNGs of class numbers, as icnet-eval's
# --format trainids / labelids), the colour map, the overlay; a video gives the last two as mp4 files.
FORMATS = ("trainids", "labelids", "color", "overlay")
DEFAULT_FORMATS = ("color", "overlay")
VIDEO_FORMATS = ("color", "overlay")
DEFAULT_VIDEO_FORMATS = ("overlay",)  # the authors' demo video


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


def rendered(kind: str, image_bgr: np.ndarray, train_ids: np.ndarray) -> np.ndarray:
    """One output of `FORMATS` for an image and its trainIds."""
    if kind == "trainids":
        return train_ids
    if kind == "labelids":
        return train_ids_to_label_ids(train_ids)
    if kind == "color":
        return color_bgr(train_ids)
    return overlay(image_bgr, train_ids)


class StreamSegmenter:
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


def _segment_images(plan: list[tuple[Path, dict[str, Path]]], segmenter: StreamSegmenter, folder: OutputFolder,
                    progress: Progress) -> list[Path]:
    written = []
    targets = dict(plan)
    for path, image, train_ids in segmenter.stream((path, _read_image(path)) for path, _ in plan):
        for kind, target in targets[path].items():
            folder.record(target, write_png(target, rendered(kind, image, train_ids)))
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


def _segment_video(path: Path, targets: dict[str, Path], segmenter: StreamSegmenter, folder: OutputFolder,
                   echo: Callable[[str], None]) -> list[Path]:
    """Each kind of `targets` (colour map, overlay) as an mp4 at the video's frame rate, written under a temporary
    name and renamed once the last frame is in."""
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise CaffeError(f"{path}: OpenCV cannot open this video")
    partials: dict[str, Path] = {}
    try:
        size = (int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)), int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)))
        check_pixels(size, f"{path}: a frame", BYTES_PER_PIXEL)  # before the first frame is decoded
        fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
        frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or 0
        for kind, target in targets.items():
            handle, name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".partial.mp4", dir=target.parent)
            os.close(handle)
            partials[kind] = Path(name)
    except BaseException:
        capture.release()
        for partial in partials.values():
            partial.unlink(missing_ok=True)
        raise
    writers: dict[str, cv2.VideoWriter] = {}
    progress = Progress(frames or None, "icnet-eval segment", "frame")
    count = 0
    try:
        for _, frame, train_ids in segmenter.stream(_frames(capture)):
            if frame.shape[:2] != size:
                check_pixels(frame.shape[:2], f"{path}: a frame", BYTES_PER_PIXEL)
            for kind, partial in partials.items():
                if kind not in writers:
                    writers[kind] = cv2.VideoWriter(str(partial), cv2.VideoWriter_fourcc(*"mp4v"), fps,
                                                    (frame.shape[1], frame.shape[0]))
                    if not writers[kind].isOpened():
                        raise CaffeError(f"{targets[kind]}: OpenCV cannot write an mp4 video here")
                writers[kind].write(rendered(kind, frame, train_ids))
            count += 1
            progress.update(1)
        for writer in writers.values():
            writer.release()
        writers.clear()
        if count == 0:
            raise CaffeError(f"{path}: the video holds no frame OpenCV can decode")
        for kind, partial in partials.items():
            os.replace(partial, targets[kind])
            folder.record(targets[kind])
    finally:
        progress.close()
        capture.release()
        for writer in writers.values():
            writer.release()
        for partial in partials.values():
            partial.unlink(missing_ok=True)
    echo(f"{count} frames at {fps:g} fps")
    return list(targets.values())


def check_formats(formats: Iterable[str] | None, video: bool = False) -> tuple[str, ...]:
    """The kinds of output asked for (None: the defaults), each once, in FORMATS' order; one line for a kind unknown
    or not for a video."""
    formats = tuple(formats) if formats is not None else DEFAULT_VIDEO_FORMATS if video else DEFAULT_FORMATS
    unknown = [kind for kind in formats if kind not in FORMATS]
    if unknown or not formats:
        raise CaffeError(f"{term('--format', 'formats')} {unknown[0] if unknown else '(none)'}: expected one or more "
                         f"of {', '.join(FORMATS)}")
    if video and any(kind not in VIDEO_FORMATS for kind in formats):
        wrong = next(kind for kind in formats if kind not in VIDEO_FORMATS)
        raise CaffeError(f"{term('--format', 'formats')} {wrong}: a video gives {' and '.join(VIDEO_FORMATS)} "
                         f"videos only (class numbers do not survive mp4 compression); segment its frames as images")
    return tuple(kind for kind in FORMATS if kind in formats)


def plan_outputs(sources: list[Path], out: Path, video: bool = False,
                 formats: Iterable[str] | None = None) -> list[tuple[Path, dict[str, Path]]]:
    """The files each source gives: <stem>_<format>.png for each format (a video: <stem>_<format>.mp4). Sources
    that share a stem (a.png and a.jpg) are told apart by their whole name (a.png_color.png, a.jpg_color.png)."""
    formats = check_formats(formats, video)
    stems: dict[str, int] = {}
    for path in sources:
        stems[path.stem] = stems.get(path.stem, 0) + 1
    plan, seen = [], {}
    for path in sources:
        base = path.stem if stems[path.stem] == 1 else path.name
        kinds = {kind: out / f"{base}_{kind}{'.mp4' if video else '.png'}" for kind in formats}
        for target in kinds.values():
            if target.name in seen:
                raise CaffeError(f"{path} and {seen[target.name]} would both be written to {target}; rename one")
            seen[target.name] = path
        plan.append((path, kinds))
    return plan


def segment_input(source: str | os.PathLike, weights: str | os.PathLike, out: str | os.PathLike,
                  device: str | None = None, fast_resize: bool = False, prototxt=None, input_size=None,
                  echo: Callable[[str], None] | None = None, fast: bool = False,
                  fast_dtype: str | None = None, formats: Iterable[str] | None = None) -> list[Path]:
    """Segment an image, every image of a folder, or a video; returns the files written into `out`.

    Images give <stem>_<format>.png for each of `formats` (FORMATS; default the colour map and the overlay),
    a video <stem>_color.mp4 and/or <stem>_overlay.mp4 (default the overlay), at the video's frame rate. The
    modes are icnet-eval's. Files
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
    plan = plan_outputs(sources, out, video, formats)
    folder = OutputFolder(out, read)
    folder.check([path for _, kinds in plan for path in kinds.values()])  # before any work
    model = load_model(weights, prototxt, input_size, on_warning=lambda message: echo(f"warning: {message}"))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CaffeError(f"{term('-o', 'out')} {out}: cannot create the folder ({error.strerror or error})") from None
    segmenter = StreamSegmenter(model, target, mode)
    try:
        if video:
            return _segment_video(source, plan[0][1], segmenter, folder, echo)
        progress = Progress(len(plan), "icnet-eval segment", "image", enabled=len(plan) > 1)
        try:
            return _segment_images(plan, segmenter, folder, progress)
        finally:
            progress.close()
    finally:
        folder.save()
