"""Fields our schema does not know: one error line for those that may change a forward, warnings for the documented
harmless ones, --allow-unknown-fields, and every warning gathered before a failure shown with it."""
import pytest
from click.testing import CliRunner

from caffe2torch.cli import main
from caffe2torch.conversion import convert
from caffe2torch.errors import CaffeError, UnknownFieldError
from caffe2torch.fields import (ENGINE, FILLER, INERT, INTEL_QUANTISATION, PRECISION, STORED_STATISTICS,
                                SYNOPSYS_IDENTITY, TRAINING, harmless_reason)
from caffe2torch.read import UnknownField

HEAD = 'name: "n"\ninput: "data" input_shape { dim: 1 dim: 3 dim: 6 dim: 6 }\n'


def _net(tmp_path, body: str, head: str = HEAD):
    path = tmp_path / "net.prototxt"
    path.write_text(head + body)
    return path


def _weights(tmp_path):
    """conv's trained blobs (2 x 3 x 3 x 3 and a bias), as a caffemodel."""
    from proto import caffe_pb2

    layer = caffe_pb2.LayerParameter(name="conv", type="Convolution")
    for shape in ([2, 3, 3, 3], [2]):
        blob = layer.blobs.add()
        blob.shape.dim.extend(shape)
        blob.data.extend([0.5] * (54 if len(shape) == 4 else 2))
    path = tmp_path / "w.caffemodel"
    path.write_bytes(caffe_pb2.NetParameter(layer=[layer]).SerializeToString())
    return path


def _conv(extra: str = "", layer_extra: str = "") -> str:
    return (f'layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv" {layer_extra}\n'
            f'  convolution_param {{ num_output: 2 kernel_size: 3 {extra} }} }}\n')


def _warned_reasons(path, **options) -> list[str]:
    conversion = convert(None, path, **options)
    return [warning.rsplit("ignored: ", 1)[-1] for warning in conversion.warnings]


def test_a_field_that_may_change_the_forward_stops_the_conversion_with_one_line(tmp_path):
    path = _net(tmp_path, _conv("odd_mode: 3"))
    with pytest.raises(UnknownFieldError) as failure:
        convert(None, path)
    assert str(failure.value) == (
        f"{path}:4: layer 'conv' (Convolution): field 'convolution_param.odd_mode' is unknown to our Caffe schema "
        f"and may change what the layer computes, so the converted net could differ from Caffe's: convert anyway "
        f"with allow_unknown_fields=True, or remove the field if the net computes the same without it")
    weights = str(_weights(tmp_path))
    result = CliRunner().invoke(main, ["convert", weights, "--prototxt", str(path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    # the command's own words for the option
    assert result.output.splitlines() == [f"caffe2torch: error: {failure.value}".replace(
        "allow_unknown_fields=True", "--allow-unknown-fields")]
    assert not (tmp_path / "out").exists()
    # Allowed: converted without it, with the warning.
    result = CliRunner().invoke(main, ["convert", weights, "--prototxt", str(path), "-o", str(tmp_path / "out"),
                                       "--allow-unknown-fields"])
    assert result.exit_code == 0, result.output
    assert ("caffe2torch: warning: " + f"{path}:4: layer 'conv' (Convolution): field 'convolution_param.odd_mode' is "
            "unknown to our Caffe schema and may change what the layer computes; skipped (without "
            "--allow-unknown-fields, convert stops here)") in result.output.splitlines()
    assert (tmp_path / "out" / "model.py").is_file()


def test_an_enum_value_the_schema_lacks_is_an_unknown_field(tmp_path):
    # A fork's value for a field the schema knows (here an Eltwise operation no Caffe has) parses as a skipped field.
    path = _net(tmp_path, _conv() + 'layer { name: "sum" type: "Eltwise" bottom: "conv" bottom: "conv" top: "sum"\n'
                                    '  eltwise_param { operation: HYPOT } }\n')
    with pytest.raises(UnknownFieldError, match=r"net.prototxt:6: layer 'sum' \(Eltwise\): field "
                                                r"'eltwise_param.operation' value HYPOT is unknown"):
        convert(None, path)


@pytest.mark.parametrize("extra, layer_extra, head_extra, reason", [
    ("alpha_filler { type: 'xavier' }", "", "", FILLER),  # a fork's filler
    ("", 'softmax_param { engine: MKL2017 }', "", None),  # placeholder: replaced below (softmax layer)
    ("conv_algorithm: 'winograd' cudnn_convolution_algo_seeker: GET", "", "", ENGINE),
    ("", "forward_type: FLOAT16 backward_math: FLOAT16", "default_forward_type: FLOAT16\n",
     PRECISION),
    ("", "", "global_grad_scale: 32 eltwise_mem_sharing: false random_seed: 8\n", TRAINING),
    ("", "quantization_param { bw_layer_in: 8 scale_in: 12.5 scale_params: [1.0, 2.0] }", "", INTEL_QUANTISATION),
    ("input_scale: 1 output_zero_point: 0 saturate: None quantize_method: ONNX", "", "", SYNOPSYS_IDENTITY),
])
def test_documented_harmless_fields_stay_warnings(tmp_path, extra, layer_extra, head_extra, reason):
    if reason is None:  # an engine value the schema lacks, on a layer whose engine enum has no MKL values
        path = _net(tmp_path, _conv() + 'layer { name: "prob" type: "Softmax" bottom: "conv" top: "prob"\n'
                                        '  softmax_param { engine: MKL2017 } }\n')
        reason = ENGINE
    else:
        path = _net(tmp_path, _conv(extra, layer_extra), HEAD + head_extra)
    reasons = _warned_reasons(path)
    assert reasons and set(reasons) == {reason}


def test_inert_and_data_dependent_classes(tmp_path):
    # NVCaffe's torch_pooling is declared but read nowhere: harmless when false. True meant floor rounding in
    # Facebook's Caffe, where it came from: it stops the conversion.
    pool = ('layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"\n'
            '  pooling_param { pool: MAX kernel_size: 2 torch_pooling: %s } }\n')
    assert _warned_reasons(_net(tmp_path, _conv() + pool % "false")) == [INERT]
    with pytest.raises(UnknownFieldError, match="field 'pooling_param.torch_pooling' is unknown"):
        convert(None, _net(tmp_path, _conv() + pool % "true"))
    # Intel Caffe's statistics over sub-batches: harmless on stored statistics, not on a BatchNorm of its batch.
    norm = ('layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "bn"\n'
            '  batch_norm_param { %s stats_batch_size: 1 } }\n')
    assert _warned_reasons(_net(tmp_path, _conv() + norm % "")) == [STORED_STATISTICS]
    with pytest.raises(UnknownFieldError, match="field 'batch_norm_param.stats_batch_size' is unknown"):
        convert(None, _net(tmp_path, _conv() + norm % "use_global_stats: false"))
    # synopsys-caffe's quantisation away from its identity values changes its forward: not harmless.
    with pytest.raises(UnknownFieldError, match="field 'convolution_param.output_scale' is unknown"):
        convert(None, _net(tmp_path, _conv("input_scale: 1 output_scale: 0.5")))
    # A binary's NVCaffe precision fields arrive as numbers 145-150 on a layer; elsewhere a number may be anything.
    assert harmless_reason(UnknownField("m.caffemodel", None, "conv", "#146", "Convolution")) == PRECISION
    assert harmless_reason(UnknownField("m.caffemodel", None, "conv", "convolution_param.#146", "Convolution")) is None
    assert harmless_reason(UnknownField("m.caffemodel", None, None, "#146")) is None


def test_layers_left_out_are_not_looked_at(tmp_path):
    body = _conv() + ('layer { name: "loss" type: "SoftmaxWithLoss" bottom: "conv" bottom: "label" top: "loss"\n'
                      '  loss_param { magic: 1 } include { phase: TRAIN } }\n'
                      'layer { name: "acc" type: "Accuracy" bottom: "conv" bottom: "label" top: "acc"\n'
                      '  accuracy_param { magic: 1 } }\n')
    assert convert(None, _net(tmp_path, body)).warnings == []


def test_warnings_gathered_before_a_failure_are_shown_with_it(tmp_path):
    # Allowed unknown fields, then a shape error: the fields that may explain it come first.
    body = (_conv("per_channel_magic: true") +
            'layer { name: "cat" type: "Concat" bottom: "conv" bottom: "data" top: "cat" }\n')
    path = _net(tmp_path, body)
    with pytest.raises(CaffeError) as failure:
        convert(None, path, allow_unknown_fields=True)
    assert "'cat' (Concat)" in str(failure.value)
    assert len(failure.value.warnings) == 1 and "per_channel_magic" in failure.value.warnings[0]
    weights = str(_weights(tmp_path))
    for command in (["convert", weights, "--prototxt", str(path), "-o", str(tmp_path / "out"),
                     "--allow-unknown-fields"],
                    ["inspect", str(path)]):
        result = CliRunner().invoke(main, command)
        lines = result.output.splitlines()
        assert result.exit_code == 2, result.output
        assert "per_channel_magic" in lines[0] and lines[0].startswith("caffe2torch: warning: ")
        assert lines[-1].startswith("caffe2torch: error: ") and "'cat' (Concat)" in lines[-1]
        assert sum("per_channel_magic" in line for line in lines) == 1  # shown once, not again with the error


def test_inspect_describes_anyway_and_shows_them(tmp_path):
    path = _net(tmp_path, _conv("odd_mode: 3"))
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert ("caffe2torch: warning: " + f"{path}:4: layer 'conv' (Convolution): field 'convolution_param.odd_mode' is "
            "unknown to our Caffe schema and may change what the layer computes; skipped (without "
            "--allow-unknown-fields, convert stops here)") in result.output.splitlines()
    assert "1 layers" in result.output


def test_every_converting_command_applies_the_rule(tmp_path):
    path = _net(tmp_path, _conv("odd_mode: 3"))
    weights = str(_weights(tmp_path))
    commands = {
        "fold-bn": ["fold-bn", weights, "--prototxt", str(path), "-o", str(tmp_path / "folded")],
        "export": ["export", weights, "--prototxt", str(path), "--format", "safetensors", "-o",
                   str(tmp_path / "net.safetensors")],
    }
    for name, command in commands.items():
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 2 and "field 'convolution_param.odd_mode'" in result.output, (name, result.output)
        result = CliRunner().invoke(main, [*command, "--allow-unknown-fields"])
        assert "field 'convolution_param.odd_mode'" in result.output, (name, result.output)
        assert "caffe2torch: error" not in result.output or "safetensors" in result.output, (name, result.output)
    # The API: an error, or Python warnings when allowed.
    import caffe2torch

    with pytest.raises(UnknownFieldError):
        caffe2torch.convert(None, path)
    with pytest.warns(UserWarning, match="odd_mode"):
        caffe2torch.convert(None, path, allow_unknown_fields=True)


def test_icnet_eval_says_how_to_convert_anyway(tmp_path):
    from icnet_eval.model import load_model

    path = _net(tmp_path, _conv("odd_mode: 3"))
    weights = tmp_path / "w.caffemodel"
    from proto import caffe_pb2

    layer = caffe_pb2.LayerParameter(name="conv", type="Convolution")
    layer.blobs.add().shape.dim.extend([2, 3, 3, 3])
    layer.blobs[0].data.extend([0.0] * 54)
    layer.blobs.add().shape.dim.extend([2])
    layer.blobs[1].data.extend([0.0, 0.0])
    weights.write_bytes(caffe_pb2.NetParameter(layer=[layer]).SerializeToString())
    with pytest.raises(UnknownFieldError, match=r"odd_mode.*: convert it with `caffe2torch convert "
                                                r"--allow-unknown-fields` and give the folder as --weights"):
        load_model(weights, path)
