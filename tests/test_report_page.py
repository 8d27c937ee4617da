"""The report people look at: report.html with its charts and thumbnails, errors/ maps, the same from `icnet-eval
score`, and progress lines in a log; report.json's scores unchanged by any of it."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from caffe2torch.progress import INTERVAL_ENV
from icnet_eval.cli import main
from tests.test_icnet_eval import (IMAGE_SIZE, STEMS, eval_args, read_gray, weights,  # noqa: F401 - weights: a fixture
                                   write_png, write_scenes)

# The page's pictures for 3 images: two charts, then image, ground truth, prediction and error map of each.
PAGE_IMAGES = 2 + 4 * len(STEMS)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Three street scenes in Cityscapes layout with instanceIds (a car, a person) beside the labels."""
    root = tmp_path_factory.mktemp("cityscapes")
    lines = write_scenes(root, instances=True)
    (root / "images.txt").write_text("\n".join(line.split()[0] for line in lines) + "\n")
    return root


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, dataset, weights):
    """One evaluation with --error-maps and --per-image, its progress logged every image (interval 0)."""
    out = tmp_path_factory.mktemp("evaluated") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(INTERVAL_ENV, "0")
        result = CliRunner().invoke(main, eval_args(dataset, weights, out, "--error-maps", "--per-image"))
    assert result.exit_code == 0, result.output
    return out, result


def _scores(report: dict) -> dict:
    return {key: value for key, value in report.items() if key not in ("options", "timing", "per_image")}


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _page_images(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]*)"', page)


def test_progress_lines_in_a_log_and_the_report_unchanged(evaluated, dataset, weights, tmp_path):
    out, result = evaluated
    lines = [line for line in result.stderr.splitlines() if re.match(r"icnet-eval: \d+/3 images", line)]
    assert [line.split(",")[0] for line in lines] == [f"icnet-eval: {n}/3 images ({100 * n // 3}%)" for n in (1, 2, 3)]
    assert all(re.search(r", \d+\.\d\d images/s, ETA \d+:\d\d$", line) for line in lines), lines
    # The same evaluation without progress, page or error maps: the same scores, and no other key but per_image.
    from icnet_eval.pipeline import EvalOptions, evaluate

    plain = tmp_path / "plain"
    evaluate(EvalOptions(dataset / "val.txt", dataset, weights, plain, "cpu", workers=0, input_size=(193, 385),
                         progress=False, report_page=False), echo=lambda _: None)
    rich, report = _report(out), _report(plain)
    assert _scores(rich) == _scores(report) and set(rich) == set(report) | {"per_image"}
    assert not any((plain / name).exists() for name in ("report.html", "class_iou.png", "confusion_matrix.png",
                                                         "errors"))
    assert "page: " in result.stderr and str(out / "report.html") in result.stderr


def test_the_page_holds_tables_charts_and_thumbnails(evaluated):
    out, result = evaluated
    report, page = _report(out), (out / "report.html").read_text(encoding="utf-8")
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert "<script" not in page.lower() and "http://" not in page and "https://" not in page
    sources = _page_images(page)
    assert len(sources) == PAGE_IMAGES and all(src.startswith("data:image/") for src in sources)
    # the charts are embedded exactly as written beside the report, and they are real images
    for name in ("class_iou.png", "confusion_matrix.png"):
        data = (out / name).read_bytes()
        assert f"data:image/png;base64,{base64.b64encode(data).decode()}" in sources
        chart = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert chart.shape[0] > 500 and chart.shape[1] > 800
    for thumbnail in sources[2:]:
        picture = cv2.imdecode(np.frombuffer(base64.b64decode(thumbnail.split(",", 1)[1]), np.uint8),
                               cv2.IMREAD_COLOR)
        assert picture.shape[:2] == IMAGE_SIZE  # smaller than the thumbnail width: never scaled up
    assert f"mIoU <b>{report['miou']:.2f}%</b>" in page
    assert "<th>iIoU %</th>" in page and f"{report['class_iiou'][13]:.2f}" in page  # car had instances
    for train_id, name in enumerate(report["classes"]):
        assert re.search(rf'<td class="num">{train_id}</td><td><span class="swatch"[^>]*></span>{name}</td>', page)
    # every image, worst first, as report.json's per-image scores
    worst_first = sorted(report["per_image"], key=lambda item: item["miou"])
    section = page.split('id="per-image"')[1]
    listed = re.findall(r'<td class="wrap">([^<]*)</td><td class="num">([\d.]+)</td>', section)
    assert [path for path, _ in listed] == [str(Path(item["image"]).relative_to(_data_root(report)))
                                            for item in worst_first]
    assert [value for _, value in listed] == [f"{item['miou']:.2f}" for item in worst_first]
    assert '"world_size"' not in page and "<th>world_size</th>" in page  # options as a table
    assert "<th>stages_ms_median.forward</th>" in page


def _data_root(report: dict) -> Path:
    return Path(report["options"]["data_root"])


def test_error_maps_mark_eval_acc_errors_and_resume(evaluated, dataset, weights, tmp_path):
    out, _ = evaluated
    for stem in STEMS:
        errors = cv2.imread(str(out / "errors" / f"{stem}_leftImg8bit.png"))
        prediction = read_gray(out / "gray" / f"{stem}_leftImg8bit.png")
        label = read_gray(dataset / f"gtFine/val/city/{stem}_gtFine_labelTrainIds.png")
        ignored = label >= 254  # eval_acc.m's uint8 + 1 saturates both
        wrong = (prediction != label) & ~ignored
        assert wrong.any() and ignored.any() and (~wrong & ~ignored).any()
        red = np.all(errors == (0, 0, 255), axis=2)
        assert np.array_equal(red, wrong)
        grey = errors[~wrong]
        assert np.all(grey[:, 0] == grey[:, 1]) and np.all(grey[:, 1] == grey[:, 2])
        assert errors[ignored].min() >= 128 and errors[~wrong & ~ignored].max() <= 102  # pale veil / dimmed
    # A resumed run keeps the maps; one deleted is drawn again, the same.
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    kept, gone = copy / "errors" / f"{STEMS[0]}_leftImg8bit.png", copy / "errors" / f"{STEMS[1]}_leftImg8bit.png"
    before = kept.stat().st_mtime_ns
    gone.unlink()
    result = CliRunner().invoke(main, eval_args(dataset, weights, copy, "--error-maps"))
    assert result.exit_code == 0, result.output
    assert _report(copy)["timing"]["images_resumed"] == 3
    assert kept.stat().st_mtime_ns == before
    assert gone.read_bytes() == (out / "errors" / gone.name).read_bytes()
    refused = CliRunner().invoke(main, eval_args(dataset, weights, tmp_path / "x", "--error-maps",
                                                  list_name="images.txt"))
    assert refused.exit_code == 2 and "--error-maps" in refused.stderr and refused.stderr.count("\n") == 1


def test_score_writes_the_same_report_page_and_error_maps(evaluated, dataset, tmp_path):
    out, _ = evaluated
    scored = tmp_path / "scored"
    args = ["score", "--list", str(dataset / "val.txt"), "--data-root", str(dataset), "--pred-dir", str(out),
            "--out", str(scored), "--error-maps", "--per-image"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report, evaluation = _report(scored), _report(out)
    assert _scores(report) == _scores(evaluation) and report["per_image"] == evaluation["per_image"]
    for stem in STEMS:
        name = f"{stem}_leftImg8bit.png"
        assert np.array_equal(cv2.imread(str(scored / "errors" / name)), cv2.imread(str(out / "errors" / name)))
    page = (scored / "report.html").read_text(encoding="utf-8")
    assert len(_page_images(page)) == PAGE_IMAGES and "predictions " in page
    assert CliRunner().invoke(main, args).exit_code == 0  # its own files are replaced
    # never a file of the user's
    users = tmp_path / "users"
    users.mkdir()
    (users / "report.html").write_text("my notes")
    refused = CliRunner().invoke(main, args[:-4] + ["--out", str(users)])
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1 and "not written by icnet-eval score" in \
        refused.stderr
    assert (users / "report.html").read_text() == "my notes" and sorted(p.name for p in users.iterdir()) == \
        ["report.html"]
    alone = CliRunner().invoke(main, args[:-4] + ["--error-maps"])
    assert alone.exit_code == 2 and "--error-maps needs --out" in alone.stderr


def test_an_unlabelled_list_gets_a_page_without_scores(evaluated, dataset, weights, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(evaluated[0], out)
    result = CliRunner().invoke(main, eval_args(dataset, weights, out, list_name="images.txt"))
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "the list has no labels, so nothing was scored" in page
    assert not (out / "class_iou.png").exists() and not (out / "confusion_matrix.png").exists()  # not this run's
    assert len(_page_images(page)) == 2 * len(STEMS)  # image and prediction of each


def test_the_page_escapes_user_text_and_survives_a_vanished_file(tmp_path):
    from icnet_eval.data import ListEntry
    from icnet_eval.metrics import ConfusionCounts
    from icnet_eval.page import PageImage, render_page

    label = np.zeros(IMAGE_SIZE, np.uint8)
    label[:, 64:] = 13
    counts = ConfusionCounts()
    counts.add(label, label)
    report = dict(counts.summary(), options={"list": "<b>list</b>", "data_root": str(tmp_path)})
    evil = tmp_path / '<img src=x onerror="alert(1)">.png'
    write_png(evil, np.zeros((*IMAGE_SIZE, 3), np.uint8))
    write_png(tmp_path / "label.png", label)
    write_png(tmp_path / "pred.png", label)
    entry = ListEntry(tmp_path / "l.txt", 1, evil, tmp_path / "label.png")
    vanished = ListEntry(tmp_path / "l.txt", 2, tmp_path / "b.png", tmp_path / "label.png")
    page = render_page(report, [PageImage(entry, tmp_path / "pred.png", miou=50.0, pixel_accuracy=90.0),
                                PageImage(vanished, tmp_path / "gone.png", miou=60.0, pixel_accuracy=95.0)], {})
    assert "<img src=x" not in page and "<b>list" not in page
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;.png" in page and "&lt;b&gt;list&lt;/b&gt;" in page
    assert re.search(r'<p class="note">[^<]*cannot read prediction [^<]*gone\.png', page.split("rank 2 of 2")[1])
    assert len(_page_images(page)) == 4  # the vanished prediction's row has none, and no broken image


def test_the_printed_table_is_numbered_by_train_id(evaluated):
    out, result = evaluated
    assert re.search(r"^  0 +road: ", result.stdout, re.M) and re.search(r"^ 18 +bicycle: ", result.stdout, re.M)
    assert not re.search(r"^ 19 ", result.stdout, re.M)
