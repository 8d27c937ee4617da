"""Progress of a long loop: a tqdm bar on a terminal, a plain line now and then when the output is a log or a pipe.

A log gets whole lines only (no carriage returns, no bar redrawn into the file): one when both
`interval` seconds (default 10, or $CAFFE2TORCH_PROGRESS_INTERVAL) and 5% of the total have passed since
the last one, and a closing line once any was written. A run shorter than the interval writes nothing.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

from caffe2torch.errors import CaffeError

INTERVAL_ENV = "CAFFE2TORCH_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 10.0
# A line at most every 5% of the total: a 2-hour run logs 20 lines, not 720.
STEP_FRACTION = 0.05


def progress_interval() -> float:
    """Seconds between two lines in a log: $CAFFE2TORCH_PROGRESS_INTERVAL (tests set it short), else 10."""
    text = os.environ.get(INTERVAL_ENV)
    if text is None or not text.strip():
        return DEFAULT_INTERVAL_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0.0:  # also NaN
        raise CaffeError(f"{INTERVAL_ENV}={text!r}: expected the seconds between progress lines (a number >= 0)")
    return value


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """Count `total` steps of `unit` (singular, e.g. "image"); `total` None when unknown (a video's frames).

    On a terminal a tqdm bar (shown after `delay` seconds: a short run shows none); otherwise
    "PREFIX: 120/500 images (24%), 3.21 images/s, ETA 1:57" lines (see the module's doc).
    """

    def __init__(self, total: int | None, prefix: str, unit: str = "image", enabled: bool = True,
                 stream: TextIO | None = None, interval: float | None = None, delay: float = 0.0) -> None:
        self.total = total if total else None
        self.prefix, self.unit = prefix, unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.interval = progress_interval() if interval is None else interval
        self.done = 0
        self.start = self.last_time = time.perf_counter()
        self.last_done = 0
        self.lines = 0  # lines written to a log
        self.bar = None
        if enabled and is_terminal(self.stream):
            try:
                from tqdm import tqdm
            except ImportError:  # a machine set up with --no-deps: the plain lines instead
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=self.total, desc=prefix, unit=unit, file=self.stream, delay=delay,
                                dynamic_ncols=True, leave=True)

    def update(self, count: int = 1) -> None:
        self.done += count
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(count)
            return
        now = time.perf_counter()
        step = STEP_FRACTION * self.total if self.total else 0
        if now - self.last_time >= self.interval and self.done - self.last_done >= max(step, 1):
            self._line(now, final=False)

    def _line(self, now: float, final: bool) -> None:
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        plural = f"{self.unit}s"
        count = f"{self.done}/{self.total} {plural} ({100 * self.done // self.total}%)" if self.total else \
            f"{self.done} {plural}"
        if final:
            tail = f"{_clock(elapsed)} in all"
        elif self.total and rate > 0:
            tail = f"ETA {_clock((self.total - self.done) / rate)}"
        else:
            tail = f"{_clock(elapsed)} so far"
        self.stream.write(f"{self.prefix}: {count}, {rate:.2f} {plural}/s, {tail}\n")
        self.stream.flush()
        self.last_time, self.last_done = now, self.done
        self.lines += 1

    def write(self, message: str, file: TextIO | None = None) -> None:
        """Print a line to `file` (default: the progress stream) without tearing a bar on the terminal."""
        file = file if file is not None else self.stream
        if self.bar is not None:
            self.bar.write(message, file=file)
        else:
            print(message, file=file, flush=True)

    def close(self) -> None:
        """End the bar; a log that got lines gets a closing one (its reader sees the run finished)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.lines and self.done > self.last_done:
            self._line(time.perf_counter(), final=True)
        self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
