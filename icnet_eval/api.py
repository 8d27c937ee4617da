"""The Python API: segment one image with ICNet, or run a whole evaluation, as the command line does."""

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


def _model(model: LoadedModel | str | os.PathLike) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load_model(model, on_warning=lambda _: None)


def segment(image_bgr: np.ndarray, model: LoadedModel | str | os.PathLike, device: str | None = None,
            fast: bool = False) -> np.ndarray:
    """trainIds (H x W uint8, 0..18) of one H x W x 3 uint8 image in OpenCV's BGR order, as eval_sub.m.

    `model` is what `icnet_eval.model.load_model` returns, or a path it takes (a .caffemodel or a
    converted folder). The net's input is the image resized to the net's input size (MATLAB's
    bilinear imresize on uint8), in BGR order, minus the mean (B 103.939, G 116.779, R 123.68),
    0-255 scale, N x 3 x H x W float32; its output is 19 class scores, which are softmaxed,
    resized back to the image and arg-maxed (ties to the lowest class). `fast` uses torch's resize (as
    `--fast-resize`).
    """
    image = np.asarray(image_bgr)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise CaffeError(f"segment() takes an H x W x 3 uint8 BGR image, got {image.dtype} {image.shape}")
    check_pixels(image.shape[:2], "segment(): the image")  # its class scores at full size come next
    loaded = _model(model)
    target = resolve_device(device)
    mode = resolve_mode(False, fast, None, target)
    net = runtime_net(loaded, target, mode)  # the net icnet-eval runs in that mode on that device
    inputs = preprocess(image, loaded.input_size)[None].to(target)
    with numerics(target, exact=mode.exact), torch.inference_mode():
        logits = net(inputs)[0]
    return predict_train_ids(logits, image.shape[:2], fast=fast)


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
