"""Run a reader of untrusted files in a child process with a time limit, so a corrupt file cannot hang us.

libhdf5 can loop forever on a damaged file (an attribute read spun without end in a fuzzed
.ref.h5); C code cannot be interrupted from Python, but a child process can be killed. The child
is forked (no re-import, milliseconds); where fork is not available the reader runs directly.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
from typing import Callable, TypeVar

from caffe2torch.errors import CaffeError

T = TypeVar("T")
# Seconds a reader gets: a base plus the time to read the file at a slow disk's speed.
BASE_SECONDS = 30.0
BYTES_PER_SECOND = 20e6


def time_limit(size_bytes: int) -> float:
    return BASE_SECONDS + size_bytes / BYTES_PER_SECOND


def _child(connection, function, args) -> None:
    try:
        result = ("ok", function(*args))
    except CaffeError as error:
        result = ("error", str(error))
    except BaseException as error:  # noqa: BLE001 - any failure of the reader is reported, not raised here
        result = ("error", f"{type(error).__name__}: {error}")
    try:
        connection.send_bytes(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
    finally:
        connection.close()


def run_bounded(function: Callable[..., T], args: tuple, seconds: float, what: str) -> T:
    """`function(*args)` in a forked child; its CaffeError comes back as one, a hang after `seconds` too."""
    if "fork" not in multiprocessing.get_all_start_methods() or os.environ.get("CAFFE2TORCH_NO_FORK"):
        return function(*args)
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(send, function, args), daemon=True)
    process.start()
    send.close()
    try:
        if not receive.poll(seconds):
            raise CaffeError(f"{what}: not read within {seconds:.0f} s (a damaged HDF5 file can make the "
                             f"library loop); giving up")
        try:
            status, value = pickle.loads(receive.recv_bytes())
        except (EOFError, OSError):
            raise CaffeError(f"{what}: the reader stopped without an answer (exit code {process.exitcode}; "
                             f"a damaged file can crash the HDF5 library)") from None
    finally:
        if process.is_alive():
            process.kill()
        process.join()
        receive.close()
    if status == "error":
        raise CaffeError(value)
    return value
