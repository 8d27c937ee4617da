"""The evaluation run: forward, the authors' softmax / resize / argmax, PNG outputs, resume, sharding, report."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

import numpy as np
import torch

from caffe2torch.errors import CaffeError
from icnet_eval.cityscapes import CLASS_NAMES
from icnet_eval.data import MEAN_BGR, EvaluationDataset, ListEntry, make_loader, parse_list
from icnet_eval.imresize import fast_resize, matlab_imresize_torch
from icnet_eval.metrics import ConfusionCounts
from caffe2torch.write import write_atomic
from icnet_eval.model import LoadedModel, load_model
from icnet_eval.outputs import (REPORT_FILE, OutputStore, check_outputs_apart, check_run_file, delete_outputs,
                               lock_out_dir, prepare_out_dir, write_run_file)


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
    # The MATLAB resize of the input on the net's device (default: on a GPU), else in the workers.
    resize_on_device: bool | None = None
    writer_threads: int = 4  # PNG encoding and writing beside the main loop (0: in the main loop)
    extra: dict[str, Any] = field(default_factory=dict)


def class_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """eval_sub.m's `exp(score) ./ sum(exp(score), 3)` in float32, without max subtraction.

    The sum runs over the classes in order, one addition at a time, so it gives the same bits on
    every device. Logits above ~88 overflow to inf and give NaN, as they would in MATLAB.
    """
    scores = torch.exp(logits.float())
    total = scores[0].clone()
    for channel in range(1, scores.shape[0]):
        total += scores[channel]
    return scores / total


def predict_train_ids(logits: torch.Tensor, image_size: tuple[int, int], fast: bool = False) -> np.ndarray:
    """C x h x w logits -> H x W uint8 trainIds: softmax, resize to the image (MATLAB bilinear), argmax."""
    probabilities = class_probabilities(logits)
    resize = fast_resize if fast else matlab_imresize_torch
    resized = resize(probabilities, tuple(image_size))
    # MATLAB's max skips NaN (all-NaN gives the first class); torch.argmax would pick the NaN.
    resized = torch.nan_to_num(resized, nan=-math.inf)
    # torch.argmax returns the first maximal index: ties go to the lowest class, as MATLAB's max.
    return torch.argmax(resized, dim=0).to(torch.uint8).cpu().numpy()


class Progress:
    """Images/s and ETA: one self-updating line on a terminal, a line per 10% in a log (long runs only)."""

    def __init__(self, total: int, enabled: bool, stream: TextIO | None = None) -> None:
        self.total, self.done, self.start = total, 0, time.perf_counter()
        self.stream = stream or sys.stderr
        self.terminal = getattr(self.stream, "isatty", lambda: False)()
        self.enabled = enabled and (self.terminal or total >= 20)
        self.next_log = total / 10

    def update(self, count: int) -> None:
        self.done += count
        if not self.enabled or (not self.terminal and self.done < self.next_log):
            return
        self.next_log += self.total / 10
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        minutes, seconds = divmod(int((self.total - self.done) / rate if rate > 0 else 0), 60)
        line = (f"[{self.done:>{len(str(self.total))}}/{self.total}] {rate:6.2f} images/s  "
                f"ETA {minutes:d}:{seconds:02d}")
        self.stream.write(f"\r{line} " if self.terminal else f"icnet-eval: {line}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.terminal:
            self.stream.write("\n")
            self.stream.flush()


def resolve_device(name: str | None) -> torch.device:
    """--device, defaulting to the GPU when there is one; refuses a GPU that is not there."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise CaffeError(f"--device {name}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CaffeError(f"--device {name}: CUDA is not available on this machine")
    return device


@contextlib.contextmanager
def numerics(device: torch.device, exact: bool = True) -> Iterator[None]:
    """Exact mode: results that do not depend on the thread count, the run or TF32.

    GPU: TF32 off, no cuDNN autotuning (its choice changes from run to run). CPU: oneDNN off; its
    convolutions round differently with 1 and 2 threads (torchrun gives each process one thread),
    while PyTorch's own im2col + GEMM path gives the same bits for any thread count, so a sharded
    run reports exactly what a single process does. Fast mode leaves PyTorch's defaults.
    """
    if not exact:
        yield
        return
    matmul_tf32, onednn = torch.backends.cuda.matmul.allow_tf32, torch.backends.mkldnn.enabled
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.mkldnn.enabled = device.type != "cpu"
    try:
        with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.mkldnn.enabled = matmul_tf32, onednn


def _write_json(path: Path, data: dict) -> None:
    def clean(value):  # NaN is not JSON: a score that is 0 / 0 is written as null
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    try:
        write_atomic(path, (json.dumps(clean(data), indent=2) + "\n").encode())
    except OSError as error:
        raise CaffeError(f"{path}: cannot write ({error.strerror or error})") from None


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


def _options_record(options: EvalOptions, model: LoadedModel, device: torch.device, world: int) -> dict:
    return {
        "list": str(options.list_path), "data_root": str(options.data_root),
        "weights": str(model.weights) if model.weights else None, "weights_md5": model.md5,
        "release": model.release.name if model.release else None, "definition": model.definition,
        "input_size": list(model.input_size), "resize": "fast" if options.fast_resize else "matlab",
        "format": options.output_format, "out": str(options.out), "device": str(device),
        "batch_size": options.batch_size, "workers": options.workers, "world_size": world,
        "verify_md5": options.verify_md5, **options.extra,
    }


def _forward(net: torch.nn.Module, inputs: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    with torch.inference_mode():
        logits = net(inputs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return logits, (time.perf_counter() - start) * 1000.0


def network_inputs(items: list[dict], input_size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """The batch the net reads: preprocessed by the workers, or (resize on the device) made here from the
    decoded uint8 images with the same MATLAB-exact resize, so the bits are the same either way."""
    if items[0]["input"].dtype != torch.uint8:
        return torch.stack([item["input"] for item in items]).to(device, non_blocking=True)
    mean = torch.tensor(MEAN_BGR, device=device).view(3, 1, 1)
    resized = [matlab_imresize_torch(item["input"].to(device, non_blocking=True), input_size) for item in items]
    return torch.stack([image.to(torch.float32) - mean for image in resized])


class PngWriter:
    """PNG encoding and atomic writes on a few threads beside the main loop (cv2 releases the GIL).

    At most `limit` writes wait at a time; the first failure stops the run with its one-line error
    at the next `submit` or at `finish`. Every file is written through a rename, so a run stopped
    halfway resumes as before.
    """

    def __init__(self, threads: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="png") if threads > 0 else None
        self.pending: list[Future] = []
        self.limit = 4 * max(threads, 1)

    def _check(self, wait_for_room: bool) -> None:
        while self.pending and (self.pending[0].done() or wait_for_room and len(self.pending) >= self.limit):
            self.pending.pop(0).result()  # raises the job's CaffeError here

    def submit(self, job: Callable[..., None], *args) -> None:
        if self.pool is None:
            job(*args)
            return
        self._check(wait_for_room=True)
        self.pending.append(self.pool.submit(job, *args))

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


# Per image: its own mIoU and pixel accuracy, then its cityscapesScripts instance terms.
_PER_IMAGE_FIELDS = 2 + ConfusionCounts().instance_terms.size


def _run_shard(shard: list[ListEntry], net: torch.nn.Module, model: LoadedModel, store: OutputStore,
               options: EvalOptions, device: torch.device, progress: Progress, per_image: np.ndarray,
               positions: list[int]) -> tuple[ConfusionCounts, list[float], int]:
    """Predict (or take from disk) every image of this process's share; returns counts, forward ms, resumed.

    Row positions[i] of `per_image` gets image i's own scores and instance terms, so that they can be
    summed in list order however the list was sharded (floating-point sums depend on their order).
    """
    counts, forward_ms, resumed = ConfusionCounts(), [], 0
    if not shard:
        return counts, forward_ms, resumed
    resize_here = device.type != "cpu" if options.resize_on_device is None else options.resize_on_device
    dataset = EvaluationDataset(shard, model.input_size, store.existing_prediction, keep_image=store.overlay,
                                resize=not resize_here)
    loader = make_loader(dataset, options.batch_size, options.workers, pin_memory=device.type == "cuda")
    writer = PngWriter(options.writer_threads)
    try:
        for batch in loader:
            for item in batch:
                if item["error"]:
                    raise CaffeError(item["error"])
            todo = [item for item in batch if item["prediction"] is None]
            if todo:
                inputs = network_inputs(todo, model.input_size, device)
                logits, elapsed = _forward(net, inputs, device)
                forward_ms.append(elapsed / len(todo))
                for item, item_logits in zip(todo, logits):
                    item["prediction"] = predict_train_ids(item_logits, item["image_size"], options.fast_resize)
                    writer.submit(store.write, item["entry"], item["prediction"])
            resumed += len(batch) - len(todo)
            if store.overlay:
                for item in batch:
                    writer.submit(store.write_overlay, item["entry"], item["prediction"], item["image"],
                                  item["input"] is not None)
            for item in batch:  # list order, so the totals never depend on timing
                if item["label"] is not None:
                    before = counts.instance_terms.copy()
                    row = per_image[positions[item["index"]]]
                    row[:2] = counts.add(item["prediction"], item["label"], item["instances"])
                    row[2:] = counts.instance_terms - before
            progress.update(len(batch))
    except BaseException:
        writer.abandon()
        raise
    writer.finish()
    return counts, forward_ms, resumed


def evaluate(options: EvalOptions, model: LoadedModel | None = None,
             echo: Callable[[str], None] | None = None) -> dict:
    """Run the whole evaluation and return the report (also written to OUT/report.json by rank 0)."""
    echo = echo or (lambda message: print(message, file=sys.stderr))
    device = resolve_device(options.device)
    if options.batch_size < 1 or options.workers < 0:
        raise CaffeError("--batch-size must be >= 1 and --workers >= 0")
    entries = parse_list(options.list_path, options.data_root)
    if any(entry.label_is_label_ids for entry in entries):
        echo("note: some *_labelTrainIds.png labels are missing; their *_labelIds.png are mapped to trainIds "
             "with the official Cityscapes table")
    out = Path(options.out)
    if out.exists() and not out.is_dir():
        raise CaffeError(f"--out {out}: is a file, expected a folder for the predictions")
    store = OutputStore(out, options.output_format, options.resume, options.overlay)
    if model is None:
        model = load_model(options.weights, options.prototxt, options.input_size, options.verify_md5,
                           on_warning=lambda message: echo(f"warning: {message}"))
    check_outputs_apart(store, entries)
    prepare_out_dir(out)
    # the settings a user can name come first: the error names the first one that differs
    fingerprint = {"weights_md5": model.md5, "input_size": list(model.input_size),
                   "resize": "fast" if options.fast_resize else "matlab", "format": options.output_format,
                   "data_root": str(Path(options.data_root).resolve()), "definition_md5": model.definition_md5}

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
                raise CaffeError(f"--out {out}: another icnet-eval run is writing there; wait for it or "
                                 f"choose another --out")

    # Nothing is deleted or written until every rank holds what it needs: the lock, then the settings
    # check, then --redo's deletions, then rank 0's run file.
    agreed(take_lock)
    agreed(lambda: check_run_file(out, fingerprint, store, entries))
    if not store.resume:
        agreed(lambda: delete_outputs(store, shard))
    agreed(lambda: (write_run_file(out, fingerprint) if dist.rank == 0 else None, store.make_folders()))
    # Exact mode keeps Caffe's order of operations in BN layers too (torch's BatchNorm is an ulp or two away).
    net = model.evaluation_net(exact=not options.fast_resize).to(device).eval()
    start = time.perf_counter()
    progress = Progress(len(shard), options.progress and dist.rank == 0)
    per_image = np.zeros((len(entries), _PER_IMAGE_FIELDS))
    failure: BaseException | None = None
    try:
        with numerics(device, exact=not options.fast_resize):
            counts, forward_ms, resumed = _run_shard(shard, net, model, store, options, device, progress,
                                                     per_image, list(range(dist.rank, len(entries), dist.world)))
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

    local = np.concatenate([counts.to_array(), [len(shard), resumed]]).astype(np.float64)
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
    report["options"] = _options_record(options, model, device, dist.world)
    report["timing"] = {
        "seconds": round(seconds, 3),
        "images_per_second": round(predicted / seconds, 3) if seconds > 0 else None,
        "images_inferred": predicted - resumed_total,
        "images_resumed": resumed_total,
        # per image, measured on rank 0's share
        "forward_ms_median": round(float(np.median(forward_ms)), 3) if forward_ms else None,
        "forward_ms_mean": round(float(np.mean(forward_ms)), 3) if forward_ms else None,
    }
    if dist.rank == 0:
        _write_json(out / REPORT_FILE, report)
    if lock is not None:
        lock.close()
    dist.close()
    return report


def format_report(report: dict) -> str:
    """The scores as tables, eval_acc.m's first (class IoU), then cityscapesScripts' categories and iIoU; all in
    percent."""
    if report.get("miou") is None:
        return f"{report['images']} images predicted; the list has no labels, so nothing was scored"

    def percent(value) -> str:
        return "   n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:6.2f}"

    instances = "class_iiou" in report
    lines = ["==== Summary IoU (%) ====" + ("   iIoU (%)" if instances else "")]
    for index, name in enumerate(report["classes"]):
        extra = f"   {percent(report['class_iiou'][index])}" if instances else ""
        lines.append(f"{index + 1:3d} {name:>16s}: {percent(report['class_iou'][index])}{extra}")
    lines.append(f"Mean IoU over {len(report['classes'])} classes: {report['miou']:.2f}%"
                 + (f"   (class iIoU mean {percent(report['class_miiou']).strip()}%)" if instances else ""))
    lines.append(f"Pixel-wise Accuracy: {report['pixel_accuracy']:.2f}%")
    if "category_iou" in report:
        lines.append("==== Categories, IoU (%) as cityscapesScripts ====" + ("   iIoU (%)" if instances else ""))
        for index, name in enumerate(report["categories"]):
            extra = f"   {percent(report['category_iiou'][index])}" if instances else ""
            lines.append(f"    {name:>16s}: {percent(report['category_iou'][index])}{extra}")
        lines.append(f"Mean category IoU: {percent(report['category_miou']).strip()}%")
    lines.append(f"({report['images']} images scored)")
    return "\n".join(lines)


PREDICTION_FORMATS = ("auto", "trainids", "labelids")


def _prediction_source(pred_dir: Path, pred_format: str, echo: Callable[[str], None]) -> tuple[Path, str]:
    """The folder of prediction PNGs and their format; an --out folder says both in its run file."""
    from icnet_eval.outputs import RUN_FILE

    if pred_format not in PREDICTION_FORMATS:
        raise CaffeError(f"--format {pred_format}: expected one of {', '.join(PREDICTION_FORMATS)}")
    if not pred_dir.is_dir():
        raise CaffeError(f"--pred-dir {pred_dir}: no such folder")
    recorded = None
    if (pred_dir / RUN_FILE).is_file():
        try:
            recorded = json.loads((pred_dir / RUN_FILE).read_text(encoding="utf-8")).get("format")
        except (OSError, ValueError, AttributeError):
            raise CaffeError(f"--pred-dir {pred_dir}: its {RUN_FILE} cannot be read") from None
        if pred_format != "auto" and recorded not in (None, pred_format):
            raise CaffeError(f"--pred-dir {pred_dir}: holds {recorded} predictions (see {RUN_FILE}), not {pred_format}")
        pred_format = recorded or pred_format
    folder = {"labelids": "labelids"}.get(pred_format, "gray")
    if (pred_dir / folder).is_dir():
        pred_dir = pred_dir / folder
        echo(f"note: reading the {'labelIds' if folder == 'labelids' else 'trainIds'} predictions in {pred_dir}")
    return pred_dir, pred_format


def score_predictions(list_path: Path, data_root: Path, pred_dir: Path,
                      echo: Callable[[str], None] | None = None, pred_format: str = "auto") -> dict:
    """eval_acc.m alone: score prediction PNGs against the list's labels.

    trainId predictions are named like the authors' (label name, gtFine_labelTrainIds ->
    leftImg8bit); labelId ones (`--format labelids` runs) as the benchmark server's files and are
    mapped with the official table. `auto` takes the format an --out folder recorded and refuses
    trainId predictions with values no trainId has (labelIds scored as trainIds give a wrong mIoU);
    an explicit `trainids` scores any values as eval_acc.m does (above 19: the last bin).
    """
    from icnet_eval.cityscapes import LABEL_ID_TO_TRAIN_ID, NUM_CLASSES
    from icnet_eval.data import read_gray_png, read_instance_ids, read_label_train_ids
    from icnet_eval.outputs import server_name

    echo = echo or (lambda message: print(message, file=sys.stderr))
    entries = parse_list(list_path, data_root, need_images=False, need_labels=True)
    if any(entry.label_is_label_ids for entry in entries):
        echo("note: labelIds labels (*_labelIds.png, named so or standing in for a missing *_labelTrainIds.png) "
             "are mapped to trainIds with the official Cityscapes table")
    pred_dir, resolved = _prediction_source(Path(pred_dir), pred_format, echo)
    counts = ConfusionCounts()
    for entry in entries:
        path = pred_dir / (server_name(entry) if resolved == "labelids" else entry.label_prediction_name)
        if not path.is_file():
            raise CaffeError(f"{entry.where}: prediction {path} does not exist")
        prediction = read_gray_png(path, "prediction", entry)
        if prediction is None:
            raise CaffeError(f"{entry.where}: prediction {path} is not a readable PNG file")
        if resolved == "labelids":
            prediction = LABEL_ID_TO_TRAIN_ID[prediction]
        elif resolved == "auto":
            outside = prediction[(prediction >= NUM_CLASSES) & (prediction != 255)]
            if outside.size:
                raise CaffeError(f"{entry.where}: prediction {path} holds values no trainId has (e.g. "
                                 f"{int(outside[0])}): labelIds? Score them with --format labelids "
                                 f"(or --format trainids to count them as eval_acc.m would)")
        label = read_label_train_ids(entry)
        counts.add(prediction, label, read_instance_ids(entry, label.shape))
    report = counts.summary()
    report["options"] = {"list": str(list_path), "data_root": str(data_root), "pred_dir": str(pred_dir),
                         "format": resolved}
    return report
