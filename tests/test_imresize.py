"""MATLAB-exact imresize: weights, per-pass rounding, pass order, and the reference test vectors."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from caffe2torch.errors import CaffeError
from icnet_eval.imresize import (
    _resize_chw_numpy,
    _resize_chw_torch_ops,
    contributions,
    fast_resize,
    matlab_imresize,
    matlab_imresize_torch,
)
from tests.conftest import IMRESIZE_DIR, external_reference

TIE_TOLERANCE = 1e-6


def _triangle(x: float) -> float:
    return (1 + x) * (-1 <= x < 0) + (1 - x) * (0 <= x <= 1)


def _box(x: float) -> float:
    return float(-0.5 <= x < 0.5)


def _matlab_contributions(n_in: int, n_out: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    """MATLAB's `contributions`, one output pixel at a time, written from imresize.m's text."""
    kernel, width, antialias = {"bilinear": (_triangle, 2.0, True), "nearest": (_box, 1.0, False)}[method]
    scale = n_out / n_in
    if scale < 1 and antialias:
        def h(x):
            return scale * kernel(scale * x)
        width = width / scale
    else:
        h = kernel
    taps = math.ceil(width) + 2
    mirror = list(range(1, n_in + 1)) + list(range(n_in, 0, -1))
    weights, indices = [], []
    for x in range(1, n_out + 1):
        u = x / scale + 0.5 * (1 - 1 / scale)
        left = math.floor(u - width / 2)
        row = [h(u - (left + p)) for p in range(taps)]
        total = sum(row)
        weights.append([w / total for w in row])
        indices.append([mirror[(left + p - 1) % (2 * n_in)] - 1 for p in range(taps)])
    weights, indices = np.array(weights), np.array(indices)
    kept = np.any(weights != 0, axis=0)
    return weights[:, kept], indices[:, kept]


def _reference_resize(image: np.ndarray, size, order=None):
    """Independent MATLAB-style resize of an H x W (x C) array.

    Returns the result and a mask of pixels where an exact tie (pre-rounding value k + 0.5 within
    1e-6, in this pass or in an input pixel it reads) makes the last digit depend on summation order.
    """
    scales = [size[0] / image.shape[0], size[1] / image.shape[1]]
    order = order if order is not None else sorted(range(2), key=lambda axis: scales[axis])
    current, uncertain = image, np.zeros(image.shape, dtype=bool)
    for axis in order:
        weights, indices = _matlab_contributions(current.shape[axis], size[axis], "bilinear")
        view = [1] * current.ndim
        view[axis] = -1
        acc = np.zeros(1)
        spread = np.zeros(1, dtype=bool)
        for k in range(weights.shape[1]):
            acc = acc + np.take(current.astype(np.float64), indices[:, k], axis) * weights[:, k].reshape(view)
            spread = spread | (np.take(uncertain, indices[:, k], axis) & (weights[:, k] != 0).reshape(view))
        if image.dtype == np.uint8:
            fraction = acc - np.floor(acc)
            spread = spread | (np.abs(fraction - 0.5) < TIE_TOLERANCE)
            current = np.clip(np.floor(acc + 0.5), 0, 255).astype(np.uint8)
        else:
            current = acc.astype(image.dtype)
        uncertain = spread
    return current, uncertain


def _assert_equal_except_ties(actual: np.ndarray, expected: np.ndarray, ties: np.ndarray) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype == np.uint8
    diff = actual.astype(np.int32) - expected.astype(np.int32)
    assert np.count_nonzero(diff[~ties]) == 0, f"{np.count_nonzero(diff[~ties])} pixels differ outside ties"
    assert np.abs(diff[ties]).max(initial=0) <= 1


@pytest.mark.parametrize("n_in,n_out", [(1025, 1024), (2048, 2049), (37, 16), (53, 101), (10, 3), (5, 11), (1, 4),
                                        (4, 1), (7, 7)])
@pytest.mark.parametrize("method", ["bilinear", "nearest"])
def test_contributions_follow_matlab_formula(n_in, n_out, method):
    weights, indices = contributions(n_in, n_out, method)
    expected_weights, expected_indices = _matlab_contributions(n_in, n_out, method)
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_allclose(weights, expected_weights, rtol=1e-15, atol=0)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-14)


def test_contributions_of_icnet_resizes():
    # 1024 -> 1025 upsample: 2 taps; the first output's left tap (input 0, 1-based) mirrors onto input 1.
    weights, indices = contributions(1024, 1025)
    assert weights.shape == (1025, 2)
    np.testing.assert_array_equal(indices[0], [0, 0])
    # u = 1 / scale + 0.5 * (1 - 1 / scale) = 0.5 + 0.5 * 1024 / 1025, so the tap at 0 weighs 1 - u.
    np.testing.assert_allclose(weights[0], [0.5 / 1025, 1 - 0.5 / 1025], rtol=1e-12)
    np.testing.assert_array_equal(indices[-1], [1023, 1023])
    # 1025 -> 1024 antialiased shrink: kernel width 2 * 1025 / 1024 -> 3 taps kept.
    weights, indices = contributions(1025, 1024)
    assert weights.shape == (1024, 3)
    assert indices.min() == 0 and indices.max() == 1024


# The ICNet-sized vectors (12 MB) are external; the gray cases are vendored in tests/data/imresize.
RGB = ("imresize/rgb_1024x2048.png", "imresize/rgb_1024x2048_to_1025x2049.png")
PROBS = ("imresize/probs_257x513x5.npy", "imresize/probs_257x513x5_to_256x512.npy")


def test_rgb_icnet_input_resize_matches_reference():
    folder = external_reference(*RGB) / "imresize"
    image = np.array(Image.open(folder / "rgb_1024x2048.png"))
    expected = np.array(Image.open(folder / "rgb_1024x2048_to_1025x2049.png"))
    resized = matlab_imresize(image, (1025, 2049))
    independent, ties = _reference_resize(image, (1025, 2049))
    assert 0 < ties.mean() < 0.005  # README: about 0.06% of pre-rounding values are ties
    _assert_equal_except_ties(resized, expected, ties)
    _assert_equal_except_ties(independent, expected, ties)


@pytest.mark.parametrize("name,size", [("rgb_1024x2048.png", (1025, 2049)), ("gray_37x53.png", (80, 101)),
                                       ("gray_37x53.png", (16, 23))])
def test_the_gpu_passes_equal_the_numpy_resize_on_the_shared_vectors(name, size):
    """The whole-tensor passes a GPU runs (here on the CPU) give the NumPy resize's bits on the shared ICNet input
    and gray cases; the NumPy resize with one thread (as in a loader worker) too."""
    from icnet_eval.imresize import set_resize_threads

    folder = (external_reference(*RGB) / "imresize") if name.startswith("rgb") else IMRESIZE_DIR
    image = np.array(Image.open(folder / name))
    volume = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
    by_numpy = matlab_imresize(image, size)
    by_passes = _resize_chw_torch_ops(torch.from_numpy(np.ascontiguousarray(volume)), size, "bilinear").numpy()
    np.testing.assert_array_equal(by_passes[0] if image.ndim == 2 else by_passes.transpose(1, 2, 0), by_numpy)
    set_resize_threads(1)
    try:
        np.testing.assert_array_equal(matlab_imresize(image, size), by_numpy)
    finally:
        set_resize_threads(None)


@pytest.mark.parametrize("size", [(16, 23), (80, 101), (37, 20)])
def test_gray_cases_match_reference(size):
    folder = IMRESIZE_DIR
    image = np.array(Image.open(folder / "gray_37x53.png"))
    expected = np.array(Image.open(folder / f"gray_37x53_to_{size[0]}x{size[1]}.png"))
    _, ties = _reference_resize(image, size)
    _assert_equal_except_ties(matlab_imresize(image, size), expected, ties)


def test_probability_shrink_matches_reference():
    folder = external_reference(*PROBS) / "imresize"
    probs = np.load(folder / "probs_257x513x5.npy")
    expected = np.load(folder / "probs_257x513x5_to_256x512.npy")
    resized = matlab_imresize(probs, (256, 512))
    assert resized.dtype == np.float32 and resized.shape == (256, 512, 5)
    np.testing.assert_allclose(resized, expected, rtol=1e-6, atol=1e-12)


def test_uint8_rounds_half_away_from_zero():
    # Width 2 -> 4: outputs 2, 0.75*2 + 0.25*4 = 2.5, 3.5, 4; round-half-even would give 2 at 2.5.
    resized = matlab_imresize(np.array([[2, 4]], dtype=np.uint8), (1, 4))
    np.testing.assert_array_equal(resized, [[2, 3, 4, 4]])


def test_uint8_is_rounded_after_each_pass():
    image = np.random.default_rng(3).integers(0, 256, (23, 31), dtype=np.uint8)
    size = (40, 17)
    expected, ties = _reference_resize(image, size)
    _assert_equal_except_ties(matlab_imresize(image, size), expected, ties)
    rounded_once = _reference_resize(image.astype(np.float32), size)[0]
    rounded_once = np.clip(np.floor(rounded_once.astype(np.float64) + 0.5), 0, 255).astype(np.uint8)
    assert np.count_nonzero(rounded_once != expected) > 0


def test_float32_is_stored_as_float32_after_each_pass():
    image = np.random.default_rng(4).random((19, 27, 2)).astype(np.float32)
    resized = matlab_imresize(image, (30, 11))
    assert resized.dtype == np.float32
    per_pass, _ = _reference_resize(image, (30, 11))
    np.testing.assert_array_equal(resized, per_pass)
    float64_throughout, _ = _reference_resize(image.astype(np.float64), (30, 11))
    assert np.count_nonzero(float64_throughout.astype(np.float32) != resized) > 0


def test_smaller_scale_goes_first():
    image = np.random.default_rng(8).integers(0, 256, (19, 27), dtype=np.uint8)
    size = (30, 11)  # width scale 0.41 < height scale 1.58: width first
    width_first, ties = _reference_resize(image, size, order=[1, 0])
    height_first, _ = _reference_resize(image, size, order=[0, 1])
    resized = matlab_imresize(image, size)
    _assert_equal_except_ties(resized, width_first, ties)
    assert np.count_nonzero((resized != height_first) & ~ties) > 0


def test_nearest_picks_matlab_pixels():
    row = np.array([[10, 20, 30, 40]], dtype=np.uint8)
    np.testing.assert_array_equal(matlab_imresize(row, (1, 2), method="nearest"), [[20, 40]])
    np.testing.assert_array_equal(matlab_imresize(row[:, :2], (1, 4), method="nearest"), [[10, 10, 20, 20]])
    np.testing.assert_array_equal(matlab_imresize(row, (1, 3), method="nearest"), [[10, 30, 40]])


def test_same_size_is_identity():
    image = np.random.default_rng(5).integers(0, 256, (9, 13, 3), dtype=np.uint8)
    np.testing.assert_array_equal(matlab_imresize(image, (9, 13)), image)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("shape,size", [((3, 37, 53), (16, 23)), ((2, 65, 129), (66, 128)), ((4, 30, 40), (61, 9))])
def test_torch_and_numpy_paths_agree_bit_for_bit(dtype, shape, size):
    volume = (np.random.default_rng(6).random(shape) * 255).astype(dtype)
    by_numpy = _resize_chw_numpy(volume, size, "bilinear")
    by_torch_ops = _resize_chw_torch_ops(torch.from_numpy(volume), size, "bilinear")
    np.testing.assert_array_equal(by_torch_ops.numpy(), by_numpy)
    batch = torch.from_numpy(volume)[None]
    public = matlab_imresize_torch(batch, size)
    assert public.shape == (1, shape[0], *size) and public.dtype == batch.dtype
    np.testing.assert_array_equal(public[0].numpy(), matlab_imresize(volume.transpose(1, 2, 0), size).transpose(2, 0, 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_path_matches_numpy():
    rng = np.random.default_rng(7)
    for volume, size in [((rng.random((3, 1024, 2048)) * 255).astype(np.uint8), (1025, 2049)),
                         (rng.random((19, 1025, 2049)).astype(np.float32), (1024, 2048))]:
        on_gpu = matlab_imresize_torch(torch.from_numpy(volume).cuda(), size).cpu().numpy()
        np.testing.assert_array_equal(on_gpu, _resize_chw_numpy(volume, size, "bilinear"))


def test_fast_resize_is_close():
    folder = external_reference(*PROBS, RGB[0]) / "imresize"
    probs = torch.from_numpy(np.load(folder / "probs_257x513x5.npy")).permute(2, 0, 1)
    expected = np.load(folder / "probs_257x513x5_to_256x512.npy").transpose(2, 0, 1)
    fast = fast_resize(probs, (256, 512))
    assert fast.dtype == torch.float32 and fast.shape == (5, 256, 512)
    assert np.abs(fast.numpy() - expected).max() < 1e-4
    image = torch.from_numpy(np.array(Image.open(folder / "rgb_1024x2048.png"))).permute(2, 0, 1)[None]
    fast_image = fast_resize(image, (1025, 2049))
    exact_image = matlab_imresize_torch(image, (1025, 2049))
    assert fast_image.dtype == torch.uint8
    assert (fast_image.int() - exact_image.int()).abs().max() <= 1


@pytest.mark.parametrize("call", [
    lambda: matlab_imresize(np.zeros((4, 4), np.float16), (2, 2)),
    lambda: matlab_imresize(np.zeros((1, 4, 4, 1), np.uint8), (2, 2)),
    lambda: matlab_imresize(np.zeros((4, 4), np.uint8), (0, 2)),
    lambda: matlab_imresize(np.zeros((4, 4), np.uint8), (2, 2), method="bicubic"),
    lambda: matlab_imresize_torch(torch.zeros(4, 4), (2, 2)),
])
def test_bad_input_raises_caffe_error(call):
    with pytest.raises(CaffeError):
        call()
