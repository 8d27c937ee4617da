"""Known ICNet releases: md5 manifest look-ups and the check that refuses a corrupt or mislabelled caffemodel."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from caffe2torch.errors import CaffeError, term

MANIFEST_PACKAGE = "weights"
MANIFEST_FILE = "manifest.json"
_MD5_PATTERN = re.compile(r"^[0-9a-f]{32}$")
_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class ReportedScore:
    """A score the authors published for a release."""

    split: str
    miou: float
    pixel_accuracy: float | None


@dataclass(frozen=True)
class Release:
    """One released caffemodel as listed in weights/manifest.json."""

    name: str
    md5: str | None
    size_bytes: int | None
    size_approx: str | None
    training_set: str
    iterations: int
    bn_merged: bool
    prototxt: str
    reported: ReportedScore | None
    download: tuple[str, ...]
    source: str
    note: str


@dataclass(frozen=True)
class PrototxtEntry:
    """One official deploy prototxt shipped in weights/."""

    name: str
    md5: str
    size_bytes: int
    bn_merged: bool
    source: str


@dataclass(frozen=True)
class Manifest:
    """The whole manifest: released weights and the deploy prototxts they go with."""

    releases: tuple[Release, ...]
    prototxts: tuple[PrototxtEntry, ...]


def _release_from_json(raw: dict[str, Any]) -> Release:
    reported = raw.get("reported")
    return Release(
        name=raw["name"],
        md5=raw["md5"].lower() if raw.get("md5") else None,
        size_bytes=raw.get("size_bytes"),
        size_approx=raw.get("size_approx"),
        training_set=raw["training_set"],
        iterations=int(raw["iterations"]),
        bn_merged=bool(raw["bn_merged"]),
        prototxt=raw["prototxt"],
        reported=ReportedScore(reported["split"], reported["miou"], reported.get("pixel_accuracy"))
        if reported
        else None,
        download=tuple(raw.get("download", ())),
        source=raw.get("source", ""),
        note=raw.get("note", ""),
    )


def parse_manifest(text: str) -> Manifest:
    """Build a Manifest from the JSON text of a manifest file."""
    try:
        data = json.loads(text)
        return Manifest(
            releases=tuple(_release_from_json(raw) for raw in data["releases"]),
            prototxts=tuple(
                PrototxtEntry(raw["name"], raw["md5"].lower(), int(raw["size_bytes"]), bool(raw["bn_merged"]),
                              raw.get("source", ""))
                for raw in data["prototxts"]
            ),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CaffeError(f"{MANIFEST_FILE}: malformed release manifest ({type(exc).__name__}: {exc})") from exc


@lru_cache(maxsize=1)
def load_manifest() -> Manifest:
    """The manifest shipped in the weights package (read once; works from an installed wheel too)."""
    text = resources.files(MANIFEST_PACKAGE).joinpath(MANIFEST_FILE).read_text(encoding="utf-8")
    return parse_manifest(text)


def md5_file(path: str | Path) -> str:
    """Hex md5 of a file, read in 1 MiB chunks so a large caffemodel never sits in memory twice."""
    try:
        with open(path, "rb") as handle:
            if hasattr(hashlib, "file_digest"):
                # file_digest reads into one reused buffer instead of a fresh bytes object per chunk.
                return hashlib.file_digest(handle, "md5").hexdigest()
            digest = hashlib.md5()
            for chunk in iter(lambda: handle.read(_CHUNK_BYTES), b""):
                digest.update(chunk)
            return digest.hexdigest()
    except OSError as exc:
        raise CaffeError(f"{path}: cannot read file for md5 ({exc.strerror or exc})") from exc


def lookup_by_name(filename: str | Path, manifest: Manifest | None = None) -> Release | None:
    """The release whose file name equals the base name of `filename`, or None."""
    base_name = Path(filename).name
    for release in (manifest or load_manifest()).releases:
        if release.name == base_name:
            return release
    return None


def lookup_by_md5(md5: str, manifest: Manifest | None = None) -> Release | None:
    """The release with this md5 (case-insensitive), or None; releases with unknown md5 never match."""
    wanted = md5.strip().lower()
    if not _MD5_PATTERN.match(wanted):
        return None
    for release in (manifest or load_manifest()).releases:
        if release.md5 == wanted:
            return release
    return None


def check_release(
    path: str | Path,
    md5: str | None = None,
    verify: bool = True,
    manifest: Manifest | None = None,
) -> Release | None:
    """Identify a caffemodel against the released files.

    Returns the release the file is (matched by name and md5, or by md5 alone when the name is
    not a release name), else None. With `verify`, a file carrying a release's name but another
    md5 is refused: it is most often a truncated download, and converting it would silently give
    wrong numbers. `md5` may be passed when the caller already hashed the file.
    """
    manifest = manifest or load_manifest()
    actual_md5 = (md5 or md5_file(path)).strip().lower()
    by_name = lookup_by_name(path, manifest)
    if by_name is not None and by_name.md5 is not None and by_name.md5 != actual_md5:
        if verify:
            raise CaffeError(
                f"{path}: md5 {actual_md5} differs from the released {by_name.name} (md5 {by_name.md5}); "
                "the download is incomplete or this is another file under that name; "
                f"pass {term('--no-verify', 'verify_md5=False')} to convert it anyway"
            )
        # Unverified and not the release: say nothing about a name that would be false.
        return lookup_by_md5(actual_md5, manifest)
    if by_name is not None and by_name.md5 == actual_md5:
        return by_name
    return lookup_by_md5(actual_md5, manifest)


def deploy_prototxt_path(release: Release) -> Path:
    """Path of the official deploy prototxt that goes with `release` (a file in the weights package)."""
    resource = resources.files(MANIFEST_PACKAGE).joinpath(release.prototxt)
    if not isinstance(resource, Path):
        raise CaffeError(f"{release.prototxt}: the weights package is not on the file system (zipped install)")
    if not resource.is_file():
        raise CaffeError(f"{resource}: deploy prototxt for {release.name} is missing from the weights package")
    return resource
