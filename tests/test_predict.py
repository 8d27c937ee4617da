"""Tests of the evaluation's device side: confusion counts where the prediction is, the modes' nets, --fast and its
accuracy guard on the Caffe references, and (with CUDA) exact mode on a GPU against the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from caffe2torch.errors import CaffeError
from icnet_eval.cli import main
from icnet_eval.data import preprocess
from icnet_eval.demo import street_scene
from icnet_eval.metrics import ConfusionCounts, image_instance_terms
from icnet_eval.model import untrained_model, write_untrained_caffemodel
from icnet_eval.predict import (Mode, Predictor, label_confusion, numerics, predict_train_ids, resolve_mode,
                                runtime_net)

CPU = torch.device("cpu")
SMALL = (193, 385)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (exact mode on a GPU)")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_counts_from_the_device_confusion_equal_eval_acc_counts():
    """`add_confusion(label_confusion(...))` is `add` for trainId predictions: totals, the image's own scores
    and the instance terms, with ignored 255 and eval_acc.m's 254 in the label."""
    rng = np.random.default_rng(3)
    direct, via_matrix = ConfusionCounts(), ConfusionCounts()
    for shape in ((37, 53), (64, 128), (5, 7)):
        label = rng.integers(0, 19, shape).astype(np.uint8)
        label[rng.random(shape) < 0.15] = 255
        label[rng.random(shape) < 0.05] = 254
        prediction = np.where(rng.random(shape) < 0.5, np.minimum(label, 18), rng.integers(0, 19, shape)).astype(np.uint8)
        instances = np.where(rng.random(shape) < 0.3, 26000 + rng.integers(0, 3, shape), 7).astype(np.int32)
        confusion = label_confusion(torch.from_numpy(prediction), torch.from_numpy(label)).numpy()
        assert confusion.sum() == np.count_nonzero(label < 19)
        one = direct.add(prediction, label, instances)
        other = via_matrix.add_confusion(confusion, image_instance_terms(prediction, label, instances))
        assert one == other  # bit for bit: the same float operations on the same integers
    assert np.array_equal(direct.to_array(), via_matrix.to_array())
    assert json.dumps(direct.summary()) == json.dumps(via_matrix.summary())  # NaN (no instances) included
    with pytest.raises(CaffeError, match="19x19"):
        ConfusionCounts().add_confusion(np.zeros((18, 18)))


def test_first_argmax_is_matlab_max_on_ties_and_nan():
    """Ties go to the lowest class and NaN never wins (an all-NaN pixel gives class 0), as MATLAB's max; the
    same as torch.argmax of the NaN-free volume."""
    from icnet_eval.predict import first_argmax

    rng = torch.Generator().manual_seed(0)
    volume = torch.randint(0, 3, (19, 40, 50), generator=rng).float()  # many ties
    volume[torch.rand(volume.shape, generator=rng) < 0.2] = float("nan")
    volume[:, :3] = float("nan")
    volume[0, 5, 5], volume[1:, 5, 5] = float("nan"), 1.0  # the NaN of class 0 does not win
    volume[:, 6, 6] = -float("inf")
    expected = torch.argmax(torch.nan_to_num(volume, nan=-float("inf")), dim=0).to(torch.uint8)
    got = first_argmax(volume)
    assert torch.equal(got, expected)
    assert got[0, 0] == 0 and got[5, 5] == 1 and got[6, 6] == 0


def test_modes_from_the_options():
    assert resolve_mode(False, False, None, CPU) == Mode("exact", torch.float32)
    assert resolve_mode(False, True, None, CPU) == Mode("fast-resize", torch.float32)
    assert resolve_mode(True, False, None, CPU) == Mode("fast", torch.float32)  # CPU float16 is slower
    assert resolve_mode(True, False, None, torch.device("cuda")) == Mode("fast", torch.float16)
    assert resolve_mode(True, True, "bfloat16", CPU).dtype == torch.bfloat16
    assert Mode("fast", torch.bfloat16).dtype_name == "bfloat16"
    with pytest.raises(CaffeError, match="fast_dtype needs fast=True"):  # the API's words
        resolve_mode(False, False, "float16", CPU)
    with pytest.raises(CaffeError, match="expected one of"):
        resolve_mode(True, False, "int8", CPU)


@pytest.fixture(scope="module")
def small_model():
    return untrained_model(SMALL, seed=2)


def _items(images: list[np.ndarray], size: tuple[int, int], fast: bool = False, labels=None) -> list[dict]:
    return [{"input": preprocess(image, size, fast), "image_size": image.shape[:2],
             "label": None if labels is None else labels[index]} for index, image in enumerate(images)]


def test_the_exact_cpu_predictor_is_the_earlier_path_bit_for_bit(small_model):
    """Launch two batches before waiting for either (as the pipeline does): each prediction and confusion is
    what the converted net in Caffe's BN order, the authors' softmax, MATLAB's resize and argmax give."""
    scenes = [street_scene(seed, (48, 96)) for seed in (1, 2, 3)]
    images = [np.ascontiguousarray(image[..., ::-1]) for image, _ in scenes]
    labels = [label for _, label in scenes]
    predictor = Predictor(small_model, CPU, Mode())
    with numerics(CPU, exact=True):
        first = predictor.launch(_items(images[:2], SMALL, labels=labels[:2]))
        second = predictor.launch(_items(images[2:], SMALL, labels=labels[2:]))
        first.wait()
        second.wait()
        net = small_model.evaluation_net(exact=True)
        with torch.inference_mode():
            for item, image, label in zip(first.items + second.items, images, labels):
                expected = predict_train_ids(net(preprocess(image, SMALL)[None])[0], image.shape[:2])
                assert np.array_equal(item["prediction"], expected)
                counts = ConfusionCounts()
                counts.add(expected, label)
                assert np.array_equal(item["confusion"], counts.confusion)
    assert set(first.times_ms) == {"input", "forward", "post"} and first.times_ms["forward"] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_fast_net_runs_in_its_dtype_close_to_exact(small_model, dtype):
    """The fast graph, cast after folding: its scores are in the mode's dtype and near the exact net's on the
    well-conditioned untrained weights (half precision's rounding, not a wrong layer)."""
    image, _ = street_scene(4, (96, 192))
    inputs = preprocess(np.ascontiguousarray(image[..., ::-1]), SMALL)[None]
    fast = runtime_net(small_model, CPU, Mode("fast", dtype))
    assert all(p.dtype == dtype for p in fast.parameters())
    with torch.inference_mode():
        exact = small_model.evaluation_net(exact=True)(inputs)
        got = fast(inputs.to(dtype))
    assert got.dtype == dtype
    error = float((got.float() - exact).norm() / exact.norm())
    assert error < {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}[dtype]


def _reference_input(path: Path) -> torch.Tensor:
    with h5py.File(path, "r") as file:
        group = file["input"]
        return torch.from_numpy(group[next(iter(group))][()])


def _agreement(exact: torch.Tensor, other: torch.Tensor, margin: float) -> tuple[float, float]:
    """(identical argmax over all pixels, over the pixels whose exact top-2 logit margin is >= margin)."""
    top2 = exact.topk(2, dim=1).values
    confident = (top2[:, 0] - top2[:, 1]) >= margin
    same = exact.argmax(1) == other.argmax(1)
    return float(same.float().mean()), float(same[confident].float().mean())


def test_fast_half_precision_accuracy_guard(reference_dir):
    """--fast's guard, float16 against exact float32, on ICNet 257x513 with the reference's calibrated weights
    and on the well-conditioned untrained ones (BENCHMARKS.md: "--fast against exact").

    The calibrated weights amplify any rounding about 1000-fold through the trunk (exact float32
    against Caffe: 1e-7 per layer, 1e-4 at conv5_3): float16's 5e-4 becomes 4.4% of the logits
    (largest error 0.85), so pixels with a margin of 0.1 still flip (97.6% agree) and the guard there
    is the margin the error bound gives, 1.0. On weights that keep activations of order 1, as trained
    ones do, the issue's condition holds as stated: margin >= 0.1 agrees on >= 99.99% of pixels.
    """
    from tests.conftest import convert_reference

    net = convert_reference("icnet_257x513").eval()
    x = _reference_input(reference_dir / "icnet_merged_257x513.ref.h5")
    model = untrained_model((257, 513))
    image, _ = street_scene(0, (256, 512))
    demo_x = preprocess(np.ascontiguousarray(image[..., ::-1]), (257, 513))[None]
    from caffe2torch.fast import optimize

    with torch.inference_mode():
        exact = net(x)
        half = optimize(net).half()(x.half()).float()
        demo_exact = model.net(demo_x)
        demo_half = optimize(model.net).half()(demo_x.half()).float()
    overall, confident = _agreement(exact, half, 1.0)
    assert confident >= 0.9999 and overall >= 0.94
    assert float((half - exact).norm() / exact.norm()) < 0.06
    overall, confident = _agreement(demo_exact, demo_half, 0.1)
    assert confident >= 0.9999 and overall >= 0.995


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fastset")
    lines = []
    import cv2

    for index in range(3):
        image, label = street_scene(20 + index, (64, 128))
        cv2.imwrite(str(root / f"c{index}_leftImg8bit.png"), image[..., ::-1])
        cv2.imwrite(str(root / f"c{index}_gtFine_labelTrainIds.png"), label)
        lines.append(f"c{index}_leftImg8bit.png c{index}_gtFine_labelTrainIds.png")
    (root / "val.txt").write_text("\n".join(lines) + "\n")
    return root, write_untrained_caffemodel(root / "w.caffemodel", seed=1)


def _run(root: Path, weights: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["--list", str(root / "val.txt"), "--data-root", str(root), "--weights",
                                     str(weights), "--out", str(out), "--input-size", *map(str, SMALL),
                                     "--device", "cpu", "--workers", "0", *extra])


def test_fast_evaluation_end_to_end_and_its_own_outputs(tmp_path, small_set):
    root, weights = small_set
    exact = _run(root, weights, tmp_path / "exact")
    assert exact.exit_code == 0, exact.output
    fast = _run(root, weights, tmp_path / "fast", "--fast", "--fast-dtype", "float16", "--batch-size", "2")
    assert fast.exit_code == 0, fast.output
    report = json.loads((tmp_path / "fast" / "report.json").read_text())
    reference = json.loads((tmp_path / "exact" / "report.json").read_text())
    assert report["options"]["mode"] == "fast" and report["options"]["dtype"] == "float16"
    assert report["options"]["resize"] == "fast" and reference["options"]["mode"] == "exact"
    assert report["images"] == 3 and abs(report["pixel_accuracy"] - reference["pixel_accuracy"]) < 2.0
    stages = report["timing"]["stages_ms_median"]
    assert all(stages[stage] is not None and stages[stage] >= 0 for stage in ("decode", "resize", "forward", "post",
                                                                              "write"))
    # predictions of another precision or resize are never mixed into an --out
    again = _run(root, weights, tmp_path / "exact", "--fast")
    assert again.exit_code != 0 and "another resize" in again.stderr
    other = _run(root, weights, tmp_path / "fast", "--fast")  # float32 on the CPU, not float16
    assert other.exit_code != 0 and "another precision ('float16', now 'float32')" in other.stderr
    resumed = _run(root, weights, tmp_path / "fast", "--fast", "--fast-dtype", "float16")
    assert resumed.exit_code == 0 and "3 taken from earlier outputs" in resumed.stderr
    wrong = _run(root, weights, tmp_path / "x", "--fast-dtype", "float16")
    assert wrong.exit_code != 0 and wrong.stderr.strip() == "icnet-eval: error: --fast-dtype needs --fast"
    assert not (tmp_path / "x").exists()  # refused before anything is written


@needs_cuda
def test_exact_on_the_gpu_agrees_with_the_cpu_and_with_itself(reference_dir):
    """Exact mode on a GPU (fast graph in float32, TF32 off, deterministic, CUDA graph, image by image):
    >= 99.99% of the CPU's trainIds on the reference input, the same bits from run to run and batch to batch."""
    from icnet_eval.model import load_model

    gpu = torch.device("cuda")
    model = load_model(reference_dir / "icnet_merged_1025x2049.caffemodel",
                       reference_dir / "icnet_cityscapes.prototxt", on_warning=lambda _: None)
    x = _reference_input(reference_dir / "icnet_merged_1025x2049.ref.h5")[0]
    items = [{"input": x, "image_size": (1024, 2048), "label": None}]
    with numerics(CPU, exact=True):
        cpu = Predictor(model, CPU, Mode()).launch(items)
        cpu.wait()
    predictor = Predictor(model, gpu, Mode())
    with numerics(gpu, exact=True):
        runs = [predictor.launch([dict(item) for item in items * batch]) for batch in (1, 2, 1)]
        for run in runs:
            run.wait()
    first = runs[0].items[0]["prediction"]
    assert all(np.array_equal(item["prediction"], first) for run in runs for item in run.items)
    assert float((first == cpu.items[0]["prediction"]).mean()) >= 0.9999


def test_a_shorter_batch_is_padded_to_the_captured_graph(small_model):
    """Under --fast one CUDA graph of --batch-size images serves the run: a shorter batch is padded with its last
    image and the extra scores dropped. Checked on the CPU with a stand-in for the graph."""
    predictor = Predictor(small_model, CPU, Mode("fast", torch.float32), batch_size=3)
    seen = []

    def graph(inputs):
        seen.append(inputs.shape[0])
        return predictor.net(inputs)

    predictor.graph = graph
    inputs = torch.randn(2, 3, *SMALL, generator=torch.Generator().manual_seed(1)) * 50
    with torch.inference_mode():
        got = predictor.forward(inputs)
        eager = predictor.net(inputs)
    assert seen == [3] and got.shape[0] == 2
    assert torch.allclose(got, eager, rtol=1e-5, atol=1e-4)  # oneDNN may block a batch of 3 differently


def test_an_error_in_the_next_batch_keeps_the_batch_already_computed(tmp_path, small_set):
    """The device works one batch ahead; when the next batch fails (here an unreadable image), the predictions
    already made are still written, so a resume starts after them."""
    root, weights = small_set
    broken = tmp_path / "data"
    import shutil

    shutil.copytree(root, broken)
    (broken / "c2_leftImg8bit.png").write_bytes(b"not a png")
    result = _run(broken, weights, tmp_path / "out")
    assert result.exit_code != 0 and "c2_leftImg8bit.png is not a readable image" in result.stderr
    assert sorted(p.name for p in (tmp_path / "out" / "gray").iterdir()) == ["c0_leftImg8bit.png", "c1_leftImg8bit.png"]


def test_folders_of_the_converted_net_and_of_the_fast_graph_are_not_mixed(tmp_path, small_set):
    """A --fast-resize run records that its predictions come from the fast graph; a folder that does not say so
    (made by an earlier version, with the converted net) is not resumed with it."""
    root, weights = small_set
    out = tmp_path / "out"
    assert _run(root, weights, out, "--fast-resize").exit_code == 0
    run_file = out / "icnet-eval-run.json"
    recorded = json.loads(run_file.read_text())
    assert recorded["net"] == "fast graph" and "precision" not in recorded
    del recorded["net"]
    run_file.write_text(json.dumps(recorded))
    again = _run(root, weights, out, "--fast-resize")
    assert again.exit_code != 0 and "another net (not recorded, now 'fast graph')" in again.stderr
    exact = tmp_path / "exact"
    assert _run(root, weights, exact).exit_code == 0
    assert "net" not in json.loads((exact / "icnet-eval-run.json").read_text())  # as earlier versions wrote it


def test_segment_runs_the_evaluation_modes(tmp_path, small_set):
    """`icnet-eval segment --fast` takes icnet-eval's modes; exact segment gives exactly the evaluation's trainIds
    (its colour maps match the evaluation's colour PNGs)."""
    import cv2

    root, weights = small_set
    images = tmp_path / "images"
    images.mkdir()
    for index in range(2):
        (images / f"c{index}.png").write_bytes((root / f"c{index}_leftImg8bit.png").read_bytes())
    common = ["--weights", str(weights), "--input-size", *map(str, SMALL), "--device", "cpu"]
    exact = CliRunner().invoke(main, ["segment", str(images), "-o", str(tmp_path / "exact"), *common])
    assert exact.exit_code == 0, exact.output
    evaluation = _run(root, weights, tmp_path / "eval")
    assert evaluation.exit_code == 0, evaluation.output
    for index in range(2):
        assert np.array_equal(cv2.imread(str(tmp_path / "exact" / f"c{index}_color.png")),
                              cv2.imread(str(tmp_path / "eval" / "color" / f"c{index}_leftImg8bit.png")))
    fast = CliRunner().invoke(main, ["segment", str(images), "-o", str(tmp_path / "fast"), "--fast",
                                     "--fast-dtype", "float16", *common])
    assert fast.exit_code == 0, fast.output
    assert sorted(p.name for p in (tmp_path / "fast").iterdir()) == ["c0_color.png", "c0_overlay.png",
                                                                     "c1_color.png", "c1_overlay.png",
                                                                     "icnet-segment.json"]
    wrong = CliRunner().invoke(main, ["segment", str(images), "-o", str(tmp_path / "x"), "--fast-dtype", "float16",
                                      *common])
    assert wrong.exit_code != 0 and "--fast-dtype needs --fast" in wrong.stderr and not (tmp_path / "x").exists()
