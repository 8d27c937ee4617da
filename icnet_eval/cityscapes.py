"""Cityscapes label tables: the 19 evaluated classes, their colours, and labelId <-> trainId conversion."""
from __future__ import annotations

import numpy as np

from caffe2torch.errors import CaffeError

__all__ = [
    "AVERAGE_INSTANCE_SIZE",
    "CATEGORY_NAMES",
    "CLASS_CATEGORY",
    "CLASS_NAMES",
    "INSTANCE_CATEGORIES",
    "IGNORE_TRAIN_ID",
    "LABEL_ID_TO_TRAIN_ID",
    "NUM_CLASSES",
    "PALETTE",
    "TRAIN_ID_TO_LABEL_ID",
    "UNLABELED_LABEL_ID",
    "colorize",
    "label_ids_to_train_ids",
    "train_ids_to_label_ids",
]

NUM_CLASSES = 19
IGNORE_TRAIN_ID = 255
UNLABELED_LABEL_ID = 0

# (trainId order) name, labelId, colour -- cityscapesscripts/helpers/labels.py.
_CLASSES: tuple[tuple[str, int, tuple[int, int, int]], ...] = (
    ("road", 7, (128, 64, 128)),
    ("sidewalk", 8, (244, 35, 232)),
    ("building", 11, (70, 70, 70)),
    ("wall", 12, (102, 102, 156)),
    ("fence", 13, (190, 153, 153)),
    ("pole", 17, (153, 153, 153)),
    ("traffic light", 19, (250, 170, 30)),
    ("traffic sign", 20, (220, 220, 0)),
    ("vegetation", 21, (107, 142, 35)),
    ("terrain", 22, (152, 251, 152)),
    ("sky", 23, (70, 130, 180)),
    ("person", 24, (220, 20, 60)),
    ("rider", 25, (255, 0, 0)),
    ("car", 26, (0, 0, 142)),
    ("truck", 27, (0, 0, 70)),
    ("bus", 28, (0, 60, 100)),
    ("train", 31, (0, 80, 100)),
    ("motorcycle", 32, (0, 0, 230)),
    ("bicycle", 33, (119, 11, 32)),
)

CLASS_NAMES: tuple[str, ...] = tuple(name for name, _, _ in _CLASSES)

# cityscapesscripts/helpers/labels.py: the category of each evaluated class (trainId order), and the
# evaluated classes with instances, with evalPixelLevelSemanticLabeling's average instance sizes (pixels)
# that weight the instance-level iIoU.
CATEGORY_NAMES: tuple[str, ...] = ("flat", "construction", "object", "nature", "sky", "human", "vehicle")
CLASS_CATEGORY: np.ndarray = np.array([0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4, 5, 5, 6, 6, 6, 6, 6, 6], dtype=np.int64)
CLASS_CATEGORY.flags.writeable = False
AVERAGE_INSTANCE_SIZE: dict[int, float] = {
    11: 3462.4756337644, 12: 3930.4788056518, 13: 12794.0202738185, 14: 27855.1264367816,
    15: 35732.1511111111, 16: 67583.7075812274, 17: 6298.7200839748, 18: 4672.3249222261,
}
# Categories whose every label has instances (cityscapesScripts' generateInstanceStats): human, vehicle.
INSTANCE_CATEGORIES: tuple[int, ...] = (5, 6)
TRAIN_ID_TO_LABEL_ID: tuple[int, ...] = tuple(label_id for _, label_id, _ in _CLASSES)
PALETTE: np.ndarray = np.array([color for _, _, color in _CLASSES], dtype=np.uint8)
PALETTE.flags.writeable = False

# Lookup over every uint8 value: labelIds 0..33 that are not evaluated (and anything above) are ignored.
LABEL_ID_TO_TRAIN_ID: np.ndarray = np.full(256, IGNORE_TRAIN_ID, dtype=np.uint8)
LABEL_ID_TO_TRAIN_ID[list(TRAIN_ID_TO_LABEL_ID)] = np.arange(NUM_CLASSES, dtype=np.uint8)
LABEL_ID_TO_TRAIN_ID.flags.writeable = False

# trainIds outside 0..18 (255 = ignore) become labelId 0, 'unlabeled', as cityscapesScripts expects for void.
_TRAIN_ID_TO_LABEL_ID_LUT = np.full(256, UNLABELED_LABEL_ID, dtype=np.uint8)
_TRAIN_ID_TO_LABEL_ID_LUT[:NUM_CLASSES] = TRAIN_ID_TO_LABEL_ID
_TRAIN_ID_TO_LABEL_ID_LUT.flags.writeable = False

# Colour of ignored / out-of-range trainIds in `colorize`.
_VOID_COLOR = (0, 0, 0)


def _as_uint8_ids(ids: np.ndarray, what: str) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.dtype == np.uint8:
        return ids
    if not np.issubdtype(ids.dtype, np.integer) or (ids.size and (ids.min() < 0 or ids.max() > 255)):
        raise CaffeError(f"{what}: expected integer ids in 0..255, got {ids.dtype} data")
    return ids.astype(np.uint8)


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map a labelId image (e.g. *_gtFine_labelIds.png) to trainIds, 255 where Cityscapes ignores the pixel."""
    return LABEL_ID_TO_TRAIN_ID[_as_uint8_ids(label_ids, "label_ids_to_train_ids")]


def train_ids_to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """Map a trainId image to labelIds (what the Cityscapes server takes); non-classes become 0 (unlabeled)."""
    return _TRAIN_ID_TO_LABEL_ID_LUT[_as_uint8_ids(train_ids, "train_ids_to_label_ids")]


def colorize(train_ids: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 RGB image of a trainId map in the Cityscapes colours (black where not a class)."""
    lut = np.tile(np.array(_VOID_COLOR, dtype=np.uint8), (256, 1))
    lut[:NUM_CLASSES] = PALETTE
    return lut[_as_uint8_ids(train_ids, "colorize")]


def color_bgr(train_ids: np.ndarray) -> np.ndarray:
    """`colorize` in OpenCV's BGR order, contiguous (what cv2 writes and blends)."""
    return np.ascontiguousarray(colorize(train_ids)[..., ::-1])
