"""Progress of long runs: whole lines (count, rate, ETA) in a log or pipe, a tqdm bar on a terminal, nothing for a
short run; the commands that loop over many items (segment, verify) show it."""

from __future__ import annotations

import io
import re

import cv2
import pytest
from click.testing import CliRunner

from caffe2torch.errors import CaffeError
from caffe2torch.progress import INTERVAL_ENV, Progress, progress_interval

LINE = re.compile(r"^test: (\d+)/(\d+) images \((\d+)%\), (\d+\.\d\d) images/s, (ETA \d+:\d\d|\d+:\d\d in all)$")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_whole_lines_every_5_percent_once_the_interval_passed():
    stream = io.StringIO()
    with Progress(40, "test", "image", stream=stream, interval=0.0) as progress:
        for _ in range(40):
            progress.update()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert all(LINE.match(line) for line in lines), lines
    counts = [int(LINE.match(line).group(1)) for line in lines]
    # every 2 images (5% of 40): 2, 4, ..., 40; the closing line is not repeated when the last one was at 40
    assert counts == list(range(2, 41, 2))
    assert lines[-1].endswith("ETA 0:00")


def test_a_short_run_writes_nothing_and_a_long_one_ends_with_a_closing_line(monkeypatch):
    quiet = io.StringIO()
    with Progress(5, "test", "image", stream=quiet, interval=3600.0) as progress:
        progress.update(5)
    assert quiet.getvalue() == ""
    stream = io.StringIO()
    progress = Progress(10, "test", "image", stream=stream, interval=0.0)
    progress.update(3)
    progress.interval = 3600.0  # nothing more until the end
    progress.update(4)
    progress.close()
    progress.close()  # closing twice writes nothing more
    lines = stream.getvalue().splitlines()
    assert [LINE.match(line).group(1, 3) for line in lines] == [("3", "30"), ("7", "70")]
    assert lines[-1].endswith(" in all")


def test_an_unknown_total_counts_without_eta_and_disabled_progress_is_silent():
    stream = io.StringIO()
    with Progress(None, "video", "frame", stream=stream, interval=0.0) as progress:
        progress.update(2)
    assert re.fullmatch(r"video: 2 frames, \d+\.\d\d frames/s, \d+:\d\d so far\n", stream.getvalue())
    silent = io.StringIO()
    with Progress(10, "test", stream=silent, interval=0.0, enabled=False) as progress:
        progress.update(10)
    assert silent.getvalue() == ""


def test_a_terminal_gets_a_tqdm_bar_and_lines_written_through_it():
    terminal = _Terminal()
    with Progress(4, "test", "image", stream=terminal) as progress:
        progress.update(2)
        progress.write("a line of results")
        progress.update(2)
    text = terminal.getvalue()
    assert "\r" in text and "4/4" in text and "image/s" in text
    assert "a line of results\n" in text


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(INTERVAL_ENV, raising=False)
    assert progress_interval() == 10.0
    monkeypatch.setenv(INTERVAL_ENV, "0.5")
    assert progress_interval() == 0.5
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(INTERVAL_ENV, bad)
        with pytest.raises(CaffeError, match=INTERVAL_ENV):
            progress_interval()


@pytest.mark.usefixtures("one_thread")
def test_segment_of_a_folder_logs_its_progress(tmp_path, monkeypatch):
    from icnet_eval.cli import main
    from icnet_eval.demo import street_scene
    from icnet_eval.model import write_untrained_caffemodel
    from icnet_eval.netdef import icnet_prototxt

    weights = write_untrained_caffemodel(tmp_path / "icnet_untrained.caffemodel", seed=1)
    prototxt = tmp_path / "small.prototxt"
    prototxt.write_text(icnet_prototxt(193, 385, False))
    images = tmp_path / "images"
    images.mkdir()
    for index in range(2):
        assert cv2.imwrite(str(images / f"frame{index}.png"), street_scene(index, (64, 128))[0][..., ::-1])
    monkeypatch.setenv(INTERVAL_ENV, "0")
    result = CliRunner().invoke(main, ["segment", str(images), "--weights", str(weights), "--prototxt",
                                       str(prototxt), "--device", "cpu", "-o", str(tmp_path / "seg")])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("icnet-eval segment: ")]
    assert [line.split(",")[0] for line in lines] == ["icnet-eval segment: 1/2 images (50%)",
                                                      "icnet-eval segment: 2/2 images (100%)"]


def test_verify_logs_its_progress_per_layer(units_dir, monkeypatch):
    from caffe2torch.cli import main
    monkeypatch.setenv(INTERVAL_ENV, "0")
    result = CliRunner().invoke(main, ["verify", str(units_dir / "unit_conv_basic.caffemodel"), "--reference",
                                       str(units_dir / "unit_conv_basic.ref.h5"), "--tolerance", "1e-5"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("caffe2torch verify: ")]
    assert lines and re.match(r"caffe2torch verify: (\d+)/\1 layers \(100%\)", lines[-1]), lines
    assert result.stdout.strip().splitlines()[-1].startswith("7/7 layers within tolerance")  # the report as before
