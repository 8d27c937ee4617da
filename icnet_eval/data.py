"""Evaluation lists (`IMAGE [LABEL]` per line), image and label decoding, and the authors' input preprocessing."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from caffe2torch.errors import CaffeError, term
from icnet_eval.header import image_size
from icnet_eval.imresize import matlab_imresize

DEFAULT_INPUT_SIZE = (1025, 2049)
# eval_all.m's means, subtracted in single precision from the uint8 image as eval_sub.m does.
MEAN_RGB = (123.68, 116.779, 103.939)
MEAN_BGR = np.array(MEAN_RGB[::-1], dtype=np.float32)
TRAIN_IDS_TAG = "gtFine_labelTrainIds"
LABEL_IDS_TAG = "gtFine_labelIds"
INSTANCE_IDS_TAG = "gtFine_instanceIds"
IMAGE_TAG = "leftImg8bit"
NUM_TRAIN_IDS = 19


@dataclass(frozen=True)
class ListEntry:
    """One line of an evaluation list, with its files resolved against the data root."""

    list_path: Path
    line: int
    image: Path
    label: Path | None
    # The label holds labelIds (named *_gtFine_labelIds.png, or standing in for a missing *_labelTrainIds.png).
    label_is_label_ids: bool = False
    # cityscapes' *_gtFine_instanceIds.png beside the label, when there is one (for the instance-level iIoU).
    instances: Path | None = None

    @property
    def where(self) -> str:
        return f"{self.list_path} line {self.line}"

    @property
    def output_stem(self) -> str:
        """eval_sub.m's output name: the image file name without its extension."""
        return self.image.stem

    @property
    def label_prediction_name(self) -> str:
        """eval_acc.m's prediction name: the label file name with gtFine_labelTrainIds -> leftImg8bit."""
        if self.label is None:
            raise CaffeError(f"{self.where}: no label file on this line")
        name = self.label.name
        if self.label_is_label_ids:
            name = name.replace(LABEL_IDS_TAG, TRAIN_IDS_TAG)
        return name.replace(TRAIN_IDS_TAG, IMAGE_TAG)


def _label_ids_sibling(label: Path) -> Path | None:
    """The *_labelIds.png beside a missing *_labelTrainIds.png, when there is one."""
    if TRAIN_IDS_TAG not in label.name:
        return None
    sibling = label.with_name(label.name.replace(TRAIN_IDS_TAG, LABEL_IDS_TAG))
    return sibling if sibling.is_file() else None


def split_list_line(line: str, where: str) -> list[str]:
    """IMAGE [LABEL] fields: tab-separated when the line has a tab, else quoted like a shell ('a b.png')
    when it has quotes, else split at spaces (the authors' lists)."""
    if "\t" in line:
        return [field.strip() for field in line.split("\t") if field.strip()]
    if '"' in line or "'" in line:
        try:
            return shlex.split(line, comments=False, posix=True)
        except ValueError as error:
            raise CaffeError(f"{where}: {error} (quote paths with spaces, or separate the fields by a tab)") from None
    return line.split()


def _LIST() -> str:
    return term("--list", "list_path")


def parse_list(list_path: str | os.PathLike, data_root: str | os.PathLike, need_images: bool = True,
               need_labels: bool = False) -> list[ListEntry]:
    """Read an `IMAGE [LABEL]` list; every error names the list line. Paths are relative to `data_root`."""
    list_path, data_root = Path(list_path), Path(data_root)
    if not data_root.is_dir():
        raise CaffeError(f"{term('--data-root', 'data_root')} {data_root}: no such folder")
    try:
        text = list_path.read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is not part of the first path
    except FileNotFoundError:
        raise CaffeError(f"{_LIST()} {list_path}: no such file") from None
    except IsADirectoryError:
        raise CaffeError(f"{_LIST()} {list_path}: is a folder, expected a text file") from None
    except UnicodeDecodeError as error:
        raise CaffeError(f"{_LIST()} {list_path}: not a text file (byte {error.start} is not UTF-8)") from None
    except OSError as error:
        raise CaffeError(f"{_LIST()} {list_path}: cannot read ({error.strerror})") from None

    entries: list[ListEntry] = []
    stems: dict[str, int] = {}
    for number, raw_line in enumerate(text.splitlines(), start=1):
        where = f"{list_path} line {number}"
        fields = split_list_line(raw_line, where)
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) > 2:
            raise CaffeError(f"{where}: expected 'IMAGE [LABEL]', found {len(fields)} fields")
        image = data_root / fields[0]
        if need_images and not image.is_file():
            raise CaffeError(f"{where}: image {image} does not exist")
        label = data_root / fields[1] if len(fields) == 2 else None
        # A label named *_gtFine_labelIds.png holds labelIds: mapped to trainIds, never scored as them.
        from_label_ids = label is not None and LABEL_IDS_TAG in label.name
        if label is None and need_labels:
            raise CaffeError(f"{where}: no label file on this line; scoring needs 'IMAGE LABEL' lines")
        if label is not None and not label.is_file():
            sibling = _label_ids_sibling(label)
            if sibling is None:
                raise CaffeError(f"{where}: label {label} does not exist")
            label, from_label_ids = sibling, True
        if entries and (label is None) != (entries[0].label is None):
            raise CaffeError(f"{where}: has {'no' if label is None else 'a'} label but line {entries[0].line} "
                             f"{'has one' if label is None else 'has none'}; give labels on every line or on none")
        entry = ListEntry(list_path, number, image, label, from_label_ids, _instances_beside(label))
        if need_images:
            if entry.output_stem in stems:
                raise CaffeError(f"{where}: image name {image.name} repeats line {stems[entry.output_stem]}; "
                                 "the predictions would overwrite each other")
            stems[entry.output_stem] = number
        entries.append(entry)
    if not entries:
        raise CaffeError(f"{_LIST()} {list_path}: no images listed (the list is empty)")
    return entries


def _instances_beside(label: Path | None) -> Path | None:
    if label is None:
        return None
    for tag in (TRAIN_IDS_TAG, LABEL_IDS_TAG):
        if tag in label.name:
            candidate = label.with_name(label.name.replace(tag, INSTANCE_IDS_TAG))
            return candidate if candidate.is_file() else None
    return None


def read_instance_ids(entry: ListEntry, shape: tuple[int, int]) -> np.ndarray | None:
    """cityscapes' instanceIds of the entry (labelId * 1000 + index per instance), or None without a file."""
    if entry.instances is None:
        return None
    data = _read_bytes(entry.instances, "instanceIds image", entry)
    array = decode_checked(data, cv2.IMREAD_UNCHANGED, f"{entry.where}: instanceIds image {entry.instances}",
                           ID_BYTES_PER_PIXEL)
    if array is None or array.ndim != 2 or array.dtype.kind not in "ui":
        raise CaffeError(f"{entry.where}: {entry.instances} is not a one-channel integer PNG (instanceIds)")
    if array.shape != tuple(shape):
        raise CaffeError(f"{entry.where}: {entry.instances} is {array.shape[0]}x{array.shape[1]}, "
                         f"the label {shape[0]}x{shape[1]}")
    return array


def _read_bytes(path: Path, what: str, entry: ListEntry) -> np.ndarray:
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        raise CaffeError(f"{entry.where}: cannot read {what} {path} ({error.strerror or error})") from None


# Bytes per image pixel the evaluation holds at once after the forward: 19 class planes of float32
# probabilities at the image size, their resize and the temporaries of softmax and argmax.
BYTES_PER_PIXEL = 19 * 4 * 3
# Bytes per pixel of a label, prediction or instanceIds image while it is scored: the decoded array (up to
# 32-bit instanceIds), its trainIds and the masks and indices of the confusion counts.
ID_BYTES_PER_PIXEL = 16


def check_pixels(size: tuple[int, int], what: str, bytes_per_pixel: int = BYTES_PER_PIXEL) -> None:
    """Refuse an image whose evaluation would need more than the memory limit: one line naming it and its size."""
    from caffe2torch.limits import format_bytes, memory_limit

    needed = int(size[0]) * int(size[1]) * bytes_per_pixel
    if needed > memory_limit():
        raise CaffeError(f"{what} is {size[0]}x{size[1]}: evaluating it needs {format_bytes(needed)}, more than the "
                         f"memory limit ({term('--max-memory', 'the CAFFE2TORCH_MAX_MEMORY environment variable')})")


def decode_checked(data: np.ndarray, flags: int, what: str, bytes_per_pixel: int) -> np.ndarray | None:
    """cv2.imdecode, after the size the file's header states is checked against the memory limit (a small file can
    hold a huge image); None when OpenCV cannot decode it. A format whose header is not read here is checked
    once decoded, within OpenCV's own pixel limit."""
    if not data.size:
        return None
    size = image_size(data)
    if size is not None:
        check_pixels(size, what, bytes_per_pixel)
    array = cv2.imdecode(data, flags)
    if array is not None and size is None:
        check_pixels(array.shape[:2], what, bytes_per_pixel)
    return array


def read_image_bgr(entry: ListEntry) -> np.ndarray:
    """The image as H x W x 3 uint8 in OpenCV's BGR order, without EXIF rotation (MATLAB's imread ignores it).

    An image too large to evaluate within the memory limit is refused from its header, before it is
    decoded and before the per-pixel class probabilities (76 bytes a pixel, three times) are allocated.
    """
    data = _read_bytes(entry.image, "image", entry)
    image = decode_checked(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION,
                           f"{entry.where}: image {entry.image}", BYTES_PER_PIXEL)
    if image is None:
        raise CaffeError(f"{entry.where}: image {entry.image} is not a readable image file")
    return image


def read_gray_png(path: Path, what: str, entry: ListEntry) -> np.ndarray | None:
    """A single-channel 8-bit PNG as H x W uint8; None when it cannot be decoded."""
    data = _read_bytes(path, what, entry)
    array = decode_checked(data, cv2.IMREAD_UNCHANGED, f"{entry.where}: {what} {path}", ID_BYTES_PER_PIXEL)
    if array is None:
        return None
    if array.ndim != 2 or array.dtype != np.uint8:
        raise CaffeError(f"{entry.where}: {what} {path} must be a one-channel 8-bit PNG, it is "
                         f"{array.shape[2] if array.ndim == 3 else 1}-channel {array.dtype}")
    return array


def read_label_train_ids(entry: ListEntry) -> np.ndarray:
    """The label as trainIds (255 = ignore); a *_labelIds.png stand-in is mapped with the official table."""
    from icnet_eval.cityscapes import label_ids_to_train_ids

    assert entry.label is not None
    label = read_gray_png(entry.label, "label", entry)
    if label is None:
        raise CaffeError(f"{entry.where}: label {entry.label} is not a readable PNG file")
    if entry.label_is_label_ids:
        return label_ids_to_train_ids(label)
    # 254 is eval_acc.m's saturation quirk (+1 makes it 255, ignored): a trainIds label may hold it.
    outside = label[(label >= NUM_TRAIN_IDS) & (label < 254)]
    if outside.size:
        raise CaffeError(f"{entry.where}: label {entry.label} holds values outside the trainIds 0-18 and 255 "
                         f"(e.g. {int(outside[0])}): labelIds? Name such files *_{LABEL_IDS_TAG}.png and they are "
                         f"mapped with the official table")
    return label


def preprocess(image_bgr: np.ndarray, input_size: tuple[int, int], fast: bool = False) -> torch.Tensor:
    """eval_sub.m's input: uint8 MATLAB bilinear resize, single(img) - mean, BGR; as a 3 x H x W tensor.

    The resize treats channels independently and the mean is per channel, so working in
    OpenCV's BGR order gives the same bits as resizing RGB and reordering afterwards. `fast`:
    PyTorch's antialiased bilinear resize (to uint8) instead of MATLAB's.
    """
    if fast:
        from icnet_eval.imresize import fast_resize

        chw = torch.from_numpy(np.ascontiguousarray(image_bgr.transpose(2, 0, 1)))
        resized = fast_resize(chw, input_size).numpy().transpose(1, 2, 0)
    else:
        resized = matlab_imresize(image_bgr, input_size)
    normalised = resized.astype(np.float32) - MEAN_BGR
    return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))


class EvaluationDataset(Dataset):
    """Decodes and preprocesses one list entry per item; user errors travel back as a message, not an exception.

    `existing_prediction(entry, image_size)` may return the trainId prediction already on disk
    (resume): the item then carries it instead of a network input. Items carry their decode and
    resize times in milliseconds ("times_ms").
    """

    def __init__(self, entries: Sequence[ListEntry], input_size: tuple[int, int],
                 existing_prediction: Callable[[ListEntry, tuple[int, int]], np.ndarray | None] | None = None,
                 keep_image: bool = False, resize: bool = True, fast_resize: bool = False):
        self.entries = list(entries)
        self.input_size = input_size
        self.existing_prediction = existing_prediction
        self.keep_image = keep_image  # the decoded image travels with the item (for overlays)
        self.resize = resize  # False: the input is the decoded uint8 image, resized on the net's device
        self.fast_resize = fast_resize  # PyTorch's resize instead of MATLAB's (--fast)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry = self.entries[index]
        item: dict[str, Any] = {"index": index, "entry": entry, "input": None, "label": None, "instances": None,
                                "prediction": None, "image_size": None, "image": None, "error": None,
                                "times_ms": {}}
        try:
            start = time.perf_counter()
            image = read_image_bgr(entry)
            item["image_size"] = image_size = image.shape[:2]
            if self.keep_image:
                item["image"] = image
            if entry.label is not None:
                label = read_label_train_ids(entry)
                if label.shape != image_size:
                    raise CaffeError(f"{entry.where}: label {entry.label} is {label.shape[0]}x{label.shape[1]} "
                                     f"but image {entry.image} is {image_size[0]}x{image_size[1]}")
                item["label"] = label
                item["instances"] = read_instance_ids(entry, label.shape)
            if self.existing_prediction is not None:
                item["prediction"] = self.existing_prediction(entry, image_size)
            decoded = time.perf_counter()
            item["times_ms"]["decode"] = (decoded - start) * 1000.0  # image, label and instances
            if item["prediction"] is None:
                if self.resize:
                    item["input"] = preprocess(image, self.input_size, self.fast_resize)
                    item["times_ms"]["resize"] = (time.perf_counter() - decoded) * 1000.0
                else:
                    item["input"] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        except CaffeError as error:
            item["error"] = str(error)
        return item


def _keep_list(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return batch


def _single_threaded_worker(_: int) -> None:
    """A loader process works on one core: no resize pool, no OpenCV or torch threads of its own (the
    workers are the parallelism; nested pools made N workers fight over the cores)."""
    from icnet_eval.imresize import set_resize_threads

    set_resize_threads(1)
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def worker_context() -> multiprocessing.context.BaseContext:
    """Loader workers start from a forkserver (a fresh process that has run no thread pool), never as forks of this
    process: a fork copies every thread pool's state without its threads, and OpenCV's pool, once used here (a large
    cv2.resize, icnet_eval.segment()), then deadlocks the worker for good in pthread_cond_destroy. The server imports
    this module once; each worker is a fork of it, so a run starts in a fraction of a second after the first."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


@contextlib.contextmanager
def _main_script_hidden():
    """A forkserver worker runs the parent's __main__ script again unless that is guarded by `if __name__ ==
    '__main__'` (and fails if it is not); the workers unpickle only this package's objects, so they are not told of
    the script while they start."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None) if getattr(main, "__spec__", None) is None else None
    if path is None:
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path


class EvaluationLoader(DataLoader):
    """A DataLoader whose worker processes start safely from any caller (see `worker_context`)."""

    def __iter__(self):
        with _main_script_hidden():
            return super().__iter__()


def make_loader(dataset: EvaluationDataset, batch_size: int, workers: int, pin_memory: bool = False) -> DataLoader:
    """Batches in list order; `workers` single-threaded processes decode (and resize) while the network runs."""
    return EvaluationLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                            collate_fn=_keep_list, pin_memory=pin_memory and workers > 0,
                            worker_init_fn=_single_threaded_worker if workers > 0 else None,
                            prefetch_factor=2 if workers > 0 else None, persistent_workers=False,
                            multiprocessing_context=worker_context() if workers > 0 else None)
