"""The device side of an evaluation: the net each mode runs, its input batch, and the post (softmax, resize,
argmax, confusion counts) up to the uint8 prediction, the only image that comes back to the host.

Three modes:

* exact (default): the authors' numerics. On the CPU the converted net with BN in Caffe's order
  (reports and PNGs bit-identical to earlier releases); on a GPU the fast graph in float32 with
  TF32 off and deterministic cuDNN, one image at a time in a CUDA graph (the same report from run
  to run, and for any --batch-size). MATLAB's resize both ways.
* fast-resize: PyTorch's resize of the class probabilities, the fast graph in float32.
* fast: the fast graph in half precision (float16 on a GPU by default), PyTorch's resize of the
  input and of the probabilities, whole batches in a CUDA graph.

Work is only queued here: `Predictor.launch` returns at once on a GPU, and `Launched.wait` blocks
until that batch's predictions have arrived, so the next batch's forward overlaps the host work
(scoring, PNG writes) of the previous one.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from caffe2torch.errors import CaffeError, term
from icnet_eval.cityscapes import NUM_CLASSES
from icnet_eval.data import MEAN_BGR
from icnet_eval.imresize import fast_resize, matlab_imresize_torch
from icnet_eval.model import LoadedModel

MODES = ("exact", "fast-resize", "fast")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Mode:
    """How an evaluation computes: `name` in MODES and the net's dtype."""

    name: str = "exact"
    dtype: torch.dtype = torch.float32

    @property
    def exact(self) -> bool:
        return self.name == "exact"

    @property
    def torch_output_resize(self) -> bool:
        return self.name != "exact"

    @property
    def torch_input_resize(self) -> bool:
        return self.name == "fast"

    @property
    def dtype_name(self) -> str:
        return next(name for name, dtype in DTYPES.items() if dtype == self.dtype)


def resolve_mode(fast: bool, fast_resize: bool, dtype: str | None, device: torch.device) -> Mode:
    """--fast / --fast-resize / --fast-dtype as a Mode; half precision by default only on a GPU (on a CPU, float16
    convolutions are 6x slower than float32 ones, and bfloat16, faster where the CPU has AVX-512 BF16, is too
    imprecise to be a default: BENCHMARKS.md)."""
    if dtype is not None and dtype not in DTYPES:
        raise CaffeError(f"{term('--fast-dtype', 'fast_dtype')} {dtype}: expected one of {', '.join(DTYPES)}")
    if dtype is not None and not fast:
        raise CaffeError(f"{term('--fast-dtype', 'fast_dtype')} needs {term('--fast', 'fast=True')}")
    if fast:
        return Mode("fast", DTYPES[dtype or ("float16" if device.type == "cuda" else "float32")])
    return Mode("fast-resize" if fast_resize else "exact")


@contextlib.contextmanager
def numerics(device: torch.device, exact: bool = True) -> Iterator[None]:
    """Exact mode: results that do not depend on the thread count, the run or TF32.

    GPU: TF32 off, no cuDNN autotuning (its choice changes from run to run). CPU: oneDNN off; its
    convolutions round differently with 1 and 2 threads (torchrun gives each process one thread),
    while PyTorch's own im2col + GEMM path gives the same bits for any thread count, so a sharded
    run reports exactly what a single process does. Otherwise PyTorch's fastest: TF32 and cuDNN's
    autotuner.
    """
    matmul_tf32, onednn = torch.backends.cuda.matmul.allow_tf32, torch.backends.mkldnn.enabled
    torch.backends.cuda.matmul.allow_tf32 = not exact
    if exact:
        torch.backends.mkldnn.enabled = device.type != "cpu"
    try:
        with torch.backends.cudnn.flags(enabled=True, benchmark=not exact, deterministic=exact, allow_tf32=not exact):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.mkldnn.enabled = matmul_tf32, onednn


def runtime_net(model: LoadedModel, device: torch.device, mode: Mode) -> torch.nn.Module:
    """The module a mode runs on a device (see the module docstring): the converted net in Caffe's BN order for
    exact mode on a CPU, else the fast graph."""
    if mode.exact and device.type == "cpu":
        return model.evaluation_net(exact=True).to(device).eval()
    from caffe2torch.fast import optimize

    # Made once per model, device and dtype (segmenting a video asks for it every frame).
    cache = model.__dict__.setdefault("_runtime_nets", {})
    key = (str(device), mode.dtype)
    if key not in cache:
        # Built on the target device (its choices depend on it) from a copy, so the loaded net stays where it
        # was; folded and laid out in float32, then cast: folding in half precision would round twice.
        cache[key] = optimize(copy.deepcopy(model.net).to(device)).to(mode.dtype)
    return cache[key]


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


def first_argmax(volume: torch.Tensor) -> torch.Tensor:
    """C x H x W -> H x W uint8: the first class of largest value, NaN never winning (all-NaN gives class 0).

    MATLAB's `max` on the probabilities, which is torch.argmax of the NaN-free volume (first
    maximal index), computed as a running maximum over the classes: one pass over contiguous
    planes instead of a strided reduction (4x faster on a CPU), the same result bit for bit.
    """
    best = torch.nan_to_num(volume[0], nan=-math.inf)
    classes = torch.zeros(volume.shape[1:], dtype=torch.uint8, device=volume.device)
    for channel in range(1, volume.shape[0]):
        value = torch.nan_to_num(volume[channel], nan=-math.inf)
        classes.masked_fill_(value > best, channel)  # strictly greater: ties stay with the lower class
        best = torch.maximum(best, value)
    return classes


def predicted_train_ids(logits: torch.Tensor, image_size: tuple[int, int], fast: bool = False) -> torch.Tensor:
    """C x h x w logits -> H x W uint8 trainIds on the logits' device: softmax, resize to the image, argmax."""
    # the fast graph's scores are channels_last: the per-class planes below want them contiguous
    probabilities = class_probabilities(logits.contiguous())
    resize = fast_resize if fast else matlab_imresize_torch
    return first_argmax(resize(probabilities, tuple(image_size)))


def predict_train_ids(logits: torch.Tensor, image_size: tuple[int, int], fast: bool = False) -> np.ndarray:
    """`predicted_train_ids` as a NumPy array on the host."""
    return predicted_train_ids(logits, image_size, fast).cpu().numpy()


def label_confusion(prediction: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """19 x 19 counts (rows label, columns prediction) over the pixels eval_acc.m scores, on their device.

    For trainId predictions (0..18, as the net gives) this is `metrics.image_confusion`, and every
    count of eval_acc.m follows from it (`ConfusionCounts.add_confusion`). Labels are trainIds with
    255 (and eval_acc.m's 254) ignored; `read_label_train_ids` refuses anything else.
    """
    # No boolean indexing and no bincount: both need a count on the host, which would stall a GPU's queue.
    cells = NUM_CLASSES * NUM_CLASSES
    pairs = torch.where(label < NUM_CLASSES, label.long() * NUM_CLASSES + prediction.long(), cells).flatten()
    counts = torch.zeros(cells + 1, dtype=torch.int64, device=pairs.device)
    counts.index_add_(0, pairs, torch.ones_like(pairs))  # integer sums: exact in any order
    return counts[:cells].view(NUM_CLASSES, NUM_CLASSES)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without waiting for the device: from pinned memory, asynchronously."""
    if device.type == "cuda" and not tensor.is_pinned():
        tensor = tensor.pin_memory()  # a pageable copy would wait for the work already queued
    return tensor.to(device, non_blocking=True)


def network_inputs(items: list[dict], input_size: tuple[int, int], device: torch.device,
                   mode: Mode = Mode()) -> torch.Tensor:
    """The batch the net reads: preprocessed by the workers, or (resize on the device) made here from the
    decoded uint8 images with the same resize (MATLAB's gives the same bits on every device; PyTorch's
    antialiased one, under --fast, may differ in the last bit between CPU and GPU)."""
    if items[0]["input"].dtype != torch.uint8:
        return torch.stack([_to_device(item["input"], device) for item in items]).to(mode.dtype)
    mean = _mean_on(device)
    resize = fast_resize if mode.torch_input_resize else matlab_imresize_torch
    resized = [resize(_to_device(item["input"], device), input_size) for item in items]
    return torch.stack([image.to(torch.float32) - mean for image in resized]).to(mode.dtype)


@functools.lru_cache(maxsize=None)
def _mean_on(device: torch.device) -> torch.Tensor:
    return _to_device(torch.from_numpy(MEAN_BGR.copy()), device).view(3, 1, 1)  # made once, copied without a wait


class _Clock:
    """Elapsed milliseconds between marks: CUDA events on a GPU (read once the work is done), else the wall."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.cuda = device, device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def spans_ms(self) -> list[float]:
        pairs = zip(self.marks, self.marks[1:])
        if self.cuda:
            return [begin.elapsed_time(end) for begin, end in pairs]
        return [(end - begin) * 1000.0 for begin, end in pairs]


@dataclass
class Launched:
    """One batch's queued device work; `wait` fills each item's "prediction" (and "confusion")."""

    items: list[dict]
    predictions: list[torch.Tensor]
    confusions: list[torch.Tensor | None]
    clock: _Clock
    done: Any = None  # the CUDA event after the last copy back
    times_ms: dict[str, float] = field(default_factory=dict)

    def wait(self) -> None:
        if self.done is not None:
            self.done.synchronize()
        spans = self.clock.spans_ms()
        self.times_ms = {name: span / len(self.items) for name, span in zip(("input", "forward", "post"), spans)}
        for item, prediction, confusion in zip(self.items, self.predictions, self.confusions):
            item["prediction"] = prediction.numpy()
            item["confusion"] = confusion.numpy() if confusion is not None else None


class Predictor:
    """Runs a mode's net and post on a device, in a CUDA graph on a GPU (one image at a time in exact mode,
    whole batches padded to `batch_size` otherwise, so one graph serves the run)."""

    def __init__(self, model: LoadedModel, device: torch.device, mode: Mode, batch_size: int = 1) -> None:
        if device.type == "cuda":  # "cuda" means the current device; events and streams below need its index
            device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
            torch.cuda.set_device(device)
        self.model, self.device, self.mode, self.batch_size = model, device, mode, batch_size
        self.net = runtime_net(model, device, mode)
        self.graph: Any = None
        self.graph_error: str | None = None  # why the net runs without a CUDA graph on a GPU, if it does

    @property
    def graph_batch(self) -> int:
        return 1 if self.mode.exact else self.batch_size

    def capture(self) -> None:
        """Capture the CUDA graph now (GPU only; before a loader's threads start, and out of the timings)."""
        if self.device.type != "cuda" or self.graph is not None or self.graph_error is not None:
            return
        from caffe2torch.fast import cuda_graph

        height, width = self.model.input_size
        example = torch.zeros(self.graph_batch, 3, height, width, device=self.device, dtype=self.mode.dtype)
        try:
            self.graph = cuda_graph(self.net, example)
        except (CaffeError, RuntimeError) as error:  # e.g. a layer whose output size depends on the data
            self.graph_error = str(error).splitlines()[0] if str(error) else type(error).__name__

    def _run(self, inputs: torch.Tensor) -> torch.Tensor:
        self.capture()
        count = inputs.shape[0]
        if self.graph is None or count > self.graph_batch:
            return self.net(inputs)
        if count < self.graph_batch:  # the last, shorter batch (or one with resumed images): pad, then drop
            inputs = torch.cat([inputs, inputs[-1:].expand(self.graph_batch - count, -1, -1, -1)])
        return self.graph(inputs)[:count]

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The net's scores for a batch. Exact mode on a GPU runs one image at a time, so the result cannot
        depend on --batch-size (cuDNN may pick other kernels for other batch shapes)."""
        with torch.inference_mode():
            if not (self.mode.exact and self.device.type == "cuda" and inputs.shape[0] > 1):
                return self._run(inputs)
            first = self._run(inputs[:1])
            scores = torch.empty((inputs.shape[0], *first.shape[1:]), dtype=first.dtype, device=first.device)
            scores[:1].copy_(first)  # the graph's output is overwritten by the next replay
            for index in range(1, inputs.shape[0]):
                scores[index:index + 1].copy_(self._run(inputs[index:index + 1]))
            return scores

    def launch(self, items: list[dict]) -> Launched:
        """Queue the forward and the post of `items` (dicts from EvaluationDataset) on the device."""
        clock = _Clock(self.device)
        clock.mark()
        inputs = network_inputs(items, self.model.input_size, self.device, self.mode)
        clock.mark()
        logits = self.forward(inputs)
        clock.mark()
        predictions, confusions = [], []
        pinned = self.device.type == "cuda"
        with torch.inference_mode():
            for item, item_logits in zip(items, logits):
                prediction = predicted_train_ids(item_logits, item["image_size"], self.mode.torch_output_resize)
                confusion = None
                if item["label"] is not None:
                    label = _to_device(torch.from_numpy(item["label"]), self.device)
                    confusion = label_confusion(prediction, label)
                predictions.append(_to_host(prediction, pinned))
                confusions.append(_to_host(confusion, pinned) if confusion is not None else None)
        clock.mark()
        done = None
        if pinned:
            done = torch.cuda.Event(blocking=True)  # waiting for it sleeps instead of spinning a core
            done.record(torch.cuda.current_stream(self.device))
        return Launched(items, predictions, confusions, clock, done)


def _to_host(tensor: torch.Tensor, pinned: bool) -> torch.Tensor:
    if not pinned:
        return tensor.cpu()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)
