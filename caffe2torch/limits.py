"""Memory a net will need, judged from Caffe's shapes before anything large is allocated; what the machine offers.

A hostile or mistaken definition (a huge num_output, Interp size or input size) would otherwise
try to allocate tens of GB to TB and end in a MemoryError traceback or the kernel's OOM killer.
The default limit is the memory the machine has available; `--max-memory` or the environment
variable CAFFE2TORCH_MAX_MEMORY (e.g. `64G`) sets another.
"""

from __future__ import annotations

import math
import os
import re
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Sequence

from caffe2torch.errors import CaffeError, term

ENVIRONMENT = "CAFFE2TORCH_MAX_MEMORY"
# Whatever the limit says, nothing beyond 2^60 bytes (an exbibyte) is accepted: torch and NumPy count elements
# and bytes in int64, so every shape the budget lets through then has products of its sizes far inside int64
# (a dimension of 2^63 - 1 in a file is refused, never wrapped or overflowed).
MAX_LIMIT = 1 << 60
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'64G', '512M', '1.5T' or a number of bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([KMGT]?)i?B?\s*", str(text), re.IGNORECASE)
    if not match:
        raise CaffeError(f"memory size {text!r}: expected a number with an optional K, M, G or T suffix (e.g. 64G)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def available_memory() -> int:
    """MemAvailable of /proc/meminfo, else free physical pages, else 16 GiB (unknown systems)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 16 << 30


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity on Linux, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def memory_limit(explicit: int | str | None = None) -> int:
    """The limit in bytes: the argument, else $CAFFE2TORCH_MAX_MEMORY, else the available memory (at most MAX_LIMIT)."""
    if explicit is not None:
        limit = parse_size(explicit) if isinstance(explicit, str) else int(explicit)
    elif os.environ.get(ENVIRONMENT):
        limit = parse_size(os.environ[ENVIRONMENT])
    else:
        limit = available_memory()
    return min(limit, MAX_LIMIT)


def format_bytes(count: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} bytes"


class MemoryBudget:
    """Parameters kept for the whole net plus one layer's bottoms and tops at a time, in float32."""

    def __init__(self, limit: int | str | None = None) -> None:
        self.limit = memory_limit(limit)
        self.parameters = 0

    def _refuse(self, where: str, needed: int) -> None:
        refuse(where, needed, self.limit)

    def add_parameters(self, where: str, count: int) -> None:
        self.parameters += 4 * count
        if self.parameters > self.limit:
            self._refuse(f"{where}: the parameters up to here", self.parameters)

    def check_layer(self, where: str, elements: int) -> None:
        """`elements` of activations live at once for this layer (its bottoms and tops)."""
        needed = self.parameters + 4 * elements
        if needed > self.limit:
            self._refuse(where, needed)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within it, a converter's own checks (`check_top`) count against this budget: its limit (the
        caller's `memory_limit` too) and the parameters already held."""
        token = _ACTIVE.set(self)
        try:
            yield
        finally:
            _ACTIVE.reset(token)


# The budget of the net being built, if any (MemoryBudget.applied); a converter called alone has none.
_ACTIVE: ContextVar[MemoryBudget | None] = ContextVar("caffe2torch_memory_budget", default=None)


def refuse(where: str, needed: int, limit: int) -> None:
    raise CaffeError(f"{where} needs {format_bytes(needed)}, more than the memory limit of {format_bytes(limit)} "
                     f"(the available memory unless {term('--max-memory', 'memory_limit=')} or {ENVIRONMENT} says "
                     f"otherwise)")


def check_top(layer, shape: Sequence[int], bottoms: Sequence[Sequence[int]] = (), what: str = "top") -> None:
    """Refuse a layer whose top (or another array of `shape` it makes), with its bottoms, would not fit the memory
    limit, before its converter builds tables sized by the file's numbers (Interp's, pooling's, PriorBox's): one
    line naming the layer and the size. Counted as the net's budget will count the layer once built, while one is
    applied."""
    where = f"layer {layer.name!r} ({layer.type}) ({what} {'x'.join(map(str, shape))})"
    elements = math.prod(shape) + sum(math.prod(bottom) for bottom in bottoms)
    budget = _ACTIVE.get()
    if budget is not None:
        budget.check_layer(where, elements)
        return
    limit = memory_limit()
    if 4 * elements > limit:
        refuse(where, 4 * elements, limit)
