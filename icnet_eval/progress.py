"""Progress of a long run: images/s and ETA on one self-updating terminal line, or a line per 10% in a log."""

from __future__ import annotations

import sys
import time
from typing import TextIO


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
