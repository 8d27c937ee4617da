"""One converted net runs at any size Caffe's Reshape() accepts: a net converted at one size and run at another equals
the net converted at that other size (bit for bit, the same weights), for every layer whose sizes or tables depend on
its input; a size Caffe refuses is refused with one line naming the layer."""

from __future__ import annotations

import pytest
import torch

from caffe2torch.conversion import convert
from caffe2torch.errors import CaffeError, InputSizeError
from caffe2torch.model import net_info

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(text: str, sizes: dict[str, tuple[int, ...]]) -> str:
    return "".join(f'input: "{name}" input_shape {{ {" ".join(f"dim: {d}" for d in shape)} }}\n'
                   for name, shape in sizes.items()) + text


def _layer(name: str, kind: str, bottoms, tops, body: str = "") -> str:
    bottoms = [bottoms] if isinstance(bottoms, str) else bottoms
    tops = [tops] if isinstance(tops, str) else tops
    return (f'layer {{ name: "{name}" type: "{kind}" ' + "".join(f'bottom: "{b}" ' for b in bottoms) +
            "".join(f'top: "{t}" ' for t in tops) + body + " }\n")


def _image(n=1, c=3):
    return lambda h, w: {"data": (n, c, h, w)}


def _pool(name, bottom, body):
    return _layer(name, "Pooling", bottom, name, f"pooling_param {{ {body} }}")


CONV = _layer("conv", "Convolution", "data", "conv", "convolution_param { num_output: 4 kernel_size: 3 pad: 1 }")
CASES = {
    "max_pool_ceil_clip": (CONV + _pool("p", "conv", "pool: MAX kernel_size: 3 stride: 2 pad: 1"), _image()),
    "ave_pool_divisors": (CONV + _pool("p", "conv", "pool: AVE kernel_size: 3 stride: 2 pad: 1"), _image()),
    "ave_exc_pad": (CONV + _pool("p", "conv", "pool: AVE_EXC_PAD kernel_size: 3 stride: 2 pad: 1"), _image()),
    "global_pool": (CONV + _pool("p", "conv", "pool: AVE global_pooling: true"), _image()),
    "floor_pool": (CONV + _pool("p", "conv", "pool: MAX kernel_size: 2 stride: 2 round_mode: FLOOR"), _image()),
    "same_pool": (CONV + _pool("p", "conv", "pool: MAX kernel_size: 3 stride: 2 pad_type: 1"), _image()),
    "side_pads": (CONV + _pool("p", "conv", "pool: AVE kernel_size: 3 stride: 2 pad_t: 1 pad_l: 0 pad_b: 2 pad_r: 1"),
                  _image()),
    "same_conv": (_layer("c", "Convolution", "data", "c", "convolution_param { num_output: 2 kernel_size: 3 stride: 2 "
                         "pad_type: 1 }"), _image()),
    "deconv": (_layer("d", "Deconvolution", "data", "d", "convolution_param { num_output: 2 kernel_size: 4 stride: 2 "
                      "pad: 1 }"), _image()),
    "segnet_unpool": (_layer("p", "Pooling", "data", ["p", "mask"], "pooling_param { pool: MAX kernel_size: 2 "
                             "stride: 2 }") +
                      _layer("u", "Upsample", ["p", "mask"], "u", "upsample_param { scale: 2 }"), _image(1, 2)),
    "interp_zoom": (_layer("i", "Interp", "data", "i", "interp_param { zoom_factor: 3 }"), _image()),
    "interp_shrink_crop": (_layer("i", "Interp", "data", "i", "interp_param { shrink_factor: 2 pad_beg: -1 "
                                  "pad_end: -1 }"), _image()),
    "interp_both": (_layer("i", "Interp", "data", "i", "interp_param { shrink_factor: 2 zoom_factor: 3 }"), _image()),
    "interp_fixed": (_layer("i", "Interp", "data", "i", "interp_param { height: 7 width: 11 }"), _image()),
    "spp": (_layer("s", "SPP", "data", "s", "spp_param { pyramid_height: 3 pool: MAX }"), _image()),
    "lrn_within": (_layer("l", "LRN", "data", "l", "lrn_param { local_size: 3 norm_region: WITHIN_CHANNEL }"),
                   _image()),
    "crop_to_reference": (CONV + _pool("p", "conv", "pool: MAX kernel_size: 2 stride: 2") +
                          _layer("d", "Deconvolution", "p", "d", "convolution_param { num_output: 4 kernel_size: 4 "
                                 "stride: 2 }") +
                          _layer("c", "Crop", ["d", "conv"], "c", "crop_param { axis: 2 offset: 1 }"), _image()),
    "reshape_flatten_slice_argmax": (
        _layer("r", "Reshape", "data", "r", "reshape_param { shape { dim: 0 dim: 0 dim: -1 } }") +
        _layer("f", "Flatten", "data", "f") +
        _layer("s", "Slice", "data", ["s1", "s2", "s3"], "slice_param { axis: 1 }") +
        _layer("a", "ArgMax", "data", "a", "argmax_param { top_k: 2 out_max_val: true }"), _image()),
    "resize_bilinear_scale": (_layer("r", "ResizeBilinear", "data", "r", 'resize_bilinear_param { scale_height: 1.5 '
                                     'scale_width: 0.5 data_format: "NCHW" align_corners: true }'), _image()),
    "resize_bilinear_fixed": (_layer("r", "ResizeBilinear", "data", "r", 'resize_bilinear_param { output_height: 9 '
                                     'output_width: 4 data_format: "NCHW" half_pixel_centers: true }'), _image()),
    "prior_box_from_image": (
        _layer("f", "Pooling", "data", "f", "pooling_param { pool: AVE kernel_size: 4 stride: 4 }") +
        _layer("p", "PriorBox", ["f", "data"], "p", "prior_box_param { min_size: 6 max_size: 12 aspect_ratio: 2 "
               "flip: true clip: true variance: 0.1 variance: 0.2 variance: 0.2 variance: 0.1 }"), _image()),
    "prior_box_given_image_and_step": (
        _layer("p", "PriorBox", "data", "p", "prior_box_param { min_size: 6 img_size: 300 step: 8 offset: 0.25 "
               "variance: 0.1 }"), _image()),
    "ssd_head": (
        _layer("f", "Pooling", "data", "f", "pooling_param { pool: AVE kernel_size: 4 stride: 4 }") +
        _layer("loc", "Convolution", "f", "loc", "convolution_param { num_output: 8 kernel_size: 1 }") +
        _layer("lp", "Permute", "loc", "lp", "permute_param { order: 0 order: 2 order: 3 order: 1 }") +
        _layer("lf", "Flatten", "lp", "lf") +
        _layer("conf", "Convolution", "f", "conf", "convolution_param { num_output: 6 kernel_size: 1 }") +
        _layer("cp", "Permute", "conf", "cp", "permute_param { order: 0 order: 2 order: 3 order: 1 }") +
        _layer("cf", "Flatten", "cp", "cf") +
        _layer("pr", "PriorBox", ["f", "data"], "pr", "prior_box_param { min_size: 8 aspect_ratio: 2 flip: false "
               "variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 }") +
        _layer("det", "DetectionOutput", ["lf", "cf", "pr"], "det", "detection_output_param { num_classes: 3 "
               "nms_param { nms_threshold: 0.45 } confidence_threshold: 0.01 }"), _image()),
    "mvn_reduction": (_layer("m", "MVN", "data", "m", "mvn_param { normalize_variance: true }") +
                      _layer("a", "MVN", "data", "a", "mvn_param { across_channels: true normalize_variance: false }") +
                      _layer("r", "Reduction", "data", "r", "reduction_param { operation: MEAN axis: 1 coeff: 3 }"),
                      _image()),
    "im2col": (_layer("i", "Im2col", "data", "i", "convolution_param { kernel_size: 3 stride: 2 pad: 1 }"), _image()),
    "reorg_shuffle_normalize": (
        _layer("r", "Reorg", "data", "r", "reorg_param { stride: 2 }") +
        _layer("s", "ShuffleChannel", "r", "s", "shuffle_channel_param { group: 2 }") +
        _layer("n", "Normalize", "s", "n", "norm_param { across_spatial: false channel_shared: false }"),
        lambda h, w: {"data": (1, 4, 2 * (h // 2), 2 * (w // 2))}),
}
# (H, W) of the size converted for, then of the sizes it is run at (each a size Caffe accepts for these nets)
SIZES = [(24, 32), (29, 21), (40, 64)]


def _net(text: str, shapes: dict, folder) -> torch.nn.Module:
    path = folder / f"net{len(list(folder.iterdir()))}.prototxt"
    path.write_text(_inputs(text, shapes))
    return convert(None, path, on_warning=lambda _: None).net


def _randomise(net: torch.nn.Module, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def _inputs_for(shapes: dict, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for shape in shapes.values()]


def _same(a, b) -> None:
    a, b = (x if isinstance(x, tuple) else (x,) for x in (a, b))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape
        assert torch.equal(torch.nan_to_num(x, nan=7.25), torch.nan_to_num(y, nan=7.25))
        assert torch.equal(x.isnan(), y.isnan())


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_net_converted_at_one_size_runs_as_the_net_converted_at_another(case, tmp_path):
    text, shapes_at = CASES[case]
    first = _net(text, shapes_at(*SIZES[0]), tmp_path)
    _randomise(first)
    for index, size in enumerate(SIZES[1:], start=1):
        shapes = shapes_at(*size)
        there = _net(text, shapes, tmp_path)
        there.load_state_dict(first.state_dict())
        x = _inputs_for(shapes, seed=index)
        with torch.no_grad():
            _same(first(*x), there(*x))
            _same(first(*x), first(*x))  # the second call takes the cached tables: the same bits


def test_tables_are_built_once_per_size_and_kept_for_the_sizes_used(tmp_path):
    from caffe2torch.modules import TableCache

    text, shapes_at = CASES["interp_zoom"]
    net = _net(CONV + _pool("p", "conv", "pool: AVE kernel_size: 3 stride: 2 pad: 1") + text.replace('"data"', '"p"'),
               shapes_at(20, 20), tmp_path)
    TableCache.clear()
    with torch.no_grad():
        for size in ((20, 20), (31, 17), (20, 20), (31, 17)):
            net(torch.zeros(1, 3, *size))
        assert len(TableCache.tables) == 4  # (pooling divisors + Interp tables) x 2 sizes
        built = {key: id(value) for key, value in TableCache.tables.items()}
        net(torch.zeros(1, 3, 20, 20))
    assert {key: id(value) for key, value in TableCache.tables.items()} == built  # reused, not rebuilt
    keys = [key for key in TableCache.tables if key[0] == "interp"]
    assert {key[1] for key in keys} == {(11, 11), (16, 9)} and all(key[4] == torch.float32 for key in keys)


def test_tables_follow_the_dtype_and_train_after_inference_mode(tmp_path):
    text, shapes_at = CASES["ave_pool_divisors"]
    net = _net(text, shapes_at(24, 32), tmp_path)
    _randomise(net)
    x = torch.randn(2, 3, 19, 23)
    with torch.inference_mode():
        expected = net(x)
    net.train()
    loss = net(x).square().mean()
    loss.backward()  # tables built under inference_mode are ordinary tensors: autograd may save them
    assert all(p.grad is not None for p in net.parameters())
    half = net.eval().to(torch.bfloat16)(x.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16 and torch.allclose(half.float(), expected, rtol=0.05, atol=0.05)


def test_sizes_a_definition_cannot_take_name_the_layer_in_one_line(tmp_path):
    fixed = _layer("i", "Interp", "data", "i", "interp_param { height: 5 width: 5 }")
    text = fixed + _layer("e", "Eltwise", ["i", "data"], "e")
    net = _net(text, {"data": (1, 2, 5, 5)}, tmp_path)
    with pytest.raises(InputSizeError, match=r"^layer 'e' \(Eltwise\) cannot take bottoms 'i' 1x2x5x5, 'data' 1x2x6x5 "
                                             r"\(the net was converted for 1x2x5x5, 1x2x5x5"):
        net(torch.zeros(1, 2, 6, 5))
    with pytest.raises(CaffeError):  # Caffe refuses that size too: the conversion says so
        _net(text, {"data": (1, 2, 6, 5)}, tmp_path)
    inner = _net(CONV + _layer("ip", "InnerProduct", "conv", "ip", "inner_product_param { num_output: 3 }"),
                 {"data": (1, 3, 8, 8)}, tmp_path)
    with pytest.raises(InputSizeError, match=r"layer 'ip' \(InnerProduct\) cannot take bottoms 'conv' 2x4x9x8 "
                                             r"\(the net was converted for 1x4x8x8"):
        inner(torch.zeros(2, 3, 9, 8))
    assert inner(torch.zeros(5, 3, 8, 8)).shape == (5, 3)  # the batch stays free
    assert net_info(inner).inputs["data"] == (1, 3, 8, 8)


def test_verify_and_the_standalone_model_take_other_sizes(units_dir, tmp_path):
    """A folder converted at one size is verified against a reference recorded at another; its standalone model.py
    (whose embedded modules compute their sizes at run time) gives the net's outputs at any size."""
    from click.testing import CliRunner

    from caffe2torch.cli import main
    from caffe2torch.folder import save_net
    from tests.conftest import load_standalone
    folder = tmp_path / "converted"
    result = CliRunner().invoke(main, ["convert", str(units_dir / "unit_pool_ave.caffemodel"), "--prototxt",
                                       str(units_dir / "unit_pool_ave.prototxt"), "--input-shape", "1,2,20,24",
                                       "-o", str(folder)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["verify", str(folder), "--reference", str(units_dir / "unit_pool_ave.ref.h5")])
    assert result.exit_code == 0, result.output
    assert "6/6 layers within tolerance" in result.output
    text, shapes_at = CASES["ssd_head"]
    net = _net(text.replace('"det"', '"detx"').split('layer { name: "det"')[0], shapes_at(24, 32), tmp_path)
    _randomise(net)
    save_net(net, tmp_path / "saved")
    standalone = load_standalone(tmp_path / "saved")
    for size in ((24, 32), (40, 20)):
        x = _inputs_for(shapes_at(*size), seed=size[0])
        with torch.no_grad():
            _same(standalone(*x), net(*x))


def test_the_pooling_tables_of_two_roundings_never_mix(tmp_path):
    """ceil and floor pooling of one kernel, stride and input share every key but the output size: each keeps its
    own divisors, whichever ran first."""
    from caffe2torch.modules import TableCache

    for order in ((0, 1), (1, 0)):
        TableCache.clear()
        nets = [_net(_pool("p", "data", f"pool: AVE kernel_size: 2 stride: 2 round_mode: {mode}"),
                     {"data": (1, 1, 5, 5)}, tmp_path) for mode in ("CEIL", "FLOOR")]
        x = torch.arange(25.0).reshape(1, 1, 5, 5)
        with torch.no_grad():
            outs = {index: nets[index](x) for index in order}
        assert outs[0].shape == (1, 1, 3, 3) and outs[1].shape == (1, 1, 2, 2)
        assert outs[0][0, 0, 0, 2] == (4 + 9) / 2 and torch.equal(outs[1], outs[0][:, :, :2, :2])


def test_errors_at_the_converted_size_are_not_blamed_on_sizes(tmp_path):
    net = _net(CONV, {"data": (1, 3, 8, 8)}, tmp_path)
    with pytest.raises(RuntimeError) as raised:
        net(torch.zeros(1, 3, 8, 8, dtype=torch.float64))  # a dtype mismatch: torch's own message stands
    assert not isinstance(raised.value, InputSizeError)


def test_run_time_checks_of_sizes_caffe_refuses(tmp_path):
    spp = _net(CASES["spp"][0], {"data": (1, 3, 24, 32)}, tmp_path)
    with pytest.raises(InputSizeError, match=r"layer 's' \(SPP\) cannot take bottoms 'data' 1x3x3x3 .*Caffe refuses"):
        spp(torch.zeros(1, 3, 3, 3))
    resize = _net(CASES["resize_bilinear_scale"][0], {"data": (1, 3, 24, 32)}, tmp_path)
    with pytest.raises(InputSizeError, match="leaves no output"):
        resize(torch.zeros(1, 3, 1, 1))


def test_dynamic_exports_keep_caffes_rules_at_every_size(tmp_path):
    """A pt2 file with symbolic height and width runs each pooling (the clip where the far side's padding is the
    larger, empty windows, global) as the net at sizes it was never checked at; SAME padding, whose remainders
    torch.export's solver cannot keep symbolic, says so."""
    from caffe2torch.dynamic import dynamic_shapes, example_shapes, size_ranges

    same = _net(_pool("q", "data", "pool: AVE kernel_size: 3 stride: 2 pad_type: 1"), {"data": (1, 3, 11, 11)},
                tmp_path)
    with pytest.raises(CaffeError, match=r"layer 'q' \(Pooling\): TensorFlow's SAME padding .* keeps the height"):
        dynamic_shapes(same)
    text = (_pool("p", "data", "pool: MAX kernel_size: 2 stride: 2 pad_t: 0 pad_l: 0 pad_b: 1 pad_r: 1") +
            _pool("q", "data", "pool: AVE kernel_size: 2 stride: 3") + _pool("g", "data", "pool: MAX global_pooling: "
                                                                                "true"))
    net = _net(text, {"data": (1, 3, 11, 11)}, tmp_path)
    _randomise(net)
    example = _inputs_for(example_shapes(net, size_ranges(net)), seed=0)
    program = torch.export.export(net, tuple(example), dynamic_shapes=dynamic_shapes(net)).module()
    for size in ((12, 12), (16, 10), (9, 23)):
        x = _inputs_for({"data": (2, 3, *size)}, seed=size[0])
        with torch.no_grad():
            for ours, theirs in zip(program(*x), net(*x)):
                assert ours.shape == theirs.shape
                torch.testing.assert_close(ours, theirs, equal_nan=True)  # empty windows: 0 / 0 as in Caffe
