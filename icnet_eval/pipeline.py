"""The evaluation run: loader, the device work of `predict` one batch ahead of the host's scoring and PNG writes,
resume, sharding, report."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from caffe2torch.errors import CaffeError, term
from caffe2torch.limits import available_cores
from caffe2torch.progress import Progress
from caffe2torch.protect import ReadFiles
from icnet_eval.cityscapes import CLASS_NAMES
from icnet_eval.data import EvaluationDataset, ListEntry, make_loader, parse_list
from icnet_eval.metrics import ConfusionCounts, image_instance_terms
from icnet_eval.model import LoadedModel, load_model
from icnet_eval.outputs import (CLASS_IOU_CHART, CONFUSION_CHART, REPORT_FILE, OutputStore, PngWriter,
                                check_outputs_apart, check_run_file, delete_outputs, lock_out_dir, prepare_out_dir,
                                write_run_file)
from icnet_eval.page import PageImage, write_report_files
from icnet_eval.predict import Launched, Mode, Predictor, numerics, resolve_mode
from icnet_eval.report import write_json


@dataclass
class EvalOptions:
    """Everything one evaluation run depends on (the CLI's options)."""

    list_path: Path
    data_root: Path
    weights: Path | None
    out: Path
    device: str = "cpu"
    batch_size: int = 1
    workers: int = 2
    fast_resize: bool = False
    output_format: str = "trainids"
    input_size: tuple[int, int] | None = None
    prototxt: Path | None = None
    verify_md5: bool = True
    resume: bool = True
    progress: bool = True
    per_image: bool = False
    overlay: bool = False
    error_maps: bool = False  # errors/: wrong pixels over the dimmed image
    report_page: bool = True  # report.html and its charts beside report.json
    # The input resize (MATLAB's, or PyTorch's under --fast) on the net's device (default: on a GPU), else in the workers.
    resize_on_device: bool | None = None
    # PNG encoding and writing beside the main loop (0: in the main loop; None: half the cores, 2 to 8)
    writer_threads: int | None = None
    fast: bool = False  # half precision (on a GPU), fast graph, PyTorch's resizes, CUDA graphs
    fast_dtype: str | None = None  # with fast: float16, bfloat16 or float32 (default float16 on a GPU)
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_device(name: str | None) -> torch.device:
    """--device, defaulting to the GPU when there is one; refuses a GPU that is not there."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise CaffeError(f"{term('--device', 'device')} {name}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CaffeError(f"{term('--device', 'device')} {name}: CUDA is not available on this machine")
    return device


class _Distributed:
    """torch.distributed when WORLD_SIZE > 1 (torchrun): rank r takes list lines r, r + world, ..."""

    def __init__(self, device: torch.device) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0")) if self.world > 1 else 0
        self.device = device
        if self.world > 1:
            import torch.distributed as dist

            if device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.rank)))
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, entries: list[ListEntry]) -> list[ListEntry]:
        return entries[self.rank::self.world]

    def sum(self, values: np.ndarray, op: str = "sum") -> np.ndarray:
        if not self.active:
            return values
        import torch.distributed as dist

        tensor = torch.as_tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return tensor.cpu().numpy()

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()


def default_writer_threads() -> int:
    """Half the cores this process may use, 2 to 8: PNG encoding of noisy predictions (about 140 ms an image on
    one core) must keep up with a GPU, and the loader's workers need the other half."""
    return max(2, min(8, available_cores() // 2))


def _options_record(options: EvalOptions, model: LoadedModel, device: torch.device, world: int, mode: Mode) -> dict:
    return {
        "list": str(options.list_path), "data_root": str(options.data_root),
        "weights": str(model.weights) if model.weights else None, "weights_md5": model.md5,
        "release": model.release.name if model.release else None, "definition": model.definition,
        "input_size": list(model.input_size), "resize": "fast" if mode.torch_output_resize else "matlab",
        "mode": mode.name, "dtype": mode.dtype_name,
        "format": options.output_format, "out": str(options.out), "device": str(device),
        "batch_size": options.batch_size, "workers": options.workers, "world_size": world,
        "verify_md5": options.verify_md5, **options.extra,
    }


# Per image: its own mIoU and pixel accuracy, then its cityscapesScripts instance terms.
_PER_IMAGE_FIELDS = 2 + ConfusionCounts().instance_terms.size
# The stages timed per image (milliseconds): in the workers, then on the device, then in the PNG threads.
STAGES = ("decode", "resize", "input", "forward", "post", "write")


@dataclass
class _Shard:
    """What one process's share of the list gives: counts, per-stage times, how many images were resumed."""

    counts: ConfusionCounts = field(default_factory=ConfusionCounts)
    times_ms: dict[str, list[float]] = field(default_factory=lambda: {stage: [] for stage in STAGES})
    resumed: int = 0
    waited_s: float = 0.0  # the main loop waiting for the loader


def _run_shard(shard: list[ListEntry], predictor: Predictor, store: OutputStore, options: EvalOptions,
               progress: Progress, per_image: np.ndarray, positions: list[int]) -> _Shard:
    """Predict (or take from disk) every image of this process's share.

    The device works one batch ahead: batch k + 1 is queued before batch k's predictions are
    scored and handed to the PNG threads. Row positions[i] of `per_image` gets image i's own
    scores and instance terms, so that they can be summed in list order however the list was
    sharded (floating-point sums depend on their order).
    """
    result = _Shard()
    if not shard:
        return result
    device, mode = predictor.device, predictor.mode
    resize_here = device.type != "cpu" if options.resize_on_device is None else options.resize_on_device
    dataset = EvaluationDataset(shard, predictor.model.input_size, store.existing_prediction,
                                keep_image=store.overlay or store.error_maps, resize=not resize_here,
                                fast_resize=mode.torch_input_resize)
    loader = make_loader(dataset, options.batch_size, options.workers, pin_memory=device.type == "cuda")
    writer = PngWriter(default_writer_threads() if options.writer_threads is None else options.writer_threads)

    def finish(batch: list[dict], launched: Launched | None) -> None:
        if launched is not None:
            launched.wait()
            for stage, value in launched.times_ms.items():
                result.times_ms[stage].extend([value] * len(launched.items))
            for item in launched.items:
                writer.submit(store.write, item["entry"], item["prediction"])
        for item in batch if store.overlay or store.error_maps else ():
            fresh = item["input"] is not None  # predicted now, not taken from disk
            if store.overlay:
                writer.submit(store.write_overlay, item["entry"], item["prediction"], item["image"], fresh)
            if store.error_maps and item["label"] is not None:
                writer.submit(store.write_error_map, item["entry"], item["prediction"], item["image"], item["label"],
                              fresh)
        for item in batch:  # list order, so the totals never depend on timing
            if item["label"] is None:
                continue
            row = per_image[positions[item["index"]]]
            before = result.counts.instance_terms.copy()
            if item.get("confusion") is not None:  # counted on the device
                terms = None if item["instances"] is None else \
                    image_instance_terms(item["prediction"], item["label"], item["instances"])
                row[:2] = result.counts.add_confusion(item["confusion"], terms)
            else:  # a prediction taken from disk, whatever its values
                row[:2] = result.counts.add(item["prediction"], item["label"], item["instances"])
            # as the difference of the running sums, as earlier releases stored it (same report bits)
            row[2:] = result.counts.instance_terms - before
        progress.update(len(batch))

    pending: tuple[list[dict], Launched | None] | None = None
    try:
        batches = iter(loader)
        while True:
            started = time.perf_counter()
            batch = next(batches, None)
            result.waited_s += time.perf_counter() - started
            if batch is None:
                break
            try:
                for item in batch:
                    if item["error"]:
                        raise CaffeError(item["error"])
                    for stage in ("decode", "resize"):
                        if item["prediction"] is None and item["times_ms"].get(stage) is not None:
                            result.times_ms[stage].append(item["times_ms"][stage])
                todo = [item for item in batch if item["prediction"] is None]
                launched = predictor.launch(todo) if todo else None
            except Exception:
                # the batch already computed is written before the error is reported: a resume starts after it
                if pending is not None:
                    with contextlib.suppress(Exception):
                        finish(*pending)
                        writer.finish()
                raise
            result.resumed += len(batch) - len(todo)
            if pending is not None:
                finish(*pending)
            pending = (batch, launched)
        if pending is not None:
            finish(*pending)
    except BaseException:
        writer.abandon()
        raise
    writer.finish()
    result.times_ms["write"] = writer.times_ms
    return result


def _write_page(out: Path, report: dict, entries: list[ListEntry], per_image: np.ndarray, store: OutputStore) -> None:
    """report.html and the charts, from the scores and the prediction PNGs on disk (after report.json)."""
    scored = report.get("miou") is not None
    if not scored:  # charts of an earlier run of this --out would not describe this one
        for name in (CONFUSION_CHART, CLASS_IOU_CHART):
            (out / name).unlink(missing_ok=True)
    images = [PageImage(entry, store.paths(entry)[store.main_kind], store.output_format == "labelids",
                        float(row[0]) if scored else None, float(row[1]) if scored else None)
              for entry, row in zip(entries, per_image)]
    write_report_files(out, report, images, Path(report["options"]["data_root"]))


def _rounded(statistic: Callable, values: list[float]) -> float | None:
    return round(float(statistic(values)), 3) if values else None


def evaluate(options: EvalOptions, model: LoadedModel | None = None,
             echo: Callable[[str], None] | None = None) -> dict:
    """Run the whole evaluation and return the report (also written to OUT/report.json by rank 0)."""
    echo = echo or (lambda message: print(message, file=sys.stderr))
    device = resolve_device(options.device)
    mode = resolve_mode(options.fast, options.fast_resize, options.fast_dtype, device)
    if options.batch_size < 1 or options.workers < 0:
        raise CaffeError(f"{term('--batch-size', 'batch_size')} must be >= 1 and {term('--workers', 'workers')} >= 0")
    entries = parse_list(options.list_path, options.data_root)
    if options.error_maps and entries[0].label is None:
        raise CaffeError(f"--error-maps: the list {options.list_path} has no labels ('IMAGE LABEL' lines), so there "
                         f"are no errors to show")
    if any(entry.label_is_label_ids for entry in entries):
        echo("note: some *_labelTrainIds.png labels are missing; their *_labelIds.png are mapped to trainIds "
             "with the official Cityscapes table")
    out = Path(options.out)
    if out.exists() and not out.is_dir():
        raise CaffeError(f"{term('--out', 'out')} {out}: is a file, expected a folder for the predictions")
    store = OutputStore(out, options.output_format, options.resume, options.overlay, options.error_maps)
    if model is None:
        model = load_model(options.weights, options.prototxt, options.input_size, options.verify_md5,
                           on_warning=lambda message: echo(f"warning: {message}"))
    check_outputs_apart(store, entries, ReadFiles([(options.list_path, "the list"), (options.weights, "the weights"),
                                                   (options.prototxt, "the net definition")]))
    prepare_out_dir(out)
    # the settings a user can name come first: the error names the first one that differs
    fingerprint = {"weights_md5": model.md5, "input_size": list(model.input_size),
                   "resize": "fast" if mode.torch_output_resize else "matlab", "format": options.output_format,
                   "data_root": str(Path(options.data_root).resolve()), "definition_md5": model.definition_md5}
    # Keys earlier runs did not record are added only where their value differs from what those runs did
    # (the converted net, float32), so their folders still resume.
    if not (mode.exact and device.type == "cpu"):
        fingerprint["net"] = "fast graph"
    if mode.name == "fast":
        fingerprint["precision"] = mode.dtype_name

    dist = _Distributed(device)
    device = dist.device
    shard = dist.shard(entries)
    lock = None

    def agreed(step: Callable[[], None]) -> None:
        """Run one setup step on every rank; if it failed anywhere, every rank stops here, before writing."""
        failure: BaseException | None = None
        try:
            step()
        except BaseException as error:  # noqa: BLE001 - shared with the other ranks below, then raised
            failure = error
        if dist.sum(np.array([1.0 if failure else 0.0]), op="max")[0] > 0:
            if lock is not None:
                lock.close()
            dist.close()
            raise failure or CaffeError(f"rank {dist.rank}: another process of the distributed run failed to "
                                        f"start (see its message)")

    def take_lock() -> None:
        nonlocal lock
        if dist.rank == 0:  # one lock per run: a second run's rank 0 is refused, and its ranks with it
            lock = lock_out_dir(out)
            if lock is None:
                raise CaffeError(f"{term('--out', 'out')} {out}: another icnet-eval run is writing there; wait for it or "
                                 f"choose another {term('--out', 'out')}")

    # Nothing is deleted or written until every rank holds what it needs: the lock, then the settings
    # check, then --redo's deletions, then rank 0's run file.
    agreed(take_lock)
    agreed(lambda: check_run_file(out, fingerprint, store, entries))
    if not store.resume:
        agreed(lambda: delete_outputs(store, shard))
    agreed(lambda: (write_run_file(out, fingerprint) if dist.rank == 0 else None, store.make_folders()))
    predictor = Predictor(model, device, mode, options.batch_size)
    start = time.perf_counter()
    progress = Progress(len(shard), "icnet-eval", "image", enabled=options.progress and dist.rank == 0)
    per_image = np.zeros((len(entries), _PER_IMAGE_FIELDS))
    failure: BaseException | None = None
    try:
        with numerics(device, exact=mode.exact):
            predictor.capture()  # before the loader's threads make CUDA calls of their own, out of the timings
            if predictor.graph_error:
                echo(f"note: the net runs without a CUDA graph ({predictor.graph_error})")
            done = _run_shard(shard, predictor, store, options, progress, per_image,
                              list(range(dist.rank, len(entries), dist.world)))
    except BaseException as error:  # every rank must reach the reductions below, or the others wait forever
        failure = error
    finally:
        progress.close()
    failed_elsewhere = dist.sum(np.array([1.0 if failure else 0.0]), op="max")[0] > 0
    if failure is not None:
        if lock is not None:
            lock.close()
        if dist.active:
            dist.close()
        raise failure
    if failed_elsewhere:
        if lock is not None:
            lock.close()
        dist.close()
        raise CaffeError(f"rank {dist.rank}: another process of the distributed run failed (see its message)")

    local = np.concatenate([done.counts.to_array(), [len(shard), done.resumed]]).astype(np.float64)
    totals = dist.sum(local)
    per_image = dist.sum(per_image)  # each row comes from one rank: the sum is that row, exactly
    seconds = time.perf_counter() - start
    counts = ConfusionCounts.from_array(totals[:-2])
    counts.instance_terms = per_image[:, 2:].sum(axis=0)  # in list order, the same for any sharding
    predicted, resumed_total = int(totals[-2]), int(totals[-1])
    report: dict[str, Any]
    if entries[0].label is not None:
        report = counts.summary()
        if options.per_image:
            report["per_image"] = [{"image": str(entry.image), "miou": float(row[0]), "pixel_accuracy": float(row[1])}
                                   for entry, row in zip(entries, per_image)]
    else:
        report = {"miou": None, "pixel_accuracy": None, "class_iou": None, "class_accuracy": None,
                  "classes": list(CLASS_NAMES), "images": predicted}
    report["options"] = _options_record(options, model, device, dist.world, mode)
    report["options"]["cuda_graph"] = predictor.graph is not None
    report["timing"] = {
        "seconds": round(seconds, 3),
        "images_per_second": round(predicted / seconds, 3) if seconds > 0 else None,
        "images_inferred": predicted - resumed_total,
        "images_resumed": resumed_total,
        # per image, measured on rank 0's share
        "forward_ms_median": _rounded(np.median, done.times_ms["forward"]),
        "forward_ms_mean": _rounded(np.mean, done.times_ms["forward"]),
        # where the time goes: medians per image of each stage, and the main loop's wait for the loader
        "stages_ms_median": {stage: _rounded(np.median, done.times_ms[stage]) for stage in STAGES},
        "loader_wait_s": round(done.waited_s, 3),
    }
    if dist.rank == 0:
        write_json(out / REPORT_FILE, report)
        if options.report_page:
            _write_page(out, report, entries, per_image, store)
    if lock is not None:
        lock.close()
    dist.close()
    return report
