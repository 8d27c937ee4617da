"""The vendored reference data (tests/data) is complete and byte for byte the Caffe output it was copied from."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.conftest import DATA_DIR, IMRESIZE_DIR, UNITS, UNITS_DIR, external_reference


def _md5sums(path: Path) -> dict[str, str]:
    lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return {name: digest for digest, name in lines}


@pytest.mark.parametrize("folder", [UNITS_DIR, IMRESIZE_DIR], ids=["units", "imresize"])
def test_vendored_files_match_their_md5sums(folder: Path) -> None:
    listed = _md5sums(folder / "MD5SUMS")
    assert sorted(listed) == sorted(p.name for p in folder.iterdir() if p.name != "MD5SUMS")
    for name, digest in listed.items():
        assert hashlib.md5((folder / name).read_bytes()).hexdigest() == digest, name


def test_every_unit_net_has_its_four_files() -> None:
    suffixes = (".prototxt", ".caffemodel", ".caffemodel.h5", ".ref.h5")
    assert sorted(p.name for p in UNITS_DIR.iterdir() if p.name != "MD5SUMS") == sorted(
        unit + suffix for unit in UNITS for suffix in suffixes)
    assert sum(p.stat().st_size for p in DATA_DIR.rglob("*") if p.is_file()) < 2_100_000  # small enough to vendor


def test_vendored_md5sums_are_the_external_datas() -> None:
    """Where the external reference data is at hand, its MD5SUMS lists the same digests for the vendored files."""
    external = external_reference("MD5SUMS", "imresize/MD5SUMS")
    listed = _md5sums(external / "MD5SUMS")
    assert {f"units/{name}": digest for name, digest in _md5sums(UNITS_DIR / "MD5SUMS").items()}.items() <= listed.items()
    assert _md5sums(IMRESIZE_DIR / "MD5SUMS").items() <= _md5sums(external / "imresize" / "MD5SUMS").items()
