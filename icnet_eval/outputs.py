"""Prediction PNGs on disk: names, atomic writes, and the completeness check a resumed run relies on."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import struct
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from caffe2torch.errors import CaffeError, term
from icnet_eval.cityscapes import LABEL_ID_TO_TRAIN_ID, NUM_CLASSES, color_bgr, colorize, train_ids_to_label_ids
from icnet_eval.data import IMAGE_TAG, ListEntry
from icnet_eval.header import image_size as header_size
from caffe2torch.protect import ReadFiles
from caffe2torch.write import write_atomic

FORMATS = ("trainids", "labelids")
RUN_FILE = "icnet-eval-run.json"
LOCK_FILE = ".icnet-eval.lock"
REPORT_FILE = "report.json"
# Beside report.json (icnet_eval.page): the page people open, and its two charts.
REPORT_PAGE = "report.html"
CONFUSION_CHART = "confusion_matrix.png"
CLASS_IOU_CHART = "class_iou.png"
REPORT_FILES = (REPORT_FILE, REPORT_PAGE, CONFUSION_CHART, CLASS_IOU_CHART)
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def prepare_out_dir(out: Path) -> Path:
    """Create --out (refusing a file in its place) and check it can be written."""
    if out.exists() and not out.is_dir():
        raise CaffeError(f"{term('--out', 'out')} {out}: is a file, expected a folder for the predictions")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CaffeError(f"{term('--out', 'out')} {out}: cannot create the folder ({error.strerror or error})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise CaffeError(f"{term('--out', 'out')} {out}: the folder is not writable")
    return out


def server_name(entry: ListEntry) -> str:
    """The Cityscapes benchmark server's file name: <city>_<seq>_<frame>_leftImg8bit.png."""
    stem = entry.output_stem
    return f"{stem}.png" if stem.endswith(f"_{IMAGE_TAG}") else f"{stem}_{IMAGE_TAG}.png"


SOURCE_KEY = b"icnet-eval-source"


def source_id(path: Path) -> str:
    """What a prediction depends on of its input file besides the run's settings: size and modification time."""
    try:
        stat = path.stat()
    except OSError:
        return "missing"
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_text(data: bytes, key: bytes) -> str | None:
    """The value of a tEXt chunk of a PNG, or None."""
    position = 8
    while position + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        payload = data[position + 8:position + 8 + length]
        if kind == b"tEXt" and payload.startswith(key + b"\0"):
            return payload[len(key) + 1:].decode("latin-1")
        if kind == b"IEND":
            return None
        position += 12 + length
    return None


def _encode_png(array: np.ndarray, path: Path, source: str | None = None) -> bytes:
    """PNG bytes; `source` (the input's source_id) goes into a tEXt chunk a resumed run compares."""
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise CaffeError(f"{path}: PNG encoding failed")
    data = encoded.tobytes()
    if source is None:
        return data
    end = len(data) - len(_PNG_END)  # before the IEND chunk, which must stay last
    return data[:end] + _png_chunk(b"tEXt", SOURCE_KEY + b"\0" + source.encode("latin-1")) + data[end:]


def write_png(path: Path, array: np.ndarray, source: str | None = None) -> bytes:
    """Encode and write a PNG through a temporary file and a rename (returns its bytes); a failure is one CaffeError
    line."""
    data = _encode_png(array, path, source)
    try:
        write_atomic(path, data)
    except OSError as error:
        raise CaffeError(f"{path}: cannot write ({error.strerror or error})") from None
    return data


SEGMENT_FILES = "icnet-segment.json"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class OutputFolder:
    """A folder a command writes loose files into (icnet-eval segment's -o). A file already there is replaced only
    when this tool wrote it (listed with its sha256 in icnet-segment.json and unchanged since), never a file of the
    user's, and never a file the run reads."""

    def __init__(self, folder: Path, read: ReadFiles, manifest_name: str = SEGMENT_FILES,
                 tool: str = "icnet-eval segment") -> None:
        self.folder, self.read, self.tool = Path(folder), read, tool
        self.manifest = self.folder / manifest_name
        self.files = self._load()
        self.changed, self.saved = False, time.monotonic()

    def _load(self) -> dict[str, str]:
        if not self.manifest.exists() and not self.manifest.is_symlink():
            return {}
        problem = f"{self.manifest}: is not the list of files {self.tool} wrote; remove it or choose another folder"
        if self.manifest.is_symlink() or not self.manifest.is_file():
            raise CaffeError(problem)
        try:
            data = json.loads(self.manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise CaffeError(problem) from None
        files = data.get("files") if isinstance(data, dict) else None
        if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
            raise CaffeError(problem)
        return files

    def _key(self, path: Path) -> str | None:
        """The manifest's name of `path`: relative to the folder, '/'-separated (a file at the top: its name)."""
        try:
            parent = path.parent.resolve().relative_to(self.folder.resolve())
        except ValueError:
            return None
        return (parent / path.name).as_posix()

    def ours(self, path: Path) -> bool:
        key = self._key(path)
        digest = self.files.get(key) if key is not None else None
        return digest is not None and not path.is_symlink() and path.is_file() and _sha256_file(path) == digest

    def check(self, targets: list[Path], option: str | None = None) -> None:
        """Refuse, before any work, every target that is read by the run or is a file this tool did not write."""
        option = option or term("-o", "out")
        self.read.check_file(self.manifest, option)
        for target in targets:
            self.read.check_file(target, option)
            if (target.exists() or target.is_symlink()) and not self.ours(target):
                raise CaffeError(f"{target}: exists and was not written by {self.tool} (it is not in "
                                 f"{self.manifest.name}); move it away or choose another folder")

    def record(self, path: Path, data: bytes | None = None) -> None:
        key = self._key(path)
        if key is None:
            raise CaffeError(f"{path}: is not inside {self.folder}")
        self.files[key] = hashlib.sha256(data).hexdigest() if data is not None else _sha256_file(path)
        self.changed = True
        if time.monotonic() - self.saved > 5.0:  # a run killed outright leaves at most 5 s of files unlisted
            self.save()

    def save(self) -> None:
        if self.changed:
            write_atomic(self.manifest, (json.dumps({"files": self.files}, indent=1, sort_keys=True) + "\n").encode())
            self.changed = False
        self.saved = time.monotonic()


class OutputStore:
    """Where one run's PNGs go; picklable so DataLoader workers can run the resume check."""

    def __init__(self, out: Path, output_format: str = "trainids", resume: bool = True, overlay: bool = False,
                 error_maps: bool = False) -> None:
        if output_format not in FORMATS:
            raise CaffeError(f"{term('--format', 'output_format')} {output_format}: expected one of {', '.join(FORMATS)}")
        self.out, self.output_format, self.resume, self.overlay = Path(out), output_format, resume, overlay
        self.error_maps = error_maps
        self.main_kind = "gray" if output_format == "trainids" else "labelids"

    def paths(self, entry: ListEntry) -> dict[str, Path]:
        """The files written for `entry`: the id image first, then the colour image."""
        if self.output_format == "trainids":
            main = self.out / "gray" / f"{entry.output_stem}.png"
        else:
            main = self.out / "labelids" / server_name(entry)
        paths = {self.main_kind: main, "color": self.out / "color" / f"{entry.output_stem}.png"}
        if self.overlay:
            paths["overlay"] = self.out / "overlay" / f"{entry.output_stem}.png"
        if self.error_maps:
            paths["errors"] = self.out / "errors" / f"{entry.output_stem}.png"
        return paths

    def make_folders(self) -> None:
        for kind in (self.main_kind, "color") + (("overlay",) if self.overlay else ()) + \
                (("errors",) if self.error_maps else ()):
            (self.out / kind).mkdir(parents=True, exist_ok=True)

    def write_overlay(self, entry: ListEntry, train_ids: np.ndarray, image_bgr: np.ndarray, fresh: bool) -> None:
        """The image with the colour map blended over it (as the authors' demo video).

        Rewritten when the prediction was `fresh`ly computed, or when the one on disk was made from
        another version of the image (its PNG records the image's size and mtime, like the ids).
        """
        from icnet_eval.segment import overlay

        path = self.paths(entry)["overlay"]
        source = source_id(entry.image)
        if not fresh and self.resume and self._decode_complete(path, cv2.IMREAD_UNCHANGED, source) is not None:
            return
        write_png(path, overlay(image_bgr, train_ids), source)

    def write_error_map(self, entry: ListEntry, train_ids: np.ndarray, image_bgr: np.ndarray, label: np.ndarray,
                        fresh: bool) -> None:
        """errors/: eval_acc.m's wrong pixels over the dimmed image (`visuals.error_map`).

        Its PNG records what it was drawn from (the image's and the label's size and mtime, and a
        checksum of the prediction), so a resumed run keeps only maps that still show this run's
        prediction against these files.
        """
        from icnet_eval.visuals import error_map

        path = self.paths(entry)["errors"]
        source = error_map_source(entry, train_ids)
        if not fresh and self.resume and self._decode_complete(path, cv2.IMREAD_UNCHANGED, source) is not None:
            return
        write_png(path, error_map(image_bgr, train_ids, label), source)

    def any_exists(self, entries: list[ListEntry]) -> bool:
        return any(path.exists() for entry in entries for path in self.paths(entry).values())

    def write(self, entry: ListEntry, train_ids: np.ndarray) -> None:
        """Write the id PNG and the colour PNG, each through a temporary file and a rename.

        The id PNG records which version of the input image it was made from (size, mtime), so a
        resumed run recomputes predictions of images that changed since.
        """
        paths = self.paths(entry)
        ids = train_ids if self.output_format == "trainids" else train_ids_to_label_ids(train_ids)
        source = source_id(entry.image)
        kinds = ((self.main_kind, ids), ("color", color_bgr(train_ids)))
        for kind, array in kinds:
            write_png(paths[kind], array, source if kind == self.main_kind else None)

    @staticmethod
    def _decode_complete(path: Path, flags: int, source: str | None = None,
                         size: tuple[int, int] | None = None) -> np.ndarray | None:
        """The decoded PNG, or None when it is missing, cut short, unreadable, (with `source`) made from another
        version of the input or (with `size`, read from its header before decoding) of another size."""
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if not data.endswith(_PNG_END):  # interrupted copy or a foreign partial file: checked before decoding
            return None
        if source is not None and png_text(data, SOURCE_KEY) != source:
            return None
        if size is not None and header_size(data) != tuple(size):
            return None
        return cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)

    def existing_prediction(self, entry: ListEntry, image_size: tuple[int, int]) -> np.ndarray | None:
        """The trainIds of a finished earlier prediction for `entry`, or None if it must be (re)computed.

        Finished means: every file present and complete, of the image's size, the ids valid and the
        colour image equal to the ids' colours.
        """
        if not self.resume:
            return None
        paths = self.paths(entry)
        ids = self._decode_complete(paths[self.main_kind], cv2.IMREAD_UNCHANGED, source_id(entry.image), image_size)
        if ids is None or ids.ndim != 2 or ids.dtype != np.uint8 or ids.shape != tuple(image_size):
            return None
        if self.output_format == "trainids":
            train_ids = ids
            if train_ids.max(initial=0) >= NUM_CLASSES:
                return None
        else:
            train_ids = LABEL_ID_TO_TRAIN_ID[ids]
            if (train_ids == 255).any():
                return None
        color = self._decode_complete(paths["color"], cv2.IMREAD_COLOR, size=image_size)
        if color is None or not np.array_equal(color[..., ::-1], colorize(train_ids)):
            return None
        return train_ids


def error_map_source(entry: ListEntry, train_ids: np.ndarray) -> str:
    """What an error map shows: versions of the image and the label, and the prediction (its CRC-32)."""
    assert entry.label is not None
    crc = zlib.crc32(np.ascontiguousarray(train_ids).data)
    return f"{source_id(entry.image)};{source_id(entry.label)};{crc:08x}"


def check_outputs_apart(store: OutputStore, entries: list[ListEntry], read: ReadFiles | None = None) -> None:
    """Refuse an --out where a file of the run (a prediction, the report, the run file, the lock) would be written
    over (or, with --redo, delete) a file the run reads: an image, a label, the list, the weights, the definition."""
    read = read or ReadFiles()
    for entry in entries:
        read.add(entry.image, f"the image of {entry.where}")
        read.add(entry.label, f"the label of {entry.where}")
    for entry in entries:
        for path in store.paths(entry).values():
            read.check_file(path, term("--out", "out"))
    for name in REPORT_FILES + (RUN_FILE, LOCK_FILE):
        read.check_file(store.out / name, term("--out", "out"))


def lock_out_dir(out: Path):
    """Hold an exclusive lock on --out for this run (rank 0 takes it for a distributed run); None if taken.

    Two runs writing one --out at once would interleave predictions of different settings.
    """
    path = out / LOCK_FILE
    handle = open(path, "a+", encoding="ascii")  # noqa: SIM115 - held until the run ends
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def check_run_file(out: Path, fingerprint: dict, store: OutputStore, entries: list[ListEntry]) -> None:
    """Refuse to mix predictions of different settings in one --out (reads only; see `start_run`).

    The run file is written before the first prediction, so predictions without one were not made by
    this tool (or not with these settings) and are not silently taken over.
    """
    if not store.resume:
        return
    run_file = out / RUN_FILE
    if run_file.exists():
        try:
            recorded = json.loads(run_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            recorded = {}
        if not isinstance(recorded, dict):
            recorded = {}
        changed = [key for key in fingerprint if recorded.get(key) != fingerprint[key]]
        if changed:
            key = changed[0]
            before = repr(recorded[key]) if key in recorded else "not recorded"
            raise CaffeError(
                f"{term('--out', 'out')} {out}: holds predictions made with another {key} ({before}, now "
                f"{fingerprint[key]!r}); use another {term('--out', 'out')}, or {term('--redo', 'resume=False')} to "
                f"replace them"
            )
    elif store.any_exists(entries):
        raise CaffeError(f"{term('--out', 'out')} {out}: holds predictions not recorded in {RUN_FILE} (made by "
                         f"another tool or version); use another {term('--out', 'out')}, or "
                         f"{term('--redo', 'resume=False')} to replace them")


def delete_outputs(store: OutputStore, entries: list[ListEntry]) -> None:
    """--redo: the replaced outputs go first, so that, were the run interrupted, none could pass for its own."""
    for entry in entries:
        for path in store.paths(entry).values():
            if path.is_file() or path.is_symlink():
                path.unlink()


def write_run_file(out: Path, fingerprint: dict) -> None:
    write_atomic(out / RUN_FILE, (json.dumps(fingerprint, indent=2, sort_keys=True) + "\n").encode())


class PngWriter:
    """PNG encoding and atomic writes on a few threads beside the main loop (cv2 releases the GIL).

    At most `limit` writes wait at a time; the first failure stops the run with its one-line error
    at the next `submit` or at `finish`. Every file is written through a rename, so a run stopped
    halfway resumes as before. `times_ms` collects each job's time (one image's PNGs, or its overlay).
    """

    def __init__(self, threads: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="png") if threads > 0 else None
        self.pending: list[Future] = []
        self.limit = 4 * max(threads, 1)
        self.times_ms: list[float] = []

    def _timed(self, job: Callable[..., None], *args) -> None:
        start = time.perf_counter()
        job(*args)
        self.times_ms.append((time.perf_counter() - start) * 1000.0)  # list.append is atomic in CPython

    def _check(self, wait_for_room: bool) -> None:
        while self.pending and (self.pending[0].done() or wait_for_room and len(self.pending) >= self.limit):
            self.pending.pop(0).result()  # raises the job's CaffeError here

    def submit(self, job: Callable[..., None], *args) -> None:
        if self.pool is None:
            self._timed(job, *args)
            return
        self._check(wait_for_room=True)
        self.pending.append(self.pool.submit(self._timed, job, *args))

    def finish(self) -> None:
        """Wait for every write; the first failure is raised."""
        if self.pool is None:
            return
        try:
            for future in self.pending:
                future.result()
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Stop after the writes under way (the run failed elsewhere: its error is the one to report)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pending.clear()
