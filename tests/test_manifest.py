"""Tests for the ICNet release manifest, the md5 helper and the release check."""
import hashlib
import json
import re
from dataclasses import replace
from importlib import resources
from pathlib import Path

import pytest

from caffe2torch import manifest as manifest_module
from caffe2torch.errors import CaffeError
from caffe2torch.manifest import (
    Manifest,
    check_release,
    deploy_prototxt_path,
    load_manifest,
    lookup_by_md5,
    lookup_by_name,
    md5_file,
)

MD5_RE = re.compile(r"^[0-9a-f]{32}$")
RELEASE_NAMES = {
    "icnet_cityscapes_train_30k.caffemodel",
    "icnet_cityscapes_train_30k_bnnomerge.caffemodel",
    "icnet_cityscapes_trainval_90k.caffemodel",
    "icnet_cityscapes_trainval_90k_bnnomerge.caffemodel",
}
# As published in hszhao/ICNet evaluation/model/README.md.
PUBLISHED_MD5 = {
    "icnet_cityscapes_train_30k.caffemodel": "c7038630c4b6c869afaaadd811bdb539",
    "icnet_cityscapes_train_30k_bnnomerge.caffemodel": "6da59a72a254862106420983a7723624",
    "icnet_cityscapes_trainval_90k.caffemodel": "4f4dd9eecd465dd8de7e4cf88ba5d5d5",
    "icnet_cityscapes_trainval_90k_bnnomerge.caffemodel": "ba3cf6e24beb07068dacc901a9c7f28b",
}


def _raw_manifest() -> dict:
    return json.loads(resources.files("weights").joinpath("manifest.json").read_text(encoding="utf-8"))


def _manifest_with_md5(name: str, md5: str) -> Manifest:
    """The shipped manifest with one release's md5 replaced, to test a match without the real 31 MB file."""
    shipped = load_manifest()
    releases = tuple(replace(r, md5=md5) if r.name == name else r for r in shipped.releases)
    return Manifest(releases=releases, prototxts=shipped.prototxts)


def test_raw_manifest_entries_are_well_formed() -> None:
    raw = _raw_manifest()
    assert {entry["name"] for entry in raw["releases"]} == RELEASE_NAMES
    for entry in raw["releases"]:
        if entry["md5"] is None:
            assert entry["note"].strip(), f"{entry['name']}: null md5 needs a note"
        else:
            assert MD5_RE.match(entry["md5"]), entry["name"]
        assert entry["source"].strip()
        assert entry["size_bytes"] is None or entry["size_bytes"] > 0
        assert all(url.startswith("https://") for url in entry["download"])
    for entry in raw["prototxts"]:
        assert MD5_RE.match(entry["md5"]), entry["name"]


def test_release_facts_match_publication() -> None:
    by_name = {r.name: r for r in load_manifest().releases}
    for name, md5 in PUBLISHED_MD5.items():
        assert by_name[name].md5 == md5
    train = by_name["icnet_cityscapes_train_30k.caffemodel"]
    assert (train.training_set, train.iterations, train.bn_merged) == ("train", 30000, True)
    assert (train.reported.split, train.reported.miou, train.reported.pixel_accuracy) == ("val", 67.7, 94.5)
    trainval = by_name["icnet_cityscapes_trainval_90k_bnnomerge.caffemodel"]
    assert (trainval.training_set, trainval.iterations, trainval.bn_merged) == ("train+val", 90000, False)
    assert (trainval.reported.split, trainval.reported.miou) == ("test", 69.5)
    for release in by_name.values():
        expected = "icnet_cityscapes_bnnomerge.prototxt" if "bnnomerge" in release.name else "icnet_cityscapes.prototxt"
        assert release.prototxt == expected
        assert release.bn_merged == ("bnnomerge" not in release.name)


def test_deploy_prototxts_match_manifest_md5_and_size() -> None:
    for entry in load_manifest().prototxts:
        release = next(r for r in load_manifest().releases if r.prototxt == entry.name)
        path = deploy_prototxt_path(release)
        assert path.name == entry.name
        assert md5_file(path) == entry.md5
        assert path.stat().st_size == entry.size_bytes


def test_prototxt_copies_identical_to_reference(reference_dir: Path) -> None:
    for entry in load_manifest().prototxts:
        reference = reference_dir / entry.name
        if not reference.is_file():
            pytest.skip(f"{reference} absent")
        shipped = resources.files("weights").joinpath(entry.name).read_bytes()
        assert shipped == reference.read_bytes(), entry.name


def test_md5_file_streams_known_digest(tmp_path: Path) -> None:
    # Larger than one read chunk, so the loop over chunks is exercised.
    payload = bytes(range(256)) * 9000 + b"tail"
    target = tmp_path / "blob.bin"
    target.write_bytes(payload)
    assert md5_file(target) == hashlib.md5(payload).hexdigest()
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert md5_file(empty) == "d41d8cd98f00b204e9800998ecf8427e"


def test_md5_file_missing_raises_caffe_error(tmp_path: Path) -> None:
    with pytest.raises(CaffeError, match="nothing.caffemodel"):
        md5_file(tmp_path / "nothing.caffemodel")


def test_lookups() -> None:
    release = lookup_by_name("/some/dir/icnet_cityscapes_trainval_90k.caffemodel")
    assert release is not None and release.md5 == "4f4dd9eecd465dd8de7e4cf88ba5d5d5"
    assert lookup_by_md5("C7038630C4B6C869AFAAADD811BDB539").name == (
        "icnet_cityscapes_train_30k.caffemodel"
    )
    assert lookup_by_name("my_model.caffemodel") is None
    assert lookup_by_md5("0" * 32) is None
    assert lookup_by_md5("not-an-md5") is None


def test_check_release_refuses_renamed_file(tmp_path: Path) -> None:
    impostor = tmp_path / "icnet_cityscapes_train_30k.caffemodel"
    impostor.write_bytes(b"truncated download")
    actual = hashlib.md5(b"truncated download").hexdigest()
    with pytest.raises(CaffeError) as info:
        check_release(impostor, md5_file(impostor))
    message = str(info.value)
    assert "\n" not in message
    assert "icnet_cityscapes_train_30k.caffemodel" in message
    assert actual in message and "c7038630c4b6c869afaaadd811bdb539" in message
    assert "pass verify_md5=False to convert it anyway" in message  # the API's words; the CLI's: --no-verify
    # The escape hatch: no error, and no claim that it is the release.
    assert check_release(impostor, None, verify=False) is None


def test_check_release_accepts_matching_md5(tmp_path: Path) -> None:
    payload = b"pretend caffemodel bytes"
    name = "icnet_cityscapes_trainval_90k_bnnomerge.caffemodel"
    fake = _manifest_with_md5(name, hashlib.md5(payload).hexdigest())
    target = tmp_path / name
    target.write_bytes(payload)
    release = check_release(target, manifest=fake)
    assert release is not None and release.name == name
    assert deploy_prototxt_path(release).name == "icnet_cityscapes_bnnomerge.prototxt"
    # Same bytes under another name are still recognised by md5.
    renamed = tmp_path / "mine.caffemodel"
    renamed.write_bytes(payload)
    assert check_release(renamed, manifest=fake).name == name


def test_check_release_accepts_matching_md5_with_patched_default(tmp_path: Path, monkeypatch) -> None:
    payload = b"another pretend caffemodel"
    name = "icnet_cityscapes_train_30k.caffemodel"
    monkeypatch.setattr(manifest_module, "load_manifest", lambda: _manifest_with_md5(name, hashlib.md5(payload).hexdigest()))
    target = tmp_path / name
    target.write_bytes(payload)
    assert check_release(target, md5_file(target)).name == name


def test_check_release_unknown_name_passes(tmp_path: Path) -> None:
    target = tmp_path / "my_finetuned.caffemodel"
    target.write_bytes(b"weights of my own")
    assert check_release(target) is None
    assert check_release(target, verify=False) is None
