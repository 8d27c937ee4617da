"""icnet-eval segment and the image readers: never a file of the user's or of the run's inputs written, every output
named apart, and image sizes checked from their headers before anything is decoded."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from icnet_eval.cli import main
from icnet_eval.demo import street_scene
from icnet_eval.header import image_size
from icnet_eval.model import write_untrained_caffemodel
from icnet_eval.netdef import icnet_prototxt

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def net(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("net")
    weights = write_untrained_caffemodel(folder / "icnet_untrained.caffemodel", seed=1)
    prototxt = folder / "small.prototxt"
    prototxt.write_text(icnet_prototxt(193, 385, False))
    return weights, prototxt


def _image(path: Path, seed: int = 10) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), street_scene(seed, (64, 128))[0][..., ::-1])
    return path


def _segment(net, source: Path, out: Path, *extra: str):
    weights, prototxt = net
    return CliRunner().invoke(main, ["segment", str(source), "--weights", str(weights), "--prototxt", str(prototxt),
                                     "--device", "cpu", "-o", str(out), *extra])


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("icnet-eval: error")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_the_input_folder_is_never_the_output_folder(net, tmp_path):
    """`segment f -o f` overwrote the user's f/a_color.png and then segmented its own outputs."""
    folder = tmp_path / "f"
    _image(folder / "a.png")
    (folder / "a_color.png").write_bytes(b"the user's own file")
    before = _files(folder)
    line = _one_line_error(_segment(net, folder, folder))
    assert "is the folder of the images being segmented" in line
    assert _files(folder) == before


def test_files_of_the_user_are_never_replaced_and_own_files_are(net, tmp_path):
    source = _image(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_overlay.png").write_bytes(b"mine")
    line = _one_line_error(_segment(net, source, out))
    assert "a_overlay.png: exists and was not written by icnet-eval segment" in line
    assert _files(out) == {"a_overlay.png": b"mine"}
    (out / "a_overlay.png").unlink()
    first = _segment(net, source, out)
    assert first.exit_code == 0, first.output
    written = _files(out)
    assert sorted(written) == ["a_color.png", "a_overlay.png", "icnet-segment.json"]
    again = _segment(net, source, out)  # its own earlier outputs are replaced
    assert again.exit_code == 0, again.output
    assert _files(out) == written
    (out / "a_color.png").write_bytes(b"edited by the user")  # changed since: the user's now
    line = _one_line_error(_segment(net, source, out))
    assert "a_color.png: exists and was not written" in line
    assert (out / "a_color.png").read_bytes() == b"edited by the user"


def test_inputs_of_the_run_are_never_written(net, tmp_path):
    """An image named like another image's output: the second would overwrite the first input."""
    folder = tmp_path / "in"
    _image(folder / "a.png")
    _image(folder / "b.png", seed=11)
    out = tmp_path / "out"
    _image(out / "a.png")  # a file the run reads lives in -o
    single = _segment(net, out / "a.png", out)
    assert single.exit_code == 0, single.output  # a_color.png beside its image is no input
    weights, _ = net
    clash = _segment(net, folder / "a.png", weights.parent)  # writes beside the weights: allowed, they differ
    assert clash.exit_code == 0, clash.output
    renamed = tmp_path / "x"
    _image(renamed / "a.png")
    _image(renamed / "a_color.png", seed=12)
    result = _segment(net, renamed / "a.png", renamed)
    line = _one_line_error(result)  # a_color.png is an image of the user's (and an input of another run)
    assert "a_color.png: exists and was not written" in line


def test_images_sharing_a_stem_get_outputs_of_their_own(net, tmp_path):
    """a.png and a.jpg both became a_color.png: 4 files reported, 2 written."""
    folder = tmp_path / "in"
    _image(folder / "a.png")
    _image(folder / "a.jpg", seed=11)
    out = tmp_path / "out"
    result = _segment(net, folder, out)
    assert result.exit_code == 0, result.output
    assert "wrote 4 files" in result.stderr
    names = sorted(p.name for p in out.iterdir() if p.suffix == ".png")
    assert names == ["a.jpg_color.png", "a.jpg_overlay.png", "a.png_color.png", "a.png_overlay.png"]
    assert not np.array_equal(cv2.imread(str(out / "a.jpg_overlay.png")), cv2.imread(str(out / "a.png_overlay.png")))


def _png_claiming(path: Path, height: int, width: int) -> Path:
    """A valid small PNG whose header states another size: what a hostile 200 KB file of 6000 x 12000 looks like
    to every reader before it decodes."""
    ok, encoded = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))
    data = bytearray(encoded.tobytes())
    data[16:24] = struct.pack(">II", width, height)  # IHDR's data follows its length and type at 8..16
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # the CRC of type and data
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


def test_huge_images_are_refused_from_their_header_before_decoding(net, tmp_path, monkeypatch):
    import icnet_eval.data

    huge = _png_claiming(tmp_path / "in" / "huge.png", 6000, 12000)
    assert image_size(np.fromfile(huge, dtype=np.uint8)) == (6000, 12000)
    decoded = []
    real = icnet_eval.data.cv2.imdecode
    monkeypatch.setattr(icnet_eval.data.cv2, "imdecode", lambda *a: decoded.append(a) or real(*a))
    line = _one_line_error(_segment(net, huge, tmp_path / "out", "--max-memory", "2G"))
    assert "huge.png is 6000x12000" in line and "more than the memory limit" in line
    assert decoded == [] and not (tmp_path / "out" / "huge_color.png").exists()
    # the evaluation reads images, labels and predictions the same way
    weights, prototxt = net
    (tmp_path / "list.txt").write_text("in/huge.png\n")
    result = CliRunner().invoke(main, ["--list", str(tmp_path / "list.txt"), "--data-root", str(tmp_path),
                                       "--weights", str(weights), "--prototxt", str(prototxt), "--device", "cpu",
                                       "--workers", "0", "--out", str(tmp_path / "eval"), "--max-memory", "2G"])
    assert "huge.png is 6000x12000" in _one_line_error(result)
    assert decoded == []


def test_video_frames_are_checked_against_the_memory_limit(net, tmp_path):
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 4, (1024, 512))
    for _ in range(2):
        writer.write(street_scene(10, (512, 1024))[0])
    writer.release()
    # the small net fits 100 MiB, a frame's class scores at 512 x 1024 (114 MiB) do not
    line = _one_line_error(_segment(net, video, tmp_path / "out", "--max-memory", "100M"))
    assert "clip.mp4: a frame is 512x1024" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    result = _segment(net, video, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["clip_overlay.mp4", "icnet-segment.json"]


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".webp", ".tiff", ".ppm", ".pgm", ".pam", ".hdr", ".ras",
                                    ".gif"])
def test_header_sizes_match_what_opencv_decodes(suffix):
    rng = np.random.default_rng(0)
    for height, width in ((1, 1), (7, 13), (300, 17), (1025, 2049)):
        image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        if suffix == ".pgm":
            image = image[..., 0]
        ok, encoded = cv2.imencode(suffix, image)
        assert ok
        assert image_size(encoded) == (height, width)
        assert cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED).shape[:2] == (height, width)
    assert image_size(b"not an image at all") is None
    assert image_size(encoded.tobytes()[:20]) in (None, (height, width))  # a cut header: None, never an exception


def test_json_reports_never_replace_what_the_run_reads(net, tmp_path):
    weights, prototxt = net
    before = prototxt.read_bytes()
    result = CliRunner().invoke(main, ["time", "--weights", str(weights), "--prototxt", str(prototxt),
                                       "--device", "cpu", "--iterations", "1", "--warmup", "0",
                                       "--json", str(prototxt)])
    assert "is the net definition, which this run reads" in _one_line_error(result)
    assert prototxt.read_bytes() == before
    image = _image(tmp_path / "img.png")
    (tmp_path / "list.txt").write_text("img.png img.png\n")
    preds = tmp_path / "preds"
    preds.mkdir()
    for target, what in ((tmp_path / "list.txt", "is the list"), (image, "is the label of"),
                         (preds / "x.json", "is inside the prediction folder")):
        data = target.read_bytes() if target.exists() else None
        result = CliRunner().invoke(main, ["score", "--list", str(tmp_path / "list.txt"), "--data-root",
                                           str(tmp_path), "--pred-dir", str(preds), "--json", str(target)])
        assert what in _one_line_error(result)
        assert (target.read_bytes() if target.exists() else None) == data


def test_damaged_images_and_videos_end_in_one_line_or_a_result(net, tmp_path):
    """Seeded mutations (bytes flipped, headers rewritten, files cut) of an image and a video: segment either
    segments what it can decode or stops with one line, never a traceback."""
    rng = np.random.default_rng(1234)
    image = cv2.imencode(".png", street_scene(10, (64, 128))[0])[1].tobytes()
    jpeg = cv2.imencode(".jpg", street_scene(11, (64, 128))[0])[1].tobytes()
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 4, (128, 64))
    writer.write(street_scene(10, (64, 128))[0])
    writer.release()
    clip = video.read_bytes()
    outcomes = set()
    for case in range(24):
        original, suffix = [(image, ".png"), (jpeg, ".jpg"), (clip, ".mp4")][case % 3]
        data = bytearray(original)
        kind = case // 3 % 4
        if kind == 0:  # a cut file
            data = data[:int(rng.integers(1, len(data)))]
        elif kind == 1:  # random bytes flipped, the header included
            for position in rng.integers(0, min(len(data), 64), 4):
                data[position] ^= int(rng.integers(1, 256))
        elif kind == 2:  # sizes in the header rewritten to extremes
            position = int(rng.integers(8, min(len(data) - 4, 40)))
            data[position:position + 4] = bytes(rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00",
                                                            b"\x7f\xff\xff\xff"]))
        else:  # noise after a valid start
            data[len(data) // 2:] = rng.integers(0, 256, len(data) - len(data) // 2, dtype=np.uint8).tobytes()
        source = tmp_path / f"case{case}{suffix}"
        source.write_bytes(bytes(data))
        assert image_size(bytes(data)) is None or len(image_size(bytes(data))) == 2
        result = _segment(net, source, tmp_path / f"out{case}", "--max-memory", "4G")
        assert result.exit_code in (0, 2), (case, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit), (case, result.exception)
        if result.exit_code == 2:
            _one_line_error(result)
        outcomes.add(result.exit_code)
    assert outcomes == {0, 2}  # the mutations do reach both ends


def test_formats_choose_the_files_written(net, tmp_path):
    from icnet_eval.cityscapes import train_ids_to_label_ids

    source = _image(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    result = _segment(net, source, out, "--format", "trainids,labelids", "--format", "color")
    assert result.exit_code == 0, result.output
    assert sorted(_files(out)) == ["a_color.png", "a_labelids.png", "a_trainids.png", "icnet-segment.json"]
    train_ids = cv2.imread(str(out / "a_trainids.png"), cv2.IMREAD_UNCHANGED)
    assert train_ids.shape == (64, 128) and train_ids.dtype == np.uint8 and train_ids.max() <= 18
    np.testing.assert_array_equal(cv2.imread(str(out / "a_labelids.png"), cv2.IMREAD_UNCHANGED),
                                  train_ids_to_label_ids(train_ids))
    assert "--format nope: expected one or more of trainids, labelids, color, overlay" in _one_line_error(
        _segment(net, source, tmp_path / "o2", "--format", "nope"))


def test_a_video_gives_colour_and_overlay_videos_only(net, tmp_path):
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 4, (128, 64))
    for seed in (10, 11):
        writer.write(street_scene(seed, (64, 128))[0])
    writer.release()
    result = _segment(net, video, tmp_path / "out", "--format", "color,overlay")
    assert result.exit_code == 0, result.output
    assert sorted(_files(tmp_path / "out")) == ["clip_color.mp4", "clip_overlay.mp4", "icnet-segment.json"]
    capture = cv2.VideoCapture(str(tmp_path / "out" / "clip_color.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 2
    capture.release()
    line = _one_line_error(_segment(net, video, tmp_path / "o2", "--format", "trainids"))
    assert "--format trainids: a video gives color and overlay videos only" in line


def test_segmenter_loads_once_and_takes_rgb(net, tmp_path, monkeypatch):
    import icnet_eval
    import icnet_eval.api

    weights, prototxt = net
    image = street_scene(10, (64, 128))[0][..., ::-1].copy()  # BGR
    segmenter = icnet_eval.Segmenter(weights, device="cpu", prototxt=prototxt)
    train_ids = segmenter(image)
    assert train_ids.shape == (64, 128) and train_ids.dtype == np.uint8
    np.testing.assert_array_equal(segmenter(image[..., ::-1].copy(), channels="rgb"), train_ids)
    with pytest.raises(icnet_eval.api.CaffeError, match="channels must be 'bgr' or 'rgb', got 'RGB'"):
        segmenter(image, channels="RGB")
    # segment(image, weights) loads the net on the first call only, and again when the weights change
    folder = tmp_path / "converted"
    import caffe2torch

    caffe2torch.save(segmenter.model.net, folder)
    loads = []
    real = icnet_eval.api.load_model
    monkeypatch.setattr(icnet_eval.api, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    first = icnet_eval.segment(image, folder, device="cpu")
    np.testing.assert_array_equal(icnet_eval.segment(image, folder, device="cpu"), first)
    np.testing.assert_array_equal(icnet_eval.segment(image[..., ::-1].copy(), folder, device="cpu", channels="rgb"),
                                  first)
    assert len(loads) == 1
    icnet_eval.segment(image, folder, device="cpu", fast=True)  # another mode: another net
    assert len(loads) == 2
