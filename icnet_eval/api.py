"""The Python API: segment images with ICNet (Segmenter, segment), or run a whole evaluation, as the command line
does."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from caffe2torch.errors import CaffeError
from icnet_eval.data import check_pixels, preprocess
from icnet_eval.pipeline import EvalOptions, resolve_device
from icnet_eval.predict import numerics, predict_train_ids, resolve_mode, runtime_net
from icnet_eval.pipeline import evaluate as run_evaluation
from icnet_eval.model import LoadedModel, load_model


CHANNELS = ("bgr", "rgb")


class Segmenter:
    """ICNet loaded once, segmenting one image per call: `Segmenter(weights)(image)` gives its trainIds.

    `model` is a .caffemodel, a converted folder (`caffe2torch convert` / `save`, e.g. a fine-tuned ICNet) or
    what `icnet_eval.model.load_model` returns; `prototxt`, `input_size` and `verify_md5` are load_model's.
    `device` defaults to a GPU when there is one; `fast` resizes the class scores with PyTorch instead of
    MATLAB's imresize (icnet-eval --fast-resize). The net is prepared for that device and mode here, once.
    """

    def __init__(self, model: LoadedModel | str | os.PathLike, device: str | None = None, fast: bool = False,
                 prototxt: str | os.PathLike | None = None, input_size: tuple[int, int] | None = None,
                 verify_md5: bool = True) -> None:
        self.device = resolve_device(device)
        self.mode = resolve_mode(False, fast, None, self.device)
        self.fast = fast
        self.model = model if isinstance(model, LoadedModel) else load_model(
            model, prototxt, input_size, verify_md5, on_warning=lambda _: None)
        self.net = runtime_net(self.model, self.device, self.mode)  # the net icnet-eval runs in that mode there

    def __call__(self, image: np.ndarray, channels: str = "bgr") -> np.ndarray:
        """trainIds (H x W uint8, 0..18) of one H x W x 3 uint8 image, as eval_sub.m computes them.

        `channels` says the image's order: "bgr" (OpenCV's cv2.imread, the default) or "rgb" (PIL, imageio,
        matplotlib). The net was trained on BGR: an RGB image given as BGR still gives a plausible map, but
        only about 85% of its pixels agree with the right one. The net's input is the image resized to the net's
        input size (MATLAB's bilinear imresize on uint8), BGR, minus the mean (B 103.939, G 116.779, R 123.68),
        0-255 scale, N x 3 x H x W float32; its output is 19 class scores, which are softmaxed, resized back to
        the image and arg-maxed (ties to the lowest class).
        """
        if channels not in CHANNELS:
            raise CaffeError(f"channels must be 'bgr' or 'rgb', got {channels!r}")
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise CaffeError(f"segment() takes an H x W x 3 uint8 BGR image (RGB with channels='rgb'), got "
                             f"{image.dtype} {image.shape}")
        if channels == "rgb":
            image = image[..., ::-1]
        check_pixels(image.shape[:2], "segment(): the image")  # its class scores at full size come next
        inputs = preprocess(np.ascontiguousarray(image), self.model.input_size)[None].to(self.device)
        with numerics(self.device, exact=self.mode.exact), torch.inference_mode():
            logits = self.net(inputs)[0]
        return predict_train_ids(logits, image.shape[:2], fast=self.fast)


# segment(image, path) keeps the last Segmenter it made, so a loop over frames loads the net once.
_last: tuple[tuple, Segmenter] | None = None


def _files_signature(path: Path) -> tuple:
    """What changes when the weights do: the file's (or the folder's files') identity, size and time."""
    try:
        paths = sorted(path.iterdir()) if path.is_dir() else [path]
        return tuple((p.name, p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    except OSError:
        return ()


def _segmenter(model: LoadedModel | str | os.PathLike, device: str | None, fast: bool) -> Segmenter:
    global _last
    if isinstance(model, LoadedModel):
        key: tuple = (id(model), device, fast)
    else:
        path = Path(model).absolute()
        key = (str(path), _files_signature(path), device, fast)
    if _last is not None and _last[0] == key and (not isinstance(model, LoadedModel) or _last[1].model is model):
        return _last[1]
    _last = None  # let the previous net go before the next one is loaded
    segmenter = Segmenter(model, device, fast)
    _last = (key, segmenter)
    return segmenter


def segment(image: np.ndarray, model: LoadedModel | str | os.PathLike, device: str | None = None,
            fast: bool = False, channels: str = "bgr") -> np.ndarray:
    """trainIds (H x W uint8, 0..18) of one H x W x 3 uint8 image (`Segmenter.__call__` says how).

    `model` as Segmenter's; the net is loaded on the first call and kept for later calls with the same
    weights (unchanged on disk), device and mode, so calling this per video frame costs no reloading.
    """
    return _segmenter(model, device, fast)(image, channels)


def evaluate(list_path: str | os.PathLike, data_root: str | os.PathLike, weights: str | os.PathLike,
             out: str | os.PathLike = "icnet-results", **options) -> dict:
    """The whole evaluation (`icnet-eval --list ... --data-root ... --weights ...`); returns report.json's content.

    `options` are EvalOptions fields: device, batch_size, workers, fast_resize, fast, fast_dtype,
    output_format, input_size, prototxt, verify_md5, resume, progress, per_image, overlay, error_maps,
    report_page.
    """
    fields = EvalOptions.__dataclass_fields__
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise TypeError(f"evaluate() got unknown options {unknown}; known: {', '.join(sorted(fields))}")
    return run_evaluation(EvalOptions(Path(list_path), Path(data_root), Path(weights), Path(out), **options),
                          echo=lambda _: None)
