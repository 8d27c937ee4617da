"""Tests of the icnet-eval pipeline: demo, eval_acc.m scoring, resume, torch.distributed sharding, bad input, labelIds."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from caffe2torch.errors import CaffeError
from caffe2torch.manifest import load_manifest, md5_file
from icnet_eval.cityscapes import LABEL_ID_TO_TRAIN_ID, TRAIN_ID_TO_LABEL_ID
from icnet_eval.cli import main
from icnet_eval.data import MEAN_RGB, ListEntry, parse_list, preprocess
from icnet_eval.demo import street_scene
from icnet_eval.predict import class_probabilities, predict_train_ids
from icnet_eval.imresize import matlab_imresize
from icnet_eval.model import write_untrained_caffemodel
from icnet_eval.netdef import icnet_prototxt
from icnet_eval.outputs import server_name

REPO = Path(__file__).resolve().parents[1]
# Smallest 2:1 ICNet input whose conv5_3 map (7x13) still allows the 6x6 pyramid bins: fast on a CPU.
SMALL_INPUT = ("193", "385")
IMAGE_SIZE = (64, 128)
STEMS = [f"city_{i:06d}_000019" for i in range(3)]


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)


def read_gray(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return write_untrained_caffemodel(tmp_path_factory.mktemp("model") / "icnet_untrained.caffemodel", seed=1)


def write_scenes(root: Path, instances: bool = False) -> list[str]:
    """Three small street scenes in Cityscapes layout under `root`, listed in root/val.txt (its lines returned);
    with `instances`, *_gtFine_instanceIds.png beside the labels (a car and a person)."""
    lines = []
    for seed, stem in enumerate(STEMS):
        image, label = street_scene(seed + 10, IMAGE_SIZE)
        image_rel = f"leftImg8bit/val/city/{stem}_leftImg8bit.png"
        label_rel = f"gtFine/val/city/{stem}_gtFine_labelTrainIds.png"
        write_png(root / image_rel, image[..., ::-1])
        write_png(root / label_rel, label)
        if instances:
            ids = np.array(list(TRAIN_ID_TO_LABEL_ID) + [0] * 237, dtype=np.uint16)[label]
            ids[10:30, 20:50] = 26 * 1000 + 1
            ids[35:60, 70:90] = 24 * 1000 + 2
            write_png(root / label_rel.replace("labelTrainIds", "instanceIds"), ids)
        lines.append(f"{image_rel} {label_rel}")
    (root / "val.txt").write_text("\n".join(lines) + "\n")
    return lines


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Three small street scenes in Cityscapes layout; the list is root/val.txt."""
    root = tmp_path_factory.mktemp("cityscapes")
    write_scenes(root)
    return root


def eval_args(root: Path, weights: Path, out: Path, *extra: str, list_name: str = "val.txt") -> list[str]:
    return ["--list", str(root / list_name), "--data-root", str(root), "--weights", str(weights), "--out", str(out),
            "--input-size", *SMALL_INPUT, "--device", "cpu", "--workers", "0", *extra]


def run_cli(args: list[str]):
    return CliRunner().invoke(main, args)


def scores(report: dict) -> dict:
    """Everything a report holds except what legitimately changes between runs."""
    return {key: value for key, value in report.items() if key not in ("options", "timing")}


def load_report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, dataset, weights) -> Path:
    """One uninterrupted single-process run: the reference the other runs must equal."""
    out = tmp_path_factory.mktemp("baseline")
    result = run_cli(eval_args(dataset, weights, out))
    assert result.exit_code == 0, result.output
    return out


def test_baseline_report_and_outputs(baseline):
    report = load_report(baseline)
    assert report["images"] == 3
    assert len(report["class_iou"]) == len(report["class_accuracy"]) == len(report["classes"]) == 19
    assert report["classes"][0] == "road" and report["classes"][18] == "bicycle"
    assert report["miou"] == pytest.approx(np.mean(report["class_iou"]), rel=1e-12)
    assert report["options"]["input_size"] == [193, 385] and report["options"]["resize"] == "matlab"
    for stem in STEMS:
        gray = read_gray(baseline / "gray" / f"{stem}_leftImg8bit.png")
        color = cv2.imread(str(baseline / "color" / f"{stem}_leftImg8bit.png"))
        assert gray.shape == IMAGE_SIZE and gray.dtype == np.uint8 and gray.max() < 19
        assert color.shape == (*IMAGE_SIZE, 3)


def test_demo_runs_end_to_end(tmp_path):
    root = tmp_path / "demo"
    result = run_cli(["demo", "--dir", str(root), "--images", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "UNTRAINED" in result.stdout
    release = load_manifest().releases[0]
    assert release.md5 in result.stdout and release.name in result.stdout
    report = load_report(root / "results")
    assert report["images"] == 2 and report["options"]["input_size"] == [257, 513]
    assert len(report["class_iou"]) == 19 and 0.0 <= report["miou"] <= 100.0
    gray = read_gray(root / "results" / "gray" / "demo_000001_000019_leftImg8bit.png")
    assert gray.shape == (256, 512) and gray.max() < 19
    # several classes predicted: the untrained weights are scaled to keep the logits varied
    assert len(np.unique(gray)) >= 3
    # the weights are a real, deterministic caffemodel
    again = write_untrained_caffemodel(tmp_path / "again.caffemodel")
    assert md5_file(again) == md5_file(root / "model" / "icnet_untrained_demo.caffemodel")


def eval_acc_reference(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, float]:
    """eval_acc.m written out independently: uint8 +1 saturation, hist bins centred on 0..19, eps per image."""
    edges = np.concatenate([[-np.inf], np.arange(19) + 0.5, [np.inf]])
    intersection, union = np.zeros(19), np.zeros(19)
    correct = labelled = 0
    for pred, label in pairs:
        anno = np.minimum(label.astype(np.int64) + 1, 255)
        anno[anno == 255] = 0
        pred = np.minimum(pred.astype(np.int64) + 1, 255)
        correct += np.sum((pred == anno) & (anno > 0))
        labelled += np.sum(anno > 0)
        pred = pred * (anno > 0)
        inter = np.histogram(pred * (pred == anno), edges)[0][1:]
        area_pred = np.histogram(pred, edges)[0][1:]
        area_label = np.histogram(anno, edges)[0][1:]
        intersection += inter
        union += np.finfo(np.float64).eps + (area_pred + area_label - inter)
    return 100 * intersection / union, 100 * correct / labelled


def test_score_equals_independent_eval_acc(tmp_path):
    rng = np.random.default_rng(5)
    lines, pairs = [], []
    for index in range(4):
        stem = f"c_{index:06d}_000019"
        label = rng.integers(0, 19, (20, 30)).astype(np.uint8)
        label[rng.random(label.shape) < 0.1] = 255
        label[0, :3] = 254  # saturates to 255 in eval_acc.m: ignored too
        pred = np.where(rng.random(label.shape) < 0.6, label, rng.integers(0, 19, label.shape)).astype(np.uint8)
        pred[1, :5] = [19, 200, 255, 18, 0]  # values above 18 count as the last class (hist rule)
        label_rel = f"gtFine/val/c/{stem}_gtFine_labelTrainIds.png"
        if index == 3:  # only the labelIds file exists: mapped with the official table
            write_png(tmp_path / label_rel.replace("labelTrainIds", "labelIds"),
                      np.array(list(TRAIN_ID_TO_LABEL_ID) + [0] * 237, dtype=np.uint8)[label])
        else:
            write_png(tmp_path / label_rel, label)
        if index == 2:  # half-size prediction: eval_acc.m resizes it with 'nearest' (pixel doubling here)
            small = pred[::2, ::2]
            pred = np.repeat(np.repeat(small, 2, axis=0), 2, axis=1)
            write_png(tmp_path / "pred" / f"{stem}_leftImg8bit.png", small)
        else:
            write_png(tmp_path / "pred" / f"{stem}_leftImg8bit.png", pred)
        lines.append(f"leftImg8bit/val/c/{stem}_leftImg8bit.png {label_rel}")
        pairs.append((pred, label))
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    json_path = tmp_path / "scores.json"
    result = run_cli(["score", "--list", str(tmp_path / "list.txt"), "--data-root", str(tmp_path),
                      "--pred-dir", str(tmp_path / "pred"), "--json", str(json_path), "--format", "trainids"])
    assert result.exit_code == 0, result.output
    assert result.stderr.count("labelIds labels") == 1  # said once
    report = json.loads(json_path.read_text())
    class_iou, pixel_accuracy = eval_acc_reference(pairs)
    np.testing.assert_allclose(report["class_iou"], class_iou, rtol=1e-12, atol=0)
    assert report["miou"] == pytest.approx(np.mean(class_iou), rel=1e-12)
    assert report["pixel_accuracy"] == pytest.approx(pixel_accuracy, rel=1e-12)
    assert report["images"] == 4


def test_resume_after_interruption_gives_the_same_report(tmp_path, baseline, dataset, weights):
    out = tmp_path / "out"
    shutil.copytree(baseline, out)
    (out / "report.json").unlink()
    (out / "gray" / f"{STEMS[0]}_leftImg8bit.png").unlink()
    color = out / "color" / f"{STEMS[1]}_leftImg8bit.png"
    color.write_bytes(color.read_bytes()[:100])  # a file cut short
    result = run_cli(eval_args(dataset, weights, out, "--workers", "1"))
    assert result.exit_code == 0, result.output
    report = load_report(out)
    assert scores(report) == scores(load_report(baseline))
    assert report["timing"]["images_resumed"] == 1 and report["timing"]["images_inferred"] == 2
    for kind in ("gray", "color"):
        for stem in STEMS:
            name = f"{stem}_leftImg8bit.png"
            assert (out / kind / name).read_bytes() == (baseline / kind / name).read_bytes()


def test_resume_refuses_outputs_of_other_settings(tmp_path, baseline, dataset, weights):
    out = tmp_path / "out"
    shutil.copytree(baseline, out)
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    args = eval_args(dataset, weights, out)
    args[args.index("--input-size") + 1:args.index("--input-size") + 3] = ["225", "449"]
    result = run_cli(args)
    assert result.exit_code != 0
    assert result.stderr.strip().count("\n") == 0 and "input_size" in result.stderr
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before
    result = run_cli(args + ["--redo"])
    assert result.exit_code == 0, result.output
    report = load_report(out)
    assert report["options"]["input_size"] == [225, 449] and report["timing"]["images_inferred"] == 3


def test_two_processes_give_the_same_report(tmp_path, baseline, dataset, weights):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "icnet_eval.cli", *eval_args(dataset, weights, out)]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = load_report(out)
    assert report["options"]["world_size"] == 2
    assert scores(report) == scores(load_report(baseline))
    for stem in STEMS:
        name = f"{stem}_leftImg8bit.png"
        assert np.array_equal(read_gray(out / "gray" / name), read_gray(baseline / "gray" / name))


def test_labelids_format_writes_server_files(tmp_path, baseline, dataset, weights):
    out = tmp_path / "out"
    result = run_cli(eval_args(dataset, weights, out, "--format", "labelids"))
    assert result.exit_code == 0, result.output
    assert scores(load_report(out)) == scores(load_report(baseline))
    assert sorted(path.name for path in (out / "labelids").iterdir()) == [f"{s}_leftImg8bit.png" for s in STEMS]
    for stem in STEMS:
        label_ids = read_gray(out / "labelids" / f"{stem}_leftImg8bit.png")
        assert set(np.unique(label_ids)) <= set(TRAIN_ID_TO_LABEL_ID)
        train_ids = read_gray(baseline / "gray" / f"{stem}_leftImg8bit.png")
        assert np.array_equal(LABEL_ID_TO_TRAIN_ID[label_ids], train_ids)
    plain = ListEntry(Path("l.txt"), 1, Path("images/frame7.jpg"), None)
    assert server_name(plain) == "frame7_leftImg8bit.png"


def _case_missing_image(root: Path, setup: Path) -> tuple[list[str], str]:
    lines = (root / "val.txt").read_text().splitlines()
    lines.insert(1, "leftImg8bit/val/city/gone_leftImg8bit.png")
    (setup / "list.txt").write_text("\n".join(lines))
    return ["--list", str(setup / "list.txt")], "line 2: image"


def _case_label_size(root: Path, setup: Path) -> tuple[list[str], str]:
    write_png(setup / "small_label.png", np.zeros((32, 64), dtype=np.uint8))
    image = root / f"leftImg8bit/val/city/{STEMS[0]}_leftImg8bit.png"
    (setup / "list.txt").write_text(f"{image} {setup / 'small_label.png'}\n")
    return ["--list", str(setup / "list.txt")], "line 1: label"


def _case_unreadable_image(root: Path, setup: Path) -> tuple[list[str], str]:
    (setup / "broken_leftImg8bit.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (setup / "list.txt").write_text(f"\n{setup / 'broken_leftImg8bit.png'}\n")
    return ["--list", str(setup / "list.txt")], "line 2: image"


def _case_empty_list(root: Path, setup: Path) -> tuple[list[str], str]:
    (setup / "list.txt").write_text("\n  \n")
    return ["--list", str(setup / "list.txt")], "empty"


def _case_md5_mismatch(root: Path, setup: Path, weights: Path) -> tuple[list[str], str]:
    renamed = setup / "icnet_cityscapes_train_30k.caffemodel"
    shutil.copy(weights, renamed)
    return ["--weights", str(renamed)], "md5"


@pytest.mark.parametrize("case", ["missing_image", "label_size", "unreadable_image", "empty_list",
                                  "md5_mismatch", "out_is_file"])
def test_bad_input_gives_one_line_and_writes_nothing(tmp_path, dataset, weights, case):
    out = tmp_path / "out"
    setup = tmp_path / "setup"
    setup.mkdir()
    args = eval_args(dataset, weights, out)
    if case == "out_is_file":
        out.write_text("precious")
        expected, override = "is a file", []
    elif case == "md5_mismatch":
        override, expected = _case_md5_mismatch(dataset, setup, weights)
    else:
        override, expected = globals()[f"_case_{case}"](dataset, setup)
    for flag, value in zip(override[::2], override[1::2]):
        args[args.index(flag) + 1] = value
    result = run_cli(args)
    assert result.exit_code != 0
    message = result.stderr.strip()
    assert "\n" not in message and message.startswith("icnet-eval: error:"), message
    assert expected in message
    if case == "out_is_file":
        assert out.read_text() == "precious"
        assert str(out) in message
    else:
        assert not (out / "report.json").exists()
    if case in ("missing_image", "label_size", "unreadable_image"):
        assert "list.txt" in message


def test_list_parsing_errors_name_the_line(tmp_path, dataset):
    image = f"leftImg8bit/val/city/{STEMS[0]}_leftImg8bit.png"
    label = f"gtFine/val/city/{STEMS[0]}_gtFine_labelTrainIds.png"
    cases = {
        f"{image} {label}\n{image}\n": "line 2: has no label",
        f"{image} {label} extra\n": "line 1: expected 'IMAGE [LABEL]'",
        f"{image} {label}\n\n{image} {label}\n": "line 3: image name",
    }
    for text, expected in cases.items():
        (tmp_path / "list.txt").write_text(text)
        with pytest.raises(CaffeError, match=re.escape(expected)):
            parse_list(tmp_path / "list.txt", dataset)
    (tmp_path / "list.txt").write_text(f"# comment\n{image} {label}\n")
    (entry,) = parse_list(tmp_path / "list.txt", dataset)
    assert entry.line == 2 and entry.label_prediction_name == f"{STEMS[0]}_leftImg8bit.png"


def test_preprocess_is_eval_sub_input():
    """MATLAB resize of the RGB image, single(img) - mean, then BGR: the BGR shortcut gives the same bits."""
    rgb, _ = street_scene(3, (40, 70))
    expected = matlab_imresize(rgb, (33, 65)).astype(np.float32) - np.array(MEAN_RGB, dtype=np.float32)
    got = preprocess(np.ascontiguousarray(rgb[..., ::-1]), (33, 65))
    assert got.dtype == torch.float32 and got.shape == (3, 33, 65)
    assert np.array_equal(got.numpy(), expected[..., ::-1].transpose(2, 0, 1))


def test_softmax_resize_argmax_rules():
    logits = torch.zeros(19, 4, 6)
    logits[3] = 2.0
    logits[5] = 2.0  # tie with class 3: the lowest class wins, as MATLAB's max
    assert (predict_train_ids(logits, (4, 6)) == 3).all()
    # no max subtraction: exp(100) overflows, inf/inf is NaN, and MATLAB's max skips NaN -> class 0
    logits[7, 0, 0] = 100.0
    assert torch.isnan(class_probabilities(logits)[7, 0, 0])
    assert predict_train_ids(logits, (4, 6))[0, 0] == 0
    # a real case against NumPy: float32 softmax, MATLAB bilinear shrink, first maximum
    rng = np.random.default_rng(0)
    values = rng.normal(0, 2, (19, 17, 33)).astype(np.float32)
    scores = np.exp(values)
    probs = scores / np.add.reduce(scores, axis=0, dtype=np.float32)
    expected = matlab_imresize(probs.transpose(1, 2, 0), (11, 21)).argmax(axis=2)
    assert np.array_equal(predict_train_ids(torch.from_numpy(values), (11, 21)), expected)


def test_prototxt_and_time_commands(tmp_path):
    result = run_cli(["prototxt", "--height", "257", "--width", "513", "-o", str(tmp_path / "net.prototxt")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "net.prototxt").read_text() == icnet_prototxt(257, 513, False)
    result = run_cli(["time", "--input-size", *SMALL_INPUT, "--iterations", "2", "--warmup", "0", "--device", "cpu",
                      "--json", str(tmp_path / "time.json")])
    assert result.exit_code == 0, result.output
    assert "33.00 ms" in result.stdout and "fps" in result.stdout and "1x3x193x385" in result.stdout
    record = json.loads((tmp_path / "time.json").read_text())
    assert record["iterations"] == 2 and record["device"] == "cpu" and record["paper_ms"] == 33.0
    assert record["median_ms"] > 0 and record["fps"] == pytest.approx(1000 / record["median_ms"])


def test_generated_net_reproduces_caffe_argmax(reference_dir):
    """--input-size path: the generated 257x513 definition with Caffe-written weights gives Caffe's argmax."""
    import h5py

    from icnet_eval.predict import numerics
    from icnet_eval.model import load_model

    model = load_model(reference_dir / "icnet_merged_1025x2049.caffemodel", None, (257, 513))
    assert model.definition == "generated ICNet 257x513 (BN merged)" and model.release is None
    with h5py.File(reference_dir / "icnet_merged_257x513.ref.h5", "r") as ref:
        inputs, caffe_argmax = torch.from_numpy(ref["input/data"][()]), ref["final/argmax"][()]
    with torch.inference_mode(), numerics(torch.device("cpu")):
        ours = model.net(inputs)[0].argmax(0).numpy()
    # float32 rounding differs from Caffe's BLAS: only near-ties may flip
    assert np.mean(ours == caffe_argmax) > 0.9999
    bn_model = load_model(reference_dir / "icnet_bnnomerge_1025x2049.caffemodel", None, (257, 513))
    assert bn_model.definition == "generated ICNet 257x513 (separate BN)"


def test_weights_of_another_net_are_refused_before_building(units_dir):
    from icnet_eval.model import load_model

    with pytest.raises(CaffeError, match=r"unit_conv_basic\.caffemodel: none of its 6 weighted layers match a layer name of generated ICNet"):
        load_model(units_dir / "unit_conv_basic.caffemodel", None, (257, 513))


# ---------------------------------------------------------------- safety of --out and resume

def _copy_dataset(dataset: Path, target: Path) -> Path:
    shutil.copytree(dataset, target)
    return target


def test_resume_recomputes_images_that_changed(tmp_path, baseline, dataset, weights):
    root = _copy_dataset(dataset, tmp_path / "data")
    out = tmp_path / "out"
    assert run_cli(eval_args(root, weights, out)).exit_code == 0
    changed = root / f"leftImg8bit/val/city/{STEMS[1]}_leftImg8bit.png"
    image, _ = street_scene(99, IMAGE_SIZE)  # another scene under the same name
    write_png(changed, image[..., ::-1])
    result = run_cli(eval_args(root, weights, out))
    assert result.exit_code == 0, result.output
    report = load_report(out)
    assert report["timing"]["images_inferred"] == 1 and report["timing"]["images_resumed"] == 2
    fresh = tmp_path / "fresh"
    assert run_cli(eval_args(root, weights, fresh)).exit_code == 0
    assert scores(report) == scores(load_report(fresh))  # as if run from scratch on the new images


def test_resume_refuses_another_data_root(tmp_path, baseline, dataset, weights):
    out = tmp_path / "out"
    shutil.copytree(baseline, out)
    other = _copy_dataset(dataset, tmp_path / "elsewhere")
    result = run_cli(eval_args(other, weights, out))
    assert result.exit_code == 2
    assert "\n" not in result.stderr.strip() and "another data_root" in result.stderr


def test_one_run_per_out_at_a_time(tmp_path, dataset, weights):
    from icnet_eval.outputs import lock_out_dir

    out = tmp_path / "out"
    out.mkdir()
    held = lock_out_dir(out)
    try:
        result = run_cli(eval_args(dataset, weights, out))
        assert result.exit_code == 2 and "another icnet-eval run is writing there" in result.stderr
        assert not (out / "gray").exists()
    finally:
        held.close()
    assert run_cli(eval_args(dataset, weights, out)).exit_code == 0


def test_predictions_never_overwrite_or_delete_inputs(tmp_path, dataset, weights):
    root = _copy_dataset(dataset, tmp_path / "data")
    stem = f"{STEMS[0]}_leftImg8bit"
    (root / "gray").mkdir()
    shutil.copy(root / f"leftImg8bit/val/city/{stem}.png", root / "gray" / f"{stem}.png")
    (root / "in_out.txt").write_text(f"gray/{stem}.png\n")
    before = (root / "gray" / f"{stem}.png").read_bytes()
    for extra in ((), ("--redo",)):
        result = run_cli(eval_args(root, weights, root, *extra, list_name="in_out.txt"))
        assert result.exit_code == 2, result.output
        assert "is the image of" in result.stderr and "which this run reads" in result.stderr
        assert "choose another --out" in result.stderr
        assert (root / "gray" / f"{stem}.png").read_bytes() == before


def test_lists_with_a_bom_tabs_and_quoted_paths(tmp_path, dataset):
    root = _copy_dataset(dataset, tmp_path / "data")
    spaced = root / "with space" / "a b_leftImg8bit.png"
    spaced.parent.mkdir()
    shutil.copy(root / f"leftImg8bit/val/city/{STEMS[0]}_leftImg8bit.png", spaced)
    label = f"gtFine/val/city/{STEMS[0]}_gtFine_labelTrainIds.png"
    for text in (f"\ufeffwith space/a b_leftImg8bit.png\t{label}\n",
                 f"\ufeff\"with space/a b_leftImg8bit.png\" '{label}'\n"):
        (root / "list.txt").write_text(text, encoding="utf-8")
        (entry,) = parse_list(root / "list.txt", root)
        assert entry.image == spaced and entry.label == root / label
    (root / "list.txt").write_text('"unbalanced quote.png\n')
    with pytest.raises(CaffeError, match="list.txt line 1: No closing quotation"):
        parse_list(root / "list.txt", root)


def test_sizes_beyond_the_memory_limit_are_refused(tmp_path, dataset, weights, monkeypatch):
    monkeypatch.setenv("CAFFE2TORCH_MAX_MEMORY", "100G")  # restored after the test, whatever --max-memory sets
    result = run_cli(eval_args(dataset, weights, tmp_path / "big", "--input-size", "100001", "200001"))
    assert result.exit_code == 2 and "more than the memory limit" in result.stderr
    root = _copy_dataset(dataset, tmp_path / "data")
    image, _ = street_scene(5, (512, 1024))
    write_png(root / "huge_leftImg8bit.png", image[..., ::-1])
    (root / "huge.txt").write_text("huge_leftImg8bit.png\n")
    result = run_cli(eval_args(root, weights, tmp_path / "out", "--max-memory", "80M", list_name="huge.txt"))
    assert result.exit_code == 2, result.output
    assert "huge.txt line 1: image" in result.stderr and "is 512x1024: evaluating it needs" in result.stderr


def test_label_ids_are_never_scored_as_train_ids(tmp_path, baseline, dataset, weights):
    """labelIds labels named so are mapped; labelIds content under a trainIds name, or labelId predictions
    scored without saying so, is refused; an --out folder of either format scores the same."""
    root = _copy_dataset(dataset, tmp_path / "data")
    named, hidden = [], []
    for line in (root / "val.txt").read_text().splitlines():
        image, label = line.split()
        train_ids = read_gray(root / label)
        label_ids = np.array(list(TRAIN_ID_TO_LABEL_ID) + [0] * 237, dtype=np.uint8)[train_ids]
        write_png(root / label.replace("labelTrainIds", "labelIds"), label_ids)
        write_png(root / "hidden" / label, label_ids)  # labelIds under a trainIds name
        named.append(f"{image} {label.replace('labelTrainIds', 'labelIds')}")
        hidden.append(f"{image} hidden/{label}")
    (root / "named.txt").write_text("\n".join(named) + "\n")
    (root / "hidden.txt").write_text("\n".join(hidden) + "\n")
    baseline_scores = scores(load_report(baseline))
    result = run_cli(["score", "--list", str(root / "named.txt"), "--data-root", str(root), "--pred-dir", str(baseline)])
    assert result.exit_code == 0, result.output
    json_path = tmp_path / "s.json"
    run_cli(["score", "--list", str(root / "named.txt"), "--data-root", str(root), "--pred-dir", str(baseline),
             "--json", str(json_path)])
    assert {k: v for k, v in json.loads(json_path.read_text()).items() if k != "options"} == baseline_scores
    result = run_cli(["score", "--list", str(root / "hidden.txt"), "--data-root", str(root), "--pred-dir", str(baseline)])
    assert result.exit_code == 2 and "holds values outside the trainIds" in result.stderr
    # A --format labelids run scores the same through its --out folder, with no flag.
    out = tmp_path / "labelids_out"
    assert run_cli(eval_args(root, weights, out, "--format", "labelids")).exit_code == 0
    result = run_cli(["score", "--list", str(root / "val.txt"), "--data-root", str(root), "--pred-dir", str(out),
                      "--json", str(json_path)])
    assert result.exit_code == 0, result.output
    assert {k: v for k, v in json.loads(json_path.read_text()).items() if k != "options"} == baseline_scores
    # The labelId PNGs alone are refused as trainIds, and scored right when said.
    pred = ["score", "--list", str(root / "val.txt"), "--data-root", str(root), "--pred-dir", str(out / "labelids")]
    result = run_cli(pred)
    assert result.exit_code == 2 and "--format labelids" in result.stderr
    assert run_cli(pred + ["--format", "labelids", "--json", str(json_path)]).exit_code == 0
    assert {k: v for k, v in json.loads(json_path.read_text()).items() if k != "options"} == baseline_scores


def test_python_api_and_a_converted_folder_as_weights(tmp_path, baseline, dataset, weights):
    import icnet_eval
    from caffe2torch.cli import main as caffe2torch_main
    from icnet_eval.data import read_image_bgr

    # A folder written by caffe2torch (here for the small input size) evaluates like the caffemodel.
    prototxt = tmp_path / "icnet_small.prototxt"
    prototxt.write_text(icnet_prototxt(int(SMALL_INPUT[0]), int(SMALL_INPUT[1]), False))
    folder = tmp_path / "converted"
    done = CliRunner().invoke(caffe2torch_main, ["convert", str(weights), "--prototxt", str(prototxt), "-o", str(folder)])
    assert done.exit_code == 0, done.output
    out = tmp_path / "out"
    args = eval_args(dataset, weights, out)
    args[args.index("--weights") + 1] = str(folder)
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    assert scores(load_report(out)) == scores(load_report(baseline))
    # The same through the Python API, and one image through segment().
    report = icnet_eval.evaluate(dataset / "val.txt", dataset, folder, tmp_path / "api", device="cpu", workers=0,
                                 progress=False)
    assert scores(report) == scores(load_report(baseline))
    entry = parse_list(dataset / "val.txt", dataset)[0]
    train_ids = icnet_eval.segment(read_image_bgr(entry), folder, device="cpu")
    assert np.array_equal(train_ids, read_gray(baseline / "gray" / f"{STEMS[0]}_leftImg8bit.png"))
    with pytest.raises(CaffeError, match="H x W x 3 uint8 BGR image"):
        icnet_eval.segment(np.zeros((4, 4), np.uint8), folder)


def test_rich_report_with_instances_is_the_same_sharded(tmp_path, dataset, weights):
    """With *_gtFine_instanceIds.png beside the labels the report gains iIoU; category IoU, the confusion matrix
    and --per-image scores are there too, and two processes give exactly what one does."""
    root = _copy_dataset(dataset, tmp_path / "data")
    from icnet_eval.cityscapes import TRAIN_ID_TO_LABEL_ID

    for line in (root / "val.txt").read_text().splitlines():
        label = root / line.split()[1]
        train_ids = read_gray(label)
        instances = np.array(list(TRAIN_ID_TO_LABEL_ID) + [0] * 237, dtype=np.uint16)[train_ids]
        instances[10:30, 20:50] = 26 * 1000 + 1  # a car
        instances[35:60, 70:90] = 24 * 1000 + 2  # a person
        write_png(label.with_name(label.name.replace("labelTrainIds", "instanceIds")), instances)
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    result = run_cli(eval_args(root, weights, single, "--per-image"))
    assert result.exit_code == 0, result.output
    report = load_report(single)
    assert len(report["per_image"]) == 3 and all(0 <= item["miou"] <= 100 for item in report["per_image"])
    matrix = np.array(report["confusion_matrix"])
    assert len(report["category_iou"]) == 7 and matrix.shape == (19, 19)
    assert matrix.trace() / matrix.sum() == pytest.approx(report["pixel_accuracy"] / 100, rel=1e-12)
    assert report["class_iiou"][13] is not None and report["class_iiou"][0] is None  # car has instances, road none
    assert "iIoU (%)" in result.stdout and "==== Categories, IoU (%)" in result.stdout
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "icnet_eval.cli", *eval_args(root, weights, sharded, "--per-image")]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert scores(load_report(sharded)) == scores(report)


def test_overlays_and_the_segment_command(tmp_path, baseline, dataset, weights):
    from icnet_eval.cityscapes import colorize
    from icnet_eval.data import read_image_bgr

    out = tmp_path / "out"
    assert run_cli(eval_args(dataset, weights, out, "--overlay")).exit_code == 0
    entry = parse_list(dataset / "val.txt", dataset)[0]
    image = read_image_bgr(entry)
    gray = read_gray(out / "gray" / f"{STEMS[0]}_leftImg8bit.png")
    blended = cv2.imread(str(out / "overlay" / f"{STEMS[0]}_leftImg8bit.png"))
    expected = np.rint(0.5 * colorize(gray)[..., ::-1].astype(np.float64) + 0.5 * image).astype(np.int64)
    assert np.abs(blended.astype(np.int64) - expected).max() <= 1  # half and half, rounded
    assert scores(load_report(out)) == scores(load_report(baseline))  # overlays change no score
    # segment: a folder of images and a video, no labels; the same predictions as the evaluation.
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(entry.image, images / "frame.png")
    prototxt = tmp_path / "small.prototxt"
    prototxt.write_text(icnet_prototxt(int(SMALL_INPUT[0]), int(SMALL_INPUT[1]), False))
    common = ["--weights", str(weights), "--prototxt", str(prototxt), "--device", "cpu", "-o", str(tmp_path / "seg")]
    result = run_cli(["segment", str(images), *common])
    assert result.exit_code == 0, result.output
    color = cv2.imread(str(tmp_path / "seg" / "frame_color.png"))
    assert np.array_equal(color, colorize(gray)[..., ::-1])
    assert np.array_equal(cv2.imread(str(tmp_path / "seg" / "frame_overlay.png")), blended)
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 4, (image.shape[1], image.shape[0]))
    for _ in range(3):
        writer.write(image)
    writer.release()
    result = run_cli(["segment", str(video), *common])
    assert result.exit_code == 0, result.output
    assert "3 frames at 4 fps" in result.stderr
    capture = cv2.VideoCapture(str(tmp_path / "seg" / "clip_overlay.mp4"))
    frames = 0
    while capture.read()[0]:
        frames += 1
    assert frames == 3
    missing = run_cli(["segment", str(tmp_path / "nothing.png"), *common])
    assert missing.exit_code == 2 and "no such file or folder" in missing.stderr


def test_a_refused_distributed_redo_deletes_nothing(tmp_path, baseline, dataset, weights):
    """Every rank agrees on the lock and the settings before any of them deletes or writes a file."""
    from icnet_eval.outputs import lock_out_dir

    out = tmp_path / "out"
    shutil.copytree(baseline, out)
    before = {path: path.read_bytes() for path in out.rglob("*.png")}
    held = lock_out_dir(out)  # a single-process run is writing --out
    try:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "-m", "icnet_eval.cli", *eval_args(dataset, weights, out, "--redo")]
        done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    finally:
        held.close()
    assert done.returncode != 0 and "another icnet-eval run is writing there" in done.stderr
    assert {path: path.read_bytes() for path in out.rglob("*.png")} == before


def test_overlays_follow_a_changed_image(tmp_path, dataset, weights):
    root = _copy_dataset(dataset, tmp_path / "data")
    out = tmp_path / "out"
    assert run_cli(eval_args(root, weights, out, "--overlay")).exit_code == 0
    image_path = root / f"leftImg8bit/val/city/{STEMS[0]}_leftImg8bit.png"
    flipped = cv2.imread(str(image_path))[:, ::-1]
    write_png(image_path, np.ascontiguousarray(flipped))
    assert run_cli(eval_args(root, weights, out, "--overlay")).exit_code == 0
    from icnet_eval.segment import overlay

    gray = read_gray(out / "gray" / f"{STEMS[0]}_leftImg8bit.png")
    written = cv2.imread(str(out / "overlay" / f"{STEMS[0]}_leftImg8bit.png"))
    assert np.array_equal(written, overlay(flipped, gray))


def test_resize_on_the_device_and_batches_give_the_same_bits(tmp_path, baseline, dataset, weights):
    """The GPU layout (workers only decode; the MATLAB resize runs where the net runs) and --batch-size 2,
    checked on the CPU: the same report and the same PNGs as the default single-image run."""
    from icnet_eval.pipeline import EvalOptions, evaluate

    for name, extra in (("device_resize", dict(resize_on_device=True)), ("batched", dict(batch_size=2)),
                        ("both", dict(resize_on_device=True, batch_size=2, writer_threads=0))):
        out = tmp_path / name
        options = EvalOptions(dataset / "val.txt", dataset, weights, out, "cpu", workers=0,
                              input_size=tuple(int(v) for v in SMALL_INPUT), progress=False, **extra)
        report = evaluate(options, echo=lambda _: None)
        assert scores(report) == scores(load_report(baseline)), name
        for stem in STEMS:
            png = f"{stem}_leftImg8bit.png"
            assert np.array_equal(read_gray(out / "gray" / png), read_gray(baseline / "gray" / png)), name


def test_a_failed_background_write_stops_the_run_and_resume_finishes_it(tmp_path, baseline, dataset, weights,
                                                                      monkeypatch):
    from icnet_eval.outputs import OutputStore

    real_write = OutputStore.write
    calls = []

    def failing(self, entry, train_ids):
        calls.append(entry)
        if len(calls) == 2:
            raise CaffeError(f"{entry.where}: cannot write (No space left on device)")
        real_write(self, entry, train_ids)

    monkeypatch.setattr(OutputStore, "write", failing)
    out = tmp_path / "out"
    result = run_cli(eval_args(dataset, weights, out))
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "No space left on device" in result.stderr
    monkeypatch.setattr(OutputStore, "write", real_write)
    result = run_cli(eval_args(dataset, weights, out))
    assert result.exit_code == 0, result.output
    assert scores(load_report(out)) == scores(load_report(baseline))


def test_loader_workers_start_safely_after_opencv_threads(tmp_path, baseline, dataset, weights):
    """Forked loader workers deadlocked for good (pthread_cond_destroy in OpenCV's pool) once the parent had used
    OpenCV's threads; forkserver workers start from a process that has none. The script is not guarded by
    `if __name__ == "__main__"`: the workers must not run it again."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        "import json, sys, cv2, numpy as np, icnet_eval\n"
        "cv2.setNumThreads(4)\n"
        "big = np.random.default_rng(0).integers(0, 255, (3000, 4000, 3), dtype=np.uint8)\n"
        "for _ in range(3):\n"
        "    cv2.resize(big, (2000, 1500))  # starts OpenCV's thread pool in this process\n"
        f"report = icnet_eval.evaluate({str(dataset / 'val.txt')!r}, {str(dataset)!r}, {str(weights)!r},\n"
        f"                             out={str(tmp_path / 'out')!r}, workers=2, device='cpu',\n"
        f"                             input_size=({SMALL_INPUT[0]}, {SMALL_INPUT[1]}))\n"
        "print(json.dumps(report['miou']))\n")
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240,
                                env=environment, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail("the evaluation hung after OpenCV's thread pool was used (loader workers forked?)")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == load_report(baseline)["miou"]


def test_the_segment_function_survives_an_import_of_the_segment_module():
    """Overlays and the segment command import icnet_eval.segment (the module); icnet_eval.segment stays the API."""
    import icnet_eval
    from icnet_eval.segment import overlay  # noqa: F401

    assert callable(icnet_eval.segment) and icnet_eval.segment.__module__ == "icnet_eval"
    assert sys.modules["icnet_eval.segment"].overlay is overlay
