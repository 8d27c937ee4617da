"""The one guard of every output path: a command never writes over, replaces or deletes a file it reads.

Each command names the files it reads (the weights, the definition it used, wherever it was found,
a reference, a list, images, labels) and asks before anything is written whether an output file,
or a folder that is replaced as a whole, would touch one of them. Paths are compared after
resolving symbolic links, and a second name of the same file (a hard link) counts as the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from caffe2torch.errors import CaffeError


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


class ReadFiles:
    """The files and folders one run reads, each with what it is (for the message)."""

    def __init__(self, items: Iterable[tuple[str | os.PathLike | None, str]] = ()) -> None:
        self._paths: dict[Path, str] = {}
        self._folders: dict[Path, str] = {}  # read as a whole: nothing inside them is written either
        self._identities: dict[tuple[int, int], str] = {}
        for path, what in items:
            self.add(path, what)

    def add(self, path: str | os.PathLike | None, what: str) -> None:
        if path is None:
            return
        resolved = Path(path).resolve()
        self._paths.setdefault(resolved, what)
        if resolved.is_dir():
            self._folders.setdefault(resolved, what)
        identity = _identity(resolved)
        if identity is not None and not resolved.is_dir():
            self._identities.setdefault(identity, what)

    def _read_as(self, target: Path) -> str | None:
        resolved = target.resolve()
        if resolved in self._paths:
            return self._paths[resolved]
        for parent in resolved.parents if self._folders else ():
            if parent in self._folders:
                return f"inside {self._folders[parent]}"
        identity = _identity(resolved)
        return self._identities.get(identity) if identity is not None else None

    def check_file(self, target: str | os.PathLike, option: str) -> None:
        """Refuse `target` as a file to write (or replace, or delete) when this run reads it."""
        target = Path(target)
        what = self._read_as(target)
        if what is not None:
            raise CaffeError(f"{target}: is {what}, which this run reads, so {option} may not write it; choose "
                             f"another {option}")

    def check_folder(self, folder: str | os.PathLike, option: str) -> None:
        """Refuse `folder` as a folder replaced as a whole when it is, or holds, something this run reads."""
        folder = Path(folder)
        resolved = folder.resolve()
        for path, what in self._paths.items():
            if path == resolved or resolved in path.parents:
                inside = "" if path == resolved else f" ({path.name} inside it)"
                raise CaffeError(f"{folder}: is or holds {what}{inside}, which this run reads, so {option} may "
                                 f"not replace it; choose another {option}")
        self.check_file(folder, option)
