"""Pictures of one scored image for people: the error map (errors/, the report page) and the page's thumbnails."""

from __future__ import annotations

import cv2
import numpy as np

from caffe2torch.errors import CaffeError
from icnet_eval.cityscapes import color_bgr
from icnet_eval.metrics import error_pixels

# Wrong pixels in a strong red; ignored ones (not scored) under a pale veil; the rest is the image in grey at 40%
# brightness, so that the scene stays recognisable and nothing in it competes with the red.
ERROR_BGR = (0, 0, 255)
DIM_NUMERATOR, DIM_DENOMINATOR = 2, 5
# Where no image can be read (`icnet-eval score` needs none), the map is drawn over a mid-grey field.
NO_IMAGE_GREY = 128


def error_map(image_bgr: np.ndarray | None, prediction: np.ndarray, label: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 BGR at the label's size: eval_acc.m's wrong pixels red, its ignored pixels pale, the rest
    the dimmed image (resized to the label when its size differs; grey when there is none)."""
    wrong, ignored = error_pixels(prediction, label)
    height, width = label.shape
    if image_bgr is None:
        grey = np.full((height, width), NO_IMAGE_GREY, dtype=np.uint8)
    else:
        if image_bgr.shape[:2] != (height, width):
            image_bgr = cv2.resize(image_bgr, (width, height), interpolation=cv2.INTER_AREA)
        grey = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2GRAY)
    dimmed = (grey.astype(np.uint16) * DIM_NUMERATOR // DIM_DENOMINATOR).astype(np.uint8)
    dimmed[ignored] = dimmed[ignored] // 2 + 128  # a pale veil: 128..178 over 0..102 elsewhere
    result = cv2.cvtColor(dimmed, cv2.COLOR_GRAY2BGR)
    result[wrong] = ERROR_BGR
    return result


def thumbnail(array: np.ndarray, width: int, labels: bool = False) -> np.ndarray:
    """`array` scaled down to `width` pixels (never up); `labels`: a colour map, whose colours must not blend."""
    height, old_width = array.shape[:2]
    if old_width <= width:
        return array
    new_height = max(1, round(height * width / old_width))
    return cv2.resize(array, (width, new_height), interpolation=cv2.INTER_NEAREST if labels else cv2.INTER_AREA)


def colour_thumbnail(train_ids: np.ndarray, width: int) -> np.ndarray:
    """A trainId map in the Cityscapes colours, scaled down (nearest: no colour that is no class)."""
    return color_bgr(thumbnail(train_ids, width, labels=True))


def encode(array: np.ndarray, kind: str, quality: int = 80) -> bytes:
    """PNG (colour maps: flat colours compress well, exactly) or JPEG (photographs) bytes of a BGR image."""
    if kind == "png":
        ok, data = cv2.imencode(".png", array)
    elif kind == "jpeg":
        ok, data = cv2.imencode(".jpg", array, [cv2.IMWRITE_JPEG_QUALITY, quality])
    else:
        raise ValueError(f"encode: unknown kind {kind!r}")
    if not ok:
        raise CaffeError(f"cannot encode a {array.shape[1]}x{array.shape[0]} {kind.upper()} image")
    return data.tobytes()
