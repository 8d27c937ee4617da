"""`icnet-eval time`: forward-pass latency of the converted ICNet, beside the paper's figure."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from caffe2torch.errors import CaffeError
from icnet_eval.model import LoadedModel
from icnet_eval.predict import Mode, Predictor

# Zhao et al., "ICNet for Real-Time Semantic Segmentation on High-Resolution Images", ECCV 2018:
# 33 ms per 1024x2048 image (30.3 fps) in Caffe on one NVIDIA Titan X.
PAPER_MS = 33.0
PAPER_FPS = 30.3
PAPER_SETUP = "Caffe, one NVIDIA Titan X, 1024x2048 input (ICNet paper, ECCV 2018)"


@dataclass
class TimingResult:
    """Per-iteration forward times in milliseconds and their summary."""

    times_ms: list[float]
    device: str
    input_size: tuple[int, int]
    warmup: int

    @property
    def median_ms(self) -> float:
        return float(np.median(self.times_ms))

    @property
    def p10_ms(self) -> float:
        return float(np.percentile(self.times_ms, 10))

    @property
    def p90_ms(self) -> float:
        return float(np.percentile(self.times_ms, 90))

    @property
    def fps(self) -> float:
        return 1000.0 / self.median_ms if self.median_ms > 0 else float("inf")

    def as_dict(self) -> dict:
        return {"device": self.device, "input_size": list(self.input_size), "iterations": len(self.times_ms),
                "warmup": self.warmup, "median_ms": self.median_ms, "p10_ms": self.p10_ms, "p90_ms": self.p90_ms,
                "fps": self.fps, "paper_ms": PAPER_MS, "paper_fps": PAPER_FPS}


def time_forward(model: LoadedModel, device: torch.device, iterations: int = 100, warmup: int = 10,
                 seed: int = 0, mode: Mode | None = None) -> TimingResult:
    """Time `iterations` forward passes on one 1x3xHxW input after `warmup` untimed ones.

    The net is the one an evaluation in `mode` runs (default exact), CUDA graph included on a GPU.
    GPU: CUDA events around each forward, read after one synchronisation at the end, so timing
    adds no stall between iterations. CPU: perf_counter around each forward.
    """
    mode = mode or Mode()
    if iterations < 1 or warmup < 0:
        raise CaffeError("--iterations must be >= 1 and --warmup >= 0")
    height, width = model.input_size
    generator = torch.Generator().manual_seed(seed)
    # pixel-like values: mean-subtracted intensities of a few tens
    inputs = (torch.randn(1, 3, height, width, generator=generator) * 50.0).to(device, mode.dtype)
    net = Predictor(model, device, mode).forward
    times: list[float] = []
    with torch.inference_mode():
        for _ in range(warmup):
            net(inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(iterations)]
            for begin, end in events:
                begin.record()
                net(inputs)
                end.record()
            torch.cuda.synchronize(device)
            times = [begin.elapsed_time(end) for begin, end in events]
        else:
            for _ in range(iterations):
                start = time.perf_counter()
                net(inputs)
                times.append((time.perf_counter() - start) * 1000.0)
    return TimingResult(times, str(device), (height, width), warmup)


def format_timing(result: TimingResult, description: str) -> str:
    """Our numbers and the paper's, side by side."""
    height, width = result.input_size
    return "\n".join([
        f"net: {description}",
        f"input 1x3x{height}x{width} on {result.device}, {len(result.times_ms)} iterations after {result.warmup} warm-up",
        f"ours : median {result.median_ms:8.2f} ms  (p10 {result.p10_ms:.2f}, p90 {result.p90_ms:.2f})  "
        f"{result.fps:7.2f} fps",
        f"paper:        {PAPER_MS:8.2f} ms  {'':>24s}{PAPER_FPS:7.2f} fps  [{PAPER_SETUP}]",
    ])
